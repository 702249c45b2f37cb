//! Mode [`PublishMode::Fast`]: fast-ingest batch publishing (ADR-50, nats-server 2.14+, stream
//! `allow_batched`), in **lanes** that keep each key's publish order through faults.
//!
//! # Lanes
//!
//! Every stream has [`LANES`] lanes ([`FAST_MAX_IN_FLIGHT`](super::FAST_MAX_IN_FLIGHT)). A
//! message with a key goes to its key's lane (a hash of the key), in publish order. A lane has
//! at most one fast batch in flight: while it waits for that batch's commit, the lane's next
//! messages queue behind it, and go out together as the lane's next batch once it ends. With
//! `gap=fail` the server stores a prefix of every batch and nothing after a gap, so when a
//! batch ends short (a gap, a refusal, a leader lost, no ack at all), its unstored tail is put
//! back at the head of the lane's queue and sent first in the next batch: a later message of
//! the key is never stored ahead of an earlier one. Messages that may already be stored (no ack
//! came) are sent again alone, with their ids, which the stream de-duplicates. A fault on one
//! lane holds only that lane's keys; the others go on. Under load the queues coalesce, so
//! batches grow with the rate.
//!
//! Messages without a key take whichever lane is idle, one engine batch's worth at a time and
//! in publish order ([`Fast::place_keyless`]): stored in publish order while nothing fails,
//! with as many batches in flight as there are lanes (one lane alone would wait a round trip
//! between batches, about a quarter of the throughput of a saturated server), but with no
//! order through faults.
//!
//! # Wire format
//!
//! No headers: the server reads the batch from the **reply subject** of every message,
//! `<prefix>.<batch id>.<flow>.<gap mode>.<batch seq>.<op>.$FI` (prefix `<inbox>.<n>.f<lane>`
//! for the sink's `n`-th lane batch, gap mode `fail`), with op `0` (start, seq 1), `1` (append),
//! `3` (commit at end of batch: an empty message that is not stored). Messages are stored as
//! they arrive (a fast batch is not atomic); the server replies on the same subjects:
//!
//! - `{"type":"ack","seq":N,"msgs":M}`: flow control, messages 1..=N were persisted;
//! - `{"type":"gap",...}` / `{"type":"err","seq":N,"error":{...}}`: a gap, or message N refused;
//! - a pub ack with `"batch"` and `"count":C` once the batch is committed: with gap mode
//!   `fail` (ours) exactly messages 1..=C are stored (or were already, as duplicates of their
//!   ids), and every later one was dropped;
//! - a plain error pub ack when a message is refused before it reaches the batch (stream does
//!   not allow batches, too many batches in flight, message too large, ...). When that happens
//!   to message 1 the batch never starts and nothing of it is stored.
//!
//! We end every batch with the `eob` commit rather than committing on the last data message, so
//! a refusal of the last message still ends in a pub ack whose count says what is stored.
//!
//! A message sent alone (one that may already be stored) is a plain publish with
//! `Nats-Msg-Id`, its pub ack on `<inbox>.<n>.s<lane>`.
//! Streams without `allow_batched` are published in async mode instead (logged once, counted in
//! `eventbus_nats_mode_fallback_total`), without the lanes' order guarantee.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{Ack, Bytes, Error, ErrorKind, Message, Outcome, Position};

use super::reply::{ApiError, DUPLICATE_IN_PROCESS, Reply, Router, api_error, parse_reply};
use super::writer::{Group, Writer, no_stream, not_queued};
use super::{FAST_MAX_IN_FLIGHT, Protocol, PublishMode, count_fallback};
use crate::error::err;
use crate::headers;
use crate::retry::{RETRIES, backoff};

/// Lanes per stream: at most this many fast batches of one sink in flight on a stream.
const LANES: u32 = FAST_MAX_IN_FLIGHT as u32;

/// What the writer keeps for fast batches.
pub(super) struct Fast {
    /// Unique per sink; batch ids are `<prefix><n>`.
    batch_prefix: String,
    /// Stream -> what fast batches need to know of it.
    batched: HashMap<String, StreamFacts>,
    /// Stream -> its lanes.
    lanes: HashMap<String, Vec<Lane>>,
    /// Stream -> its messages without a key, one run per engine batch, in order, waiting for
    /// an idle lane.
    keyless: HashMap<String, VecDeque<Vec<Entry>>>,
    /// Lane batches sent so far (names the next one).
    sent: u64,
}

impl Fast {
    pub(super) fn new(batch_prefix: String) -> Self {
        Fast {
            batch_prefix,
            batched: HashMap::new(),
            lanes: HashMap::new(),
            keyless: HashMap::new(),
            sent: 0,
        }
    }
}

/// One lane of a stream, on the writer's side.
#[derive(Default)]
struct Lane {
    /// A batch of this lane is in flight (or waits out a backoff before it is sent again).
    busy: bool,
    /// Messages waiting for the lane, in publish order.
    queue: VecDeque<Entry>,
    /// Transient refusals in a row (no leader, too many batches in flight): the backoff.
    tries: u8,
    /// Silences in a row: the next batch's silence is the sink's doubled this many times.
    silences: u8,
}

/// Messages a lane holds before it drops the oldest ones the engine stopped waiting for (a
/// broker stalled longer than the engine's `ack_timeout`): the engine's ACK window bounds the
/// others.
const LANE_QUEUE_CAP: usize = 4_096;

