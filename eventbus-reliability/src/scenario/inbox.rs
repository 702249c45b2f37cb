//! Exactly-once effects through crashes: a consumer **process** handles messages with the
//! inbox (each message's effect, a row in the user's table, written in the transaction that
//! records its id) while the SDK publishes; the consumer is SIGKILLed at random points, many
//! times, and started again. Afterwards every published message must have its effect exactly
//! once: none missing (at-least-once delivery did its part), none applied twice (the inbox did
//! its part), however many deliveries the kills caused.

use std::time::{Duration, Instant};

use eventbus::handler::{self, HandlerConfig, HandlerError};
use eventbus::outbox::inbox::{PgInbox, SqliteInbox};
use eventbus::outbox::sqlx;
use eventbus::{SubscribeSpec, Subscriber};
use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::Postgres;
use eventbus_core::{Message, Publisher};
use rand::Rng;

use super::outbox::{Worker, bus_from_env, until_stdin_closes};
use super::{Row, Size, blocking, run_id};
use crate::target::Target;

/// The subcommand the reliability binary runs as a consumer process.
pub const INBOX_COMMAND: &str = "inbox-consumer";

/// The inbox's consumer name in the inbox rows.
const INBOX_CONSUMER: &str = "rel";

/// Up to `max_ms` of handling time, at random.
async fn pause(max_ms: u64) {
    let ms = rand::rng().random_range(0..=max_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Run as a consumer process: `inbox-consumer <database url> <filter> <group>`, through the
/// backend its `EVENTBUS_*` variables name, until stdin closes or the process is killed.
/// Each message's effect is one row in `effects`, written in the inbox's transaction (the
/// inbox's consumer is `rel`, whatever the group). Its handling takes a few milliseconds
/// before and after the commit, so that kills land inside the work (rolled back) and between
/// the commit and the ack (redelivered, for the inbox to skip).
pub async fn consumer_process(database: &str, filter: &str, group: &str) -> Result<(), String> {
    let bus = bus_from_env().await?;
    let sub = bus
        .subscriber()
        .subscribe(
            SubscribeSpec::new(filter)
                .group(group)
                .ack_wait(Duration::from_secs(2)),
        )
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let cfg = HandlerConfig::default().concurrency(8);
    // The same handler on either store: `$inbox` over `$pool`, parameters written `$p1`.
    macro_rules! consume {
        ($pool:expr, $inbox:ident, $p:literal) => {{
            let pool = $pool;
            let failed = |e: sqlx::Error| HandlerError::new(format!("effect: {e}"));
            let inner = $inbox::new(pool.clone(), INBOX_CONSUMER).handler(move |msg, tx| {
                Box::pin(async move {
                    pause(5).await;
                    sqlx::query(concat!("INSERT INTO effects (msg_id) VALUES (", $p, "1)"))
                        .bind(msg.id().to_string())
                        .execute(tx)
                        .await
                        .map_err(failed)?;
                    Ok(())
                })
            });
            // Every delivery is counted (outside the inbox's transaction) before the inbox
            // sees it: more deliveries than messages show the kills caused redeliveries.
            let work = move |msg: Message, info| {
                let (pool, id) = (pool.clone(), msg.id().to_string());
                let handled = inner(msg, info);
                async move {
                    sqlx::query(concat!(
                        "INSERT INTO deliveries (msg_id) VALUES (",
                        $p,
                        "1)"
                    ))
                    .bind(id)
                    .execute(&pool)
                    .await
                    .map_err(failed)?;
                    handled.await?;
                    // Committed, not yet acked.
                    pause(10).await;
                    Ok(())
                }
            };
            handler::run(sub, cfg, work, until_stdin_closes()).await;
        }};
    }
    if database.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(database)
            .await
            .map_err(|e| format!("open SQLite: {e}"))?;
        consume!(pool, SqliteInbox, "?");
    } else {
        let pool = sqlx::PgPool::connect(database)
            .await
            .map_err(|e| format!("connect PostgreSQL: {e}"))?;
        consume!(pool, PgInbox, "$");
    }
    Ok(())
}

/// The store an inbox row runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// PostgreSQL, started by the project's tooling.
    Postgres,
    /// A SQLite file.
    Sqlite,
}

