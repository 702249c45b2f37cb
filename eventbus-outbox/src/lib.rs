//! # eventbus-outbox
//!
//! A transactional outbox: an event is published if and only if the service's database
//! transaction commits. You enqueue messages **inside your own sqlx transaction**, next to
//! your business rows; a [`Relay`] publishes what committed through any eventbus
//! [`Publisher`] (the batching engine over NATS, Kafka or the memory backend) and marks a row
//! published only once its ack came. A rolled-back transaction leaves nothing to publish; a
//! relay that crashes between the publish and the mark publishes the row again **with the same
//! message id**, which NATS drops by `Nats-Msg-Id` and a consumer's de-duplication drops on
//! Kafka.
//!
//! Its counterpart on the consuming side is the [`inbox`]: a handler's database effects happen
//! once per message, however often the broker delivers it.
//!
//! Two stores, both real: [`PgOutbox`] (PostgreSQL, feature `postgres`: the relay wakes on
//! `LISTEN/NOTIFY` within milliseconds of a commit) and [`SqliteOutbox`] (SQLite, feature
//! `sqlite`: the embedded default for tests and single-node services; it polls).
//!
//! ```no_run
//! # async fn demo(publisher: impl eventbus_core::Publisher + 'static) -> Result<(), eventbus_core::Error> {
//! use std::time::Duration;
//! use eventbus_core::Message;
//! use eventbus_outbox::{PgOutbox, Relay, RelayConfig};
//!
//! let pool = sqlx::PgPool::connect("postgres://app@db/app").await.unwrap();
//! let outbox = PgOutbox::new(pool.clone());
//! outbox.migrate().await?;                       // or apply `PgOutbox::schema()` yourself
//!
//! let mut tx = pool.begin().await.unwrap();
//! sqlx::query("insert into orders (id, total) values ($1, $2)")
//!     .bind(42_i64).bind(12_i64).execute(&mut *tx).await.unwrap();
//! outbox.enqueue(&mut tx, &Message::new("orders.created", r#"{"id":42}"#).with_key("order-42")).await?;
//! tx.commit().await.unwrap();                    // the event commits with the order, or not at all
//!
//! let relay = Relay::start(outbox, publisher, RelayConfig::default());
//! // ... later, on shutdown: publish what is due, then stop.
//! relay.close(Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! ## Order and retries
//!
//! The relay takes due rows in the table's sequence (the order they were inserted) and
//! publishes them as one batch; rows with the same key are handed to the publisher in that
//! order, and the backend keeps it as far as it keeps per-key order (Kafka's idempotent
//! producer does through retries). On PostgreSQL two transactions that insert concurrently may
//! commit in the other order: per-key order is insert order, which is commit order when one
//! writer at a time changes a given key (as a lock on the aggregate's row ensures).
//!
//! A row whose outcome is `Unknown` or a retryable failure is published again after a backoff
//! (doubling up to [`RelayConfig::retry_max`], with no limit on attempts), with the same id,
//! and **holds back every later row of its key** until it is published, so a retry never lets
//! a later event of the same key overtake it; a row delayed by `enqueue_at` holds its key the
//! same way. When the publisher itself refuses (closed, window full, misconfigured) the round
//! stops there and the rest waits, untouched. A message the broker refuses for what it is (too
//! large, invalid, no such topic) moves to the failed state with the error's kind and text
//! (never its payload) and does not hold its key.
//!
//! The same id makes a copy harmless only while the broker still remembers it: NATS within the
//! stream's `duplicate_window` (2 minutes by default), Kafka as long as the consumer's
//! de-duplication does. A relay down for longer than that, or retrying longer, may publish a
//! row twice.
//!
//! ## Several relays
//!
//! On PostgreSQL, relays may run side by side on one table (for availability, or to share
//! the work): the keys are spread over [`PARTITIONS`] partitions held as advisory locks, each
//! key is published by one relay at a time in commit order, and the partitions of a relay that
//! crashed are taken over at once (see [`PgOutbox`]). On SQLite, run one relay per database
//! file: two would publish the same rows side by side.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use eventbus_core::{Error, ErrorKind, Message, Outcome, Publisher};
use tokio::sync::watch;

