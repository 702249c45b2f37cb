//! The publishing side: core NATS publishes with a reply subject on one shared inbox
//! subscription, written in order by one writer task, with every ack of every batch outstanding
//! at once (bounded by the engine's ACK window).
//!
//! Mode [`PublishMode::Async`]: each message of batch `B` gets the reply subject `<inbox>.B.<i>`;
//! a router task reads the JetStream acks off the inbox and fills the batch's outcome slots. That
//! is one map lookup per ack and no per-message future, channel or timer: the engine's deadline
//! covers lost acks.
//!
//! Mode [`PublishMode::Atomic`] (ADR-50, server 2.12+, stream `allow_atomic`): the messages of
//! batch `B` that go to one stream form atomic batch `k`, sent with `Nats-Batch-Id`,
//! `Nats-Batch-Sequence` and, on the last, `Nats-Batch-Commit: 1`. Only the first (reply
//! `<inbox>.B.a<k>.s`, an empty ack or an early error) and the last (`<inbox>.B.a<k>.c`, the
//! batch's pub ack) ask for replies: one ack per batch. The batch is stored whole or not at all,
//! and its messages hold consecutive stream sequences ending at the acked one.
//!
//! Mode [`PublishMode::Fast`] (ADR-50 fast ingest, server 2.14+, stream `allow_batched`): the
//! messages of batch `B` that go to one stream form fast batch `k`, described entirely by the
//! reply subjects `<inbox>.B.f<k>.<id>.<flow>.fail.<seq>.<op>.$FI` (see [`crate::fast`]), ended
//! by an empty `eob` commit. The server acks every few hundred messages and once per batch; the
//! commit's count says exactly which messages are stored. Streams without `allow_batched` are
//! published in async mode instead (logged once, counted in `eventbus_nats_mode_fallback_total`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, StatusCode};
use eventbus_core::{
    Ack, BatchSink, Bytes, Error, ErrorKind, Message, Outcome, OutcomeRouter, Position, SinkLimits,
    TopicRules,
};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::error::{BACKEND, err};
use crate::fast::{self, Event, FastState, Fate, Op};
use crate::headers;
use crate::lookup::SubjectStreams;
use crate::retry::Kept;

/// How a [`NatsSink`] hands batches to JetStream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PublishMode {
    /// Pipelined publishes, one ack per message, many outstanding. Any JetStream server.
    Async,
    /// One atomic batch per stream per engine batch, one ack per batch, all-or-nothing
    /// (server 2.12+, stream created with `allow_atomic`). At most 1,000 messages per batch and
    /// [`ATOMIC_MAX_IN_FLIGHT`] batches in flight per sink (the server allows 50 per stream).
    Atomic,
    /// Fast-ingest batches (server 2.14+, stream created with `allow_batched`): one batch per
    /// stream per engine batch, flow-controlled acks every few hundred messages instead of one
    /// per message, gaps fail the rest of the batch (`gap=fail`) so nothing is reported stored
    /// that is not. Not atomic: a batch can be stored in part, and the outcomes say which part.
    /// At most [`FAST_MAX_IN_FLIGHT`] batches in flight per sink. Falls back to
    /// [`PublishMode::Async`] on older servers and, per stream, on streams without
    /// `allow_batched` (a log line and `eventbus_nats_mode_fallback_total`). The default:
    /// [`StreamSpec`](crate::StreamSpec) sets `allow_batched` on servers that support it.
    #[default]
    Fast,
}

impl PublishMode {
    /// The oldest server version (major, minor) that supports this mode.
    pub fn min_server(self) -> (u32, u32) {
        match self {
            PublishMode::Async => (2, 9),
            PublishMode::Atomic => (2, 12),
            PublishMode::Fast => (2, 14),
        }
    }

    fn label(self) -> &'static str {
        match self {
            PublishMode::Async => "async",
            PublishMode::Atomic => "atomic",
            PublishMode::Fast => "fast",
        }
    }
}

/// `(major, minor)` of a server version string such as `2.15.1`.
pub(crate) fn server_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim_start_matches('v').split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn count_fallback(from: PublishMode, reason: &'static str) {
    metrics::counter!(
        "eventbus_nats_mode_fallback_total",
        "from" => from.label(),
        "reason" => reason
    )
    .increment(1);
}

/// Atomic batches one sink keeps in flight (the engine is clamped to it). The server allows 50
/// per stream across all publishers.
pub const ATOMIC_MAX_IN_FLIGHT: usize = 16;
/// The server's limit on messages per atomic batch.
pub const ATOMIC_MAX_MESSAGES: usize = 1_000;
/// Fast batches one sink keeps in flight (the engine is clamped to it). The server allows 50
/// per stream across all publishers, and spaces its flow acks by `500 / batches in flight`.
pub const FAST_MAX_IN_FLIGHT: usize = 16;