/// The store's database, kept alive for the row.
enum Database {
    Postgres(Postgres),
    Sqlite(tempfile::TempDir),
}

impl Database {
    /// A PostgreSQL server of the project's own, or a SQLite file in a temporary directory.
    async fn start(store: Store) -> Result<Database, String> {
        match store {
            Store::Postgres => blocking(Postgres::start)
                .await
                .map(Database::Postgres)
                .map_err(|e| format!("start PostgreSQL: {e}")),
            Store::Sqlite => tempfile::tempdir()
                .map(Database::Sqlite)
                .map_err(|e| format!("temp dir: {e}")),
        }
    }

    fn url(&self) -> String {
        match self {
            Database::Postgres(pg) => pg.url(),
            Database::Sqlite(dir) => {
                format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display())
            }
        }
    }
}

/// A PostgreSQL session as `Pool::sessions` reads it: state, wait event type and name,
/// transaction age in seconds, the statement's start.
type Session = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    String,
);

/// The row's own connection to the store, opened once: it creates the tables and counts.
enum Pool {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

/// `$body` with `$p` bound to whichever pool `$pool` holds (the same SQL on both stores).
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Postgres($p) => $body,
            Pool::Sqlite($p) => $body,
        }
    };
}

impl Pool {
    async fn open(url: &str) -> Result<Pool, String> {
        let pool = if url.starts_with("sqlite:") {
            sqlx::SqlitePool::connect(url).await.map(Pool::Sqlite)
        } else {
            sqlx::PgPool::connect(url).await.map(Pool::Postgres)
        };
        pool.map_err(|e| format!("connect the database: {e}"))
    }

    /// Create the user's table `effects` (no key: a message applied twice shows as two rows),
    /// the row's own count of deliveries, and the inbox's table.
    async fn create_tables(&self) -> Result<(), String> {
        for q in [
            "CREATE TABLE effects (msg_id TEXT NOT NULL)",
            "CREATE TABLE deliveries (msg_id TEXT NOT NULL)",
        ] {
            with_pool!(self, p => sqlx::query(q).execute(p).await.map(|_| ()))
                .map_err(|e| format!("create tables: {e}"))?;
        }
        let migrated = match self {
            Pool::Postgres(p) => PgInbox::new(p.clone(), INBOX_CONSUMER).migrate().await,
            Pool::Sqlite(p) => SqliteInbox::new(p.clone(), INBOX_CONSUMER).migrate().await,
        };
        migrated.map_err(|e| format!("migrate the inbox: {e}"))
    }

