//! The inbox: a handler's database effects happen once per message, however often the broker
//! delivers it.
//!
//! Subscribers are at-least-once: a message is redelivered until it is acked, so a consumer
//! that crashes after committing its work and before acking does that work again. The inbox
//! closes that gap **in the handler's own transaction**: [`Inbox::process`] opens a
//! transaction, records the message id in a processed-ids table, runs your work on the same
//! transaction, and commits both together. A delivery whose id is already recorded is
//! [`Processed::Duplicate`]: your work is not run, and the caller acks it. If your work fails,
//! or the process dies before the commit, neither the effect nor the id is stored, and the
//! redelivery does the work (once).
//!
//! The same transaction can [enqueue outbox messages](crate::PgOutbox::enqueue): input
//! consumed, state changed and output produced then commit together, and the relay publishes
//! the output once the commit happened (consume, process and produce, exactly once in effect).
//!
//! ```no_run
//! # async fn demo(sub: eventbus_core::Subscription, pool: sqlx::PgPool) -> Result<(), eventbus_core::Error> {
//! use eventbus_core::handler::{self, HandlerConfig, HandlerError};
//! use eventbus_outbox::inbox::PgInbox;
//!
//! let inbox = PgInbox::new(pool, "billing"); // the consumer: its group, say
//! inbox.migrate().await?; // or apply `PgInbox::schema()` with your own tool
//! let report = handler::run(
//!     sub,
//!     HandlerConfig::default(),
//!     inbox.handler(|msg, tx| {
//!         Box::pin(async move {
//!             sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
//!                 .bind(msg.key().map(|k| k.to_vec()))
//!                 .execute(&mut *tx)
//!                 .await
//!                 .map_err(|e| HandlerError::new(format!("update: {e}")))?;
//!             Ok(())
//!         })
//!     }),
//!     std::future::pending::<()>(),
//! )
//! .await;
//! # let _ = report; Ok(()) }
//! ```
//!
//! # The id, and how long it is remembered
//!
//! The key of the table is [`Message::id`]: the SDK's own id for messages it published
//! (stable through the publisher's retries and the outbox's relays), and for messages other
//! clients wrote an id derived from where the message is stored (stable through redeliveries).
//!
//! Recorded ids are kept until you [`Inbox::purge`] them. The window you keep must be longer
//! than any redelivery can come late: the broker's longest redelivery (ack wait times max
//! deliveries, a consumer down for a while, a Kafka group rewinding to its last committed
//! offset) and, for copies published twice under the same id, the producer's retry span. A
//! copy that arrives after its id was purged is processed again. Days are a usual choice; the
//! table holds one short row per message.
//!
//! # One inbox per consumer
//!
//! An id is recorded per **consumer**: the name given to [`Inbox::new`] (use the consumer
//! group's). Two consumers that handle the same message in one database (billing and
//! shipping) each do their work once; with one name they would skip each other's messages.
//!
//! # Concurrency
//!
//! Two deliveries of one id at the same time (a redelivery after `ack_wait` while the first is
//! still running, two copies on two group members) are serialized by the table's key. On
//! PostgreSQL (at its default isolation, READ COMMITTED) the second waits for the first
//! transaction, then finds the id (duplicate) or, if the first rolled back, does the work
//! itself; under REPEATABLE READ or SERIALIZABLE the waiting copy fails with a serialization
//! error instead, which the handler runtime retries (then: duplicate). On SQLite the first
//! statement takes the database's write lock, held until the commit: other writers (another
//! handler, an outbox relay) wait for it up to the pool's busy timeout (5 s by default), so keep
//! the work short there.
//!
//! # A failed statement inside the work
//!
//! On PostgreSQL a statement that fails aborts the whole transaction, even if the work ignores
//! the error, and the commit then silently rolls back. The inbox reads its own row back on the
//! transaction before committing: an aborted transaction fails that read, and the attempt is
//! an error (retried), never reported processed.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventbus_core::handler::HandlerError;
use eventbus_core::{DeliveryInfo, Error, Message};
use sqlx::{Database, Pool};

use crate::{checked_table, storage};

/// The default table name.
pub const DEFAULT_INBOX_TABLE: &str = "eventbus_inbox";

/// A boxed future of work done in the inbox's transaction, borrowing it for `'c`.
pub type WorkFuture<'c, R> = Pin<Box<dyn Future<Output = Result<R, HandlerError>> + Send + 'c>>;

