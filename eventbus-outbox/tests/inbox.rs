//! The inbox on both stores (SQLite in a temporary file, PostgreSQL started by the project's
//! own tooling), and on PostgreSQL behind a real nats-server consumer: a redelivered message's
//! work is done once; a failed attempt leaves neither its effect nor its id; two copies at once
//! apply once; purged ids are forgotten; a consumer that fails after its commit (so the broker
//! redelivers) applies every message exactly once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::handler::HandlerError;
use eventbus_core::{Backend as _, Message, TopicSpec};
use eventbus_outbox::inbox::{Inbox, InboxDatabase, PgInbox, Processed, SqliteInbox, WorkFuture};

/// A store with the inbox table and a business table `effects` (one row per applied message).
trait Store: Send + Sync {
    type Db: InboxDatabase;
    fn inbox(&self) -> Inbox<Self::Db>;
    /// Work: one row in `effects` for `msg`.
    fn apply<'c>(
        msg: &'c Message,
        tx: &'c mut <Self::Db as sqlx::Database>::Connection,
    ) -> WorkFuture<'c, ()>;
    /// Rows in `effects`.
    async fn effects(&self) -> i64;
}

struct Sqlite {
    pool: sqlx::SqlitePool,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn open() -> Sqlite {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open SQLite");
        sqlx::query("CREATE TABLE effects (msg TEXT)")
            .execute(&pool)
            .await
            .expect("effects");
        let s = Sqlite { pool, _dir: dir };
        s.inbox().migrate().await.expect("migrate");
        s
    }
}

