//! A handler runtime on top of any [`Subscription`]: bounded concurrency, strict order per key,
//! in-place retries with exponential backoff and jitter, panics caught.
//!
//! ```no_run
//! use std::time::Duration;
//! use eventbus_core::handler::{self, HandlerConfig, HandlerError};
//! # async fn demo(sub: eventbus_core::Subscription) {
//! // Resolve this on SIGTERM / Ctrl-C (e.g. `tokio::signal::ctrl_c()`) for a graceful stop.
//! let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
//! let report = handler::run(
//!     sub,
//!     HandlerConfig::default().concurrency(16),
//!     |msg, _info| async move {
//!         if msg.payload().is_empty() {
//!             return Err(HandlerError::new("empty payload"));
//!         }
//!         Ok(())
//!     },
//!     async move {
//!         let _ = stop_rx.await;
//!     },
//! )
//! .await;
//! println!("handled {} messages", report.acked);
//! # drop(stop_tx);
//! # }
//! ```
//!
//! # Semantics
//! - Messages with the same ordering key (the message key, else the envelope aggregate id) are
//!   handled one at a time, in delivery order; different keys run in parallel, at most
//!   `concurrency` at once. Messages without a key run in parallel with everything.
//! - `Ok(())` acks. An error or a panic is retried in place (the key stays blocked, so order
//!   holds) after an exponential backoff with jitter, up to `retry.max_attempts` runs in all.
//!   After the last failed run the delivery is nacked at once: the backend redelivers it and,
//!   with `SubscribeSpec::max_deliveries` and `dead_letter`, eventually moves it to the
//!   dead-letter topic. Later messages of the same key may then run before that redelivery.
//! - Keep `ack_wait` longer than a message's worst-case handling time including retries, or the
//!   broker redelivers it while it is still being handled.
//! - When `shutdown` resolves, no new delivery is started; running handlers finish (with their
//!   retries), deliveries waiting behind a key are nacked for immediate redelivery, and the
//!   subscription is closed.
//! - Each run is inside an `eventbus.handle` span (fields `id`, `topic`, `delivery`,
//!   `attempt`, and the message's W3C `traceparent` if it carries one, see [`crate::trace`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::envelope::names;
use crate::message::Message;
use crate::subscriber::{Delivery, DeliveryInfo, Subscription};

/// Why a handler run failed. Its text goes to logs; keep payload bytes and secrets out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    permanent: bool,
}

impl HandlerError {
    /// A failure described by `message`; the runtime retries it in place.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure no retry can fix (a payload that does not decode, say): the runtime skips its
    /// in-place retries and hands the delivery back (after the retry policy's first delay), so
    /// the backend's `max_deliveries` / `dead_letter` path takes it. Without `max_deliveries`
    /// it comes back once per that delay.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: true,
        }
    }

    /// Whether this failure skips in-place retries.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

/// Exponential backoff with jitter for in-place retries.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Backoff {
    /// Handler runs per delivery, the first included (1 = no in-place retry). Default 3.
    pub max_attempts: u32,
    /// Delay before the first retry. Default 100 ms.
    #[serde(with = "crate::serde_millis")]
    pub initial: Duration,
    /// Longest delay. Default 5 s.
    #[serde(with = "crate::serde_millis")]
    pub max: Duration,
    /// Growth per retry. Default 2.
    pub multiplier: f64,
    /// Fraction of each delay that is random (0 = none, 1 = anywhere from 0). Default 0.2.
    pub jitter: f64,
}

/// The backoff policy's former name.
#[deprecated(note = "renamed `Backoff`; `eventbus_core::Retry` is the error's retry hint")]
pub type Retry = Backoff;

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Set the maximum runs per delivery (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Set the first delay.
    pub fn initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }
    /// Set the longest delay.
    pub fn max(mut self, d: Duration) -> Self {
        self.max = d;
        self
    }
    /// Set the jitter fraction (clamped to 0..=1).
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = j.clamp(0.0, 1.0);
        self
    }

    /// The delay before retry number `retry` (1-based), jittered with `random` in 0..1.
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(retry.saturating_sub(1) as i32);
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

/// What keeps messages in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OrderBy {
    /// The message key, else the envelope aggregate id; unkeyed messages are unordered.
    #[default]
    KeyOrAggregate,
    /// No ordering: every message may run in parallel.
    Nothing,
}