impl Lane {
    /// Drop the oldest messages the engine no longer waits for while the queue is over
    /// [`LANE_QUEUE_CAP`] (their callers were told `Unknown`).
    fn trim(&mut self, router: &OutcomeRouter) {
        while self.queue.len() > LANE_QUEUE_CAP
            && self.queue.front().is_some_and(|e| !router.is_pending(e.b))
        {
            self.queue.pop_front();
        }
    }
}

impl Lane {
    /// Take out of the queue messages to a subject the server refused this connection: it
    /// drops them without an answer, so they would hold the lane forever. They fail with
    /// [`ErrorKind::Auth`]. Nothing else is given up while the sink lives: a message dropped
    /// from its lane and then published again by its caller (after an `Unknown`) would be
    /// stored behind later messages of its key. A stream that is gone fails its lanes' messages
    /// after the first few retries (see [`Fast::resume`]).
    fn drop_hopeless(&mut self, w: &Writer<FastBatch>) {
        if !self.queue.iter().any(|e| e.attempts > 0) {
            return;
        }
        let mut hopeless = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for e in self.queue.drain(..) {
            if e.attempts > 0 && w.denied.contains(e.msg.topic().as_str()) {
                hopeless.push(e);
            } else {
                kept.push_back(e);
            }
        }
        self.queue = kept;
        for e in hopeless {
            e.settle(&w.router, Outcome::Failed(super::writer::denied()));
        }
    }
}

/// Track lane batch `n` of lane `l` of `stream` until its replies (or its silence) end it.
fn track(
    w: &Writer<FastBatch>,
    (n, l): (u64, u32),
    stream: &str,
    entries: Vec<Entry>,
    (tries, silences): (u8, u8),
) {
    w.groups.lock().insert(
        (n, l),
        Group {
            // A lane batch names its (engine batch, slot) pairs in its entries.
            indices: Vec::new(),
            state: FastBatch {
                fast: FastState::default(),
                entries,
                heard: Instant::now(),
                stream: stream.to_owned(),
                lane: l,
                tries,
                silences,
            },
        },
    );
}

/// Drop the oldest messages without a key that the engine no longer waits for while more than
/// [`LANE_QUEUE_CAP`] wait for a lane (all lanes held by a stalled broker).
fn trim_runs(runs: &mut VecDeque<Vec<Entry>>, router: &OutcomeRouter) {
    let mut waiting: usize = runs.iter().map(Vec::len).sum();
    while waiting > LANE_QUEUE_CAP
        && let Some(front) = runs.front_mut()
    {
        let before = front.len();
        front.retain(|e| router.is_pending(e.b));
        waiting -= before - front.len();
        if !front.is_empty() {
            return;
        }
        runs.pop_front();
    }
}

/// A message in a lane: slot `i` of engine batch `b`.
pub(super) struct Entry {
    b: u64,
    i: usize,
    msg: Message,
    /// Sent before without an answer: an earlier attempt may be stored, so it is never
    /// reported `Failed`.
    maybe_stored: bool,
    /// Times it was put back at the head of its lane.
    attempts: u8,
}

impl Entry {
    /// Settle this message with `o`, never `Failed` when an earlier attempt may be stored.
    fn settle(self, router: &OutcomeRouter, o: Outcome) {
        let (b, i, o) = self.settlement(o);
        router.settle(b, i, o);
    }

    /// What settling this message with `o` hands the router, for
    /// [`OutcomeRouter::settle_all`]: never `Failed` when an earlier attempt may be stored.
    fn settlement(self, o: Outcome) -> (u64, usize, Outcome) {
        let o = match o {
            Outcome::Failed(e) if self.maybe_stored => Outcome::Unknown(
                err(
                    e.kind(),
                    "sent again after no ack came; an earlier attempt may be stored",
                )
                .with_source(e),
            ),
            o => o,
        };
        (self.b, self.i, o)
    }
}

/// A lane's batch has ended: what the reply task hands back to the writer, which frees the
/// lane and sends its next batch, `again` first.
pub(super) struct LaneDone {
    stream: String,
    lane: u32,
    /// Messages of the batch not stored, in order: the head of the lane's next batch.
    again: Vec<Entry>,
    tries: u8,
    silences: u8,
    /// The stream refused fast batches (`allow_batched` turned off): publish the lane's
    /// messages one by one from now on.
    fallback: bool,
}

impl LaneDone {
    /// Messages it hands back to be sent again.
    pub(super) fn resending(&self) -> usize {
        self.again.len()
    }

    /// The writer is gone: settle what was to be sent again.
    pub(super) fn stopped(self, router: &OutcomeRouter) {
        for e in self.again {
            e.settle(router, super::writer::stopped());
        }
    }
}

/// One lane batch in flight.
pub(super) struct FastBatch {
    /// Refusals and per-message acks seen so far.
    fast: FastState,
    /// The messages, in batch order, kept until the batch ends so that the ones not stored
    /// can be sent again (payloads are shared, not copied).
    entries: Vec<Entry>,
    /// When the batch was sent or last heard of (any flow ack or refusal).
    heard: Instant,
    stream: String,
    lane: u32,
    /// The lane's [`Lane::tries`] and [`Lane::silences`] when it was sent.
    tries: u8,
    silences: u8,
}

/// What the fast path caches per stream.
#[derive(Clone, Copy)]
struct StreamFacts {
    /// `allow_batched`.
    fast: bool,
    /// The stream's own `max_msg_size`, if set: a message over it would be refused by the
    /// server mid-batch and end the batch there, so it is refused before sending instead.
    max_msg_size: Option<usize>,
}

