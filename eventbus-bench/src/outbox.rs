//! `--outbox-study`: what the transactional outbox costs a writer and how fast its relay
//! publishes, on PostgreSQL (started by the project's tooling) and SQLite, to a local
//! nats-server (file stream) and a local tansu (Kafka protocol, SQLite engine), side by side in
//! one run:
//!
//! - **writers**: 5 writers commit one-row business transactions flat out: alone, with a second
//!   business row instead of the enqueue (what any second statement costs), with one `enqueue`
//!   per transaction, and with the enqueue while a relay publishes to each broker, interleaved;
//!   committed transactions/s of each, the relay's rows/s to `Acked`, and the outbox's lag (the
//!   age of its oldest pending row, sampled every 50 ms) at worst.
//! - **latency**: 1,000 transactions/s (5 writers x 200/s), each enqueueing one message; commit
//!   (when `commit` returned) to the broker's ack (when the relay's publisher resolved it),
//!   p50 / p99 / max, with `LISTEN/NOTIFY` and with polling alone (the default 500 ms poll).
//!
//! Every relayed row checks that the broker acked every committed message.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{BrokerKind, TansuStorage};
use eventbus_core::backend::DynBackend;
use eventbus_core::{CloseReport, Error, Message, PendingAck, Publisher};
use eventbus_fixture::{Fixture, Select};
use eventbus_kafka::KafkaBackend;
use eventbus_nats::{NatsBackend, NatsConfig, StreamSpec};
use eventbus_outbox::sqlx::{self, PgPool, SqlitePool};
use eventbus_outbox::{OutboxStore, PgOutbox, Relay, RelayConfig, SqliteOutbox};
use parking_lot::Mutex;

use crate::Args;

/// Writers committing side by side.
const WRITERS: usize = 5;

/// A publisher that notes when each message's ack came, by message id.
#[derive(Clone)]
struct Timed<P> {
    inner: P,
    acked: Arc<Mutex<HashMap<String, Instant>>>,
}

impl<P: Publisher + Clone + 'static> Publisher for Timed<P> {
    async fn publish(&self, msg: Message) -> Result<PendingAck, Error> {
        let id = msg.id().to_string();
        let ack = self.inner.publish(msg).await?;
        let (tx, pending) = PendingAck::channel();
        let acked = Arc::clone(&self.acked);
        tokio::spawn(async move {
            let o = ack.await;
            if o.is_acked() {
                acked.lock().entry(id).or_insert_with(Instant::now);
            }
            tx.send(o);
        });
        Ok(pending)
    }

    async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }

    async fn close(&self, deadline: Duration) -> Result<CloseReport, Error> {
        self.inner.close(deadline).await
    }
}

/// The database under test.
#[derive(Clone)]
enum Db {
    /// The pool, its outbox, the same outbox without notifications, and whether the server
    /// runs with fsync on (the fixture's is off).
    Pg(PgPool, PgOutbox, PgOutbox, bool),
    Sqlite(SqlitePool, SqliteOutbox),
}

impl Db {
    fn label(&self) -> &'static str {
        match self {
            Db::Pg(.., false) => "PostgreSQL",
            Db::Pg(.., true) => "PostgreSQL, fsync on",
            Db::Sqlite(..) => "SQLite",
        }
    }

    /// One business transaction (an order row) and what `extra` adds to it.
    async fn transaction(&self, extra: Extra<'_>) -> Result<(), String> {
        // The same steps on both stores, whose pools and transactions differ in type.
        macro_rules! business {
            ($pool:expr, $outbox:expr) => {{
                let mut tx = $pool.begin().await.map_err(|x| x.to_string())?;
                let order = || sqlx::query("INSERT INTO orders (id) VALUES (1)");
                order().execute(&mut *tx).await.map_err(|x| x.to_string())?;
                match extra {
                    Extra::Nothing => {}
                    Extra::Row => {
                        order().execute(&mut *tx).await.map_err(|x| x.to_string())?;
                    }
                    Extra::Enqueue(m, _) => {
                        $outbox
                            .enqueue(&mut tx, m)
                            .await
                            .map_err(|x| x.to_string())?;
                    }
                }
                tx.commit().await.map_err(|x| x.to_string())
            }};
        }
        match self {
            Db::Pg(pool, _, quiet, _) if matches!(extra, Extra::Enqueue(_, false)) => {
                business!(pool, quiet)
            }
            Db::Pg(pool, outbox, ..) => business!(pool, outbox),
            Db::Sqlite(pool, outbox) => business!(pool, outbox),
        }
    }

    /// Drop every outbox row (what a phase without a relay left).
    async fn clear(&self) -> Result<(), String> {
        let q = sqlx::query("DELETE FROM eventbus_outbox");
        match self {
            Db::Pg(p, ..) => q.execute(p).await.map(|_| ()),
            Db::Sqlite(p, _) => sqlx::query("DELETE FROM eventbus_outbox")
                .execute(p)
                .await
                .map(|_| ()),
        }
        .map_err(|e| e.to_string())
    }

    /// A store for a relay (on PostgreSQL listening for notifications if `notify`).
    fn relay_store(&self, notify: bool) -> Stores {
        match self {
            Db::Pg(_, o, ..) => Stores::Pg(o.clone().notifications(notify)),
            Db::Sqlite(_, o) => Stores::Sqlite(o.clone()),
        }
    }
}