/// Handler runtime settings.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HandlerConfig {
    /// Handlers running at once. Default 8.
    pub concurrency: usize,
    /// Ordering. Default [`OrderBy::KeyOrAggregate`].
    pub order_by: OrderBy,
    /// In-place retries.
    pub retry: Backoff,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            concurrency: 8,
            order_by: OrderBy::KeyOrAggregate,
            retry: Backoff::default(),
        }
    }
}

impl HandlerConfig {
    /// Set the concurrency (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// Set the ordering.
    pub fn order_by(mut self, o: OrderBy) -> Self {
        self.order_by = o;
        self
    }
    /// Set the retry policy.
    pub fn retry(mut self, r: Backoff) -> Self {
        self.retry = r;
        self
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Deliveries handled successfully and acked.
    pub acked: u64,
    /// Deliveries handed back (nacked) after their last failed attempt.
    pub gave_up: u64,
    /// Of those, deliveries handed back at once after a [permanent](HandlerError::permanent)
    /// failure (a payload that does not decode, in [`run_typed`]).
    pub rejected: u64,
    /// Failed handler runs (errors and panics), retried or not.
    pub failures: u64,
    /// Of those, panics.
    pub panics: u64,
    /// Deliveries nacked unhandled at shutdown.
    pub released: u64,
    /// Subscription errors seen (each is logged).
    pub subscription_errors: u64,
}

#[derive(Default)]
struct Shared {
    queues: parking_lot::Mutex<HashMap<Vec<u8>, VecDeque<Delivery>>>,
    report: parking_lot::Mutex<RunReport>,
}

fn order_key(m: &Message, order_by: OrderBy) -> Option<Vec<u8>> {
    if order_by == OrderBy::Nothing {
        return None;
    }
    m.key().map(|k| k.to_vec()).or_else(|| {
        m.headers()
            .get(names::AGGREGATE_ID)
            .map(|a| a.as_bytes().to_vec())
    })
}

/// Run `handler` over `sub` until the subscription ends or `shutdown` resolves. See the module
/// docs for the semantics.
pub async fn run<F, Fut>(
    mut sub: Subscription,
    cfg: HandlerConfig,
    handler: F,
    shutdown: impl Future<Output = ()>,
) -> RunReport
where
    F: Fn(Message, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let shared = Arc::new(Shared::default());
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut workers = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Backpressure: take a handler slot before taking the next delivery.
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let next = tokio::select! {
            n = sub.next() => n,
            _ = &mut shutdown => break,
        };
        let d = match next {
            None => break,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "subscription error");
                shared.report.lock().subscription_errors += 1;
                continue;
            }
        };
        let key = order_key(d.message(), cfg.order_by);
        if let Some(k) = &key {
            let mut queues = shared.queues.lock();
            if let Some(q) = queues.get_mut(k) {
                // A worker owns this key: it takes this delivery when it gets there.
                q.push_back(d);
                continue; // the permit goes back
            }
            queues.insert(k.clone(), VecDeque::new());
        }
        let (handler, shared) = (Arc::clone(&handler), Arc::clone(&shared));
        workers.spawn(async move {
            let _permit = permit;
            let mut d = d;
            loop {
                handle_one(&*handler, &cfg.retry, &shared, d).await;
                let Some(k) = &key else { break };
                let mut queues = shared.queues.lock();
                let q = queues.get_mut(k).expect("key owned by this worker");
                match q.pop_front() {
                    Some(next) => d = next,
                    None => {
                        queues.remove(k);
                        break;
                    }
                }
            }
        });
        // Reap finished workers so the set does not grow.
        while workers.try_join_next().is_some() {}
    }
    // Shutdown or end of stream: let running handlers finish, release what waits behind them.
    let waiting: Vec<Delivery> = shared
        .queues
        .lock()
        .values_mut()
        .flat_map(|q| q.drain(..))
        .collect();
    for d in waiting {
        shared.report.lock().released += 1;
        let _ = d.nack(Duration::ZERO).await;
    }
    while workers.join_next().await.is_some() {}
    sub.close().await;
    *shared.report.lock()
}