mod codec;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod inbox;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::{PARTITIONS, PgOutbox};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteOutbox;
/// The sqlx this crate is built with: open pools and transactions through it, so that the
/// types match.
pub use sqlx;

/// The default table name.
pub const DEFAULT_TABLE: &str = "eventbus_outbox";

/// One committed row, due for publishing.
#[derive(Clone, Debug)]
pub struct Due {
    /// The row's place in commit order.
    pub seq: i64,
    /// The message, as it was enqueued (same id, key, headers and payload).
    pub message: Message,
    /// Publishes tried so far.
    pub attempts: u32,
}

/// What the outbox holds, for metrics and health.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OutboxStats {
    /// Rows not yet published (due or waiting for a retry).
    pub pending: u64,
    /// Rows in the failed state.
    pub failed: u64,
    /// How long the longest-waiting due row has been due (from its `available_at`: rows
    /// delayed by `enqueue_at` or waiting for a retry do not count until they are due): the
    /// outbox's lag.
    pub oldest_pending: Option<Duration>,
}

/// A table the [`Relay`] works on: [`PgOutbox`] or [`SqliteOutbox`] (or your own).
#[async_trait::async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Up to `max` pending rows due now, in commit order, leaving out every row whose key has
    /// an earlier pending row that is not due yet (waiting for its retry).
    async fn due(&self, max: usize) -> Result<Vec<Due>, Error>;
    /// Rows `seqs` were acked: mark them published.
    async fn published(&self, seqs: &[i64]) -> Result<(), Error>;
    /// Row `seq` gets another attempt after `after`; `why` is the error's kind and text.
    async fn retry_later(&self, seq: i64, after: Duration, why: &str) -> Result<(), Error>;
    /// Row `seq` was refused for good; `why` is the error's kind and text.
    async fn failed(&self, seq: i64, why: &str) -> Result<(), Error>;
    /// Delete up to `max` rows published more than `older_than` ago; how many went.
    async fn purge(&self, older_than: Duration, max: usize) -> Result<u64, Error>;
    /// What the table holds.
    async fn stats(&self) -> Result<OutboxStats, Error>;
    /// Return when rows may have become due: a commit notification where the store has one, or
    /// after `poll`.
    async fn wait(&self, poll: Duration);
}

/// A health check for the outbox: up while the table answers within the timeout and no due
/// row has waited `max_lag` ([`OutboxStats::oldest_pending`]): a relay that stopped, or
/// cannot keep up, turns it down. It says the relaying is behind, for an alert or a
/// dashboard; as a readiness probe it would take every instance out of service while a broker
/// is down. Use it beside the broker's own [`HealthCheck`](eventbus_core::ops::HealthCheck).
///
/// ```no_run
/// # async fn demo(outbox: eventbus_outbox::PgOutbox) {
/// use std::time::Duration;
/// use eventbus_core::ops::HealthCheck;
/// use eventbus_outbox::OutboxHealth;
///
/// let check = OutboxHealth::new(outbox, Duration::from_secs(30));
/// let h = check.health(Duration::from_secs(1)).await;
/// println!("outbox up: {} ({})", h.up, h.detail);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct OutboxHealth<S> {
    store: S,
    max_lag: Duration,
}

impl<S: OutboxStore> OutboxHealth<S> {
    /// Check `store`, down once its oldest pending row is `max_lag` old.
    pub fn new(store: S, max_lag: Duration) -> Self {
        OutboxHealth { store, max_lag }
    }
}

