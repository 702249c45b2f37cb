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

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_nats::{Client, StatusCode};
use eventbus_core::{
    Ack, BatchSink, Error, ErrorKind, Message, Outcome, OutcomeRouter, Position, SinkLimits,
    TopicRules,
};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::error::{BACKEND, err};
use crate::headers;

/// How a [`NatsSink`] hands batches to JetStream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishMode {
    /// Pipelined publishes, one ack per message, many outstanding. Any JetStream server.
    #[default]
    Async,
    /// One atomic batch per stream per engine batch, one ack per batch, all-or-nothing
    /// (server 2.12+, stream created with `allow_atomic`). At most 1,000 messages per batch and
    /// [`ATOMIC_MAX_IN_FLIGHT`] batches in flight per sink (the server allows 50 per stream).
    Atomic,
}

/// Atomic batches one sink keeps in flight (the engine is clamped to it). The server allows 50
/// per stream across all publishers.
pub const ATOMIC_MAX_IN_FLIGHT: usize = 16;
/// The server's limit on messages per atomic batch.
pub const ATOMIC_MAX_MESSAGES: usize = 1_000;

/// Options for [`NatsBackend::sink_with`](crate::NatsBackend::sink_with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkOptions {
    /// Publish mode. Default [`PublishMode::Async`].
    pub mode: PublishMode,
    /// Send the message id as `Nats-Msg-Id` (server-side de-duplication). Default `true`.
    pub dedup: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            mode: PublishMode::Async,
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

struct Job {
    id: u64,
    batch: Vec<Message>,
}

/// One atomic batch in flight: which slots of the engine batch it carries.
struct AtomicGroup {
    indices: Vec<usize>,
    /// An error reply to the first message (e.g. atomic publish not enabled on the stream).
    early: Option<Error>,
}

type AtomicGroups = Arc<Mutex<HashMap<(u64, u32), AtomicGroup>>>;

/// Publishes batches to JetStream. Wrap it in `eventbus_batch::Batcher`.
#[derive(Clone)]
pub struct NatsSink {
    tx: mpsc::UnboundedSender<Job>,
    router: Arc<OutcomeRouter>,
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
    pub(crate) async fn new(
        client: Client,
        js: async_nats::jetstream::Context,
        opts: SinkOptions,
        denied: Arc<crate::denied::Denied>,
    ) -> Result<Self, Error> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            err(ErrorKind::Connect, "could not subscribe to the ack inbox")
                .temporary()
                .with_source(e)
        })?;
        let router = Arc::new(OutcomeRouter::new(BACKEND));
        let groups: AtomicGroups = Arc::default();
        tokio::spawn(route(
            sub,
            inbox.len() + 1,
            Arc::clone(&router),
            Arc::clone(&groups),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        // Leave room for the headers we add (Nats-Msg-Id, key, batch) and the NATS/1.0 line.
        let max = client
            .server_info()
            .max_payload
            .saturating_sub(headers::OVERHEAD);
        let mut limits = SinkLimits::none().max_message_bytes(max);
        if opts.mode == PublishMode::Atomic {
            limits = limits
                .max_batch_messages(ATOMIC_MAX_MESSAGES)
                .max_inflight_batches(ATOMIC_MAX_IN_FLIGHT);
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
            streams: HashMap::new(),
            batch_prefix,
        };
        tokio::spawn(w.run(rx));
        Ok(NatsSink {
            tx,
            router,
            limits,
            opts,
            denied,
        })
    }

    /// The options this sink was made with.
    pub fn options(&self) -> SinkOptions {
        self.opts
    }
}