/// Like [`run`], for a handler of typed payloads decoded as JSON (see [`crate::codec`]): the
/// handler gets the decoded value and the message (headers, key, id). A payload that does not
/// decode never reaches the handler: it is a [permanent](HandlerError::permanent) failure,
/// handed back at once for the dead-letter path (`SubscribeSpec::max_deliveries` and
/// `dead_letter`), counted in [`RunReport::rejected`].
///
/// ```no_run
/// use eventbus_core::handler::{self, HandlerConfig};
/// #[derive(serde::Deserialize)]
/// struct OrderCreated { id: u64 }
/// # async fn demo(sub: eventbus_core::Subscription) {
/// let report = handler::run_typed(sub, HandlerConfig::default(), |order: OrderCreated, _msg| async move {
///     println!("order {}", order.id);
///     Ok(())
/// }, std::future::pending::<()>()).await;
/// # }
/// ```
pub async fn run_typed<T, F, Fut>(
    sub: Subscription,
    cfg: HandlerConfig,
    handler: F,
    shutdown: impl Future<Output = ()>,
) -> RunReport
where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(T, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    run_typed_with(crate::codec::Json, sub, cfg, handler, shutdown).await
}

/// [`run_typed`] with another [`Codec`](crate::codec::Codec).
pub async fn run_typed_with<C, T, F, Fut>(
    codec: C,
    sub: Subscription,
    cfg: HandlerConfig,
    handler: F,
    shutdown: impl Future<Output = ()>,
) -> RunReport
where
    C: crate::codec::Codec,
    T: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(T, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let codec = Arc::new(codec);
    let handler = Arc::new(handler);
    run(
        sub,
        cfg,
        move |msg: Message, _info: DeliveryInfo| {
            let decoded = codec.decode::<T>(msg.payload());
            let handler = Arc::clone(&handler);
            async move {
                let value = decoded.map_err(|e| HandlerError::permanent(e.to_string()))?;
                handler(value, msg).await
            }
        },
        shutdown,
    )
    .await
}

async fn handle_one<F, Fut>(handler: &F, retry: &Backoff, shared: &Shared, d: Delivery)
where
    F: Fn(Message, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let (msg, info, acker) = d.split();
    let parent = crate::trace::TraceParent::extract(&msg);
    let mut attempt = 1;
    loop {
        let span = tracing::info_span!(
            "eventbus.handle",
            id = %msg.id(),
            topic = %msg.topic(),
            delivery = info.delivery_count,
            attempt,
            traceparent = parent.map(|p| p.to_string()),
        );
        // Spawned so a panic is caught as a JoinError instead of tearing down the runtime.
        let run = tokio::spawn(tracing::Instrument::instrument(
            handler(msg.clone(), info.clone()),
            span,
        ))
        .await;
        let failure = match run {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some((e.to_string(), e.is_permanent())),
            Err(e) if e.is_panic() => {
                shared.report.lock().panics += 1;
                Some(("handler panicked".to_owned(), false))
            }
            Err(_) => Some(("handler task cancelled".to_owned(), false)),
        };
        let Some((why, permanent)) = failure else {
            shared.report.lock().acked += 1;
            if let Err(e) = acker.ack().await {
                tracing::warn!(error = %e, "ack failed; the message may be redelivered");
            }
            return;
        };
        shared.report.lock().failures += 1;
        if permanent || attempt >= retry.max_attempts {
            if permanent {
                tracing::warn!(id = %msg.id(), error = %why, "handler failed permanently; handing the message back for the dead-letter path");
            } else {
                tracing::warn!(id = %msg.id(), attempts = attempt, error = %why, "handler gave up; handing the message back");
            }
            {
                let mut report = shared.report.lock();
                report.gave_up += 1;
                report.rejected += u64::from(permanent);
            }
            // A permanent failure comes back at once on every delivery: hand it back after
            // the first retry delay, so a subscription without `max_deliveries` does not spin.
            let wait = if permanent {
                retry.delay(1, rand::random::<f64>())
            } else {
                Duration::ZERO
            };
            let _ = acker.nack(wait).await;
            return;
        }
        tracing::debug!(id = %msg.id(), attempt, error = %why, "handler failed; retrying");
        tokio::time::sleep(retry.delay(attempt, rand::random::<f64>())).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_down() {
        let r = Backoff::default()
            .initial(Duration::from_millis(100))
            .max(Duration::from_millis(350))
            .jitter(0.5);
        assert_eq!(r.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(r.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(r.delay(3, 0.0), Duration::from_millis(350), "capped");
        assert_eq!(
            r.delay(2, 1.0),
            Duration::from_millis(100),
            "half jittered away"
        );
    }
}