/// Options for [`NatsBackend::sink_with`](crate::NatsBackend::sink_with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkOptions {
    /// Publish mode. Default [`PublishMode::Fast`] (async where the server or stream lacks it).
    pub mode: PublishMode,
    /// Send the message id as `Nats-Msg-Id` (server-side de-duplication). Default `true`.
    pub dedup: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            mode: PublishMode::default(),
            dedup: true,
        }
    }
}

impl SinkOptions {
    /// Set the publish mode.
    pub fn mode(mut self, m: PublishMode) -> Self {
        self.mode = m;
        self
    }
    /// Set de-duplication.
    pub fn dedup(mut self, on: bool) -> Self {
        self.dedup = on;
        self
    }
}

enum Job {
    /// An engine batch, in the sink's mode.
    Batch { id: u64, batch: Vec<Message> },
    /// Messages `(slot, message)` of engine batch `id` published again one by one, with their
    /// own pub acks: ones definitely not stored through no fault of their own (a fast batch cut
    /// off by a gap or refused as a whole, "no responders"), or ones that heard no ack at all
    /// (`maybe_stored`).
    Resend {
        id: u64,
        items: Vec<(usize, Message)>,
        /// Check first that a stream covers each subject (a retry past the first few).
        verify: bool,
        /// An earlier attempt may be stored: never report these `Failed`.
        maybe_stored: bool,
    },
}

/// One atomic or fast batch in flight: which slots of the engine batch it carries.
struct Group {
    indices: Vec<usize>,
    /// Atomic: an error reply to the first message (e.g. atomic publish not enabled).
    early: Option<Error>,
    /// Fast: refusals and per-message acks seen so far.
    fast: FastState,
    /// Fast: the messages, in batch order, kept until the commit so that the ones a gap cut
    /// off can be sent again (payloads are shared, not copied).
    msgs: Vec<Message>,
    /// When the group was sent or last heard of (fast: any flow ack or refusal).
    heard: Instant,
}

impl Group {
    fn new(indices: Vec<usize>, msgs: Vec<Message>) -> Self {
        Group {
            indices,
            early: None,
            fast: FastState::default(),
            msgs,
            heard: Instant::now(),
        }
    }
}

type Groups = Arc<Mutex<HashMap<(u64, u32), Group>>>;

/// Publishes batches to JetStream. Wrap it in `eventbus_batch::Batcher`.
#[derive(Clone)]
pub struct NatsSink {
    tx: mpsc::UnboundedSender<Job>,
    router: Arc<OutcomeRouter>,
    kept: Arc<Kept>,
    limits: SinkLimits,
    opts: SinkOptions,
    denied: Arc<crate::denied::Denied>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("limits", &self.limits)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// `silence`: how long a publish may go without an ack before it is sent again with its id
    /// (only with de-duplication on; see [`crate::retry`]).
    pub(crate) async fn new(
        client: Client,
        js: async_nats::jetstream::Context,
        mut opts: SinkOptions,
        denied: Arc<crate::denied::Denied>,
        silence: Duration,
    ) -> Result<Self, Error> {
        let version = client.server_info().version;
        if opts.mode != PublishMode::Async
            && server_version(&version).is_some_and(|v| v < opts.mode.min_server())
        {
            let (major, minor) = opts.mode.min_server();
            tracing::warn!(
                server = %version,
                mode = opts.mode.label(),
                "publish mode needs nats-server {major}.{minor}+; using async mode"
            );
            count_fallback(opts.mode, "server");
            opts.mode = PublishMode::Async;
        }
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            err(ErrorKind::Connect, "could not subscribe to the ack inbox")
                .temporary()
                .with_source(e)
        })?;
        let router = Arc::new(OutcomeRouter::new(BACKEND));
        let groups: Groups = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let kept = Arc::new(Kept::new(Arc::clone(&router)));
        let replies = Arc::new(Router {
            router: Arc::clone(&router),
            groups: Arc::clone(&groups),
            kept: Arc::clone(&kept),
            // Weak: the writer stops once every sink handle is gone.
            resend: tx.downgrade(),
        });
        tokio::spawn(route(sub, inbox.len() + 1, Arc::clone(&replies)));
        if opts.dedup && !silence.is_zero() {
            tokio::spawn(resend_silent(replies, silence));
        }
        // Leave room for the headers we add (Nats-Msg-Id, key, batch) and the NATS/1.0 line.
        let max = client
            .server_info()
            .max_payload
            .saturating_sub(headers::OVERHEAD);
        let mut limits = SinkLimits::none().max_message_bytes(max);
        match opts.mode {
            PublishMode::Atomic => {
                limits = limits
                    .max_batch_messages(ATOMIC_MAX_MESSAGES)
                    .max_inflight_batches(ATOMIC_MAX_IN_FLIGHT);
            }
            PublishMode::Fast => limits = limits.max_inflight_batches(FAST_MAX_IN_FLIGHT),
            PublishMode::Async => {}
        }
        // The inbox ends in a unique token (a nuid): reuse it for batch ids.
        let batch_prefix = inbox.rsplit('.').next().unwrap_or_default().to_owned();
        let w = Writer {
            client,
            js,
            inbox,
            router: Arc::clone(&router),
            groups,
            opts,
            streams: SubjectStreams::default(),
            batched: HashMap::new(),
            batch_prefix,
            kept: Arc::clone(&kept),
            lookup_quiet_until: None,
        };
        tokio::spawn(w.run(rx));
        Ok(NatsSink {
            tx,
            router,
            kept,
            limits,
            opts,
            denied,
        })
    }

    /// The options in effect: as given, except that a publish mode the server does not support
    /// is replaced by [`PublishMode::Async`].
    pub fn options(&self) -> SinkOptions {
        self.opts
    }
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