impl Store for Sqlite {
    type Db = sqlx::Sqlite;
    fn inbox(&self) -> SqliteInbox {
        SqliteInbox::new(self.pool.clone(), "billing")
    }
    fn apply<'c>(msg: &'c Message, tx: &'c mut sqlx::SqliteConnection) -> WorkFuture<'c, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (msg) VALUES (?)")
                .bind(msg.id().to_string())
                .execute(tx)
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?;
            Ok(())
        })
    }
    async fn effects(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

struct Pg {
    pool: sqlx::PgPool,
    _server: eventbus_brokers::Postgres,
}

impl Pg {
    async fn open() -> Pg {
        let server = tokio::task::spawn_blocking(eventbus_brokers::Postgres::start)
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
        let pool = sqlx::PgPool::connect(&server.url())
            .await
            .expect("connect PostgreSQL");
        sqlx::query("CREATE TABLE effects (msg TEXT)")
            .execute(&pool)
            .await
            .expect("effects");
        let s = Pg {
            pool,
            _server: server,
        };
        s.inbox().migrate().await.expect("migrate");
        s
    }
}

impl Store for Pg {
    type Db = sqlx::Postgres;
    fn inbox(&self) -> PgInbox {
        PgInbox::new(self.pool.clone(), "billing")
    }
    fn apply<'c>(msg: &'c Message, tx: &'c mut sqlx::PgConnection) -> WorkFuture<'c, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (msg) VALUES ($1)")
                .bind(msg.id().to_string())
                .execute(tx)
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?;
            Ok(())
        })
    }
    async fn effects(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

async fn redelivery_is_skipped<S: Store>(s: S) {
    let inbox = s.inbox();
    let msg = Message::new("orders", "o1");
    let first = inbox.process(&msg, S::apply).await.expect("process");
    assert_eq!(first, Processed::Handled(()));
    // The same message again (a redelivery: same id).
    let again = inbox.process(&msg, S::apply).await.expect("process");
    assert_eq!(again, Processed::Duplicate);
    assert_eq!(s.effects().await, 1);
    assert!(
        inbox
            .contains(&msg.id().to_string())
            .await
            .expect("contains")
    );
    // Another message is another id.
    let other = Message::new("orders", "o1");
    assert_eq!(
        inbox.process(&other, S::apply).await.expect("process"),
        Processed::Handled(())
    );
    assert_eq!(s.effects().await, 2);
}

async fn failed_work_leaves_nothing<S: Store>(s: S) {
    let inbox = s.inbox();
    let msg = Message::new("orders", "o1");
    // The work writes its effect, then fails: both the effect and the id roll back.
    let failed = inbox
        .process(&msg, |m, tx| {
            Box::pin(async move {
                S::apply(m, tx).await?;
                Err::<(), _>(HandlerError::new("downstream refused"))
            })
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(s.effects().await, 0);
    assert!(
        !inbox
            .contains(&msg.id().to_string())
            .await
            .expect("contains")
    );
    // The redelivery does the work.
    assert_eq!(
        inbox.process(&msg, S::apply).await.expect("process"),
        Processed::Handled(())
    );
    assert_eq!(s.effects().await, 1);
}

async fn purge_forgets_old_ids<S: Store>(s: S) {
    let inbox = s.inbox();
    let msg = Message::new("orders", "o1");
    inbox.process(&msg, S::apply).await.expect("process");
    assert_eq!(
        inbox
            .purge(Duration::from_secs(3_600))
            .await
            .expect("purge"),
        0
    );
    assert!(
        inbox
            .contains(&msg.id().to_string())
            .await
            .expect("contains")
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(inbox.purge(Duration::ZERO).await.expect("purge"), 1);
    // Forgotten: a copy now is processed again (what a too-short window risks).
    assert_eq!(
        inbox.process(&msg, S::apply).await.expect("process"),
        Processed::Handled(())
    );
    assert_eq!(s.effects().await, 2);
}

/// Two consumers of one message in one database each do their work once.
async fn consumers_are_apart<S: Store>(s: S) {
    let billing = s.inbox();
    let msg = Message::new("orders", "o1");
    assert_eq!(
        billing.process(&msg, S::apply).await.expect("process"),
        Processed::Handled(())
    );
    let shipping = Inbox::<S::Db>::new(pool_of(&billing), "shipping");
    assert_eq!(
        shipping.process(&msg, S::apply).await.expect("process"),
        Processed::Handled(())
    );
    assert_eq!(
        shipping.process(&msg, S::apply).await.expect("process"),
        Processed::Duplicate
    );
    assert_eq!(s.effects().await, 2);
    // Purging one consumer's ids leaves the other's.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(shipping.purge(Duration::ZERO).await.expect("purge"), 1);
    assert!(
        billing
            .contains(&msg.id().to_string())
            .await
            .expect("contains")
    );
}

fn pool_of<DB: InboxDatabase>(inbox: &Inbox<DB>) -> sqlx::Pool<DB> {
    inbox.pool().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_consumers_are_apart() {
    consumers_are_apart(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_consumers_are_apart() {
    consumers_are_apart(Pg::open().await).await;
}

/// Work that lets a statement fail and goes on: PostgreSQL aborted the transaction, so its
/// commit would roll back silently. The attempt must fail, not be reported processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_work_that_swallows_a_failed_statement_fails() {
    let s = Pg::open().await;
    let inbox = s.inbox();
    let msg = Message::new("orders", "o1");
    let r = inbox
        .process(&msg, |m, tx| {
            Box::pin(async move {
                Pg::apply(m, &mut *tx).await?;
                // Fails (no such table); the work ignores it.
                let _ = sqlx::query("INSERT INTO no_such_table VALUES (1)")
                    .execute(&mut *tx)
                    .await;
                Ok(())
            })
        })
        .await;
    assert!(r.is_err(), "reported {r:?}");
    assert_eq!(s.effects().await, 0);
    assert!(
        !inbox
            .contains(&msg.id().to_string())
            .await
            .expect("contains")
    );
    assert_eq!(
        inbox.process(&msg, Pg::apply).await.expect("process"),
        Processed::Handled(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_redelivery_is_skipped() {
    redelivery_is_skipped(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_redelivery_is_skipped() {
    redelivery_is_skipped(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failed_work_leaves_nothing() {
    failed_work_leaves_nothing(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failed_work_leaves_nothing() {
    failed_work_leaves_nothing(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_purge_forgets_old_ids() {
    purge_forgets_old_ids(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_purge_forgets_old_ids() {
    purge_forgets_old_ids(Pg::open().await).await;
}

/// Two copies of one message at once: the second waits for the first transaction (seen
/// waiting on its lock in `pg_stat_activity`), then finds the id (first committed) or does the
/// work itself (first rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_copies_apply_once() {
    let s = Arc::new(Pg::open().await);
    for first_fails in [false, true] {
        let msg = Message::new("orders", "o1");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let (inbox, msg) = (s.inbox(), msg.clone());
            tokio::spawn(async move {
                inbox
                    .process(&msg, move |m, tx| {
                        Box::pin(async move {
                            Pg::apply(m, tx).await?;
                            // Recorded, not committed: hold on until the copy waits for us.
                            let _ = started_tx.send(());
                            let _ = release_rx.await;
                            if first_fails {
                                return Err(HandlerError::new("fails after its insert"));
                            }
                            Ok(())
                        })
                    })
                    .await
            })
        };
        started_rx.await.expect("first started");
        let second = {
            let (inbox, msg) = (s.inbox(), msg.clone());
            tokio::spawn(async move { inbox.process(&msg, Pg::apply).await })
        };
        // The copy is blocked on the first's uncommitted key, not done yet.
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            .fetch_one(&s.pool)
            .await
            .expect("pg_stat_activity");
            if waiting > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the copy never waited for the first transaction"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!second.is_finished());
        let _ = release_tx.send(());
        let first = first.await.expect("join");
        let second = second.await.expect("join").expect("second");
        if first_fails {
            assert!(first.is_err());
            assert_eq!(second, Processed::Handled(()));
        } else {
            assert_eq!(first.expect("first"), Processed::Handled(()));
            assert_eq!(second, Processed::Duplicate);
        }
    }
    assert_eq!(s.effects().await, 2, "each message applied once");
}

/// A consumer on a real nats-server whose handler fails right after its transaction committed,
/// for every message's first delivery (as a crash before the ack would): the broker redelivers
/// each one, the inbox skips it, and every message is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nats_consumer_failing_after_commit_applies_once() {
    use eventbus_batch::{BatchConfig, Batcher};
    use eventbus_core::handler::{self, Backoff, HandlerConfig};
    use eventbus_core::{Publisher, SubscribeSpec, Subscriber};
    use eventbus_nats::{NatsBackend, NatsConfig};

    const N: usize = 200;
    let s = Pg::open().await;
    let nats = eventbus_brokers::NatsServer::start()
        .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
    let backend = NatsBackend::connect(NatsConfig::new(nats.url()))
        .await
        .expect("connect");
    backend
        .ensure_topic(&TopicSpec::new("inbox.orders"))
        .await
        .expect("stream");
    let publisher =
        Batcher::new(backend.sink().await.expect("sink"), BatchConfig::default()).expect("engine");
    for i in 0..N {
        let ack = publisher
            .publish(Message::new("inbox.orders", format!("o{i}")).with_key(format!("k{}", i % 8)))
            .await
            .expect("admitted");
        ack.await.into_result().expect("stored");
    }
    let sub = backend
        .subscriber()
        .subscribe(
            SubscribeSpec::new("inbox.orders")
                .group("billing")
                .ack_wait(Duration::from_secs(30)),
        )
        .await
        .expect("subscribe");
    let inner = s.inbox().handler(Pg::apply);
    let failed_once = Arc::new(parking_lot::Mutex::new(HashSet::new()));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let (failed_once, calls) = (Arc::clone(&failed_once), Arc::clone(&calls));
        move |msg: Message, info| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = msg.id().to_string();
            let run = inner(msg, info);
            let failed_once = Arc::clone(&failed_once);
            async move {
                run.await?;
                // Committed; now "crash" before the ack, once per message.
                if failed_once.lock().insert(id) {
                    return Err(HandlerError::new("lost before the ack"));
                }
                Ok(())
            }
        }
    };
    let stop = {
        let (failed_once, calls) = (Arc::clone(&failed_once), Arc::clone(&calls));
        async move {
            // Every message failed once and came back (2 calls each), or time is up.
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < until
                && (failed_once.lock().len() < N
                    || calls.load(std::sync::atomic::Ordering::Relaxed) < 2 * N)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Let any further redelivery arrive.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let report = handler::run(
        sub,
        HandlerConfig::default()
            .concurrency(8)
            .retry(Backoff::default().max_attempts(1)),
        handler,
        stop,
    )
    .await;
    publisher
        .close(Duration::from_secs(5))
        .await
        .expect("close");
    assert_eq!(failed_once.lock().len(), N, "every message delivered");
    assert!(
        report.acked >= N as u64,
        "every redelivery acked: {report:?}"
    );
    assert_eq!(
        s.effects().await,
        N as i64,
        "each message applied exactly once"
    );
}