/// Bytes of a message as the server measures it against `max_msg_size`: headers (as encoded
/// on the wire) plus payload.
fn wire_len(hdrs: &async_nats::HeaderMap, payload: &Bytes) -> usize {
    let mut n = payload.len();
    let mut any = false;
    for (name, values) in hdrs.iter() {
        let name: &str = name.as_ref();
        for v in values {
            any = true;
            n += name.len() + v.as_str().len() + 4;
        }
    }
    if any { n + 12 } else { n }
}

/// The lane of a key.
fn lane_of(key: &Bytes) -> u32 {
    // SipHash with fixed keys: the same key takes the same lane for the sink's life.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % u64::from(LANES)) as u32
}

impl Fast {
    /// Whether `stream` accepts fast batches (`allow_batched`), and its message size limit,
    /// cached per stream. A failed lookup answers "no fast batches" for this batch and is asked
    /// again next time.
    async fn stream_facts(
        &mut self,
        js: &async_nats::jetstream::Context,
        stream: &str,
    ) -> StreamFacts {
        if let Some(&f) = self.batched.get(stream) {
            return f;
        }
        let Ok(s) = js.get_stream(stream).await else {
            return StreamFacts {
                fast: false,
                max_msg_size: None,
            };
        };
        let config = &s.cached_info().config;
        let facts = StreamFacts {
            fast: config.allow_batch_publish,
            max_msg_size: usize::try_from(config.max_message_size)
                .ok()
                .filter(|&n| n > 0),
        };
        if !facts.fast {
            tracing::info!(
                stream,
                "stream does not allow fast batches (allow_batched); publishing to it in async mode"
            );
            count_fallback(PublishMode::Fast, "stream");
        }
        self.batched.insert(stream.to_owned(), facts);
        facts
    }

    /// The lanes of `stream`.
    fn lanes_of(&mut self, stream: &str) -> &mut Vec<Lane> {
        if !self.lanes.contains_key(stream) {
            let lanes = (0..LANES).map(|_| Lane::default()).collect();
            self.lanes.insert(stream.to_owned(), lanes);
        }
        self.lanes.get_mut(stream).expect("inserted")
    }

    /// Send lane `l` of `stream` its next batch: every message queued on it, in order. The
    /// lane stays busy until the batch ends.
    ///
    /// Messages whose engine batch stopped waiting (its deadline passed: the caller was told
    /// `Unknown`) are still sent, in their place: a caller that publishes such a message again
    /// (same id) then gets the duplicate dropped, instead of the message stored behind later
    /// ones of its key. [`LANE_QUEUE_CAP`] bounds how many of them a lane holds.
    ///
    /// A message that may already be stored goes alone, with its own pub ack, and the lane
    /// waits for that ack: inside a fast batch, a clustered stream skips a message whose id is
    /// still being replicated (an earlier attempt in flight) and counts it in the commit as if
    /// stored, so the commit would ack a message whose first attempt may yet be lost with a
    /// stream leader. Alone, it is answered "stored", "duplicate" or "in process" (then asked
    /// again after a backoff).
    async fn send_lane(&mut self, w: &mut Writer<FastBatch>, stream: &str, l: u32) {
        let lane = &mut self.lanes_of(stream)[l as usize];
        lane.drop_hopeless(w);
        let single = lane.queue.front().is_some_and(|e| e.maybe_stored);
        let take = if single {
            1
        } else {
            lane.queue
                .iter()
                .position(|e| e.maybe_stored)
                .unwrap_or(lane.queue.len())
        };
        let entries: Vec<Entry> = lane.queue.drain(..take).collect();
        lane.busy = !entries.is_empty();
        if entries.is_empty() {
            return;
        }
        let (tries, silences) = (lane.tries, lane.silences);
        self.sent += 1;
        let n = self.sent;
        if single {
            self.send_single(w, stream, l, n, entries, (tries, silences))
                .await;
            return;
        }
        let prefix = format!("{}.{n}.f{l}", w.inbox);
        let id = format!("{}{n}", self.batch_prefix);
        let encoded: Vec<_> = entries
            .iter()
            .map(|e| headers::encode_ref(&e.msg, w.dedup))
            .collect();
        // Last subject: the commit goes to a subject of the stream.
        let last_subject = entries[entries.len() - 1].msg.topic().as_str().to_owned();
        track(w, (n, l), stream, entries, (tries, silences));
        let (sent, failure) = publish_batch(w, &prefix, &id, encoded, last_subject).await;
        let mut groups = w.groups.lock();
        if let Some(e) = failure {
            // The client is closed. A fast batch is stored as it arrives: what was handed over
            // may be stored.
            let Some(g) = groups.remove(&(n, l)) else {
                return;
            };
            drop(groups);
            let unsent = not_queued(e);
            let maybe = Outcome::Unknown(err(
                ErrorKind::Connect,
                "connection lost during a fast batch; the message may be stored",
            ));
            for (j, e) in g.state.entries.into_iter().enumerate() {
                let o = if (j as u64) < sent {
                    maybe.clone()
                } else {
                    unsent.clone()
                };
                e.settle(&w.router, o);
            }
            self.lanes_of(stream)[l as usize].busy = false;
        } else if let Some(g) = groups.get_mut(&(n, l)) {
            // Handed over in full: its silence counts from now.
            g.state.heard = Instant::now();
        }
    }