struct Writer {
    client: Client,
    js: async_nats::jetstream::Context,
    inbox: String,
    router: Arc<OutcomeRouter>,
    groups: Groups,
    opts: SinkOptions,
    /// Subject -> stream (None: no stream captures it), for atomic and fast batches; bounded.
    streams: SubjectStreams,
    /// Stream -> what fast batches need to know of it.
    batched: HashMap<String, StreamFacts>,
    /// Unique per sink; batch ids are `<prefix><engine batch>_<k>`.
    batch_prefix: String,
    /// Messages kept for retries after "no responders".
    kept: Arc<Kept>,
    /// A stream lookup for a retry timed out: skip the check until then.
    lookup_quiet_until: Option<std::time::Instant>,
}

fn not_queued(e: impl std::error::Error + Send + Sync + 'static) -> Outcome {
    // Not handed to the connection: definitely not sent.
    Outcome::Failed(
        err(ErrorKind::Connect, "could not queue the publish")
            .temporary()
            .with_source(e),
    )
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = rx.recv().await {
            match (job, self.opts.mode) {
                (Job::Batch { id, batch }, PublishMode::Async) => {
                    let batch: Arc<[Message]> = batch.into();
                    self.kept.keep_batch(id, Arc::clone(&batch));
                    let mut reply = String::with_capacity(self.inbox.len() + 24);
                    for (i, msg) in batch.iter().enumerate() {
                        self.publish_one(id, i, msg, &mut reply).await;
                    }
                    self.kept.sent(id);
                }
                (Job::Batch { id, batch }, PublishMode::Atomic) => {
                    self.send_atomic(id, batch).await;
                }
                (Job::Batch { id, batch }, PublishMode::Fast) => self.send_fast(id, batch).await,
                (
                    Job::Resend {
                        id,
                        items,
                        verify,
                        maybe_stored,
                    },
                    _,
                ) => {
                    // The engine stopped waiting (deadline, close): nothing to send.
                    if !self.router.is_pending(id) {
                        continue;
                    }
                    metrics::counter!("eventbus_nats_resent_total").increment(items.len() as u64);
                    let mut reply = String::with_capacity(self.inbox.len() + 24);
                    for (i, msg) in items {
                        if verify && self.no_stream_for(msg.topic().as_str()).await {
                            self.kept.settle(id, i, no_stream());
                            continue;
                        }
                        self.publish_kept(id, i, msg, maybe_stored, &mut reply)
                            .await;
                    }
                }
            }
        }
    }

    /// [`Writer::publish_one`] for a message sent on its own outside an async-mode batch: kept
    /// first for a "no responders" retry, since that answer may come back at once.
    async fn publish_kept(
        &self,
        b: u64,
        i: usize,
        msg: Message,
        maybe_stored: bool,
        reply: &mut String,
    ) {
        self.kept.keep_one(b, i, msg.clone(), maybe_stored);
        self.publish_one(b, i, &msg, reply).await;
    }

    /// Publish message `i` of batch `b` with its own pub ack on `<inbox>.b.i`.
    async fn publish_one(&self, b: u64, i: usize, msg: &Message, reply: &mut String) {
        use std::fmt::Write;
        let (subject, payload, hdrs) = headers::encode_ref(msg, self.opts.dedup);
        reply.clear();
        let _ = write!(reply, "{}.{b}.{i}", self.inbox);
        if let Err(e) = self
            .client
            .publish_with_reply_and_headers(subject, reply.clone(), hdrs, payload)
            .await
        {
            self.kept.settle(b, i, not_queued(e));
        }
    }

    /// Whether JetStream says, within 500 ms, that no stream covers `subject`. A lookup that
    /// does not answer in time (an election, a restart) says nothing: `false`.
    ///
    /// During an election many retries ask at once: a lookup that did not answer makes the
    /// next second's retries skip the question (they are sent, as before the check), and a
    /// subject found uncovered is remembered for a second (by [`SubjectStreams`]), so the single
    /// writer never waits on more than one lookup per second.
    async fn no_stream_for(&mut self, subject: &str) -> bool {
        let now = Instant::now();
        if self.lookup_quiet_until.is_some_and(|t| now < t) {
            return false;
        }
        match tokio::time::timeout(Duration::from_millis(500), self.stream_of(subject)).await {
            Ok(Ok(None)) => true,
            Ok(Ok(Some(_))) => false,
            _ => {
                self.lookup_quiet_until = Some(now + Duration::from_secs(1));
                false
            }
        }
    }

    /// The stream capturing `subject`, cached (see [`SubjectStreams`]). `Err` when the lookup
    /// itself failed (timeout, connection): that says nothing about the subject.
    async fn stream_of(&mut self, subject: &str) -> Result<Option<String>, ()> {
        use async_nats::jetstream::context::GetStreamByNameErrorKind as K;
        if let Some(s) = self.streams.get(subject, Instant::now()) {
            return Ok(s);
        }
        match self.js.stream_by_subject(subject).await {
            Ok(stream) => {
                self.streams
                    .insert(subject, Some(stream.clone()), Instant::now());
                Ok(Some(stream))
            }
            Err(e) if matches!(e.kind(), K::NotFound | K::InvalidSubject) => {
                // Remembered briefly: a stream created later is still found soon.
                self.streams.insert(subject, None, Instant::now());
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream lookup failed");
                Err(())
            }
        }
    }

    /// Whether `stream` accepts fast batches (`allow_batched`), and its message size limit,
    /// cached per stream. A failed lookup answers "no fast batches" for this batch and is asked
    /// again next time.
    async fn stream_facts(&mut self, stream: &str) -> StreamFacts {
        if let Some(&f) = self.batched.get(stream) {
            return f;
        }
        let Ok(s) = self.js.get_stream(stream).await else {
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

    /// Split a batch by stream, keeping order within each group. Messages no stream captures
    /// fail at once (nothing is sent for them); messages whose stream could not be looked up
    /// (the server did not answer in time) are returned apart, in order.
    async fn group_by_stream(
        &mut self,
        id: u64,
        batch: &[Message],
    ) -> (Vec<(String, Vec<usize>)>, Vec<usize>) {
        let mut order: Vec<(String, Vec<usize>)> = Vec::new();
        let mut unknown = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match self.stream_of(m.topic().as_str()).await {
                Ok(Some(stream)) => match order.iter_mut().find(|(s, _)| *s == stream) {
                    Some((_, v)) => v.push(i),
                    None => order.push((stream, vec![i])),
                },
                Ok(None) => self.router.settle(id, i, no_stream()),
                Err(()) => unknown.push(i),
            }
        }
        (order, unknown)
    }

    /// Track batch group `(b, k)`; forget groups whose engine batch is gone (timed out or
    /// dropped), so lost replies cannot grow the map.
    fn track(&self, b: u64, k: u32, indices: Vec<usize>, msgs: Vec<Message>) {
        let mut groups = self.groups.lock();
        if groups.len() >= 4 * FAST_MAX_IN_FLIGHT.max(ATOMIC_MAX_IN_FLIGHT) {
            groups.retain(|(b, _), _| self.router.is_pending(*b));
        }
        groups.insert((b, k), Group::new(indices, msgs));
    }

    /// Settle every message of group `(b, k)` with `o`, if the group is still open.
    fn settle_group(&self, b: u64, k: u32, o: impl Fn(usize) -> Outcome) {
        if let Some(g) = self.groups.lock().remove(&(b, k)) {
            for (j, i) in g.indices.into_iter().enumerate() {
                self.router.settle(b, i, o(j));
            }
        }
    }

    async fn send_atomic(&mut self, job_id: u64, batch: Vec<Message>) {
        let (order, unknown) = self.group_by_stream(job_id, &batch).await;
        // An atomic batch needs its stream: without it nothing is sent, and a retry may succeed.
        for i in unknown {
            self.router.settle(
                job_id,
                i,
                Outcome::Failed(
                    err(
                        ErrorKind::Timeout,
                        "could not look up the subject's stream; nothing was sent",
                    )
                    .temporary(),
                ),
            );
        }
        for (k, (_, indices)) in order.into_iter().enumerate() {
            let k = k as u32;
            let batch_id = format!("{}{job_id}_{k}", self.batch_prefix);
            let n = indices.len();
            self.track(job_id, k, indices.clone(), Vec::new());
            for (seq, &i) in indices.iter().enumerate() {
                let (subject, payload, mut hdrs) = headers::encode_ref(&batch[i], self.opts.dedup);
                hdrs.insert(headers::BATCH_ID, batch_id.as_str());
                hdrs.insert(headers::BATCH_SEQUENCE, (seq + 1).to_string().as_str());
                let last = seq + 1 == n;
                if last {
                    hdrs.insert(headers::BATCH_COMMIT, "1");
                }
                let r = if last {
                    let reply = format!("{}.{job_id}.a{k}.c", self.inbox);
                    self.client
                        .publish_with_reply_and_headers(subject, reply, hdrs, payload)
                        .await
                } else if seq == 0 {
                    let reply = format!("{}.{job_id}.a{k}.s", self.inbox);
                    self.client
                        .publish_with_reply_and_headers(subject, reply, hdrs, payload)
                        .await
                } else {
                    self.client
                        .publish_with_headers(subject, hdrs, payload)
                        .await
                };
                if let Err(e) = r {
                    // The batch cannot commit without every message: fail it whole. Messages
                    // already written are abandoned by the server (never committed).
                    let o = not_queued(e);
                    self.settle_group(job_id, k, |_| o.clone());
                    break;
                }
            }
        }
    }

    async fn send_fast(&mut self, job_id: u64, batch: Vec<Message>) {
        let (order, unknown) = self.group_by_stream(job_id, &batch).await;
        let mut slots: Vec<Option<Message>> = batch.into_iter().map(Some).collect();
        let mut reply = String::with_capacity(self.inbox.len() + 96);
        // Stream unknown for now (lookup timed out): publish those one by one with their own
        // pub acks, as async mode does; the server's answer (stored, no responders, ...) decides.
        for i in unknown {
            if let Some(msg) = slots[i].take() {
                self.publish_kept(job_id, i, msg, false, &mut reply).await;
            }
        }
        for (k, (stream, mut indices)) in order.into_iter().enumerate() {
            let facts = self.stream_facts(&stream).await;
            if !facts.fast {
                for i in indices {
                    if let Some(msg) = slots[i].take() {
                        self.publish_kept(job_id, i, msg, false, &mut reply).await;
                    }
                }
                continue;
            }
            let k = k as u32;
            let prefix = format!("{}.{job_id}.f{k}", self.inbox);
            let id = format!("{}{job_id}_{k}", self.batch_prefix);
            let mut encoded = Vec::with_capacity(indices.len());
            let mut msgs = Vec::with_capacity(indices.len());
            indices.retain(|&i| {
                let Some(msg) = slots[i].take() else {
                    return false;
                };
                let (subject, payload, hdrs) = headers::encode_ref(&msg, self.opts.dedup);
                if let Some(max) = facts.max_msg_size
                    && wire_len(&hdrs, &payload) > max
                {
                    self.router.settle(
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
            self.track(job_id, k, indices, msgs);
            let mut last_subject = String::new();
            let mut sent = 0u64;
            let mut failure = None;
            for (subject, payload, hdrs) in encoded {
                let seq = sent + 1;
                let op = if seq == 1 { Op::Start } else { Op::Append };
                fast::reply(&mut reply, &prefix, &id, seq, op);
                if seq == n {
                    last_subject.clone_from(&subject);
                }
                if let Err(e) = self
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
                    fast::reply(&mut reply, &prefix, &id, n + 1, Op::CommitEob);
                    self.client
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
                self.settle_group(job_id, k, |j| {
                    if (j as u64) < sent {
                        maybe.clone()
                    } else {
                        unsent.clone()
                    }
                });
            } else if let Some(g) = self.groups.lock().get_mut(&(job_id, k)) {
                // Handed over in full: its silence counts from now.
                g.heard = Instant::now();
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct ApiAck<'a> {
    #[serde(borrow)]
    stream: Option<&'a str>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    /// Atomic batches: messages committed.
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
pub(crate) struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

impl ApiError {
    pub(crate) fn err_code(&self) -> u16 {
        self.err_code
    }
}

/// The typed error for a JetStream API error reply.
pub(crate) fn api_error(e: &ApiError) -> Error {
    let kind = match (e.code, e.err_code) {
        (_, 10054 | 10003) => ErrorKind::TooLarge, // message / payload size exceeded
        (401 | 403, _) => ErrorKind::Auth,
        // 503, and batches in flight over the server's limit: try again later.
        (503 | 429, _) | (_, 10211) => ErrorKind::Overloaded,
        _ => ErrorKind::Rejected,
    };
    let error = err(
        kind,
        format!(
            "JetStream refused the message: {} (code {}, err_code {})",
            e.description, e.code, e.err_code
        ),
    );
    if kind == ErrorKind::Overloaded || e.err_code == DUPLICATE_IN_PROCESS {
        error.temporary()
    } else {
        error
    }
}

/// What a JetStream reply says.
enum Reply<'a> {
    Stored {
        stream: &'a str,
        seq: u64,
        duplicate: bool,
        count: Option<u64>,
    },
    /// Refused for a reason of its own: nothing stored, and asking again would not help.
    Refused(Error),
    /// "No responders" or "temporarily unavailable": nothing stored, and a moment later the
    /// stream may have a leader again (JetStream starting, a clustered stream electing one).
    Unavailable(Error),
    /// Another publish with the same message id is being stored (a resend raced its
    /// original): this one stored nothing, and the other decides.
    InProcess(Error),
    /// An empty reply (the first message of an atomic batch was accepted).
    Empty,
    Unreadable,
}

impl Reply<'_> {
    /// Why to publish the message again later, if the reply says that may help.
    fn again(&self) -> Option<Again> {
        match self {
            Reply::Unavailable(_) => Some(Again::NoLeader),
            Reply::InProcess(_) => Some(Again::InProcess),
            _ => None,
        }
    }

    /// The outcome of a message published on its own.
    fn outcome(self) -> Outcome {
        match self {
            Reply::Stored {
                stream,
                seq,
                duplicate,
                ..
            } => Outcome::Acked(Ack {
                position: Position::Stream {
                    stream: stream.to_owned(),
                    sequence: seq,
                    duplicate,
                },
            }),
            Reply::Refused(e) | Reply::Unavailable(e) => Outcome::Failed(e),
            // The message may well be stored, by the other publish.
            Reply::InProcess(e) => Outcome::Unknown(e),
            Reply::Empty | Reply::Unreadable => unreadable(),
        }
    }
}

fn parse_reply(m: &async_nats::Message) -> Reply<'_> {
    if m.status == Some(StatusCode::NO_RESPONDERS) {
        // Nothing stored. Usually no stream covers the subject (retrying will not help), but
        // a restarting server answers the same until JetStream is up again: say both.
        return Reply::Unavailable(
            err(
                ErrorKind::Rejected,
                "no JetStream responder: no stream covers the subject, or JetStream is not ready \
                 yet (server starting or restarting)",
            )
            .temporary(),
        );
    }
    if m.payload.is_empty() {
        return Reply::Empty;
    }
    match serde_json::from_slice::<ApiAck<'_>>(&m.payload) {
        Ok(ApiAck { error: Some(e), .. }) if e.err_code == DUPLICATE_IN_PROCESS => {
            Reply::InProcess(api_error(&e))
        }
        // Other 503 errors (a full stream, ...) are answers about the message.
        Ok(ApiAck { error: Some(e), .. }) if e.err_code == TEMPORARILY_UNAVAILABLE => {
            Reply::Unavailable(api_error(&e))
        }
        Ok(ApiAck { error: Some(e), .. }) => Reply::Refused(api_error(&e)),
        Ok(ApiAck {
            stream: Some(stream),
            seq: Some(seq),
            duplicate,
            count,
            ..
        }) => Reply::Stored {
            stream,
            seq,
            duplicate,
            count,
        },
        _ => Reply::Unreadable,
    }
}

fn unreadable() -> Outcome {
    Outcome::Unknown(err(
        ErrorKind::Other,
        "unreadable JetStream ack; the message may be stored",
    ))
}

/// A reply for atomic batch `k` of engine batch `b`: `s` (first message) or `c` (commit).
fn route_atomic(
    router: &OutcomeRouter,
    groups: &Groups,
    b: u64,
    k: u32,
    kind: &str,
    m: &async_nats::Message,
) {
    let reply = parse_reply(m);
    if kind == "s" {
        if let Reply::Refused(e) | Reply::Unavailable(e) = reply
            && let Some(g) = groups.lock().get_mut(&(b, k))
        {
            g.early = Some(e);
        }
        return;
    }
    let Some(g) = groups.lock().remove(&(b, k)) else {
        return;
    };
    let n = g.indices.len();
    match reply {
        Reply::Stored {
            stream,
            seq,
            duplicate,
            count,
        } if count.is_none_or(|c| c == n as u64) && seq >= n as u64 => {
            // Committed under the stream lock: consecutive sequences ending at `seq`.
            let first = seq + 1 - n as u64;
            for (j, i) in g.indices.into_iter().enumerate() {
                router.settle(
                    b,
                    i,
                    Outcome::Acked(Ack {
                        position: Position::Stream {
                            stream: stream.to_owned(),
                            sequence: first + j as u64,
                            duplicate,
                        },
                    }),
                );
            }
        }
        Reply::Refused(e) | Reply::Unavailable(e) => {
            // All or nothing: the whole batch was not stored.
            let e = g.early.unwrap_or(e);
            for i in g.indices {
                router.settle(b, i, Outcome::Failed(e.clone()));
            }
        }
        Reply::InProcess(e) => {
            // A batch with one of these ids is being stored: this one may be, too.
            for i in g.indices {
                router.settle(b, i, Outcome::Unknown(e.clone()));
            }
        }
        _ => {
            let o = Outcome::Unknown(err(
                ErrorKind::Contract,
                "atomic batch ack does not match the batch; it may be stored",
            ));
            for i in g.indices {
                router.settle(b, i, o.clone());
            }
        }
    }
}

/// A reply for message `seq` (operation `op`) of fast batch `k` of engine batch `b`.
fn route_fast(r: &Router, b: u64, k: u32, (seq, op): (u64, u8), m: &async_nats::Message) {
    let (router, groups) = (&*r.router, &r.groups);
    let event = match parse_reply(m) {
        // No responders carries no JSON: nothing was stored, and it concerns the whole batch.
        Reply::Refused(error) | Reply::Unavailable(error) if m.payload.is_empty() => {
            Event::Refused {
                seq,
                error,
                scope: fast::Scope::Batch,
            }
        }
        _ => fast::parse(seq, &m.payload),
    };
    let mut map = groups.lock();
    let Some(g) = map.get_mut(&(b, k)) else {
        return;
    };
    g.heard = Instant::now();
    let end = match event {
        Event::Progress | Event::Unreadable => return,
        Event::Refused { seq: s, error, .. } if op == Op::CommitEob as u8 && s == seq => {
            // The commit itself was refused.
            fast::End::CommitRefused(error)
        }
        Event::Refused { seq, error, scope } => {
            g.fast.refuse(seq, error, scope);
            return;
        }
        Event::Committed {
            stream,
            last,
            count,
        } => fast::End::Committed {
            stream,
            last,
            count,
        },
        Event::Single { stream, sequence } => {
            // A server without fast batches stored this one as a plain publish.
            let Some(&i) = g.indices.get((seq as usize).wrapping_sub(1)) else {
                return;
            };
            if g.fast.single() == g.indices.len() {
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
    for (j, (i, msg)) in g.indices.into_iter().zip(g.msgs).enumerate() {
        match g.fast.fate(j as u64 + 1, &end) {
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

/// What the reply task needs.
struct Router {
    router: Arc<OutcomeRouter>,
    groups: Groups,
    kept: Arc<Kept>,
    resend: mpsc::WeakUnboundedSender<Job>,
}

impl Router {
    /// Hand messages of batch `b` back to the writer to publish again with their ids:
    /// `maybe_stored` when an earlier attempt may be stored (no ack came), otherwise they
    /// were definitely not stored.
    fn send_again(&self, b: u64, items: Vec<(usize, Message)>, verify: bool, maybe_stored: bool) {
        let items = match self.resend.upgrade() {
            Some(tx) => match tx.send(Job::Resend {
                id: b,
                items,
                verify,
                maybe_stored,
            }) {
                Ok(()) => return,
                Err(mpsc::error::SendError(Job::Resend { items, .. })) => items,
                Err(_) => return,
            },
            None => items,
        };
        // The sink is gone: not sent again.
        for (i, _) in items {
            if maybe_stored {
                self.router.settle(
                    b,
                    i,
                    Outcome::Unknown(err(
                        ErrorKind::Closed,
                        "NATS writer stopped before sending again; an earlier attempt may be stored",
                    )),
                );
            } else {
                self.kept.settle(b, i, stopped());
            }
        }
    }

    /// A pub ack (or refusal) for message `i` of batch `b`. "No responders" and 503 are tried
    /// again with backoff while the engine waits for the message (see [`crate::retry`]).
    fn single(self: &Arc<Self>, b: u64, i: usize, m: &async_nats::Message) {
        let reply = parse_reply(m);
        if let Some(why) = reply.again()
            && let Some(attempt) = self.kept.retry(b, i)
        {
            // "In process" says the subject is covered: no stream check for it.
            let verify = attempt.verify && why == Again::NoLeader;
            let me = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(attempt.wait).await;
                me.send_again(b, vec![(i, attempt.msg)], verify, false);
            });
            return;
        }
        self.kept.settle(b, i, reply.outcome());
    }
}

/// Send again, with their ids, the messages that heard nothing for `silence` (see
/// [`crate::retry`]): fast batches whose flow went quiet, and messages published on their own.
/// Runs until every sink handle is gone.
async fn resend_silent(r: Arc<Router>, silence: Duration) {
    let tick = (silence / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if r.resend.upgrade().is_none() {
            return;
        }
        let now = Instant::now();
        let quiet: Vec<((u64, u32), Group)> = r
            .groups
            .lock()
            // Atomic groups keep no messages: their commit decides, and is waited for.
            .extract_if(|_, g| {
                !g.msgs.is_empty() && now.saturating_duration_since(g.heard) >= silence
            })
            .collect();
        for ((b, _), g) in quiet {
            let Some(open) = r.router.unsettled(b) else {
                continue;
            };
            let items: Vec<(usize, Message)> = g
                .indices
                .into_iter()
                .zip(g.msgs)
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
        for (b, items) in r.kept.silent(now, silence) {
            tracing::debug!(
                messages = items.len(),
                "no ack; sending the messages again with their ids"
            );
            r.send_again(b, items, false, true);
        }
    }
}

fn no_stream() -> Outcome {
    Outcome::Failed(err(
        ErrorKind::Rejected,
        "no JetStream stream covers the subject",
    ))
}

/// JetStream's "system temporarily unavailable" (code 503): no meta or stream leader yet.
const TEMPORARILY_UNAVAILABLE: u16 = 10008;

/// JetStream's "duplicate message id is in process" (code 409): a publish with the same
/// `Nats-Msg-Id` is being stored right now (a resend overtook its original, which the stream
/// leader is still replicating). Asked again a moment later the stream answers "duplicate".
pub(crate) const DUPLICATE_IN_PROCESS: u16 = 10158;

/// Why a publish is asked again (see [`Reply::again`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Again {
    /// "No responders" or "temporarily unavailable": no stream leader (or no stream).
    NoLeader,
    /// "Duplicate message id is in process": another publish of it is being stored.
    InProcess,
}

fn stopped() -> Outcome {
    Outcome::Failed(Error::closed("NATS writer stopped").with_backend(BACKEND))
}

async fn route(mut sub: async_nats::Subscriber, skip: usize, r: Arc<Router>) {
    while let Some(m) = sub.next().await {
        let Some(rest) = m.subject.as_str().get(skip..) else {
            continue;
        };
        let Some((b, i)) = rest.split_once('.') else {
            continue;
        };
        let Ok(b) = b.parse::<u64>() else { continue };
        if let Some(fast) = i.strip_prefix('f') {
            if let Some((k, tail)) = fast.split_once('.')
                && let Ok(k) = k.parse::<u32>()
                && let Some((seq, op)) = fast::parse_tail(tail)
            {
                route_fast(&r, b, k, (seq, op), &m);
            }
            continue;
        }
        if let Some(atomic) = i.strip_prefix('a') {
            if let Some((k, kind)) = atomic.split_once('.')
                && let Ok(k) = k.parse::<u32>()
            {
                route_atomic(&r.router, &r.groups, b, k, kind, &m);
            }
            continue;
        }
        let Ok(i) = i.parse::<usize>() else { continue };
        r.single(b, i, &m);
    }
    // The connection is gone for good: pending batches resolve through the engine's deadline.
    tracing::debug!("NATS ack inbox closed");
}

impl BatchSink for NatsSink {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> SinkLimits {
        self.limits
    }

    fn validate(&self, msg: &Message) -> Result<(), Error> {
        eventbus_core::validate::message(msg, TopicRules::Nats, self.limits.max_message_bytes)?;
        if self.denied.contains(msg.topic().as_str()) {
            return Err(err(
                ErrorKind::Auth,
                "the server refused this connection permission to publish to this subject",
            ));
        }
        Ok(())
    }

    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        let n = batch.len();
        let (id, outcomes) = self.router.register(n);
        // Queued synchronously: the writer publishes batches in call order.
        let queued = self.tx.send(Job::Batch { id, batch }).is_ok();
        let kept = Arc::clone(&self.kept);
        async move {
            if !queued {
                return vec![stopped(); n];
            }
            let out = outcomes.await;
            kept.forget(id);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &'static str) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.0.0".into(),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn an_id_in_process_is_unknown_and_asked_again() {
        let m = reply(
            r#"{"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#,
        );
        let o = parse_reply(&m).outcome();
        assert!(
            matches!(&o, Outcome::Unknown(e) if e.is_retryable()),
            "never Failed: the other publish may store it ({o:?})"
        );
        assert_eq!(parse_reply(&m).again(), Some(Again::InProcess));
    }

    #[test]
    fn only_transient_refusals_are_asked_again() {
        let unavailable = reply(
            r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
        );
        assert!(matches!(
            parse_reply(&unavailable).outcome(),
            Outcome::Failed(_)
        ));
        assert_eq!(parse_reply(&unavailable).again(), Some(Again::NoLeader));
        let mut no_responders = reply("");
        no_responders.status = Some(StatusCode::NO_RESPONDERS);
        assert!(matches!(
            parse_reply(&no_responders).outcome(),
            Outcome::Failed(_)
        ));
        assert_eq!(parse_reply(&no_responders).again(), Some(Again::NoLeader));
        let full = reply(
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        );
        assert!(matches!(parse_reply(&full).outcome(), Outcome::Failed(_)));
        assert_eq!(parse_reply(&full).again(), None);
        let stored = reply(r#"{"stream":"S","seq":7}"#);
        assert!(parse_reply(&stored).outcome().is_acked());
        assert_eq!(parse_reply(&stored).again(), None);
        let unreadable = reply("garbage");
        assert_eq!(parse_reply(&unreadable).again(), None);
    }
}