/// A boxed handler future, as [`Inbox::handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// What [`Inbox::process`] did with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Processed<R> {
    /// The id was new: the work ran and committed with the id; its result.
    Handled(R),
    /// The id was recorded already: the work did not run.
    Duplicate,
}

/// A database the inbox runs on: PostgreSQL ([`PgInbox`], feature `postgres`) or SQLite
/// ([`SqliteInbox`], feature `sqlite`). Sealed: the SQL of each is this crate's.
pub trait InboxDatabase: Database + sealed::Sealed {
    /// The statements that create table `table` and its index.
    fn schema(table: &str) -> Vec<String>;

    /// Record `(consumer, id)` in `table` on `conn` (inside a transaction); `false` when it
    /// was there.
    #[doc(hidden)]
    fn record<'c>(
        conn: &'c mut Self::Connection,
        table: &'c str,
        consumer: &'c str,
        id: &'c str,
    ) -> Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + 'c>>;

    /// Whether `table` holds `(consumer, id)`, read on `conn`.
    #[doc(hidden)]
    fn holds<'c>(
        conn: &'c mut Self::Connection,
        table: &'c str,
        consumer: &'c str,
        id: &'c str,
    ) -> Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + 'c>>;

    /// Run `statements` on `pool`, one by one.
    #[doc(hidden)]
    fn execute_all<'c>(
        pool: &'c Pool<Self>,
        statements: Vec<String>,
    ) -> Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

    /// Delete up to `limit` rows of `consumer` in `table` recorded before `before_ms` (Unix
    /// milliseconds); how many.
    #[doc(hidden)]
    fn purge_batch<'c>(
        pool: &'c Pool<Self>,
        table: &'c str,
        consumer: &'c str,
        before_ms: i64,
        limit: i64,
    ) -> Pin<Box<dyn Future<Output = Result<u64, sqlx::Error>> + Send + 'c>>;
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

/// The inbox on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgInbox = Inbox<sqlx::Postgres>;

/// The inbox on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteInbox = Inbox<sqlx::Sqlite>;

/// A processed-ids table, and the transactions that record ids in it with a handler's work.
/// Cloning is cheap (the pool is shared).
pub struct Inbox<DB: InboxDatabase> {
    pool: Pool<DB>,
    table: Arc<str>,
    consumer: Arc<str>,
    _db: PhantomData<fn() -> DB>,
}

impl<DB: InboxDatabase> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Inbox {
            pool: self.pool.clone(),
            table: Arc::clone(&self.table),
            consumer: Arc::clone(&self.consumer),
            _db: PhantomData,
        }
    }
}

impl<DB: InboxDatabase> std::fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("table", &self.table)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A database error met while processing, as the handler runtime's error: retried (the
/// transaction rolled back, so nothing of the work is kept).
fn handler_error(what: &str, e: sqlx::Error) -> HandlerError {
    HandlerError::new(format!("inbox: {what}: {}", storage("database", e)))
}

impl<DB: InboxDatabase> Inbox<DB> {
    /// The inbox of consumer `consumer` (its group's name, say: see the module docs) in table
    /// [`DEFAULT_INBOX_TABLE`] of `pool`'s database.
    pub fn new(pool: Pool<DB>, consumer: &str) -> Self {
        Inbox {
            pool,
            table: DEFAULT_INBOX_TABLE.into(),
            consumer: consumer.into(),
            _db: PhantomData,
        }
    }

    /// The same, in table `name` (letters, digits and `_`).
    pub fn with_table(pool: Pool<DB>, consumer: &str, name: &str) -> Result<Self, Error> {
        Ok(Inbox {
            pool,
            table: checked_table(name, false)?.into(),
            consumer: consumer.into(),
            _db: PhantomData,
        })
    }

    /// The pool it runs on.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The consumer whose ids it records.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The statements that create the table and its index (what [`Inbox::migrate`] runs),
    /// for your own migration tool.
    pub fn schema(&self) -> Vec<String> {
        DB::schema(&self.table)
    }

    /// Create the table and its index unless they exist.
    pub async fn migrate(&self) -> Result<(), Error> {
        DB::execute_all(&self.pool, self.schema())
            .await
            .map_err(|e| storage("migrate the inbox table", e))
    }