impl<S: OutboxStore> eventbus_core::ops::HealthCheck for OutboxHealth<S> {
    async fn health(&self, timeout: Duration) -> eventbus_core::ops::Health {
        use eventbus_core::ops::Health;
        let t0 = Instant::now();
        let stats = tokio::time::timeout(timeout, self.store.stats()).await;
        let took = t0.elapsed();
        match stats {
            Err(_) => Health::down("outbox", took, "the table did not answer in time"),
            // The error's kind and text only: the store's errors carry no payloads or secrets.
            Ok(Err(e)) => Health::down("outbox", took, format!("reading the table failed: {e}")),
            Ok(Ok(s)) => {
                let lag = s.oldest_pending.unwrap_or_default();
                let detail = format!(
                    "{} pending, {} failed, oldest pending {} ms",
                    s.pending,
                    s.failed,
                    lag.as_millis()
                );
                if lag >= self.max_lag {
                    Health::down("outbox", took, format!("lagging: {detail}"))
                } else {
                    Health::up("outbox", took, detail)
                }
            }
        }
    }
}

/// How a [`Relay`] works.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Most rows taken and published per round. Default 500.
    pub batch: usize,
    /// How often the table is read when nothing wakes the relay (SQLite always; PostgreSQL
    /// between notifications, as the fallback). Default 500 ms.
    pub poll: Duration,
    /// The first retry's delay; each further one doubles, up to `retry_max`. Default 100 ms.
    pub retry_initial: Duration,
    /// The longest delay between retries. Default 30 s.
    pub retry_max: Duration,
    /// How long published rows are kept before they are deleted (in batches). Default
    /// `Duration::ZERO`: deleted at the next purge (every 20 rounds of the relay).
    pub retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 500,
            poll: Duration::from_millis(500),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            retention: Duration::ZERO,
        }
    }
}

impl RelayConfig {
    /// Set [`RelayConfig::batch`] (at least 1).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }
    /// Set [`RelayConfig::poll`].
    pub fn poll(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }
    /// Set the retry delays.
    pub fn retry(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max.max(initial);
        self
    }
    /// Set [`RelayConfig::retention`].
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        self.retry_initial
            .saturating_mul(factor)
            .min(self.retry_max)
    }
}

/// The background task that publishes committed rows; started by [`Relay::start`], stopped by
/// [`Relay::close`] (or, without waiting, when dropped).
#[derive(Debug)]
pub struct Relay {
    /// `Some(deadline)` once closing.
    stop: watch::Sender<Option<Instant>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Start publishing `store`'s rows through `publisher` (which the relay owns and closes).
    pub fn start<S, P>(store: S, publisher: P, config: RelayConfig) -> Relay
    where
        S: OutboxStore,
        P: Publisher + 'static,
    {
        let (stop, stopped) = watch::channel(None);
        let task = tokio::spawn(run(Arc::new(store), publisher, config, stopped));
        Relay {
            stop,
            task: Some(task),
        }
    }

