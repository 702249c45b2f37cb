//! The outbox on both stores (SQLite in a temporary file, PostgreSQL started by the project's
//! own tooling) against the memory backend, and on PostgreSQL against a real nats-server:
//! committed messages are published with their ids, rolled-back ones never; per-key order
//! holds through a retry, behind a delayed message and after the clock stepped back; a message
//! the backend refuses ends in the failed state and the rest go on; rows committed while no
//! relay ran are published by the next one; PostgreSQL's NOTIFY wakes the relay long before its
//! poll interval.

use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::{Backend as _, Message, TopicSpec};
use eventbus_memory::MemoryBroker;
use eventbus_outbox::{OutboxStore, PgOutbox, Relay, RelayConfig, SqliteOutbox};

/// A database with the outbox table and a business table `orders`.
trait Db: Send + Sync {
    type Store: OutboxStore + Clone;
    fn store(&self) -> Self::Store;
    /// One transaction: an order row per message, and the messages enqueued; committed when
    /// `commit`, rolled back otherwise.
    async fn write(&self, msgs: &[Message], commit: bool);
    /// One committed transaction enqueueing `msg` to go no earlier than `delay` from now.
    async fn write_delayed(&self, msg: &Message, delay: Duration);
    /// Make every row so far look enqueued by a clock an hour ahead of this one (the clock
    /// has stepped back since).
    async fn clock_stepped_back(&self);
    /// Rows in `orders`.
    async fn orders(&self) -> i64;
    /// (message id, error) of the failed rows.
    async fn failures(&self) -> Vec<(String, String)>;
    /// Rows in the outbox table, whatever their state.
    async fn rows(&self) -> i64;
}

struct Sqlite {
    pool: sqlx::SqlitePool,
    outbox: SqliteOutbox,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn open() -> Sqlite {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open SQLite");
        sqlx::query("CREATE TABLE orders (id INTEGER)")
            .execute(&pool)
            .await
            .expect("orders");
        let outbox = SqliteOutbox::new(pool.clone());
        outbox.migrate().await.expect("migrate");
        Sqlite {
            pool,
            outbox,
            _dir: dir,
        }
    }
}

