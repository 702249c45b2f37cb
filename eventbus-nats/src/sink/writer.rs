//! The writer task: publishes every job in order on the connection, engine batches through the
//! sink's [`Protocol`], and what every mode shares: a message published with its own pub ack,
//! stream lookups, and the batches in flight that the reply task settles.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{Error, ErrorKind, Message, Outcome, SinkLimits};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::Protocol;
use super::reply::Router;
use crate::error::{BACKEND, err};
use crate::headers;
use crate::lookup::SubjectStreams;
use crate::retry::Kept;

/// What the sink and the reply task hand the writer.
pub(super) enum Job {
    /// An engine batch, in the sink's mode.
    Batch { id: u64, batch: Vec<Message> },
    /// Messages `(slot, message)` of engine batch `id` published again one by one, with their
    /// own pub acks: ones definitely not stored through no fault of their own ("no responders"
    /// to a message published alone), or ones that heard no ack at all (`maybe_stored`). Fast
    /// batches go back to their lane instead ([`Job::Lane`]).
    Resend {
        id: u64,
        items: Vec<(usize, Message)>,
        /// Check first that a stream covers each subject (a retry past the first few).
        verify: bool,
        /// An earlier attempt may be stored: never report these `Failed`.
        maybe_stored: bool,
    },
    /// A fast-mode lane batch ended: free the lane and send its next batch.
    Lane(super::fast::LaneDone),
}

/// One atomic or fast batch in flight: which slots of the engine batch it carries (a fast lane
/// batch, which spans engine batches, names its own in its state and leaves this empty).
pub(super) struct Group<S> {
    pub(super) indices: Vec<usize>,
    /// What its mode keeps of it ([`Protocol::State`]).
    pub(super) state: S,
}

/// The batches in flight, by engine batch and batch `k` within it (atomic), or by lane batch
/// `n` and lane (fast): filled by the writer, settled by the reply task.
pub(super) type Groups<S> = Arc<Mutex<HashMap<(u64, u32), Group<S>>>>;

/// The writer task's state: the connection, the ack inbox, and what every mode publishes with.
/// `S` is the mode's [`Protocol::State`].
pub(super) struct Writer<S> {
    pub(super) client: Client,
    pub(super) js: async_nats::jetstream::Context,
    pub(super) inbox: String,
    pub(super) router: Arc<OutcomeRouter>,
    pub(super) groups: Groups<S>,
    /// Send `Nats-Msg-Id` ([`SinkOptions::dedup`](super::SinkOptions::dedup)).
    pub(super) dedup: bool,
    /// Subject -> stream (None: no stream captures it), for atomic and fast batches; bounded.
    streams: SubjectStreams,
    /// Messages kept for retries after "no responders".
    pub(super) kept: Arc<Kept>,
    /// A stream lookup for a retry timed out: skip the check until then.
    lookup_quiet_until: Option<std::time::Instant>,
    /// Groups tracked before those of finished engine batches are swept out: a few times the
    /// mode's batches in flight (a batch has a group per stream it writes to).
    groups_cap: usize,
    /// Subjects the server refused this connection permission to publish to.
    pub(super) denied: Arc<crate::denied::Denied>,
}

/// The error for a subject the server refused this connection permission to publish to.
pub(super) fn denied() -> Error {
    err(
        ErrorKind::Auth,
        "the server refused this connection permission to publish to this subject",
    )
}

pub(super) fn not_queued(e: impl std::error::Error + Send + Sync + 'static) -> Outcome {
    // Not handed to the connection: definitely not sent.
    Outcome::Failed(
        err(ErrorKind::Connect, "could not queue the publish")
            .temporary()
            .with_source(e),
    )
}

pub(super) fn no_stream() -> Outcome {
    Outcome::Failed(err(
        ErrorKind::Rejected,
        "no JetStream stream covers the subject",
    ))
}

pub(super) fn stopped() -> Outcome {
    Outcome::Failed(Error::closed("NATS writer stopped").with_backend(BACKEND))
}

impl<S: Send + 'static> Writer<S> {
    /// The writer for the sink whose replies `replies` routes.
    pub(super) fn new(
        client: Client,
        js: async_nats::jetstream::Context,
        inbox: String,
        replies: &Router<S>,
        denied: Arc<crate::denied::Denied>,
    ) -> Self {
        Writer {
            client,
            js,
            inbox,
            router: Arc::clone(&replies.router),
            groups: Arc::clone(&replies.groups),
            dedup: replies.dedup,
            streams: SubjectStreams::default(),
            kept: Arc::clone(&replies.kept),
            lookup_quiet_until: None,
            groups_cap: 0,
            denied,
        }
    }

    /// Publish every job in order until every sink handle is gone: engine batches in `mode`,
    /// resends one by one.
    pub(super) async fn run<P: Protocol<State = S>>(
        mut self,
        mut mode: P,
        mut rx: mpsc::UnboundedReceiver<Job>,
    ) {
        let in_flight = P::limits(SinkLimits::none()).max_inflight_batches;
        self.groups_cap = 4 * in_flight.unwrap_or(16);
        while let Some(job) = rx.recv().await {
            match job {
                Job::Batch { id, batch } => mode.send(&mut self, id, batch).await,
                Job::Lane(done) => mode.resume(&mut self, done).await,
                Job::Resend {
                    id,
                    items,
                    verify,
                    maybe_stored,
                } => {
                    // The engine stopped waiting (deadline, close): nothing to send.
                    if !self.router.is_pending(id) {
                        continue;
                    }
                    self.kept.count_resent(items.len());
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
    pub(super) async fn publish_kept(
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
    pub(super) async fn publish_one(&self, b: u64, i: usize, msg: &Message, reply: &mut String) {
        use std::fmt::Write;
        let (subject, payload, hdrs) = headers::encode_ref(msg, self.dedup);
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
    pub(super) async fn no_stream_for(&mut self, subject: &str) -> bool {
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

    /// Split a batch by stream, keeping order within each group. Messages no stream captures
    /// fail at once (nothing is sent for them); messages whose stream could not be looked up
    /// (the server did not answer in time) are returned apart, in order.
    pub(super) async fn group_by_stream(
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
    pub(super) fn track(&self, b: u64, k: u32, indices: Vec<usize>, state: S) {
        let mut groups = self.groups.lock();
        if groups.len() >= self.groups_cap {
            groups.retain(|(b, _), _| self.router.is_pending(*b));
        }
        groups.insert((b, k), Group { indices, state });
    }

    /// Settle every message of group `(b, k)` with `o`, if the group is still open.
    pub(super) fn settle_group(&self, b: u64, k: u32, o: impl Fn(usize) -> Outcome) {
        if let Some(g) = self.groups.lock().remove(&(b, k)) {
            for (j, i) in g.indices.into_iter().enumerate() {
                self.router.settle(b, i, o(j));
            }
        }
    }
}
