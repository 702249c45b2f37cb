//! Mode [`PublishMode::Fast`]: fast-ingest batch publishing (ADR-50, nats-server 2.14+, stream
//! `allow_batched`). The messages of engine batch `B` that go to one stream form fast batch
//! `k`, ended by an empty `eob` commit. The server acks every few hundred messages and once per
//! batch; the commit's count says exactly which messages are stored. Streams without
//! `allow_batched` are published in async mode instead (logged once, counted in
//! `eventbus_nats_mode_fallback_total`).
//!
//! No headers: the server reads the batch from the **reply subject** of every message,
//! `<prefix>.<batch id>.<flow>.<gap mode>.<batch seq>.<op>.$FI` (prefix `<inbox>.B.f<k>`, gap
//! mode `fail`), with op `0` (start, seq 1), `1` (append), `3` (commit at end of batch: an
//! empty message that is not stored). Messages are stored as they arrive (a fast batch is not
//! atomic); the server replies on the same subjects:
//!
//! - `{"type":"ack","seq":N,"msgs":M}`: flow control, messages 1..=N were persisted;
//! - `{"type":"gap",...}` / `{"type":"err","seq":N,"error":{...}}`: a gap, or message N refused;
//! - a pub ack with `"batch"` and `"count":C` once the batch is committed: with gap mode
//!   `fail` (ours) exactly messages 1..=C are stored, and every later one was dropped;
//! - a plain error pub ack when a message is refused before it reaches the batch (stream does
//!   not allow batches, too many batches in flight, message too large, ...). When that happens
//!   to message 1 the batch never starts and nothing of it is stored.
//!
//! We end every batch with the `eob` commit rather than committing on the last data message, so
//! a refusal of the last message still ends in a pub ack whose count says what is stored.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eventbus_core::{Ack, Bytes, Error, ErrorKind, Message, Outcome, Position, SinkLimits};

use super::reply::{ApiError, DUPLICATE_IN_PROCESS, Reply, Router, api_error, parse_reply};
use super::writer::{Writer, not_queued};
use super::{FAST_MAX_IN_FLIGHT, Protocol, PublishMode, count_fallback};
use crate::error::err;
use crate::headers;

/// What the writer keeps for fast batches.
pub(super) struct Fast {
    /// Unique per sink; batch ids are `<prefix><engine batch>_<k>`.
    batch_prefix: String,
    /// Stream -> what fast batches need to know of it.
    batched: HashMap<String, StreamFacts>,
}

impl Fast {
    pub(super) fn new(batch_prefix: String) -> Self {
        Fast {
            batch_prefix,
            batched: HashMap::new(),
        }
    }
}

/// One fast batch in flight.
pub(super) struct FastBatch {
    /// Refusals and per-message acks seen so far.
    fast: FastState,
    /// The messages, in batch order, kept until the commit so that the ones a gap cut
    /// off can be sent again (payloads are shared, not copied).
    msgs: Vec<Message>,
    /// When the batch was sent or last heard of (any flow ack or refusal).
    heard: Instant,
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
}

impl Protocol for Fast {
    type State = FastBatch;

    fn limits(limits: SinkLimits) -> SinkLimits {
        limits.max_inflight_batches(FAST_MAX_IN_FLIGHT)
    }