    /// PostgreSQL's other sessions on this database: state, wait event, transaction age and
    /// the statement's start, one per line; `None` on SQLite or when it cannot be read.
    async fn sessions(&self) -> Option<String> {
        let Pool::Postgres(p) = self else { return None };
        let rows: Vec<Session> = sqlx::query_as(
            "SELECT state, wait_event_type, wait_event, \
                 extract(epoch FROM now() - xact_start)::float8, left(query, 80) \
                 FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid()",
        )
        .fetch_all(p)
        .await
        .ok()?;
        Some(
            rows.iter()
                .map(|(state, wt, w, age, q)| {
                    format!(
                        "[{} {}/{} xact {:.1} s: {q}]",
                        state.as_deref().unwrap_or("-"),
                        wt.as_deref().unwrap_or("-"),
                        w.as_deref().unwrap_or("-"),
                        age.unwrap_or(0.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    /// `(effect rows, distinct messages with an effect, deliveries)`.
    async fn counts(&self) -> Result<(i64, i64, i64), String> {
        const Q: &str = "SELECT (SELECT count(*) FROM effects), \
            (SELECT count(DISTINCT msg_id) FROM effects), (SELECT count(*) FROM deliveries)";
        with_pool!(self, p => sqlx::query_as(Q).fetch_one(p).await)
            .map_err(|e| format!("count effects: {e}"))
    }
}

/// What an inbox row does to the consumer's world.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum InboxFault {
    /// SIGKILL the consumer process at random points and start it again.
    KillConsumer,
    /// SIGKILL PostgreSQL under load and start it again; the consumer process lives on.
    RestartDatabase,
}

/// Publish `n` keyed messages to `topic` at about 2,500 a second, then wait for their acks:
/// how many were acked.
async fn publish_paced<P: Publisher>(
    publisher: P,
    topic: String,
    n: usize,
) -> Result<usize, String> {
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let msg = Message::new(topic.as_str(), format!("m{i}")).with_key(format!("k{}", i % 16));
        match publisher.publish(msg).await {
            Ok(ack) => acks.push(ack),
            Err(e) => return Err(format!("publish: {e}")),
        }
        if i % 100 == 99 {
            // About 2,500 messages a second: the kills land while messages arrive.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    let mut acked = 0usize;
    for ack in acks {
        if ack.await.into_result().is_ok() {
            acked += 1;
        }
    }
    let _ = publisher.close(Duration::from_secs(5)).await;
    Ok(acked)
}

/// `kills` faults at random 200-900 ms intervals: the consumer process SIGKILLed and started
/// again by `spawn` (the start's number), or PostgreSQL SIGKILLed and restarted. The
/// database's downtimes, in ms.
async fn inflict(
    fault: InboxFault,
    kills: usize,
    db: &mut Database,
    consumer: &mut Worker,
    spawn: &impl Fn(usize) -> std::io::Result<Worker>,
) -> Result<Vec<u128>, String> {
    let mut downtimes = Vec::new();
    for start in 1..=kills {
        let wait = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if let (InboxFault::RestartDatabase, Database::Postgres(pg)) = (fault, &mut *db) {
            let down = Instant::now();
            blocking(|| {
                pg.kill();
                std::thread::sleep(Duration::from_millis(300));
                pg.restart()
            })
            .await
            .map_err(|e| format!("restart PostgreSQL: {e}"))?;
            downtimes.push(down.elapsed().as_millis());
            continue;
        }
        consumer.kill();
        *consumer = spawn(start).map_err(|e| format!("restart the consumer: {e}"))?;
    }
    Ok(downtimes)
}

/// Wait until `acked` distinct messages were applied, at most `limit`: the table's counts
/// (rows, distinct messages, deliveries). A stall notes what PostgreSQL's sessions were doing.
async fn applied(pool: &Pool, acked: usize, limit: Duration, row: &mut Row) -> (i64, i64, i64) {
    let until = Instant::now() + limit;
    let mut counts = (0, 0, 0);
    while Instant::now() < until {
        match pool.counts().await {
            Ok(c) => {
                counts = c;
                if c.1 as usize >= acked {
                    break;
                }
            }
            Err(e) => row.notes.push(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if (counts.1 as usize) < acked
        && let Some(sessions) = pool.sessions().await
    {
        // Stalled: what the database's sessions were doing says whether the consumer waits
        // on PostgreSQL (a lock, an open transaction) or on itself.
        row.notes
            .push(format!("stalled; PostgreSQL sessions: {sessions}"));
    }
    counts
}

impl InboxFault {
    /// How many times a row inflicts the fault.
    fn times(self, size: Size) -> usize {
        match (self, size.quick) {
            (InboxFault::KillConsumer, true) => 6,
            (InboxFault::KillConsumer, false) => 20,
            (InboxFault::RestartDatabase, true) => 2,
            (InboxFault::RestartDatabase, false) => 5,
        }
    }
}

/// `inbox-kill` (PostgreSQL) / `inbox-kill-sqlite`: the consumer process SIGKILLed at random
/// points while messages are published, and restarted each time. `inbox-db-restart`: the
/// database SIGKILLed and restarted instead, twice (quick) or five times.
pub async fn inbox_kill<T: Target>(t: &mut T, size: Size, store: Store, fault: InboxFault) -> Row {
    let (name, db_name) = match (store, fault) {
        (Store::Postgres, InboxFault::KillConsumer) => ("inbox-kill", "postgres"),
        (Store::Postgres, InboxFault::RestartDatabase) => ("inbox-db-restart", "postgres"),
        (Store::Sqlite, _) => ("inbox-kill-sqlite", "sqlite"),
    };
    let mut row = Row::new(name, &format!("{}+{db_name}", t.name()));
    let mut db = try_setup!(row, Database::start(store).await);
    let url = db.url();
    let pool = try_setup!(row, Pool::open(&url).await);
    try_setup!(row, pool.create_tables().await);
    let run = run_id("inbox");
    let (topics, filter) = try_setup!(
        row,
        t.provision(&run, 1)
            .await
            .map_err(|e| format!("provision: {e}"))
    );
    let env = t.bus_env();
    // One group throughout; where the broker's groups do not survive the kills (tansu), a new
    // group per start, which reads every message from the beginning again.
    let churn_safe = t.group_survives_churn();
    let group = |start: usize| {
        if churn_safe {
            "rel".to_owned()
        } else {
            format!("rel-{start}")
        }
    };
    let spawn = |start: usize| {
        let g = group(start);
        Worker::spawn(
            &[INBOX_COMMAND, url.as_str(), filter.as_str(), g.as_str()],
            &env,
        )
    };
    let mut consumer = try_setup!(row, spawn(0).map_err(|e| format!("consumer process: {e}")));
    let sink = try_setup!(row, t.sink().await.map_err(|e| format!("sink: {e}")));
    let publisher = try_setup!(
        row,
        Batcher::new(sink, BatchConfig::default()).map_err(|e| format!("engine: {e}"))
    );
    let n: usize = if size.quick { 2_000 } else { 10_000 };
    let topic = topics[0].clone();
    let publishing = tokio::spawn(publish_paced(publisher, topic, n));
    // SIGKILL the consumer (or the database) at random points while messages are published
    // and handled.
    let kills = fault.times(size);
    let downtimes = match inflict(fault, kills, &mut db, &mut consumer, &spawn).await {
        Ok(d) => d,
        Err(e) => {
            row.failures.push(e);
            return row;
        }
    };
    let published = publishing.await.map_err(|e| format!("publisher task: {e}"));
    let acked = match published.and_then(|r| r) {
        Ok(a) => a,
        Err(e) => {
            row.failures.push(e);
            return row;
        }
    };
    // Every message's effect, however many redeliveries the kills caused.
    let mut counts = applied(&pool, acked, Duration::from_secs(90), &mut row).await;
    // Late redeliveries of messages already applied must change nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(consumer);
    if let Ok(c) = pool.counts().await {
        counts = c;
    }
    let fate = Fate {
        n,
        acked,
        counts,
        fault,
        kills,
        downtimes,
        churn_safe,
    };
    fate.record(&mut row);
    row
}

/// What an inbox row ended with: published, acked, the table's counts (rows, distinct
/// messages, deliveries), and the faults inflicted.
struct Fate {
    n: usize,
    acked: usize,
    counts: (i64, i64, i64),
    fault: InboxFault,
    kills: usize,
    downtimes: Vec<u128>,
    churn_safe: bool,
}

impl Fate {
    /// The row's figures, its note, and its verdict: every acked message applied exactly once.
    fn record(self, row: &mut Row) {
        let Fate {
            n,
            acked,
            counts,
            fault,
            kills,
            downtimes,
            churn_safe,
        } = self;
        let (rows, distinct, deliveries) = (counts.0 as u64, counts.1 as u64, counts.2 as u64);
        row.figures.sent = n as u64;
        row.figures.acked = acked as u64;
        row.figures.stored = distinct;
        row.figures.lost = (acked as u64).saturating_sub(distinct);
        row.figures.duplicates = rows.saturating_sub(distinct);
        let what = match fault {
            InboxFault::KillConsumer => format!(
                "the consumer process SIGKILLed {kills} times at random 200-900 ms intervals and restarted ({})",
                if churn_safe {
                    "in its group"
                } else {
                    "each time in a new group, reading from the start: the broker's groups do not survive the kills"
                }
            ),
            InboxFault::RestartDatabase => format!(
                "PostgreSQL SIGKILLed {kills} times at random 200-900 ms intervals under the running consumer, back after {downtimes:?} ms"
            ),
        };
        row.notes.push(format!(
            "{n} messages published ({acked} acked), {what}; effects: {distinct} messages applied, {rows} rows; {deliveries} deliveries ({} more than messages: redeliveries the inbox let through at most once)",
            deliveries.saturating_sub(n as u64)
        ));
        row.require(acked == n, format!("{} publishes not acked", n - acked));
        row.require(
            row.figures.lost == 0,
            format!("{} messages never applied", row.figures.lost),
        );
        row.require(
            row.figures.duplicates == 0,
            format!("{} extra applications of a message", row.figures.duplicates),
        );
    }
}