    /// Process `msg` once: in one transaction, record its id and run `work(msg, transaction)`,
    /// then commit both. [`Processed::Duplicate`] when the id was recorded already (`work`
    /// does not run). An error of `work` or of the database rolls everything back and is
    /// returned: nothing of this attempt is kept, and the message is processed when it comes
    /// again.
    pub async fn process<R, F>(&self, msg: &Message, work: F) -> Result<Processed<R>, HandlerError>
    where
        F: for<'c> FnOnce(&'c Message, &'c mut DB::Connection) -> WorkFuture<'c, R>,
    {
        self.process_with(&(), msg, move |(), msg, tx| work(msg, tx))
            .await
    }

    /// [`Inbox::process`] with state the work borrows: `work(state, msg, transaction)`.
    pub async fn process_with<S, R, F>(
        &self,
        state: &S,
        msg: &Message,
        work: F,
    ) -> Result<Processed<R>, HandlerError>
    where
        S: ?Sized,
        F: for<'c> FnOnce(&'c S, &'c Message, &'c mut DB::Connection) -> WorkFuture<'c, R>,
    {
        let id = msg.id().to_string();
        let (table, consumer) = (&*self.table, &*self.consumer);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| handler_error("begin", e))?;
        let new = DB::record(&mut *tx, table, consumer, &id)
            .await
            .map_err(|e| handler_error("record the id", e))?;
        if !new {
            drop(tx); // rolled back: nothing was written
            metrics::counter!("eventbus_inbox_duplicates_total").increment(1);
            return Ok(Processed::Duplicate);
        }
        // On error the transaction is dropped, which rolls it back.
        let out = work(state, msg, &mut *tx).await?;
        // A statement the work let fail has aborted the transaction (PostgreSQL), and the
        // commit would silently roll back: reading our row back fails then.
        match DB::holds(&mut *tx, table, consumer, &id).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(HandlerError::new(
                    "inbox: the id's row vanished before the commit",
                ));
            }
            Err(e) => return Err(handler_error("the work's transaction was aborted", e)),
        }
        tx.commit().await.map_err(|e| handler_error("commit", e))?;
        metrics::counter!("eventbus_inbox_processed_total").increment(1);
        Ok(Processed::Handled(out))
    }

    /// A handler for [`eventbus_core::handler::run`]: each delivery is [processed](Inbox::process)
    /// with `work`, and acked once its transaction committed (or when it is a duplicate).
    pub fn handler<F>(
        &self,
        work: F,
    ) -> impl Fn(Message, DeliveryInfo) -> HandlerFuture + Send + Sync + 'static
    where
        F: for<'c> Fn(&'c Message, &'c mut DB::Connection) -> WorkFuture<'c, ()>
            + Send
            + Sync
            + 'static,
    {
        self.handler_with((), move |(), msg, tx| work(msg, tx))
    }

    /// [`Inbox::handler`] with shared state the work borrows (an outbox to enqueue the
    /// handler's output in the same transaction, a client, a config): `work(&state, msg, tx)`.
    ///
    /// ```no_run
    /// # fn demo(inbox: eventbus_outbox::inbox::PgInbox, outbox: eventbus_outbox::PgOutbox) {
    /// use eventbus_core::{handler::HandlerError, Message};
    /// // Consume, process and produce in one transaction.
    /// let handler = inbox.handler_with(outbox, |outbox, msg, tx| {
    ///     Box::pin(async move {
    ///         let out = Message::new("invoices.created", msg.payload().clone());
    ///         outbox.enqueue(tx, &out).await.map_err(|e| HandlerError::new(e.to_string()))
    ///     })
    /// });
    /// # let _ = handler; }
    /// ```
    pub fn handler_with<S, F>(
        &self,
        state: S,
        work: F,
    ) -> impl Fn(Message, DeliveryInfo) -> HandlerFuture + Send + Sync + 'static
    where
        S: Send + Sync + 'static,
        F: for<'c> Fn(&'c S, &'c Message, &'c mut DB::Connection) -> WorkFuture<'c, ()>
            + Send
            + Sync
            + 'static,
    {
        let shared = Arc::new((state, work));
        let inbox = self.clone();
        move |msg, _info| {
            let (inbox, shared) = (inbox.clone(), Arc::clone(&shared));
            Box::pin(async move {
                let (state, work) = &*shared;
                inbox
                    .process_with(state, &msg, |s, msg, tx| work(s, msg, tx))
                    .await
                    .map(|_| ())
            })
        }
    }

    /// Whether message id `id` is recorded for this consumer.
    pub async fn contains(&self, id: &str) -> Result<bool, Error> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| storage("read the inbox table", e))?;
        DB::holds(&mut *conn, &self.table, &self.consumer, id)
            .await
            .map_err(|e| storage("read the inbox table", e))
    }

    /// Forget ids recorded more than `older_than` ago, in batches of 1,000 rows (each its own
    /// short statement, so a large purge does not hold locks for long); how many. A copy of a
    /// message that arrives after its id was purged is processed again: see the module docs
    /// for the window to keep.
    pub async fn purge(&self, older_than: Duration) -> Result<u64, Error> {
        const BATCH: i64 = 1_000;
        let before =
            now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        let mut total = 0;
        loop {
            let n = DB::purge_batch(&self.pool, &self.table, &self.consumer, before, BATCH)
                .await
                .map_err(|e| storage("purge the inbox table", e))?;
            total += n;
            if n < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

/// The statements of both stores (they share the SQL; times are Unix milliseconds).
fn schema_of(table: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                consumer TEXT NOT NULL,
                message_id TEXT NOT NULL,
                processed_at BIGINT NOT NULL,
                PRIMARY KEY (consumer, message_id)
            )"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {table}_processed_at ON {table} (consumer, processed_at)"
        ),
    ]
}