    /// Hand `stream`'s waiting runs of messages without a key, oldest first, to lanes with no
    /// batch in flight, each sent at once (a lane whose batch ends takes every waiting run, see
    /// [`Fast::resume`]). Runs go out in publish order, so without
    /// faults they are stored in order; they share no lane, so a batch that ends short is sent
    /// again after later runs were stored (messages without a key have no order through
    /// faults: give them a key for that).
    async fn place_keyless(&mut self, w: &mut Writer<FastBatch>, stream: &str) {
        loop {
            if self.keyless.get(stream).is_none_or(VecDeque::is_empty) {
                return;
            }
            let Some(l) = self.lanes_of(stream).iter().position(|lane| !lane.busy) else {
                return;
            };
            let run = self
                .keyless
                .get_mut(stream)
                .and_then(VecDeque::pop_front)
                .unwrap_or_default();
            self.lanes_of(stream)[l].queue.extend(run);
            self.send_lane(w, stream, l as u32).await;
        }
    }

    /// Send lane batch `n` of lane `l`: one message that may already be stored, alone, with its
    /// pub ack on `<inbox>.<n>.s<l>` (see [`Fast::send_lane`]).
    async fn send_single(
        &mut self,
        w: &mut Writer<FastBatch>,
        stream: &str,
        l: u32,
        n: u64,
        entries: Vec<Entry>,
        (tries, silences): (u8, u8),
    ) {
        let (subject, payload, hdrs) = headers::encode_ref(&entries[0].msg, w.dedup);
        let reply = format!("{}.{n}.s{l}", w.inbox);
        track(w, (n, l), stream, entries, (tries, silences));
        if let Err(e) = w
            .client
            .publish_with_reply_and_headers(subject, reply, hdrs, payload)
            .await
        {
            // Unless the resend task already took the message back (a reconnect): then its
            // lane is freed by that.
            let Some(g) = w.groups.lock().remove(&(n, l)) else {
                return;
            };
            let failed = not_queued(e);
            for entry in g.state.entries {
                entry.settle(&w.router, failed.clone());
            }
            self.lanes_of(stream)[l as usize].busy = false;
        }
    }

    /// Publish `entries` one by one with their own pub acks, as async mode does (no order
    /// across faults).
    async fn publish_alone(w: &mut Writer<FastBatch>, entries: impl IntoIterator<Item = Entry>) {
        let mut reply = String::with_capacity(w.inbox.len() + 24);
        for e in entries {
            w.publish_kept(e.b, e.i, e.msg, e.maybe_stored, &mut reply)
                .await;
        }
    }

    /// Queue engine batch `job_id`'s messages to `stream` (slot, message), in order: each on
    /// its key's lane, those without a key as one run for an idle lane; a message over the
    /// stream's `max_msg_size` fails at once (the server would refuse it mid-batch and end the
    /// batch there). Then send every touched lane that is idle.
    async fn queue_stream(
        &mut self,
        w: &mut Writer<FastBatch>,
        job_id: u64,
        stream: &str,
        facts: StreamFacts,
        msgs: impl Iterator<Item = (usize, Message)>,
    ) {
        let lanes = self.lanes_of(stream);
        let mut touched = 0u64;
        let mut keyless = Vec::new();
        for (i, msg) in msgs {
            if let Some(max) = facts.max_msg_size {
                let (_, payload, hdrs) = headers::encode_ref(&msg, w.dedup);
                if wire_len(&hdrs, &payload) > max {
                    w.router.settle(
                        job_id,
                        i,
                        Outcome::Failed(err(
                            ErrorKind::TooLarge,
                            "message exceeds the stream's max_msg_size",
                        )),
                    );
                    continue;
                }
            }
            let entry = Entry {
                b: job_id,
                i,
                maybe_stored: false,
                attempts: 0,
                msg,
            };
            match entry.msg.key().map(lane_of) {
                Some(l) => {
                    lanes[l as usize].queue.push_back(entry);
                    touched |= 1 << l;
                }
                None => keyless.push(entry),
            }
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            if touched & (1 << l) != 0 {
                lane.trim(&w.router);
            }
        }
        for l in 0..LANES {
            if touched & (1 << l) != 0 && !self.lanes_of(stream)[l as usize].busy {
                self.send_lane(w, stream, l).await;
            }
        }
        if !keyless.is_empty() {
            let runs = self.keyless.entry(stream.to_owned()).or_default();
            runs.push_back(keyless);
            trim_runs(runs, &w.router);
            self.place_keyless(w, stream).await;
        }
    }
}

impl Protocol for Fast {
    type State = FastBatch;

    async fn send(&mut self, w: &mut Writer<FastBatch>, job_id: u64, batch: Vec<Message>) {
        let (order, unknown) = w.group_by_stream(job_id, &batch).await;
        let mut slots: Vec<Option<Message>> = batch.into_iter().map(Some).collect();
        let mut reply = String::with_capacity(w.inbox.len() + 24);
        // Stream unknown for now (lookup timed out): publish those one by one with their own
        // pub acks, as async mode does; the server's answer (stored, no responders, ...) decides.
        for i in unknown {
            if let Some(msg) = slots[i].take() {
                w.publish_kept(job_id, i, msg, false, &mut reply).await;
            }
        }
        for (stream, indices) in order {
            let facts = self.stream_facts(&w.js, &stream).await;
            if !facts.fast {
                for i in indices {
                    if let Some(msg) = slots[i].take() {
                        w.publish_kept(job_id, i, msg, false, &mut reply).await;
                    }
                }
                continue;
            }
            let msgs = indices
                .into_iter()
                .filter_map(|i| Some((i, slots[i].take()?)));
            self.queue_stream(w, job_id, &stream, facts, msgs).await;
        }
    }

