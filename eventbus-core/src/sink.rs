//! The seam between the batching engine and a backend.

use std::future::Future;

use crate::error::Error;
use crate::message::Message;
use crate::outcome::Outcome;

/// Static limits a backend imposes; the engine clamps its configuration to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkLimits {
    /// Most messages in one batch (NATS atomic batches: 1,000).
    pub max_batch_messages: Option<usize>,
    /// Most bytes in one batch.
    pub max_batch_bytes: Option<usize>,
    /// Largest single message ([`Message::encoded_len`]).
    pub max_message_bytes: Option<usize>,
    /// Most batches in flight at once (NATS atomic batches are limited per stream).
    pub max_inflight_batches: Option<usize>,
}

impl SinkLimits {
    /// No limits.
    pub fn none() -> Self {
        SinkLimits::default()
    }
    /// Set `max_batch_messages`.
    pub fn max_batch_messages(mut self, n: usize) -> Self {
        self.max_batch_messages = Some(n);
        self
    }
    /// Set `max_batch_bytes`.
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = Some(n);
        self
    }
    /// Set `max_message_bytes`.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = Some(n);
        self
    }
    /// Set `max_inflight_batches`.
    pub fn max_inflight_batches(mut self, n: usize) -> Self {
        self.max_inflight_batches = Some(n);
        self
    }
}

/// What the batching engine needs from a backend: validate a message, send a batch.
///
/// # Contract
/// - [`BatchSink::validate`] runs before a message takes a window slot and does no I/O.
/// - [`BatchSink::send_batch`] returns **exactly one** [`Outcome`] per message, in input order.
///   The engine checks the count and resolves every message of a batch that breaks it as
///   [`Outcome::Unknown`] with [`ErrorKind::Contract`](crate::ErrorKind::Contract).
/// - The engine calls `send_batch` from one task, in admission order. A sink that wants
///   per-key order must put the batch on the wire (or on an ordered queue) in that call order:
///   do the ordering-relevant work synchronously before returning the future.
/// - The returned future may be dropped (deadline, close): the engine then reports every message
///   of the batch as [`Outcome::Unknown`]. Dropping it must not corrupt the sink.
/// - Never report a message that may have reached the broker as [`Outcome::Failed`].
pub trait BatchSink: Send + Sync + 'static {
    /// Short backend name for errors and metrics (`"nats"`, `"kafka"`, `"memory"`).
    fn name(&self) -> &'static str;

    /// The backend's limits.
    fn limits(&self) -> SinkLimits;

    /// Check a message before it is admitted (topic rules, headers, size). No I/O.
    fn validate(&self, msg: &Message) -> Result<(), Error>;

    /// Send a batch and resolve when every message has an outcome.
    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static;

    /// Flush client-side buffers and release resources; called once by the engine on close,
    /// after the last batch resolved. The default does nothing.
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
