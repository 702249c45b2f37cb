//! The publishing side: core NATS publishes with a reply subject on one shared inbox
//! subscription, written in order by one writer task, with every ack of every batch outstanding
//! at once (bounded by the engine's ACK window).
//!
//! One file per publish mode, each a [`Protocol`]: [`async_mode`] ([`PublishMode::Async`], one
//! pub ack per message), [`atomic`] ([`PublishMode::Atomic`], ADR-50 atomic batches, one ack per
//! batch) and [`fast`] ([`PublishMode::Fast`], ADR-50 fast ingest, flow-controlled acks). The
//! writer task ([`writer`]) and the reply task ([`reply`], which also parses JetStream acks and
//! sends again what needs it) call the mode without knowing its wire format, so a change to one
//! protocol stays in its file.

mod async_mode;
mod atomic;
mod fast;
mod reply;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{BatchSink, Error, ErrorKind, Message, Outcome, SinkLimits};
use tokio::sync::mpsc;

use crate::error::{BACKEND, err};
use crate::headers;
use crate::retry::Kept;
use async_mode::Async;
use atomic::Atomic;
use fast::Fast;
use reply::Router;
use writer::{Job, Writer, stopped};

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
    /// Fast-ingest batches (server 2.14+, stream created with `allow_batched`), in lanes: a
    /// stream's messages are spread over [`FAST_MAX_IN_FLIGHT`] lanes by key, each with one
    /// batch in flight and the rest queued behind it, so that a key's messages are stored in
    /// publish order through faults (a batch that ends short is sent again, in order, before
    /// anything after it; this needs [`SinkOptions::dedup`]). Messages without a key take any
    /// free lane, in publish order: in order without faults, not through them. Flow-controlled acks every few hundred messages
    /// instead of one per message, gaps fail the rest of the batch (`gap=fail`) so nothing is
    /// reported stored that is not. Not atomic: a batch can be stored in part, and the
    /// outcomes say which part. Falls back to
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
/// Fast batches one sink keeps in flight per stream: one per lane, the lanes a stream's keys
/// are spread over (see [`PublishMode::Fast`]). The server limits fast batches in flight per
/// stream across all publishers (`jetstream.limits.batch.max_inflight_per_stream`), and spaces
/// its flow acks by `500 / batches in flight`.
pub const FAST_MAX_IN_FLIGHT: usize = 16;

/// How long a fast batch may hear nothing before its lane deals with it (sends it again with
/// ids, else settles it `Unknown`) when the connection's `ack_timeout` is zero.
const LANE_SILENCE: Duration = Duration::from_secs(10);

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