    async fn resume(&mut self, w: &mut Writer<FastBatch>, done: LaneDone) {
        let LaneDone {
            stream,
            lane: l,
            again,
            tries,
            silences,
            fallback,
        } = done;
        let lane = &mut self.lanes_of(&stream)[l as usize];
        for mut e in again.into_iter().rev() {
            e.attempts = e.attempts.saturating_add(1);
            lane.queue.push_front(e);
        }
        lane.busy = false;
        lane.tries = tries;
        lane.silences = silences;
        if fallback {
            if let Some(f) = self.batched.get_mut(&stream) {
                f.fast = false;
            }
            count_fallback(PublishMode::Fast, "stream");
            let mut queued = Vec::new();
            for lane in self.lanes_of(&stream) {
                queued.extend(lane.queue.drain(..));
            }
            for run in self.keyless.remove(&stream).unwrap_or_default() {
                queued.extend(run);
            }
            Self::publish_alone(w, queued).await;
            return;
        }
        if tries > RETRIES
            && let Some(subject) = lane
                .queue
                .front()
                .map(|e| e.msg.topic().as_str().to_owned())
            && w.no_stream_for(&subject).await
        {
            // Retried past the first few and the stream is gone: fail what waits for it.
            for e in self.lanes_of(&stream)[l as usize].queue.drain(..) {
                e.settle(&w.router, no_stream());
            }
        } else {
            // Messages without a key that wait for a lane go with this one's next batch, so
            // that keys keeping every lane busy cannot starve them.
            if let Some(runs) = self.keyless.get_mut(&stream) {
                let waiting: Vec<Entry> = runs.drain(..).flatten().collect();
                self.lanes_of(&stream)[l as usize].queue.extend(waiting);
            }
            self.send_lane(w, &stream, l).await;
        }
        // The lane may be idle now.
        self.place_keyless(w, &stream).await;
    }

    /// `<n>.f<lane>.<id>.<flow>.<gap>.<seq>.<op>.$FI`: a reply for message `seq` of lane batch
    /// `n` (`b` here).
    fn route(r: &Router<FastBatch>, b: u64, tail: &str, m: &async_nats::Message) {
        if let Some(l) = tail.strip_prefix('s')
            && let Ok(l) = l.parse::<u32>()
        {
            route_single(r, b, l, m);
        } else if let Some(fast) = tail.strip_prefix('f')
            && let Some((k, tail)) = fast.split_once('.')
            && let Ok(k) = k.parse::<u32>()
            && let Some((seq, op)) = parse_tail(tail)
        {
            route_fast(r, b, k, (seq, op), m);
        }
    }

    /// Lane batches that heard nothing for `silence` (doubled for each silence of the lane in a
    /// row): with ids, their unsettled messages go back to the head of the lane, as messages
    /// that may be stored; without ids a resend could store a duplicate, so they are settled
    /// `Unknown` and the lane goes on.
    fn resend_quiet(r: &Router<FastBatch>, now: Instant, silence: Duration) {
        let quiet: Vec<_> = r
            .groups
            .lock()
            .extract_if(|_, g| {
                if silence.is_zero() {
                    // After a reconnect: what was last heard of before `now`.
                    return g.state.heard < now;
                }
                let wait = silence * (1u32 << g.state.silences.min(4));
                now.saturating_duration_since(g.state.heard) >= wait
            })
            .collect();
        for (_, g) in quiet {
            let g = g.state;
            let mut again = Vec::new();
            for mut e in g.entries {
                if r.dedup {
                    e.maybe_stored = true;
                    again.push(e);
                } else {
                    e.settle(
                        &r.router,
                        Outcome::Unknown(err(
                            ErrorKind::Timeout,
                            "no ack came for the fast batch; the message may be stored",
                        )),
                    );
                }
            }
            if !again.is_empty() {
                tracing::debug!(
                    messages = again.len(),
                    "no ack for a fast batch; sending its messages again with their ids"
                );
            }
            r.lane_done(
                LaneDone {
                    stream: g.stream,
                    lane: g.lane,
                    again,
                    tries: g.tries,
                    silences: g.silences.saturating_add(1),
                    fallback: false,
                },
                Duration::ZERO,
            );
        }
    }
}

/// Hand a lane batch's messages to the connection, then its commit (an empty message to
/// `last_subject`, not stored). How many messages were handed over, and the error that
/// stopped it (the client closed), if any.
async fn publish_batch(
    w: &Writer<FastBatch>,
    prefix: &str,
    id: &str,
    encoded: Vec<(String, Bytes, async_nats::HeaderMap)>,
    last_subject: String,
) -> (u64, Option<async_nats::PublishError>) {
    let count = encoded.len() as u64;
    let mut reply = String::with_capacity(prefix.len() + id.len() + 32);
    let mut sent = 0u64;
    for (subject, payload, hdrs) in encoded {
        let seq = sent + 1;
        let op = if seq == 1 { Op::Start } else { Op::Append };
        self::reply(&mut reply, prefix, id, seq, op);
        if let Err(e) = w
            .client
            .publish_with_reply_and_headers(subject, reply.clone(), hdrs, payload)
            .await
        {
            return (sent, Some(e));
        }
        sent = seq;
    }
    self::reply(&mut reply, prefix, id, count + 1, Op::CommitEob);
    let failure = w
        .client
        .publish_with_reply(last_subject, reply, Bytes::new())
        .await
        .err();
    (sent, failure)
}