/// What a business transaction does besides its order row.
#[derive(Clone, Copy)]
enum Extra<'a> {
    Nothing,
    /// A second order row: what any second statement costs the transaction.
    Row,
    /// `enqueue` the message (on PostgreSQL with a commit notification if `true`).
    Enqueue(&'a Message, bool),
}

/// A store for a relay.
enum Stores {
    Pg(PgOutbox),
    Sqlite(SqliteOutbox),
}

impl Stores {
    fn start<P: Publisher + 'static>(self, p: P, config: RelayConfig) -> Relay {
        match self {
            Stores::Pg(o) => Relay::start(o, p, config),
            Stores::Sqlite(o) => Relay::start(o, p, config),
        }
    }

    async fn pending(&self) -> Option<(u64, Option<Duration>)> {
        let s = match self {
            Stores::Pg(o) => o.stats().await,
            Stores::Sqlite(o) => o.stats().await,
        };
        s.ok().map(|s| (s.pending, s.oldest_pending))
    }
}

/// A relay to `backend` through a timed engine.
async fn relay(
    backend: &dyn DynBackend,
    store: Stores,
    acked: &Arc<Mutex<HashMap<String, Instant>>>,
) -> Result<Relay, String> {
    let sink = backend.sink_dyn().await.map_err(|e| format!("sink: {e}"))?;
    let engine = Batcher::new(sink, BatchConfig::default()).map_err(|e| format!("engine: {e}"))?;
    Ok(store.start(
        Timed {
            inner: engine,
            acked: Arc::clone(acked),
        },
        RelayConfig::default(),
    ))
}

/// One writers phase's figures.
struct Writers {
    tx_per_s: f64,
    relay_per_s: Option<f64>,
    max_lag: Option<Duration>,
}

/// A broker the relay publishes to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum To {
    Nats,
    Kafka,
}

impl To {
    fn label(self) -> &'static str {
        match self {
            To::Nats => "NATS",
            To::Kafka => "Kafka (tansu)",
        }
    }
}

/// What a writers phase does besides the business row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing: the business transaction alone.
    Plain,
    /// A second business row instead of the enqueue: the floor for any second statement.
    TwoRows,
    /// One enqueue per transaction, no relay running; `notify` as given (PostgreSQL).
    Enqueue { notify: bool },
    /// One enqueue per transaction (with its notification) while a relay publishes to `To`.
    Relayed(To),
}

impl Phase {
    fn label(self) -> String {
        match self {
            Phase::Plain => "plain".into(),
            Phase::TwoRows => "a second order row instead of the enqueue".into(),
            Phase::Enqueue { notify: true } => "enqueue, no relay".into(),
            Phase::Enqueue { notify: false } => "enqueue without NOTIFY, no relay".into(),
            Phase::Relayed(to) => format!("enqueue, relay publishing to {}", to.label()),
        }
    }
}

/// The brokers a relay publishes to: the study's nats-server and a tansu of its own.
struct Brokers<'a> {
    nats: &'a NatsBackend,
    /// tansu and a bus connected to it.
    kafka: Fixture,
}