    /// Publish what is due now, then close the publisher, all within `deadline`. Rows not
    /// published by then stay in the table for the next relay.
    pub async fn close(mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        let _ = self.stop.send(Some(until));
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            // The task keeps to the deadline itself; the margin lets it finish closing.
            if tokio::time::timeout_at(until + Duration::from_secs(1), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Relay {
    /// Stop at once, as a crash would: the publisher is not closed and nothing in flight is
    /// waited for; rows published but not yet marked are published again, with their ids, by
    /// the next relay. For fault tests; [`Relay::close`] is the way to stop.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Relay {
    /// Stop at once: rows not yet published stay in the table.
    fn drop(&mut self) {
        if self.task.is_some() {
            let _ = self.stop.send(Some(Instant::now()));
        }
    }
}

/// The error's kind and text, for the table: never a payload (errors carry none), at most
/// 1,000 characters.
fn describe(e: &Error) -> String {
    format!("{:?}: {e}", e.kind()).chars().take(1000).collect()
}

/// Whether `e`, the outcome of one message, says that message can never be stored: the
/// broker refused it for what it is. Anything else (the publisher closed or misconfigured, no
/// permission yet, a full window) is about the path, not the row, and is retried.
fn refused_for_good(e: &Error) -> bool {
    !e.is_retryable()
        && matches!(
            e.kind(),
            ErrorKind::TooLarge | ErrorKind::InvalidMessage | ErrorKind::Rejected
        )
}

async fn run<S: OutboxStore, P: Publisher>(
    store: Arc<S>,
    publisher: P,
    config: RelayConfig,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let poll = config.poll.max(Duration::from_millis(1));
    let batch = config.batch.max(1);
    let mut rounds: u64 = 0;
    let deadline = loop {
        // A dropped handle closes the relay too.
        let closing = (*stop.borrow()).or_else(|| stop.has_changed().is_err().then(Instant::now));
        if closing.is_some_and(|d| Instant::now() >= d) {
            break closing;
        }
        rounds += 1;
        if rounds.is_multiple_of(20) {
            purge(&*store, config.retention).await;
        }
        let due = match store.due(batch).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = ?e, "outbox: reading due rows failed");
                metrics::counter!("eventbus_outbox_errors_total").increment(1);
                if closing.is_some() {
                    break closing;
                }
                wait_or_stop(&*store, poll, &mut stop).await;
                continue;
            }
        };
        if due.is_empty() {
            if closing.is_some() {
                break closing;
            }
            report(&*store).await;
            wait_or_stop(&*store, poll, &mut stop).await;
            continue;
        }
        let full = due.len() >= batch;
        let round = publish_round(&*store, &publisher, &config, due);
        let clean = match closing {
            Some(d) => tokio::time::timeout_at(d, round).await.unwrap_or(false),
            None => round.await,
        };
        if closing.is_some() && !(full && clean) {
            break closing;
        }
        if !clean {
            // The path or the table is in trouble: do not spin on the same rows.
            wait_or_stop(&*store, poll, &mut stop).await;
        }
    };
    let left = deadline.map_or(Duration::from_secs(5), |d| {
        d.saturating_duration_since(Instant::now())
    });
    let _ = publisher.close(left).await;
}

async fn wait_or_stop<S: OutboxStore>(
    store: &S,
    poll: Duration,
    stop: &mut watch::Receiver<Option<Instant>>,
) {
    tokio::select! {
        () = store.wait(poll) => {}
        _ = stop.changed() => {}
    }
}

/// Publish `due` as one batch, then record each outcome; `false` when the round ended early
/// (the publisher refused a row for a reason not about the row) or an outcome could not be
/// recorded.
async fn publish_round<S: OutboxStore, P: Publisher>(
    store: &S,
    publisher: &P,
    config: &RelayConfig,
    due: Vec<Due>,
) -> bool {
    let mut clean = true;
    let mut pending = Vec::with_capacity(due.len());
    for row in &due {
        match publisher.publish(row.message.clone()).await {
            Ok(ack) => pending.push((row, Ok(ack))),
            // Refused before it was sent, for what it is: its own outcome.
            Err(e) if refused_for_good(&e) => pending.push((row, Err(e))),
            Err(e) => {
                // The path is in trouble (closed, full, misconfigured): stop here, so no later
                // row of the same key goes before this one; the rest stay pending as they are.
                tracing::warn!(error = ?e, "outbox: the publisher refused; trying again later");
                clean = false;
                break;
            }
        }
    }
    let mut acked = Vec::with_capacity(pending.len());
    for (row, admitted) in pending {
        let outcome = match admitted {
            Ok(ack) => ack.await,
            Err(e) => Outcome::Failed(e),
        };
        let recorded = match outcome {
            Outcome::Acked(_) => {
                acked.push(row.seq);
                Ok(())
            }
            Outcome::Failed(e) if refused_for_good(&e) => {
                tracing::warn!(seq = row.seq, error = %e, "outbox: message refused for good");
                metrics::counter!("eventbus_outbox_failed_total").increment(1);
                store.failed(row.seq, &describe(&e)).await
            }
            Outcome::Failed(e) | Outcome::Unknown(e) => {
                metrics::counter!("eventbus_outbox_retried_total").increment(1);
                let after = config.backoff(row.attempts + 1);
                store.retry_later(row.seq, after, &describe(&e)).await
            }
        };
        if let Err(e) = recorded {
            // The row stays pending and is published again with its id: at least once.
            tracing::warn!(seq = row.seq, error = ?e, "outbox: recording an outcome failed");
            clean = false;
        }
    }
    if !acked.is_empty() {
        match store.published(&acked).await {
            Ok(()) => {
                metrics::counter!("eventbus_outbox_published_total").increment(acked.len() as u64)
            }
            Err(e) => {
                tracing::warn!(
                    rows = acked.len(),
                    error = ?e,
                    "outbox: marking rows published failed; they will be published again with their ids"
                );
                clean = false;
            }
        }
    }
    clean
}