/// The pub ack of lane batch `n` of lane `l`: one message sent alone. "In process" (an earlier
/// attempt is being replicated), "no responders" and 503 send it again after a backoff, with
/// the lane held; any other answer settles it.
fn route_single(r: &Router<FastBatch>, n: u64, l: u32, m: &async_nats::Message) {
    let Some(g) = r.groups.lock().remove(&(n, l)) else {
        return;
    };
    let mut g = g.state;
    let reply = parse_reply(m);
    let mut again = Vec::new();
    let mut tries = 0;
    let mut wait = Duration::ZERO;
    if matches!(reply, Reply::InProcess(_) | Reply::Unavailable(_)) {
        tries = g.tries.saturating_add(1);
        wait = backoff(tries);
        again = std::mem::take(&mut g.entries);
    } else {
        let o = reply.outcome();
        for e in std::mem::take(&mut g.entries) {
            e.settle(&r.router, o.clone());
        }
    }
    r.lane_done(
        LaneDone {
            stream: g.stream,
            lane: g.lane,
            again,
            tries,
            silences: 0,
            fallback: false,
        },
        wait,
    );
}

/// A reply for message `seq` (operation `op`) of lane batch `n`, lane `l`.
fn route_fast(
    r: &Router<FastBatch>,
    n: u64,
    l: u32,
    (seq, op): (u64, u8),
    m: &async_nats::Message,
) {
    let event = match parse_reply(m) {
        // No responders carries no JSON: nothing was stored, and it concerns the whole batch.
        Reply::Refused(error) | Reply::Unavailable(error) if m.payload.is_empty() => {
            Event::Refused {
                seq,
                error,
                scope: Scope::Transient,
            }
        }
        _ => parse(seq, &m.payload),
    };
    let mut map = r.groups.lock();
    let Some(g) = map.get_mut(&(n, l)) else {
        return;
    };
    g.state.heard = Instant::now();
    let end = match event {
        Event::Progress | Event::Unreadable => return,
        Event::Refused { seq: s, .. } if op == Op::CommitEob as u8 && s == seq => {
            // The commit itself was refused.
            End::CommitRefused
        }
        Event::Refused { seq, error, scope } => {
            g.state.fast.refuse(seq, error, scope);
            return;
        }
        Event::Committed {
            stream,
            last,
            count,
        } => End::Committed {
            stream,
            last,
            count,
        },
    };
    let g = map.remove(&(n, l)).expect("present").state;
    drop(map);
    finish_fast(r, g, &end);
}

/// Settle what lane batch `g` (ended as `end` says) stored or refused, and hand the messages
/// it must send again back to the head of its lane.
fn finish_fast(r: &Router<FastBatch>, g: FastBatch, end: &End) {
    let fast = &g.fast;
    let mut again = Vec::new();
    // A committed batch answers for all its messages at once: one lock on the router for them.
    let mut settled = Vec::with_capacity(g.entries.len());
    for (j, mut e) in g.entries.into_iter().enumerate() {
        match fast.fate(j as u64 + 1, end) {
            Fate::Settle(o) => settled.push(e.settlement(o)),
            Fate::Resend { maybe_stored } if maybe_stored && !r.dedup => {
                settled.push(e.settlement(Outcome::Unknown(err(
                    ErrorKind::Connect,
                    "the fast batch ended without saying what it stored; the message may be stored",
                ))));
            }
            Fate::Resend { maybe_stored } => {
                e.maybe_stored |= maybe_stored;
                again.push(e);
            }
        }
    }
    r.router.settle_all(settled);
    let transient = fast.transient;
    let (tries, wait) = if transient && !again.is_empty() {
        let tries = g.tries.saturating_add(1);
        (tries, backoff(tries))
    } else {
        (0, Duration::ZERO)
    };
    if !again.is_empty() {
        tracing::debug!(
            messages = again.len(),
            transient,
            "fast batch ended early; its messages not stored go first in the lane's next batch"
        );
    }
    r.lane_done(
        LaneDone {
            stream: g.stream,
            lane: g.lane,
            again,
            tries,
            silences: 0,
            fallback: fast.fallback,
        },
        wait,
    );
}

/// The most messages between two flow-control acks we allow the server to choose. It picks
/// `min(this, 500 / batches in flight on the stream)`, starting at 1 when several are in flight.
const FLOW: u16 = 500;

/// Batch operation in the reply subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Start = 0,
    Append = 1,
    CommitEob = 3,
}

/// Write the reply subject of batch message `seq` (from 1) into `out`.
fn reply(out: &mut String, prefix: &str, id: &str, seq: u64, op: Op) {
    use std::fmt::Write;
    out.clear();
    let _ = write!(out, "{prefix}.{id}.{FLOW}.fail.{seq}.{}.$FI", op as u8);
}

/// Batch sequence and operation from the tail of a fast-batch reply subject
/// (`<id>.<flow>.<gap>.<seq>.<op>.$FI`).
fn parse_tail(tail: &str) -> Option<(u64, u8)> {
    let mut it = tail.rsplit('.');
    if it.next()? != "$FI" {
        return None;
    }
    let op = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    Some((seq, op))
}

/// A server reply on a fast batch's subjects.
#[derive(serde::Deserialize)]
struct FastReply<'a> {
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    stream: Option<&'a str>,
    seq: Option<u64>,
    batch: Option<&'a str>,
    count: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