    async fn send(&mut self, w: &mut Writer<FastBatch>, job_id: u64, batch: Vec<Message>) {
        let (order, unknown) = w.group_by_stream(job_id, &batch).await;
        let mut slots: Vec<Option<Message>> = batch.into_iter().map(Some).collect();
        let mut reply = String::with_capacity(w.inbox.len() + 96);
        // Stream unknown for now (lookup timed out): publish those one by one with their own
        // pub acks, as async mode does; the server's answer (stored, no responders, ...) decides.
        for i in unknown {
            if let Some(msg) = slots[i].take() {
                w.publish_kept(job_id, i, msg, false, &mut reply).await;
            }
        }
        for (k, (stream, mut indices)) in order.into_iter().enumerate() {
            let facts = self.stream_facts(&w.js, &stream).await;
            if !facts.fast {
                for i in indices {
                    if let Some(msg) = slots[i].take() {
                        w.publish_kept(job_id, i, msg, false, &mut reply).await;
                    }
                }
                continue;
            }
            let k = k as u32;
            let prefix = format!("{}.{job_id}.f{k}", w.inbox);
            let id = format!("{}{job_id}_{k}", self.batch_prefix);
            let mut encoded = Vec::with_capacity(indices.len());
            let mut msgs = Vec::with_capacity(indices.len());
            indices.retain(|&i| {
                let Some(msg) = slots[i].take() else {
                    return false;
                };
                let (subject, payload, hdrs) = headers::encode_ref(&msg, w.dedup);
                if let Some(max) = facts.max_msg_size
                    && wire_len(&hdrs, &payload) > max
                {
                    w.router.settle(
                        job_id,
                        i,
                        Outcome::Failed(err(
                            ErrorKind::TooLarge,
                            "message exceeds the stream's max_msg_size",
                        )),
                    );
                    return false;
                }
                encoded.push((subject, payload, hdrs));
                msgs.push(msg);
                true
            });
            if indices.is_empty() {
                continue;
            }
            let n = indices.len() as u64;
            w.track(
                job_id,
                k,
                indices,
                FastBatch {
                    fast: FastState::default(),
                    msgs,
                    heard: Instant::now(),
                },
            );
            let mut last_subject = String::new();
            let mut sent = 0u64;
            let mut failure = None;
            for (subject, payload, hdrs) in encoded {
                let seq = sent + 1;
                let op = if seq == 1 { Op::Start } else { Op::Append };
                self::reply(&mut reply, &prefix, &id, seq, op);
                if seq == n {
                    last_subject.clone_from(&subject);
                }
                if let Err(e) = w
                    .client
                    .publish_with_reply_and_headers(subject, reply.clone(), hdrs, payload)
                    .await
                {
                    failure = Some(e);
                    break;
                }
                sent = seq;
            }
            let failure = match failure {
                Some(e) => Some(e),
                None => {
                    // End of batch: an empty commit message, not stored.
                    self::reply(&mut reply, &prefix, &id, n + 1, Op::CommitEob);
                    w.client
                        .publish_with_reply(last_subject, reply.clone(), Bytes::new())
                        .await
                        .err()
                }
            };
            if let Some(e) = failure {
                // A fast batch is stored as it arrives: what was handed over may be stored.
                let unsent = not_queued(e);
                let maybe = Outcome::Unknown(err(
                    ErrorKind::Connect,
                    "connection lost during a fast batch; the message may be stored",
                ));
                w.settle_group(job_id, k, |j| {
                    if (j as u64) < sent {
                        maybe.clone()
                    } else {
                        unsent.clone()
                    }
                });
            } else if let Some(g) = w.groups.lock().get_mut(&(job_id, k)) {
                // Handed over in full: its silence counts from now.
                g.state.heard = Instant::now();
            }
        }
    }

    /// `f<k>.<id>.<flow>.<gap>.<seq>.<op>.$FI`: a reply for message `seq` of fast batch `k`.
    fn route(r: &Router<FastBatch>, b: u64, tail: &str, m: &async_nats::Message) {
        if let Some(fast) = tail.strip_prefix('f')
            && let Some((k, tail)) = fast.split_once('.')
            && let Ok(k) = k.parse::<u32>()
            && let Some((seq, op)) = parse_tail(tail)
        {
            route_fast(r, b, k, (seq, op), m);
        }
    }

    /// Fast batches whose flow went quiet: their messages are kept, so they go out again one by
    /// one, as messages that may be stored.
    fn resend_quiet(r: &Router<FastBatch>, now: Instant, silence: Duration) {
        let quiet: Vec<_> = r
            .groups
            .lock()
            .extract_if(|_, g| now.saturating_duration_since(g.state.heard) >= silence)
            .collect();
        for ((b, _), g) in quiet {
            let Some(open) = r.router.unsettled(b) else {
                continue;
            };
            let items: Vec<(usize, Message)> = g
                .indices
                .into_iter()
                .zip(g.state.msgs)
                .filter(|(i, _)| open.binary_search(i).is_ok())
                .collect();
            if !items.is_empty() {
                tracing::debug!(
                    messages = items.len(),
                    "no ack for a fast batch; sending its messages again with their ids"
                );
                r.send_again(b, items, false, true);
            }
        }
    }
}