/// One publish mode's protocol: how the writer sends an engine batch, and what the replies to
/// it mean. The writer and the reply task know nothing else of the mode; what every mode shares
/// (a message published with its own pub ack, its retries and resends) they do themselves.
trait Protocol: Send + 'static {
    /// What the mode keeps of one of its batches in flight (a [`writer::Group`]) until the
    /// replies settle it.
    type State: Send + 'static;

    /// The engine's limits in this mode, given the connection's.
    fn limits(limits: SinkLimits) -> SinkLimits {
        limits
    }

    /// Publish engine batch `id`. Called by the single writer task, so batches go out in call
    /// order.
    fn send(
        &mut self,
        w: &mut Writer<Self::State>,
        id: u64,
        batch: Vec<Message>,
    ) -> impl Future<Output = ()> + Send;

    /// A reply on `<inbox>.<b>.<tail>` whose `tail` is not a slot number (a message's own pub
    /// ack): one of the mode's batch replies, or ignored.
    fn route(r: &Router<Self::State>, b: u64, tail: &str, m: &async_nats::Message);

    /// A lane batch of this mode ended ([`Job::Lane`]): free its lane and send what waits on
    /// it. Only fast mode has lanes.
    fn resume(
        &mut self,
        _w: &mut Writer<Self::State>,
        _done: fast::LaneDone,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Deal with the batches in flight that heard nothing for `silence` at `now` (see
    /// [`crate::retry`]); a zero `silence` (after a reconnect) means every batch last heard of
    /// before `now`. Nothing by default: a mode that keeps no messages waits for its batch's
    /// commit to decide.
    fn resend_quiet(_r: &Router<Self::State>, _now: Instant, _silence: Duration) {}
}

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
        match opts.mode {
            PublishMode::Async => Self::start(|_| Async, client, js, opts, denied, silence).await,
            PublishMode::Atomic => {
                Self::start(Atomic::new, client, js, opts, denied, silence).await
            }
            PublishMode::Fast => Self::start(Fast::new, client, js, opts, denied, silence).await,
        }
    }

    /// Subscribe to the ack inbox and start the reply, resend and writer tasks for `mode`,
    /// which is made from the sink's batch id prefix.
    async fn start<P: Protocol>(
        mode: impl FnOnce(String) -> P,
        client: Client,
        js: async_nats::jetstream::Context,
        opts: SinkOptions,
        denied: Arc<crate::denied::Denied>,
        silence: Duration,
    ) -> Result<Self, Error> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            err(ErrorKind::Connect, "could not subscribe to the ack inbox")
                .temporary()
                .with_source(e)
        })?;
        let router = Arc::new(OutcomeRouter::new(BACKEND));
        let groups: writer::Groups<P::State> = Arc::default();
        // Unbounded by type, bounded in fact: batch jobs are at most the engine's batches in
        // flight, and resend jobs only carry messages of those batches, so the queue never holds
        // more than the ACK window. A bounded channel would make the reply task, which must keep
        // reading acks off the connection, wait on the writer, which may itself be waiting on a
        // stalled connection or a stream lookup.
        let (tx, rx) = mpsc::unbounded_channel();
        let kept = Arc::new(Kept::new(Arc::clone(&router)));
        let replies = Arc::new(Router {
            router: Arc::clone(&router),
            groups: Arc::clone(&groups),
            kept: Arc::clone(&kept),
            dedup: opts.dedup,
            // Weak: the writer stops once every sink handle is gone.
            resend: tx.downgrade(),
        });
        let w = Writer::new(
            client.clone(),
            js,
            inbox.clone(),
            &replies,
            Arc::clone(&denied),
        );
        tokio::spawn(reply::route::<P>(
            sub,
            inbox.len() + 1,
            Arc::clone(&replies),
        ));
        // Fast mode's lanes need the silence check even without ids (a lane whose batch
        // heard nothing is freed) and when resends are off (then after LANE_SILENCE).
        let quiet = if silence.is_zero() {
            LANE_SILENCE
        } else {
            silence
        };
        let singles = opts.dedup && !silence.is_zero();
        tokio::spawn(reply::resend_silent::<P>(
            replies,
            client.clone(),
            quiet,
            singles,
        ));
        // Leave room for the headers we add (Nats-Msg-Id, key, batch) and the NATS/1.0 line.
        let max = client
            .server_info()
            .max_payload
            .saturating_sub(headers::OVERHEAD);
        let limits = P::limits(SinkLimits::none().max_message_bytes(max));
        // The inbox ends in a unique token (a nuid): reuse it for batch ids.
        let batch_prefix = inbox.rsplit('.').next().unwrap_or_default().to_owned();
        tokio::spawn(w.run(mode(batch_prefix), rx));
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

    /// Messages this sink has sent again so far: after a silence of the connection's
    /// `ack_timeout`, after "no responders" or a 503, or cut off from a fast batch (also counted
    /// in the metric `eventbus_nats_resent_total`). 0 on a healthy, keeping-up server.
    pub fn resent(&self) -> u64 {
        self.kept.resent()
    }
}

impl BatchSink for NatsSink {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> SinkLimits {
        self.limits
    }

    fn validate(&self, msg: &Message) -> Result<(), Error> {
        eventbus_core::validate::message(
            msg,
            &crate::SUBJECT_RULES,
            self.limits.max_message_bytes,
        )?;
        if self.denied.contains(msg.topic().as_str()) {
            return Err(writer::denied());
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