/// What one server reply on a fast batch's subjects means.
#[derive(Debug)]
enum Event {
    /// Flow control or a gap notice: informational (the commit's count is authoritative).
    Progress,
    /// Message `seq` was refused with this error (not stored).
    Refused {
        seq: u64,
        error: Error,
        scope: Scope,
    },
    /// The batch is committed: messages 1..=count are stored, the last at stream `last`.
    Committed {
        stream: Arc<str>,
        last: u64,
        count: u64,
    },
    Unreadable,
}

/// Interpret a reply to message `seq` of a fast batch.
fn parse(seq: u64, payload: &[u8]) -> Event {
    let Ok(r) = serde_json::from_slice::<FastReply<'_>>(payload) else {
        return Event::Unreadable;
    };
    match (r.kind, r.error) {
        (Some("err"), Some(e)) => Event::Refused {
            seq: r.seq.unwrap_or(seq),
            error: api_error(&e),
            scope: match Scope::of(e.err_code()) {
                s @ (Scope::Elsewhere | Scope::Transient) => s,
                _ => Scope::Message,
            },
        },
        (Some(_), _) => Event::Progress,
        (None, Some(e)) => Event::Refused {
            seq,
            scope: Scope::of(e.err_code()),
            error: api_error(&e),
        },
        (None, None) => match (r.stream, r.seq, r.batch, r.count) {
            (Some(stream), Some(last), Some(_), Some(count)) => Event::Committed {
                stream: Arc::from(stream),
                last,
                count,
            },
            // A message's own pub ack inside a batch: a duplicate of its id, already stored.
            // The commit's count includes it.
            (Some(_), Some(_), None, _) if r.duplicate => Event::Progress,
            _ => Event::Unreadable,
        },
    }
}

/// What a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// The message itself (too large, stream full, ...).
    Message,
    /// The batch: fast batches are not enabled on the stream (any more).
    Batch,
    /// Nothing stored, and a moment later it may be: no responders, no stream leader yet
    /// (503), too many batches in flight on the stream.
    Transient,
    /// Neither: the batch is unknown because it never started or already ended.
    Consequence,
    /// Another publish with the same message id is being stored ("duplicate message id is in
    /// process"): that publish decides, and the message is sent again on its own to learn
    /// its fate, like one a gap cut off.
    Elsewhere,
}

impl Scope {
    fn of(err_code: u16) -> Scope {
        match err_code {
            // Batch publish not enabled, invalid batch id.
            10174 | 10179 => Scope::Batch,
            // Too many batches in flight, temporarily unavailable.
            10211 | 10008 => Scope::Transient,
            // Batch id unknown.
            10208 => Scope::Consequence,
            DUPLICATE_IN_PROCESS => Scope::Elsewhere,
            _ => Scope::Message,
        }
    }
}

/// What becomes of one message of a fast batch once the server has had its say.
#[derive(Debug)]
enum Fate {
    Settle(Outcome),
    /// Not stored by this batch, through no fault of its own (the batch ended early or never
    /// started): it goes first in the lane's next batch. `maybe_stored`: an earlier attempt
    /// or another publish of its id may have stored it.
    Resend {
        maybe_stored: bool,
    },
}

/// How a fast batch ended.
#[derive(Debug)]
enum End {
    /// Committed with messages 1..=count stored, the last at stream sequence `last`.
    Committed {
        stream: Arc<str>,
        last: u64,
        count: u64,
    },
    /// The commit was refused.
    CommitRefused,
}

/// What the server said of one fast batch in flight.
#[derive(Debug, Default)]
struct FastState {
    /// Messages refused for reasons of their own, by batch sequence (not stored).
    refused: Vec<(u64, Error)>,
    /// Message 1 was refused: the batch never started and nothing of it is stored.
    never_started: bool,
    /// A refusal that waiting may cure (no leader, too many in flight, an id in process):
    /// the lane backs off before its next batch.
    transient: bool,
    /// Another publish of an id was being stored: what is sent again may be stored already.
    elsewhere: bool,
    /// The stream refused fast batches.
    fallback: bool,
}

impl FastState {
    fn refuse(&mut self, seq: u64, e: Error, scope: Scope) {
        if seq == 1 {
            self.never_started = true;
        }
        match scope {
            Scope::Message => self.refused.push((seq, e)),
            Scope::Batch => self.fallback = true,
            Scope::Transient => self.transient = true,
            Scope::Elsewhere => {
                self.transient = true;
                self.elsewhere = true;
            }
            Scope::Consequence => {}
        }
    }

    fn refusal(&self, seq: u64) -> Option<&Error> {
        self.refused.iter().find(|(s, _)| *s == seq).map(|(_, e)| e)
    }

    /// What becomes of message `seq` (from 1) once the batch ended.
    fn fate(&self, seq: u64, end: &End) -> Fate {
        match end {
            End::Committed {
                stream,
                last,
                count,
            } => self.committed(seq, stream, *last, *count),
            End::CommitRefused => self.commit_refused(seq),
        }
    }

    /// What becomes of message `seq` (from 1) once the batch committed with `count` stored.
    /// With `gap=fail`, messages after `count` were dropped: refused ones fail with the
    /// server's reason, the others (cut off by a gap) are sent again.
    fn committed(&self, seq: u64, stream: &Arc<str>, last: u64, count: u64) -> Fate {
        if seq <= count {
            return Fate::Settle(Outcome::Acked(Ack {
                position: Position::StreamBatch {
                    stream: Arc::clone(stream),
                    last_sequence: last,
                    index: seq,
                    count,
                },
            }));
        }
        match self.refusal(seq) {
            Some(e) => Fate::Settle(Outcome::Failed(e.clone())),
            None => Fate::Resend {
                maybe_stored: self.elsewhere,
            },
        }
    }