impl Brokers<'_> {
    /// Start tansu (SQLite engine: durable, like the NATS file stream) with `topics`.
    async fn start<'a>(nats: &'a NatsBackend, topics: &[&str]) -> Result<Brokers<'a>, String> {
        let kafka = Fixture::start(Select::Broker(BrokerKind::Tansu(TansuStorage::Sqlite)), &[])
            .await
            .map_err(|e| format!("Kafka: {e}"))?;
        for t in topics {
            kafka
                .bus()
                .ensure_topic(*t)
                .await
                .map_err(|e| format!("topic {t}: {e}"))?;
        }
        Ok(Brokers { nats, kafka })
    }

    /// The backend relays publish to: the concrete one, as a service's relay would hold it.
    fn get(&self, to: To) -> &dyn DynBackend {
        match to {
            To::Nats => self.nats,
            To::Kafka => self
                .kafka
                .bus()
                .backend::<KafkaBackend>()
                .expect("a Kafka bus"),
        }
    }
}

/// One message through a relay just started, before any clock runs: its first publish waits
/// for its client to connect and learn the topic (a Kafka producer takes about a second), once
/// per relay, not per commit. Leaves one entry in `acked`.
async fn warm_up(
    db: &Db,
    acked: &Mutex<HashMap<String, Instant>>,
    topic: &str,
    tag: &str,
) -> Result<(), String> {
    let id = format!("{tag}-warm-up");
    let m = Message::new(topic, "warm-up").with_id(id.clone());
    db.transaction(Extra::Enqueue(&m, true)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !acked.lock().contains_key(&id) {
        if Instant::now() > deadline {
            return Err(format!("{tag}: the warm-up message was never acked"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// `secs` of 5 writers committing flat out, as `phase` says.
async fn writers(
    db: &Db,
    brokers: &Brokers<'_>,
    topic: &str,
    phase: Phase,
    secs: f64,
    tag: &str,
) -> Result<Writers, String> {
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let notify = !matches!(phase, Phase::Enqueue { notify: false });
    let r = if let Phase::Relayed(to) = phase {
        let r = relay(brokers.get(to), db.relay_store(true), &acked).await?;
        warm_up(db, &acked, topic, tag).await?;
        Some(r)
    } else {
        None
    };
    let stats = db.relay_store(true);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (db, topic, tag) = (db.clone(), topic.to_owned(), tag.to_owned());
            tokio::spawn(async move { writer(&db, (&topic, &tag, w), phase, notify, until).await })
        })
        .collect();
    let mut max_lag = Duration::ZERO;
    while Instant::now() < until {
        if r.is_some()
            && let Some((_, Some(age))) = stats.pending().await
        {
            max_lag = max_lag.max(age);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut committed, mut last) = (0, t0);
    for t in tasks {
        let (n, at) = t.await.map_err(|e| e.to_string())??;
        committed += n;
        last = last.max(at);
    }
    let took = last.saturating_duration_since(t0).as_secs_f64();
    let mut relay_per_s = None;
    if let Some(r) = r {
        // The relay's rate: every committed row acked, from the phase's start to the last ack.
        let deadline = Instant::now() + Duration::from_secs(60);
        while stats.pending().await.is_none_or(|(n, _)| n > 0) && Instant::now() < deadline {
            if let Some((_, Some(age))) = stats.pending().await {
                max_lag = max_lag.max(age);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        r.close(Duration::from_secs(5)).await;
        let acked = acked.lock();
        // Clocked to the last ack itself (each ack's time was taken when it came).
        let last = acked.values().max().copied().unwrap_or(t0);
        let n = acked.len() as u64 - 1; // the warm-up
        relay_per_s = Some(n as f64 / last.saturating_duration_since(t0).as_secs_f64());
        if n != committed {
            return Err(format!("{tag}: {committed} committed, {n} acked"));
        }
    }
    if let Phase::Enqueue { .. } = phase {
        // Nothing published them.
        db.clear().await?;
    }
    Ok(Writers {
        tx_per_s: committed as f64 / took,
        relay_per_s,
        max_lag: relay_per_s.map(|_| max_lag),
    })
}

/// Writer `w` committing transactions flat out, as `phase` says, until `until`: how many it
/// committed, and when its last commit returned (the writer's clock).
async fn writer(
    db: &Db,
    (topic, tag, w): (&str, &str, usize),
    phase: Phase,
    notify: bool,
    until: Instant,
) -> Result<(u64, Instant), String> {
    let mut n = 0u64;
    while Instant::now() < until {
        let m = Message::new(topic, "x".repeat(100))
            .with_id(format!("{tag}-{w}-{n}"))
            .with_key(format!("k{w}-{}", n % 16));
        let extra = match phase {
            Phase::Plain => Extra::Nothing,
            Phase::TwoRows => Extra::Row,
            _ => Extra::Enqueue(&m, notify),
        };
        db.transaction(extra).await?;
        n += 1;
    }
    Ok((n, Instant::now()))
}

/// Commit-to-ack latencies (ms) at 1,000 transactions/s for `secs`.
async fn latency(
    db: &Db,
    backend: &dyn DynBackend,
    topic: &str,
    notify: bool,
    secs: f64,
    tag: &str,
) -> Result<hdrhistogram::Histogram<u64>, String> {
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let r = relay(backend, db.relay_store(notify), &acked).await?;
    warm_up(db, &acked, topic, tag).await?;
    let per_writer = (200.0 * secs) as u64;
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (db, topic, tag) = (db.clone(), topic.to_owned(), tag.to_owned());
            let committed = Arc::clone(&committed);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                for n in 0..per_writer {
                    tick.tick().await;
                    let id = format!("{tag}-{w}-{n}");
                    let m = Message::new(topic.as_str(), "x".repeat(100))
                        .with_id(id.clone())
                        .with_key(format!("k{w}-{}", n % 16));
                    db.transaction(Extra::Enqueue(&m, true)).await?;
                    committed.lock().insert(id, Instant::now());
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let want = committed.lock().len() + 1; // and the warm-up
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().len() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.close(Duration::from_secs(5)).await;
    let mut h = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let acked = acked.lock();
    for (id, at) in committed.lock().iter() {
        let Some(ack) = acked.get(id) else {
            return Err(format!("{tag}: {id} committed, never acked"));
        };
        let _ = h.record(ack.saturating_duration_since(*at).as_micros() as u64);
    }
    Ok(h)
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// The study: both stores, writers and latency rows; writes `outbox.md` to `--out`.
pub(crate) async fn study(args: &Args) -> Result<bool, String> {
    let secs = if args.quick { 2.0 } else { 5.0 };
    let env = StudyEnv::start(
        "OUTBOX_STUDY",
        "study.>",
        (12, WRITERS as u32 + 2),
        "outbox",
    )
    .await?;
    let (pool, lite) = (env.pg.clone(), env.lite.clone());
    let brokers = Brokers::start(&env.backend, &["study.w", "study.l"]).await?;
    // The fixture runs with fsync off, so its commits cost CPU only: the outbox's extra row
    // and indexes weigh most there. A production server flushes the WAL at every commit;
    // a second server with fsync on shows what the enqueue adds to such a commit.
    let durable = DurablePg::start().await?;
    let pg = |pool: PgPool, fsync| {
        Db::Pg(
            pool.clone(),
            PgOutbox::new(pool.clone()),
            PgOutbox::new(pool).notifications(false),
            fsync,
        )
    };
    let dbs = [
        pg(pool, false),
        pg(durable.pool.clone(), true),
        Db::Sqlite(lite.clone(), SqliteOutbox::new(lite)),
    ];
    let mut md = format!(
        "# Outbox: cost to a writer, relay throughput, commit-to-ack latency\n\n\
         Written by `cargo xtask bench --outbox-study{}` (eventbus-bench, `outbox.rs`): 5 writers, \
         one order row per transaction, 100-byte events to a local nats-server (file stream) and \
         a local tansu (Kafka protocol, SQLite engine), \
         PostgreSQL 15 (fsync off, the project's fixture; and a second server with fsync on, \
         as in production, which flushes the WAL at every commit) and SQLite (WAL, one file); \
         {secs} s per phase, phases interleaved in one run.\n\n\
         | store | phase | committed tx/s (mean of 2) | relay rows/s to acked | outbox lag at \
         worst | tx/s vs plain (goal: the enqueue adds <= 30%, >= 0.77x) |\n|---|---|---|---|---|---|\n",
        if args.quick { " --quick" } else { "" }
    );
    for db in &dbs {
        prepare(db).await?;
        writer_rows(&mut md, db, &brokers, secs).await?;
    }
    let _ = writeln!(
        md,
        "\nCommit (when `commit` returned) to the broker's ack (when the relay's publisher \
         resolved it), at 1,000 transactions/s (5 writers x 200/s) for {secs} s, every committed \
         message acked:\n\n| store | to | relay wakes on | p50 ms | p99 ms | max ms | goal |\n|---|---|---|---|---|---|---|"
    );
    for db in &dbs {
        latency_rows(&mut md, db, &brokers, secs).await?;
    }
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let path = args.out.join("outbox.md");
    std::fs::write(&path, &md).map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("{md}");
    // Every committed message was acked (checked in each phase); the goals are reported.
    Ok(true)
}

/// The outbox's schema and the writers' `orders` table in `db`.
async fn prepare(db: &Db) -> Result<(), String> {
    const ORDERS: &str = "CREATE TABLE IF NOT EXISTS orders (id BIGINT)";
    match db {
        Db::Pg(p, o, ..) => {
            o.migrate().await.map_err(|e| e.to_string())?;
            sqlx::query(ORDERS)
                .execute(p)
                .await
                .map_err(|e| e.to_string())?;
        }
        Db::Sqlite(p, o) => {
            o.migrate().await.map_err(|e| e.to_string())?;
            sqlx::query(ORDERS)
                .execute(p)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The writer phases measured on `db`: the first is the plain baseline the others compare with.
fn phases(db: &Db) -> &'static [Phase] {
    match db {
        Db::Pg(.., true) => &[
            Phase::Plain,
            Phase::Enqueue { notify: true },
            Phase::Relayed(To::Nats),
        ],
        Db::Pg(..) => &[
            Phase::Plain,
            Phase::TwoRows,
            Phase::Enqueue { notify: true },
            Phase::Enqueue { notify: false },
            Phase::Relayed(To::Nats),
            Phase::Relayed(To::Kafka),
        ],
        Db::Sqlite(..) => &[
            Phase::Plain,
            Phase::TwoRows,
            Phase::Enqueue { notify: true },
            Phase::Relayed(To::Nats),
            Phase::Relayed(To::Kafka),
        ],
    }
}

/// Every writer phase of `db`, twice, interleaved: one table row per phase (against the plain
/// baseline) and one per relay target's lag goal.
async fn writer_rows(
    md: &mut String,
    db: &Db,
    brokers: &Brokers<'_>,
    secs: f64,
) -> Result<(), String> {
    let label = db.label();
    let mut figures: Vec<(Phase, Vec<Writers>)> =
        phases(db).iter().map(|p| (*p, Vec::new())).collect();
    for rep in 0..2 {
        eprintln!("==> outbox study: {label} writers, repetition {}", rep + 1);
        for (phase, got) in &mut figures {
            let tag = format!("{label}-w{rep}-{}", got.len());
            got.push(writers(db, brokers, "study.w", *phase, secs, &tag).await?);
        }
    }
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let plain_tx = mean(figures[0].1.iter().map(|w| w.tx_per_s).collect());
    let mut lag: Vec<(To, Duration)> = Vec::new();
    for (phase, got) in &figures {
        let tx = mean(got.iter().map(|w| w.tx_per_s).collect());
        let relay = got.iter().filter_map(|w| w.relay_per_s).collect::<Vec<_>>();
        let worst = got.iter().filter_map(|w| w.max_lag).max();
        if let (Phase::Relayed(to), Some(w)) = (phase, worst) {
            lag.push((*to, w));
        }
        let _ = writeln!(
            md,
            "| {label} | {} | {tx:.0} | {} | {} | {} |",
            phase.label(),
            if relay.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", mean(relay))
            },
            worst.map_or("-".into(), |l| format!("{} ms", l.as_millis())),
            if *phase == Phase::Plain {
                "1.00x".to_owned()
            } else {
                format!("{:.2}x", tx / plain_tx)
            },
        );
    }
    for (to, worst) in lag {
        let _ = writeln!(
            md,
            "| {label} | goal: lag < 1 s while the writers run flat out, to {} | | | {} |  |",
            to.label(),
            if worst < Duration::from_secs(1) {
                "met"
            } else {
                "**not met**"
            }
        );
    }
    Ok(())
}

/// Commit-to-ack latency rows of `db`: each relay target and wake-up it is measured with.
async fn latency_rows(
    md: &mut String,
    db: &Db,
    brokers: &Brokers<'_>,
    secs: f64,
) -> Result<(), String> {
    let modes: &[(To, bool)] = match db {
        Db::Pg(.., true) => &[(To::Nats, true)],
        Db::Pg(..) => &[(To::Nats, true), (To::Nats, false), (To::Kafka, true)],
        Db::Sqlite(..) => &[(To::Nats, false)],
    };
    let label = db.label();
    for &(to, notify) in modes {
        eprintln!("==> outbox study: {label} latency to {to:?}, notify {notify}");
        let h = latency(
            db,
            brokers.get(to),
            "study.l",
            notify,
            secs,
            &format!("{label}-{to:?}-l{notify}"),
        )
        .await?;
        let p99 = h.value_at_quantile(0.99);
        // The goal is for NATS; Kafka's row is reported beside it.
        let goal = match (notify, to, p99 <= 50_000) {
            (false, ..) | (true, To::Kafka, _) => "-",
            (true, To::Nats, true) => "p99 <= 50 ms: met",
            (true, To::Nats, false) => "p99 <= 50 ms: **not met**",
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {goal} |",
            to.label(),
            if notify {
                "LISTEN/NOTIFY"
            } else {
                "polling (500 ms)"
            },
            ms(h.value_at_quantile(0.5)),
            ms(p99),
            ms(h.max()),
        );
    }
    Ok(())
}

/// A second PostgreSQL server, with fsync on, for the outbox study's durable rows.
struct DurablePg {
    _server: eventbus_brokers::Postgres,
    pool: PgPool,
}

impl DurablePg {
    async fn start() -> Result<DurablePg, String> {
        let server = tokio::task::spawn_blocking(|| {
            eventbus_brokers::Postgres::start_with(&["-c", "fsync=on"])
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("start PostgreSQL (fsync on): {e}"))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(WRITERS as u32 + 7)
            .connect(&server.url())
            .await
            .map_err(|e| format!("connect PostgreSQL (fsync on): {e}"))?;
        Ok(DurablePg {
            _server: server,
            pool,
        })
    }
}

/// What a database study runs on: a local nats-server with one stream, PostgreSQL (the
/// project's fixture, fsync off) and a SQLite file (WAL) in a fresh directory, removed on drop.
pub(crate) struct StudyEnv {
    // Declared first, dropped first: the client closes before the server stops.
    pub(crate) backend: NatsBackend,
    _nats: Fixture,
    _postgres: eventbus_brokers::Postgres,
    pub(crate) pg: PgPool,
    pub(crate) lite: SqlitePool,
    dir: std::path::PathBuf,
}

impl StudyEnv {
    /// Start it: stream `stream` over `subjects`, pools of `connections` (PostgreSQL, SQLite),
    /// the SQLite file named after `name`.
    pub(crate) async fn start(
        stream: &str,
        subjects: &str,
        connections: (u32, u32),
        name: &str,
    ) -> Result<StudyEnv, String> {
        let nats = Fixture::start_broker(Select::Broker(BrokerKind::Nats), &[]).await?;
        let url = nats.address().expect("a NATS server").to_owned();
        let backend = NatsBackend::connect(NatsConfig::new(url))
            .await
            .map_err(|e| format!("connect NATS: {e}"))?;
        backend
            .ensure_stream(&StreamSpec::new(stream, [subjects]))
            .await
            .map_err(|e| format!("stream: {e}"))?;
        let postgres = tokio::task::spawn_blocking(eventbus_brokers::Postgres::start)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("start PostgreSQL: {e}"))?;
        let pg = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections.0)
            .connect(&postgres.url())
            .await
            .map_err(|e| format!("connect PostgreSQL: {e}"))?;
        let dir =
            std::env::temp_dir().join(format!("eventbus-{name}-study-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let lite = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(connections.1)
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(dir.join(format!("{name}.db")))
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10)),
            )
            .await
            .map_err(|e| format!("open SQLite: {e}"))?;
        Ok(StudyEnv {
            _nats: nats,
            _postgres: postgres,
            backend,
            pg,
            lite,
            dir,
        })
    }
}

impl Drop for StudyEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