impl Db for Sqlite {
    type Store = SqliteOutbox;
    fn store(&self) -> SqliteOutbox {
        self.outbox.clone()
    }
    async fn write(&self, msgs: &[Message], commit: bool) {
        let mut tx = self.pool.begin().await.expect("begin");
        for _ in msgs {
            sqlx::query("INSERT INTO orders (id) VALUES (1)")
                .execute(&mut *tx)
                .await
                .expect("order");
        }
        self.outbox
            .enqueue_all(&mut tx, msgs)
            .await
            .expect("enqueue");
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }
    async fn write_delayed(&self, msg: &Message, delay: Duration) {
        let mut tx = self.pool.begin().await.expect("begin");
        self.outbox
            .enqueue_at(&mut tx, msg, delay)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }
    async fn clock_stepped_back(&self) {
        sqlx::query(
            "UPDATE eventbus_outbox SET created_at = created_at + 3600000,
                                        available_at = available_at + 3600000",
        )
        .execute(&self.pool)
        .await
        .expect("shift");
    }
    async fn orders(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
    async fn failures(&self) -> Vec<(String, String)> {
        self.outbox.failures().await.expect("failures")
    }
    async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM eventbus_outbox")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

struct Pg {
    pool: sqlx::PgPool,
    outbox: PgOutbox,
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
        sqlx::query("CREATE TABLE orders (id BIGINT)")
            .execute(&pool)
            .await
            .expect("orders");
        let outbox = PgOutbox::new(pool.clone());
        outbox.migrate().await.expect("migrate");
        Pg {
            pool,
            outbox,
            _server: server,
        }
    }
}

impl Db for Pg {
    type Store = PgOutbox;
    fn store(&self) -> PgOutbox {
        self.outbox.clone()
    }
    async fn write(&self, msgs: &[Message], commit: bool) {
        let mut tx = self.pool.begin().await.expect("begin");
        for _ in msgs {
            sqlx::query("INSERT INTO orders (id) VALUES (1)")
                .execute(&mut *tx)
                .await
                .expect("order");
        }
        self.outbox
            .enqueue_all(&mut tx, msgs)
            .await
            .expect("enqueue");
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }
    async fn write_delayed(&self, msg: &Message, delay: Duration) {
        let mut tx = self.pool.begin().await.expect("begin");
        self.outbox
            .enqueue_at(&mut tx, msg, delay)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }
    async fn clock_stepped_back(&self) {
        sqlx::query(
            "UPDATE eventbus_outbox SET created_at = created_at + interval '1 hour',
                                        available_at = available_at + interval '1 hour'",
        )
        .execute(&self.pool)
        .await
        .expect("shift");
    }
    async fn orders(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
    async fn failures(&self) -> Vec<(String, String)> {
        self.outbox.failures().await.expect("failures")
    }
    async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM eventbus_outbox")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

fn quick() -> RelayConfig {
    RelayConfig::default()
        .poll(Duration::from_millis(50))
        .retry(Duration::from_millis(50), Duration::from_millis(200))
}

fn publisher(broker: &MemoryBroker) -> Batcher<eventbus_memory::MemorySink> {
    Batcher::new(
        eventbus_memory::MemorySink::new(broker),
        BatchConfig::default(),
    )
    .expect("engine")
}

/// Wait until `topic` holds `n` messages (or 10 s pass); what it holds.
async fn stored(broker: &MemoryBroker, topic: &str, n: usize) -> Vec<Message> {
    let until = Instant::now() + Duration::from_secs(10);
    while broker.topic_len(topic) < n && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.messages(topic)
}

/// The broker holds exactly `want`, in that order (by message id).
fn assert_order(got: &[Message], want: &[&Message]) {
    let got_ids: Vec<String> = got.iter().map(|m| m.id().to_string()).collect();
    let want_ids: Vec<String> = want.iter().map(|m| m.id().to_string()).collect();
    assert_eq!(got_ids, want_ids, "{got:?}");
}

/// Committed messages are published once each with their ids, in commit order; rolled-back
/// ones (and their business rows) never; the table empties once they are acked.
async fn commit_publishes_and_rollback_never<D: Db>(db: D) {
    let broker = MemoryBroker::new();
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    let committed: Vec<Message> = (0..20)
        .map(|i| Message::new("orders", format!("c{i}")).with_key(format!("k{}", i % 3)))
        .collect();
    let rolled_back: Vec<Message> = (0..10)
        .map(|i| Message::new("orders", format!("r{i}")))
        .collect();
    db.write(&committed[..10], true).await;
    db.write(&rolled_back, false).await;
    db.write(&committed[10..], true).await;
    let got = stored(&broker, "orders", committed.len()).await;
    // Published rows are deleted (retention zero) by the relay's periodic purge.
    let until = Instant::now() + Duration::from_secs(10);
    while db.rows().await > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(db.rows().await, 0, "published rows were not purged");
    assert_eq!(
        broker.topic_len("orders"),
        20,
        "nothing rolled back was published"
    );
    relay.close(Duration::from_secs(5)).await;
    let ids = |ms: &[Message]| ms.iter().map(|m| m.id().to_string()).collect::<Vec<_>>();
    assert_eq!(
        ids(&got),
        ids(&committed),
        "every commit, once, in commit order"
    );
    assert_eq!(db.orders().await, 20, "the rolled-back orders are gone too");
    let stats = db.store().stats().await.expect("stats");
    assert_eq!((stats.pending, stats.failed), (0, 0), "{stats:?}");
}

/// A message the backend refuses for good ends in the failed state with its error; it does
/// not hold the rest, not even its own key.
async fn refused_message_fails_and_the_rest_goes_on<D: Db>(db: D) {
    let broker = MemoryBroker::new();
    broker.set_max_message_bytes(1_000);
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    let big = Message::new("orders", vec![b'x'; 5_000]).with_key("k");
    let after = Message::new("orders", "small").with_key("k");
    db.write(&[big.clone(), after.clone()], true).await;
    let got = stored(&broker, "orders", 1).await;
    let failures = {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let f = db.failures().await;
            if !f.is_empty() || Instant::now() > until {
                break f;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    relay.close(Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), after.id());
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, big.id().to_string());
    assert!(failures[0].1.contains("TooLarge"), "{failures:?}");
    assert!(!failures[0].1.contains("xxxx"), "no payload in the error");
}

/// A publisher whose every message times out: `Unknown` (a broker that stopped answering).
struct Down;

impl eventbus_core::Publisher for Down {
    async fn publish(&self, _: Message) -> Result<eventbus_core::PendingAck, eventbus_core::Error> {
        Ok(eventbus_core::PendingAck::ready(
            eventbus_core::Outcome::Unknown(
                eventbus_core::Error::new(eventbus_core::ErrorKind::Timeout, "no ack").temporary(),
            ),
        ))
    }
    async fn flush(&self) -> Result<(), eventbus_core::Error> {
        Ok(())
    }
    async fn close(&self, _: Duration) -> Result<eventbus_core::CloseReport, eventbus_core::Error> {
        Ok(eventbus_core::CloseReport::default())
    }
}

/// Rows committed while no relay runs (it crashed, say) are published by the next one, and
/// a key whose earlier row waits for its retry does not let a later row overtake it.
async fn next_relay_publishes_and_keys_keep_order<D: Db>(db: D) {
    let first = Message::new("held", "1").with_key("k");
    let second = Message::new("held", "2").with_key("k");
    let other = Message::new("held", "x").with_key("other");
    db.write(std::slice::from_ref(&first), true).await;
    // The broker does not answer: `first` is Unknown and waits 2 s for its retry.
    let relay = Relay::start(
        db.store(),
        Down,
        quick().retry(Duration::from_secs(2), Duration::from_secs(2)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.close(Duration::from_secs(5)).await;
    db.write(&[second.clone(), other.clone()], true).await;
    // A later relay, the broker back: `other` goes at once, `second` only after `first`.
    let broker = MemoryBroker::new();
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    let got = stored(&broker, "held", 3).await;
    relay.close(Duration::from_secs(5)).await;
    assert_order(&got, &[&other, &first, &second]);
}

/// A publisher that is closed refuses for itself, not for the row: the round stops and the
/// rows stay pending, untouched, for a relay whose publisher works.
async fn closed_publisher_leaves_rows_pending<D: Db>(db: D) {
    let broker = MemoryBroker::new();
    let closed = publisher(&broker);
    eventbus_core::Publisher::close(&closed, Duration::from_secs(1))
        .await
        .expect("close");
    let msgs: Vec<Message> = (0..5)
        .map(|i| Message::new("orders", format!("{i}")))
        .collect();
    db.write(&msgs, true).await;
    let relay = Relay::start(db.store(), closed, quick());
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.close(Duration::from_secs(2)).await;
    let stats = db.store().stats().await.expect("stats");
    assert_eq!((stats.pending, stats.failed), (5, 0), "{stats:?}");
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    assert_eq!(stored(&broker, "orders", 5).await.len(), 5);
    relay.close(Duration::from_secs(5)).await;
}

/// A message enqueued to go later holds its key: a later message of that key waits for it,
/// others go at once.
async fn delayed_message_holds_its_key<D: Db>(db: D) {
    let later = Message::new("delayed", "1").with_key("k");
    let next = Message::new("delayed", "2").with_key("k");
    let other = Message::new("delayed", "x").with_key("other");
    let t0 = Instant::now();
    db.write_delayed(&later, Duration::from_millis(700)).await;
    db.write(&[next.clone(), other.clone()], true).await;
    let broker = MemoryBroker::new();
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    let got = stored(&broker, "delayed", 3).await;
    relay.close(Duration::from_secs(5)).await;
    assert_order(&got, &[&other, &later, &next]);
    assert!(
        t0.elapsed() >= Duration::from_millis(650),
        "the delay was kept"
    );
}

/// A message enqueued to go at once goes at once, and before later ones of its key, even
/// when the clock has stepped back since it was enqueued.
async fn clock_step_back_keeps_order<D: Db>(db: D) {
    let first = Message::new("stepped", "1").with_key("k");
    let second = Message::new("stepped", "2").with_key("k");
    db.write(std::slice::from_ref(&first), true).await;
    db.clock_stepped_back().await;
    db.write(std::slice::from_ref(&second), true).await;
    let broker = MemoryBroker::new();
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    let got = stored(&broker, "stepped", 2).await;
    relay.close(Duration::from_secs(5)).await;
    assert_order(&got, &[&first, &second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_clock_step_back_keeps_order() {
    clock_step_back_keeps_order(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clock_step_back_keeps_order() {
    clock_step_back_keeps_order(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_delayed_message_holds_its_key() {
    delayed_message_holds_its_key(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_delayed_message_holds_its_key() {
    delayed_message_holds_its_key(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_closed_publisher_leaves_rows_pending() {
    closed_publisher_leaves_rows_pending(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_closed_publisher_leaves_rows_pending() {
    closed_publisher_leaves_rows_pending(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commit_publishes_and_rollback_never() {
    commit_publishes_and_rollback_never(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_publishes_and_rollback_never() {
    commit_publishes_and_rollback_never(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refused_message_fails_and_the_rest_goes_on() {
    refused_message_fails_and_the_rest_goes_on(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refused_message_fails_and_the_rest_goes_on() {
    refused_message_fails_and_the_rest_goes_on(Pg::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_next_relay_publishes_and_keys_keep_order() {
    next_relay_publishes_and_keys_keep_order(Sqlite::open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_next_relay_publishes_and_keys_keep_order() {
    next_relay_publishes_and_keys_keep_order(Pg::open().await).await;
}

/// PostgreSQL to a real nats-server: the stream holds each committed message once, under its
/// id, and NOTIFY wakes the relay although its poll interval is 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_nats_wakes_on_commit() {
    use eventbus_nats::{NatsBackend, NatsConfig};
    let db = Pg::open().await;
    let nats = eventbus_brokers::NatsServer::start()
        .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
    let backend = NatsBackend::connect(NatsConfig::new(nats.url()))
        .await
        .expect("connect");
    backend
        .ensure_topic(&TopicSpec::new("outbox.orders"))
        .await
        .expect("stream");
    let sink = backend.sink().await.expect("sink");
    let relay = Relay::start(
        db.store(),
        Batcher::new(sink, BatchConfig::default()).expect("engine"),
        RelayConfig::default().poll(Duration::from_secs(30)),
    );
    let msgs: Vec<Message> = (0..50)
        .map(|i| Message::new("outbox.orders", format!("o{i}")))
        .collect();
    let t0 = Instant::now();
    db.write(&msgs, true).await;
    let store = db.store();
    while store.stats().await.expect("stats").pending > 0 && t0.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed();
    relay.close(Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(10),
        "not published within 10 s of the commit: the relay waited for its 30 s poll"
    );
    let stored = tokio::task::spawn_blocking(move || {
        use eventbus_brokers::TestBroker;
        nats.stored("outbox_orders")
    })
    .await
    .expect("join")
    .expect("stream count");
    assert_eq!(stored, 50);
}

/// Advisory locks on key partitions held now, by holder: how many partitions each relay holds.
async fn partitions_per_relay(pool: &sqlx::PgPool) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND objid::int8 < $1 GROUP BY pid ORDER BY 1",
    )
    .bind(i64::from(eventbus_outbox::PARTITIONS))
    .fetch_all(pool)
    .await
    .expect("pg_locks")
}

/// Three relays on one PostgreSQL table while writers commit keyed messages: the partitions
/// are shared out (none held twice), one relay is aborted mid-run as a crash would, and the
/// others take its partitions over. Every committed message is published (copies only under
/// the same id), and per key the first copies come in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_three_relays_share_keys_and_survive_a_crash() {
    let db = Pg::open().await;
    let broker = MemoryBroker::new();
    let start = |_| Relay::start(db.store(), publisher(&broker), quick());
    let mut relays: Vec<Relay> = (0..3).map(start).collect();
    let (keys, per_key) = (12, 60);
    let mut committed = Vec::new();
    let mut shares = Vec::new();
    for round in 0..per_key {
        let msgs: Vec<Message> = (0..keys)
            .map(|k| Message::new("multi", format!("{k}-{round}")).with_key(format!("k{k}")))
            .collect();
        db.write(&msgs, true).await;
        committed.extend(msgs);
        if round == 20 {
            // Relays recount each other every 500 ms: give the third its share.
            let until = Instant::now() + Duration::from_secs(5);
            shares = partitions_per_relay(&db.pool).await;
            let all = i64::from(eventbus_outbox::PARTITIONS);
            while (shares.len() < 3 || shares.iter().sum::<i64>() < all) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
                shares = partitions_per_relay(&db.pool).await;
            }
        }
        if round == 30 {
            // A crash: no close, nothing waited for.
            relays.remove(0).abort();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = stored(&broker, "multi", committed.len()).await;
    let until = Instant::now() + Duration::from_secs(5);
    let mut after = partitions_per_relay(&db.pool).await;
    while after.iter().sum::<i64>() < i64::from(eventbus_outbox::PARTITIONS)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = partitions_per_relay(&db.pool).await;
    }
    for r in relays {
        r.close(Duration::from_secs(5)).await;
    }
    assert_eq!(
        shares.iter().sum::<i64>(),
        i64::from(eventbus_outbox::PARTITIONS),
        "every partition held once: {shares:?}"
    );
    assert_eq!(
        shares.len(),
        3,
        "three relays share the partitions: {shares:?}"
    );
    assert_eq!(after.len(), 2, "two relays left: {after:?}");
    assert_eq!(
        after.iter().sum::<i64>(),
        i64::from(eventbus_outbox::PARTITIONS)
    );
    // Every committed message, copies only under the same id, per key in commit order.
    let mut first: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in &got {
        if seen.insert(m.id().to_string()) {
            first.push(m.id().to_string());
        }
    }
    assert_eq!(
        seen.len(),
        committed.len(),
        "published {} of {}",
        seen.len(),
        committed.len()
    );
    for k in 0..keys {
        let key = format!("k{k}");
        let want: Vec<String> = committed
            .iter()
            .filter(|m| m.key().is_some_and(|x| x[..] == *key.as_bytes()))
            .map(|m| m.id().to_string())
            .collect();
        let order: Vec<&String> = first.iter().filter(|id| want.contains(id)).collect();
        assert_eq!(
            order,
            want.iter().collect::<Vec<_>>(),
            "key {key} out of commit order"
        );
    }
}

/// The outbox's health: up while nothing waits, down once a row waits longer than the allowed
/// lag (no relay runs), up again once a relay published it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_health_follows_the_lag() {
    use eventbus_core::ops::HealthCheck;
    use eventbus_outbox::OutboxHealth;
    let db = Sqlite::open().await;
    let check = OutboxHealth::new(db.store(), Duration::from_millis(200));
    let h = check.health(Duration::from_secs(1)).await;
    assert!(h.up, "empty outbox: {h:?}");
    db.write(&[Message::new("health", "1")], true).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let h = check.health(Duration::from_secs(1)).await;
    assert!(
        !h.up && h.detail.contains("1 pending"),
        "a row waiting 400 ms: {h:?}"
    );
    let broker = MemoryBroker::new();
    let relay = Relay::start(db.store(), publisher(&broker), quick());
    stored(&broker, "health", 1).await;
    relay.close(Duration::from_secs(5)).await;
    let h = check.health(Duration::from_secs(1)).await;
    assert!(h.up, "published: {h:?}");
}