struct Writer {
    client: Client,
    js: async_nats::jetstream::Context,
    inbox: String,
    router: Arc<OutcomeRouter>,
    groups: AtomicGroups,
    opts: SinkOptions,
    /// Subject -> stream (None: no stream captures it), for atomic batches.
    streams: HashMap<String, Option<String>>,
    /// Unique per sink; batch ids are `<prefix><engine batch>_<k>`.
    batch_prefix: String,
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
            match self.opts.mode {
                PublishMode::Async => self.send_async(job).await,
                PublishMode::Atomic => self.send_atomic(job).await,
            }
        }
    }

    async fn send_async(&mut self, job: Job) {
        let mut reply = String::with_capacity(self.inbox.len() + 24);
        for (i, msg) in job.batch.into_iter().enumerate() {
            let (subject, payload, hdrs) = headers::encode(msg, self.opts.dedup);
            reply.clear();
            use std::fmt::Write;
            let _ = write!(reply, "{}.{}.{i}", self.inbox, job.id);
            if let Err(e) = self
                .client
                .publish_with_reply_and_headers(subject, reply.clone(), hdrs, payload)
                .await
            {
                self.router.settle(job.id, i, not_queued(e));
            }
        }
    }

    /// The stream capturing `subject`, cached (one lookup per new subject).
    async fn stream_of(&mut self, subject: &str) -> Option<String> {
        if let Some(s) = self.streams.get(subject) {
            return s.clone();
        }
        let found = self.js.stream_by_subject(subject).await.ok();
        // Only remember hits: a stream created later is found on the next batch.
        if found.is_some() {
            self.streams.insert(subject.to_owned(), found.clone());
        }
        found
    }

    async fn send_atomic(&mut self, job: Job) {
        // Group the batch by stream, keeping order within each group.
        let mut order: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, m) in job.batch.iter().enumerate() {
            match self.stream_of(m.topic().as_str()).await {
                Some(stream) => match order.iter_mut().find(|(s, _)| *s == stream) {
                    Some((_, v)) => v.push(i),
                    None => order.push((stream, vec![i])),
                },
                None => self.router.settle(
                    job.id,
                    i,
                    Outcome::Failed(err(
                        ErrorKind::Rejected,
                        "no JetStream stream covers the subject",
                    )),
                ),
            }
        }
        let mut slots: Vec<Option<Message>> = job.batch.into_iter().map(Some).collect();
        for (k, (_, indices)) in order.into_iter().enumerate() {
            let k = k as u32;
            let batch_id = format!("{}{}_{k}", self.batch_prefix, job.id);
            let n = indices.len();
            self.groups.lock().insert(
                (job.id, k),
                AtomicGroup {
                    indices: indices.clone(),
                    early: None,
                },
            );
            for (seq, &i) in indices.iter().enumerate() {
                let Some(msg) = slots[i].take() else { continue };
                let (subject, payload, mut hdrs) = headers::encode(msg, self.opts.dedup);
                hdrs.insert(headers::BATCH_ID, batch_id.as_str());
                hdrs.insert(headers::BATCH_SEQUENCE, (seq + 1).to_string().as_str());
                let last = seq + 1 == n;
                if last {
                    hdrs.insert(headers::BATCH_COMMIT, "1");
                }
                let r = if last {
                    let reply = format!("{}.{}.a{k}.c", self.inbox, job.id);
                    self.client
                        .publish_with_reply_and_headers(subject, reply, hdrs, payload)
                        .await
                } else if seq == 0 {
                    let reply = format!("{}.{}.a{k}.s", self.inbox, job.id);
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
                    if let Some(g) = self.groups.lock().remove(&(job.id, k)) {
                        let o = not_queued(e);
                        for i in g.indices {
                            self.router.settle(job.id, i, o.clone());
                        }
                    }
                    break;
                }
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
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

/// What a JetStream reply says.
enum Reply<'a> {
    Stored {
        stream: &'a str,
        seq: u64,
        duplicate: bool,
        count: Option<u64>,
    },
    Refused(Error),
    /// An empty reply (the first message of an atomic batch was accepted).
    Empty,
    Unreadable,
}

fn parse_reply(m: &async_nats::Message) -> Reply<'_> {
    if m.status == Some(StatusCode::NO_RESPONDERS) {
        // Nothing stored. Usually no stream covers the subject (retrying will not help), but
        // a restarting server answers the same until JetStream is up again: say both.
        return Reply::Refused(
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
        Ok(ApiAck { error: Some(e), .. }) => {
            let kind = match (e.code, e.err_code) {
                (_, 10054 | 10003) => ErrorKind::TooLarge, // message / payload size exceeded
                (401 | 403, _) => ErrorKind::Auth,
                (503, _) => ErrorKind::Overloaded,
                _ => ErrorKind::Rejected,
            };
            let mut error = err(
                kind,
                format!(
                    "JetStream refused the message: {} (code {}, err_code {})",
                    e.description, e.code, e.err_code
                ),
            );
            if kind == ErrorKind::Overloaded {
                error = error.temporary();
            }
            Reply::Refused(error)
        }
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

fn parse_ack(m: &async_nats::Message) -> Outcome {
    match parse_reply(m) {
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
        Reply::Refused(e) => Outcome::Failed(e),
        Reply::Empty | Reply::Unreadable => unreadable(),
    }
}

/// A reply for atomic batch `k` of engine batch `b`: `s` (first message) or `c` (commit).
fn route_atomic(
    router: &OutcomeRouter,
    groups: &AtomicGroups,
    b: u64,
    k: u32,
    kind: &str,
    m: &async_nats::Message,
) {
    let reply = parse_reply(m);
    if kind == "s" {
        if let Reply::Refused(e) = reply
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
        Reply::Refused(e) => {
            // All or nothing: the whole batch was not stored.
            let e = g.early.unwrap_or(e);
            for i in g.indices {
                router.settle(b, i, Outcome::Failed(e.clone()));
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

async fn route(
    mut sub: async_nats::Subscriber,
    skip: usize,
    router: Arc<OutcomeRouter>,
    groups: AtomicGroups,
) {
    while let Some(m) = sub.next().await {
        let Some(rest) = m.subject.as_str().get(skip..) else {
            continue;
        };
        let Some((b, i)) = rest.split_once('.') else {
            continue;
        };
        let Ok(b) = b.parse::<u64>() else { continue };
        if let Some(atomic) = i.strip_prefix('a') {
            if let Some((k, kind)) = atomic.split_once('.')
                && let Ok(k) = k.parse::<u32>()
            {
                route_atomic(&router, &groups, b, k, kind, &m);
            }
            continue;
        }
        let Ok(i) = i.parse::<usize>() else { continue };
        router.settle(b, i, parse_ack(&m));
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
        let queued = self.tx.send(Job { id, batch }).is_ok();
        async move {
            if !queued {
                return vec![
                    Outcome::Failed(
                        Error::closed("NATS writer stopped").with_backend(BACKEND)
                    );
                    n
                ];
            }
            outcomes.await
        }
    }
}