/// A reply for message `seq` (operation `op`) of fast batch `k` of engine batch `b`.
fn route_fast(
    r: &Router<FastBatch>,
    b: u64,
    k: u32,
    (seq, op): (u64, u8),
    m: &async_nats::Message,
) {
    let (router, groups) = (&*r.router, &r.groups);
    let event = match parse_reply(m) {
        // No responders carries no JSON: nothing was stored, and it concerns the whole batch.
        Reply::Refused(error) | Reply::Unavailable(error) if m.payload.is_empty() => {
            Event::Refused {
                seq,
                error,
                scope: Scope::Batch,
            }
        }
        _ => parse(seq, &m.payload),
    };
    let mut map = groups.lock();
    let Some(g) = map.get_mut(&(b, k)) else {
        return;
    };
    g.state.heard = Instant::now();
    let end = match event {
        Event::Progress | Event::Unreadable => return,
        Event::Refused { seq: s, error, .. } if op == Op::CommitEob as u8 && s == seq => {
            // The commit itself was refused.
            End::CommitRefused(error)
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
        Event::Single { stream, sequence } => {
            // A server without fast batches stored this one as a plain publish.
            let Some(&i) = g.indices.get((seq as usize).wrapping_sub(1)) else {
                return;
            };
            if g.state.fast.single() == g.indices.len() {
                map.remove(&(b, k));
            }
            drop(map);
            router.settle(
                b,
                i,
                Outcome::Acked(Ack {
                    position: Position::Stream {
                        stream,
                        sequence,
                        duplicate: false,
                    },
                }),
            );
            return;
        }
    };
    let g = map.remove(&(b, k)).expect("present");
    drop(map);
    let mut again = Vec::new();
    for (j, (i, msg)) in g.indices.into_iter().zip(g.state.msgs).enumerate() {
        match g.state.fast.fate(j as u64 + 1, &end) {
            Fate::Settle(o) => router.settle(b, i, o),
            Fate::Resend => again.push((i, msg)),
        }
    }
    if again.is_empty() {
        return;
    }
    tracing::debug!(
        messages = again.len(),
        "fast batch ended early; sending the messages it did not store again"
    );
    r.send_again(b, again, false, false);
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
        stream: String,
        last: u64,
        count: u64,
    },
    /// A plain pub ack for one message: a server that does not know fast batches stored it
    /// as an ordinary publish.
    Single {
        stream: String,
        sequence: u64,
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
                Scope::Elsewhere => Scope::Elsewhere,
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
                stream: stream.to_owned(),
                last,
                count,
            },
            (Some(stream), Some(sequence), None, _) => Event::Single {
                stream: stream.to_owned(),
                sequence,
            },
            _ => Event::Unreadable,
        },
    }
}

/// What a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// The message itself (too large, stream full, ...).
    Message,
    /// The batch (not enabled on the stream, too many in flight, no responders).
    Batch,
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
            // Batch publish not enabled, too many in flight, invalid batch id.
            10174 | 10211 | 10179 => Scope::Batch,
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
    /// Definitely not stored, through no fault of its own (the batch ended early or never
    /// started): publish it again on its own, once.
    Resend,
}

/// How a fast batch ended.
#[derive(Debug)]
enum End {
    /// Committed with messages 1..=count stored, the last at stream sequence `last`.
    Committed {
        stream: String,
        last: u64,
        count: u64,
    },
    /// The commit was refused.
    CommitRefused(Error),
}

/// One fast batch in flight.
#[derive(Debug, Default)]
struct FastState {
    /// Messages refused for reasons of their own, by batch sequence (not stored).
    refused: Vec<(u64, Error)>,
    /// Message 1 was refused: the batch never started and nothing of it is stored.
    never_started: bool,
    /// Messages already settled one by one (a server without fast batches).
    singles: usize,
}

impl FastState {
    fn refuse(&mut self, seq: u64, e: Error, scope: Scope) {
        if seq == 1 {
            self.never_started = true;
        }
        if scope == Scope::Message {
            self.refused.push((seq, e));
        }
    }