/// Implements [`InboxDatabase`] for a sqlx database: `$db`, its connection type, the insert
/// that ignores a present key, and its parameter style (`$` for `$1`, `?` for `?1`).
macro_rules! inbox_database {
    ($feature:literal, $db:ty, $conn:ty, $insert:literal, $p:literal) => {
        #[cfg(feature = $feature)]
        impl InboxDatabase for $db {
            fn schema(table: &str) -> Vec<String> {
                schema_of(table)
            }

            fn record<'c>(
                conn: &'c mut $conn,
                table: &'c str,
                consumer: &'c str,
                id: &'c str,
            ) -> Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + 'c>> {
                Box::pin(async move {
                    // PostgreSQL: a concurrent transaction with the same key makes this wait
                    // for it; then "there" if it committed, inserted if it rolled back.
                    let done = sqlx::query(&format!($insert, table = table))
                        .bind(consumer)
                        .bind(id)
                        .bind(now_ms())
                        .execute(conn)
                        .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn holds<'c>(
                conn: &'c mut $conn,
                table: &'c str,
                consumer: &'c str,
                id: &'c str,
            ) -> Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + 'c>> {
                Box::pin(async move {
                    let (c, i) = (param($p, 1), param($p, 2));
                    let n: i64 = sqlx::query_scalar(&format!(
                        "SELECT count(*) FROM {table} WHERE consumer = {c} AND message_id = {i}"
                    ))
                    .bind(consumer)
                    .bind(id)
                    .fetch_one(conn)
                    .await?;
                    Ok(n > 0)
                })
            }

            fn execute_all<'c>(
                pool: &'c Pool<Self>,
                statements: Vec<String>,
            ) -> Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>> {
                Box::pin(async move {
                    for s in statements {
                        sqlx::query(&s).execute(pool).await?;
                    }
                    Ok(())
                })
            }

            fn purge_batch<'c>(
                pool: &'c Pool<Self>,
                table: &'c str,
                consumer: &'c str,
                before_ms: i64,
                limit: i64,
            ) -> Pin<Box<dyn Future<Output = Result<u64, sqlx::Error>> + Send + 'c>> {
                Box::pin(async move {
                    let (c, b, l) = (param($p, 1), param($p, 2), param($p, 3));
                    let done = sqlx::query(&format!(
                        "DELETE FROM {table} WHERE consumer = {c} AND message_id IN (
                            SELECT message_id FROM {table}
                            WHERE consumer = {c} AND processed_at < {b} LIMIT {l})"
                    ))
                    .bind(consumer)
                    .bind(before_ms)
                    .bind(limit)
                    .execute(pool)
                    .await?;
                    Ok(done.rows_affected())
                })
            }
        }
    };
}

/// Parameter `n` (from 1) in a store's numbered style: `$1` (PostgreSQL), `?1` (SQLite).
fn param(style: &str, n: usize) -> String {
    format!("{style}{n}")
}

inbox_database!(
    "postgres",
    sqlx::Postgres,
    sqlx::PgConnection,
    "INSERT INTO {table} (consumer, message_id, processed_at) VALUES ($1, $2, $3)
     ON CONFLICT (consumer, message_id) DO NOTHING",
    "$"
);

inbox_database!(
    "sqlite",
    sqlx::Sqlite,
    sqlx::SqliteConnection,
    "INSERT OR IGNORE INTO {table} (consumer, message_id, processed_at) VALUES (?1, ?2, ?3)",
    "?"
);