async fn purge<S: OutboxStore>(store: &S, retention: Duration) {
    if let Err(e) = store.purge(retention, 10_000).await {
        tracing::warn!(error = %e, "outbox: purging published rows failed");
    }
}

async fn report<S: OutboxStore>(store: &S) {
    if let Ok(s) = store.stats().await {
        metrics::gauge!("eventbus_outbox_pending").set(s.pending as f64);
        metrics::gauge!("eventbus_outbox_failed").set(s.failed as f64);
        metrics::gauge!("eventbus_outbox_lag_seconds")
            .set(s.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// The due rows of `SELECT seq, message_id, topic, msg_key, headers, payload, attempts`, read
/// the same way on every store (`attempts` reads the last column, whose integer type differs).
/// A row that cannot be read can never be published: it is moved to the failed state, so the
/// rest goes on.
pub(crate) async fn due_rows<S, R>(
    store: &S,
    rows: Vec<R>,
    attempts: fn(&R) -> Result<i64, sqlx::Error>,
) -> Result<Vec<Due>, Error>
where
    S: OutboxStore,
    R: sqlx::Row + Send,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut due = Vec::with_capacity(rows.len());
    for r in rows {
        let seq: i64 = r
            .try_get(0)
            .map_err(|e| storage("outbox: reading due rows failed", e))?;
        let read = || -> Result<Due, String> {
            let text = |e: sqlx::Error| e.to_string();
            let columns = codec::Columns {
                id: r.try_get(1).map_err(text)?,
                topic: r.try_get(2).map_err(text)?,
                key: r.try_get(3).map_err(text)?,
                headers: r.try_get(4).map_err(text)?,
                payload: r.try_get(5).map_err(text)?,
            };
            Ok(Due {
                seq,
                message: codec::decode(columns).map_err(|e| e.to_string())?,
                attempts: u32::try_from(attempts(&r).map_err(text)?).unwrap_or(0),
            })
        };
        match read() {
            Ok(d) => due.push(d),
            Err(why) => {
                tracing::warn!(seq, why, "outbox: unreadable row moved to the failed state");
                store.failed(seq, &format!("unreadable row: {why}")).await?;
            }
        }
    }
    Ok(due)
}

/// A database error as an eventbus error: connection trouble is temporary, the rest not.
pub(crate) fn storage(what: &'static str, e: sqlx::Error) -> Error {
    let temporary = matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    );
    let err = Error::new(ErrorKind::Storage, what).with_source(e);
    if temporary { err.temporary() } else { err }
}

/// A table name that is safe to put into SQL: letters, digits and `_`, not starting with a
/// digit (optionally one `schema.` prefix of the same form).
pub(crate) fn checked_table(name: &str, schema: bool) -> Result<String, Error> {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && !part.starts_with(|c: char| c.is_ascii_digit())
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() <= if schema { 2 } else { 1 } && parts.iter().all(|p| ok(p)) {
        Ok(name.to_owned())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            if schema {
                "table name: letters, digits and `_` only (optionally `schema.table`)"
            } else {
                "table name: letters, digits and `_` only"
            },
        )
        .permanent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = RelayConfig::default().retry(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (1..=6).map(|a| c.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn table_names_are_checked() {
        assert!(checked_table("eventbus_outbox", false).is_ok());
        assert!(checked_table("app.outbox_2", true).is_ok());
        assert!(checked_table("app.outbox_2", false).is_err());
        for bad in ["", "1x", "a;drop", "a.b.c", "a b", "x\"y"] {
            assert!(checked_table(bad, true).is_err(), "{bad:?}");
        }
    }
}