    fn refusal(&self, seq: u64) -> Option<&Error> {
        self.refused.iter().find(|(s, _)| *s == seq).map(|(_, e)| e)
    }

    fn single(&mut self) -> usize {
        self.singles += 1;
        self.singles
    }

    /// What becomes of message `seq` (from 1) once the batch ended.
    fn fate(&self, seq: u64, end: &End) -> Fate {
        match end {
            End::Committed {
                stream,
                last,
                count,
            } => self.committed(seq, stream, *last, *count),
            End::CommitRefused(e) => self.commit_refused(seq, e),
        }
    }

    /// What becomes of message `seq` (from 1) once the batch committed with `count` stored.
    /// With `gap=fail`, messages after `count` were dropped: refused ones fail with the
    /// server's reason, the others (cut off by a gap) are sent again.
    fn committed(&self, seq: u64, stream: &str, last: u64, count: u64) -> Fate {
        if seq <= count {
            return Fate::Settle(Outcome::Acked(Ack {
                position: Position::StreamBatch {
                    stream: stream.to_owned(),
                    last_sequence: last,
                    index: seq,
                    count,
                },
            }));
        }
        match self.refusal(seq) {
            Some(e) => Fate::Settle(Outcome::Failed(e.clone())),
            None => Fate::Resend,
        }
    }

    /// What becomes of message `seq` when the commit itself was refused with `e`.
    fn commit_refused(&self, seq: u64, e: &Error) -> Fate {
        if !self.never_started {
            // The batch started: what arrived may be stored.
            return Fate::Settle(Outcome::Unknown(
                err(
                    e.kind(),
                    "the server refused to commit the fast batch; its messages may be stored",
                )
                .with_source(e.clone()),
            ));
        }
        // Message 1 refused: the batch never started, nothing of it is stored.
        match self.refusal(seq) {
            Some(own) => Fate::Settle(Outcome::Failed(own.clone())),
            None => Fate::Resend,
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
            } => assert_eq!(stream, "S"),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            parse(2, br#"{"stream":"S","seq":8}"#),
            Event::Single { sequence: 8, .. }
        ));
        assert!(matches!(parse(2, b"garbage"), Event::Unreadable));
    }

    #[test]
    fn outcomes_follow_the_committed_count() {
        let mut st = FastState::default();
        st.refuse(3, err(ErrorKind::TooLarge, "too big"), Scope::Message);
        assert!(matches!(st.committed(2, "S", 10, 2), Fate::Settle(o) if o.is_acked()));
        match st.committed(3, "S", 10, 2) {
            Fate::Settle(Outcome::Failed(e)) => assert_eq!(e.kind(), ErrorKind::TooLarge),
            f => panic!("{f:?}"),
        }
        assert!(matches!(st.committed(4, "S", 10, 2), Fate::Resend));
        // Commit refused: unknown unless message 1 was refused (then nothing started).
        let e = err(ErrorKind::Rejected, "sealed");
        assert!(matches!(
            st.commit_refused(2, &e),
            Fate::Settle(Outcome::Unknown(_))
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
        assert!(matches!(st.committed(3, "S", 10, 2), Fate::Resend));
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
        let e = err(ErrorKind::Rejected, "unknown batch");
        // Refused as a batch (e.g. not enabled on the stream): every message again, also the
        // ones refused only because the batch was unknown.
        let mut st = FastState::default();
        st.refuse(1, err(ErrorKind::Rejected, "not enabled"), Scope::of(10174));
        st.refuse(
            2,
            err(ErrorKind::Rejected, "unknown batch"),
            Scope::of(10208),
        );
        assert!(matches!(st.commit_refused(1, &e), Fate::Resend));
        assert!(matches!(st.commit_refused(2, &e), Fate::Resend));
        assert!(matches!(st.commit_refused(5, &e), Fate::Resend));
        // Message 1 refused for itself: it fails, the rest are sent again.
        let mut st = FastState::default();
        st.refuse(1, err(ErrorKind::TooLarge, "too big"), Scope::Message);
        assert!(matches!(
            st.commit_refused(1, &e),
            Fate::Settle(Outcome::Failed(_))
        ));
        assert!(matches!(st.commit_refused(2, &e), Fate::Resend));
    }
}