    /// What becomes of message `seq` when the commit itself was refused: a batch that
    /// started may have stored any prefix (the server lost it: restarted, a new leader), so
    /// its messages are sent again as ones that may be stored; one that never started stored
    /// nothing.
    fn commit_refused(&self, seq: u64) -> Fate {
        if !self.never_started {
            return Fate::Resend { maybe_stored: true };
        }
        match self.refusal(seq) {
            Some(own) => Fate::Settle(Outcome::Failed(own.clone())),
            None => Fate::Resend {
                maybe_stored: self.elsewhere,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::ErrorKind;

    #[test]
    fn reply_subject_round_trips() {
        let mut s = String::new();
        reply(&mut s, "_INBOX.x.7.f0", "abc7_0", 12, Op::Append);
        assert_eq!(s, "_INBOX.x.7.f0.abc7_0.500.fail.12.1.$FI");
        assert_eq!(parse_tail("abc7_0.500.fail.12.1.$FI"), Some((12, 1)));
        assert_eq!(parse_tail("abc7_0.500.fail.12.1"), None);
    }

    #[test]
    fn parses_every_reply_kind() {
        assert!(matches!(
            parse(5, br#"{"type":"ack","seq":4,"msgs":2}"#),
            Event::Progress
        ));
        match parse(
            9,
            br#"{"type":"err","seq":3,"error":{"code":400,"err_code":10054,"description":"x"}}"#,
        ) {
            Event::Refused { seq: 3, error, .. } => assert_eq!(error.kind(), ErrorKind::TooLarge),
            e => panic!("{e:?}"),
        }
        match parse(
            1,
            br#"{"stream":"S","error":{"code":400,"err_code":10174,"description":"off"}}"#,
        ) {
            Event::Refused { seq: 1, .. } => {}
            e => panic!("{e:?}"),
        }
        match parse(4, br#"{"stream":"S","seq":42,"batch":"b","count":3}"#) {
            Event::Committed {
                stream,
                last: 42,
                count: 3,
            } => assert_eq!(&*stream, "S"),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            parse(2, br#"{"stream":"S","seq":8,"duplicate":true}"#),
            Event::Progress
        ));
        assert!(matches!(parse(2, b"garbage"), Event::Unreadable));
    }

    #[test]
    fn outcomes_follow_the_committed_count() {
        let mut st = FastState::default();
        st.refuse(3, err(ErrorKind::TooLarge, "too big"), Scope::Message);
        assert!(matches!(st.committed(2, &Arc::from("S"), 10, 2), Fate::Settle(o) if o.is_acked()));
        match st.committed(3, &Arc::from("S"), 10, 2) {
            Fate::Settle(Outcome::Failed(e)) => assert_eq!(e.kind(), ErrorKind::TooLarge),
            f => panic!("{f:?}"),
        }
        assert!(matches!(
            st.committed(4, &Arc::from("S"), 10, 2),
            Fate::Resend {
                maybe_stored: false
            }
        ));
        // Commit refused after the batch started: any prefix may be stored.
        assert!(matches!(
            st.commit_refused(2),
            Fate::Resend { maybe_stored: true }
        ));
    }

    #[test]
    fn an_id_in_process_elsewhere_is_sent_again_not_failed() {
        // A resend overtook its original: "duplicate message id is in process" (10158) says
        // nothing was stored by this publish, and the other one may store it.
        let refusal = br#"{"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#;
        let Event::Refused { seq, error, scope } = parse(3, refusal) else {
            panic!("a refusal");
        };
        assert_eq!((seq, scope), (3, Scope::Elsewhere));
        assert!(error.is_retryable());
        let mut st = FastState::default();
        st.refuse(seq, error, scope);
        assert!(st.transient, "the lane waits before sending it again");
        assert!(matches!(
            st.committed(3, &Arc::from("S"), 10, 2),
            Fate::Resend { maybe_stored: true }
        ));
        // The same refusal as a flow error of the batch.
        let flow = br#"{"type":"err","seq":4,"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#;
        match parse(9, flow) {
            Event::Refused {
                seq: 4,
                scope: Scope::Elsewhere,
                ..
            } => {}
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_batch_that_never_started_is_sent_again() {
        // Refused as a batch (e.g. not enabled on the stream): every message again, also the
        // ones refused only because the batch was unknown.
        let mut st = FastState::default();
        st.refuse(1, err(ErrorKind::Rejected, "not enabled"), Scope::of(10174));
        st.refuse(
            2,
            err(ErrorKind::Rejected, "unknown batch"),
            Scope::of(10208),
        );
        assert!(matches!(st.commit_refused(1), Fate::Resend { .. }));
        assert!(matches!(st.commit_refused(2), Fate::Resend { .. }));
        assert!(matches!(st.commit_refused(5), Fate::Resend { .. }));
        // Message 1 refused for itself: it fails, the rest are sent again.
        let mut st = FastState::default();
        st.refuse(1, err(ErrorKind::TooLarge, "too big"), Scope::Message);
        assert!(matches!(
            st.commit_refused(1),
            Fate::Settle(Outcome::Failed(_))
        ));
        assert!(matches!(st.commit_refused(2), Fate::Resend { .. }));
    }
}
