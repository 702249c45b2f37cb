//! The user-facing publish API.

use std::future::Future;
use std::time::Duration;

use crate::error::Error;
use crate::message::Message;
use crate::outcome::PendingAck;

/// What [`Publisher::close`] left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// Messages admitted before close whose outcome was still unknown at the deadline. Each of
    /// them resolved as [`Outcome::Unknown`](crate::Outcome::Unknown).
    pub unresolved: u64,
}

impl CloseReport {
    /// A report with `unresolved` messages left.
    pub fn new(unresolved: u64) -> Self {
        CloseReport { unresolved }
    }
}

/// Two-phase publishing: admission, then an ack to await.
///
/// ```
/// # async fn demo(p: &impl eventbus_core::Publisher) -> Result<(), eventbus_core::Error> {
/// use eventbus_core::Message;
/// let pending = p.publish(Message::new("orders.created", "{}")).await?; // admitted
/// let ack = pending.await.into_result()?;                             // stored
/// # let _ = ack; Ok(()) }
/// ```
///
/// # Contract
/// - `publish` validates first (no I/O, nothing else in flight affected), then waits for room in
///   the ACK window (or fails with [`ErrorKind::Overloaded`](crate::ErrorKind::Overloaded) when
///   so configured), then returns. Every admitted message resolves exactly once.
/// - `flush` resolves when every message admitted before the call has an outcome.
/// - `close` flushes, waits at most `deadline`, refuses later publishes with
///   [`ErrorKind::Closed`](crate::ErrorKind::Closed) and reports what was left unresolved.
pub trait Publisher: Send + Sync {
    /// Admit a message; returns once it holds a window slot.
    fn publish(&self, msg: Message) -> impl Future<Output = Result<PendingAck, Error>> + Send;

    /// Wait until everything admitted so far has an outcome.
    fn flush(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Flush, then close. Idempotent.
    fn close(&self, deadline: Duration) -> impl Future<Output = Result<CloseReport, Error>> + Send;
}
