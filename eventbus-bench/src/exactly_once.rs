//! `--exactly-once-study`: what each exactly-once form costs beside the at-least-once path it
//! replaces, side by side in one run, phases interleaved:
//!
//! - **inbox** (PostgreSQL, started by the project's tooling, and SQLite): a backlog on a local
//!   nats-server (file stream) consumed by the handler runtime (concurrency 8), each message's
//!   effect one row written in a transaction, by the handler itself (at-least-once) and through
//!   the inbox (the id recorded in the same transaction). Messages/s from the first delivery to
//!   the last commit, and the handler's own time per message (p50 / p99). Each phase checks that
//!   the table holds one effect per message.
//! - **Kafka transactions**, on librdkafka's mock cluster (tansu 0.6.0 cannot commit a
//!   transaction, and Apache Kafka cannot be installed here): consume a backlog and produce one
//!   output per record, at-least-once (the SDK's subscriber; each input acked once its output's
//!   publish is acked) and with `TxnProcessor` (a transaction per 500 records). Records/s from the first record
//!   handed over to the last output committed; each phase checks the output topic's count.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::handler::{self, HandlerConfig, HandlerError};
use eventbus_core::{Backend as _, Message, Publisher, SubscribeSpec, Subscriber};
use eventbus_kafka::{KafkaBackend, KafkaConfig, TxnSpec};
use eventbus_nats::NatsBackend;
use eventbus_outbox::inbox::{PgInbox, SqliteInbox};
use eventbus_outbox::sqlx::{self, PgPool, SqlitePool};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::Args;

/// Handler concurrency in the inbox phases.
const CONCURRENCY: usize = 8;

/// Messages handled, the instant the last one finished, and the handler's time per message.
struct Progress {
    n: usize,
    done: AtomicUsize,
    finished: Notify,
    first: std::sync::OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    hist: Mutex<Histogram<u64>>,
}

impl Progress {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Progress {
            n,
            done: AtomicUsize::new(0),
            finished: Notify::new(),
            first: std::sync::OnceLock::new(),
            last: Mutex::new(None),
            hist: Mutex::new(Histogram::new(3).expect("histogram")),
        })
    }

    /// A handler call begins now: the clock starts at the first (the group join and the
    /// subscription's set-up are not the form's cost).
    fn begin(&self) -> Instant {
        let now = Instant::now();
        *self.first.get_or_init(|| now)
    }

    /// The first call to the last commit.
    fn elapsed(&self) -> Option<Duration> {
        Some(
            self.last
                .lock()
                .as_ref()?
                .duration_since(*self.first.get()?),
        )
    }

    /// One message handled in `took`; the last one notes the instant and wakes the waiter.
    fn handled(&self, took: Duration) {
        let _ = self.hist.lock().record(took.as_micros() as u64);
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            *self.last.lock() = Some(Instant::now());
            self.finished.notify_one();
        }
    }
}

/// The database under test, and how a phase writes its effect.
#[derive(Clone)]
enum Db {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    fn label(&self) -> &'static str {
        match self {
            Db::Pg(_) => "PostgreSQL",
            Db::Sqlite(_) => "SQLite",
        }
    }

    async fn setup(&self) -> Result<(), String> {
        const EFFECTS: &str = "CREATE TABLE IF NOT EXISTS effects (phase TEXT, msg_id TEXT)";
        match self {
            Db::Pg(p) => {
                sqlx::query(EFFECTS)
                    .execute(p)
                    .await
                    .map_err(|e| e.to_string())?;
                PgInbox::new(p.clone(), "study").migrate().await
            }
            Db::Sqlite(p) => {
                sqlx::query(EFFECTS)
                    .execute(p)
                    .await
                    .map_err(|e| e.to_string())?;
                SqliteInbox::new(p.clone(), "study").migrate().await
            }
        }
        .map_err(|e| format!("migrate the inbox: {e}"))
    }

    async fn distinct(&self, phase: &str) -> Result<(i64, i64), String> {
        const Q: &str = "SELECT count(*), count(DISTINCT msg_id) FROM effects WHERE phase = ";
        match self {
            Db::Pg(p) => {
                sqlx::query_as(&format!("{Q}$1"))
                    .bind(phase)
                    .fetch_one(p)
                    .await
            }
            Db::Sqlite(p) => {
                sqlx::query_as(&format!("{Q}?"))
                    .bind(phase)
                    .fetch_one(p)
                    .await
            }
        }
        .map_err(|e| e.to_string())
    }
}

/// Throughput and handler time of one phase.
struct Figures {
    per_s: f64,
    p50_us: u64,
    p99_us: u64,
}

/// Publish `msgs` through `publisher` and wait until every one is acked: a phase's backlog.
async fn backlog<S: eventbus_core::BatchSink>(
    publisher: &Batcher<S>,
    msgs: impl Iterator<Item = Message>,
) -> Result<(), String> {
    let mut acks = Vec::new();
    for m in msgs {
        acks.push(publisher.publish(m).await.map_err(|e| e.to_string())?);
    }
    for a in acks {
        a.await.into_result().map_err(|e| format!("backlog: {e}"))?;
    }
    Ok(())
}

/// Message `i` of a phase's backlog: 100 bytes.
fn input(topic: &str, i: usize) -> Message {
    Message::new(topic, format!("{i:0100}"))
}

/// An inbox phase's consumer on either store: `$pool` of `$inbox`, parameters written `$p1`;
/// the handler writes each effect itself (`$with_inbox` false) or through the inbox, and the
/// runtime reads `$sub` until `$stop`.
macro_rules! consume {
    ($pool:expr, $inbox:ident, $p:literal, ($with_inbox:expr, $sub:expr, $cfg:expr, $stop:expr, $progress:expr, $phase:expr)) => {{
        let (sub, cfg, stop) = ($sub, $cfg, $stop);
        let (progress, phase): (Arc<Progress>, Arc<str>) =
            (Arc::clone(&$progress), Arc::clone(&$phase));
        let pool = $pool.clone();
        let failed = |e: sqlx::Error| HandlerError::new(format!("effect: {e}"));
        const INSERT: &str = concat!(
            "INSERT INTO effects (phase, msg_id) VALUES (",
            $p,
            "1, ",
            $p,
            "2)"
        );
        let p = Arc::clone(&progress);
        if $with_inbox {
            let ph = Arc::clone(&phase);
            let inner = $inbox::new(pool, &phase).handler(move |msg, tx| {
                let ph = Arc::clone(&ph);
                Box::pin(async move {
                    sqlx::query(INSERT)
                        .bind(&*ph)
                        .bind(msg.id().to_string())
                        .execute(tx)
                        .await
                        .map_err(failed)?;
                    Ok(())
                })
            });
            let work = move |msg: Message, info| {
                let (p, t) = (Arc::clone(&p), Instant::now());
                p.begin();
                let handled = inner(msg, info);
                async move {
                    handled.await?;
                    p.handled(t.elapsed());
                    Ok(())
                }
            };
            handler::run(sub, cfg, work, stop).await
        } else {
            let work = move |msg: Message, _| {
                let (p, pool, ph, t) = (
                    Arc::clone(&p),
                    pool.clone(),
                    Arc::clone(&phase),
                    Instant::now(),
                );
                p.begin();
                async move {
                    let mut tx = pool.begin().await.map_err(failed)?;
                    sqlx::query(INSERT)
                        .bind(&*ph)
                        .bind(msg.id().to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(failed)?;
                    tx.commit().await.map_err(failed)?;
                    p.handled(t.elapsed());
                    Ok(())
                }
            };
            handler::run(sub, cfg, work, stop).await
        }
    }};
}

/// Consume `n` messages of a fresh backlog with the handler runtime, each effect written by
/// the handler (`inbox` false) or through the inbox.
async fn inbox_phase(
    nats: &NatsBackend,
    db: &Db,
    inbox: bool,
    n: usize,
    tag: &str,
) -> Result<Figures, String> {
    let subject = format!("eo.{tag}");
    let publisher = Batcher::new(
        nats.sink().await.map_err(|e| e.to_string())?,
        BatchConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    backlog(&publisher, (0..n).map(|i| input(&subject, i))).await?;
    let _ = publisher.close(Duration::from_secs(5)).await;

    let sub = nats
        .subscriber()
        .subscribe(SubscribeSpec::new(subject.as_str()).group(tag))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let progress = Progress::new(n);
    let cfg = HandlerConfig::default().concurrency(CONCURRENCY);
    let phase: Arc<str> = Arc::from(tag);
    let stop = {
        let p = Arc::clone(&progress);
        async move { p.finished.notified().await }
    };
    let report = tokio::time::timeout(Duration::from_secs(300), async {
        match db {
            Db::Pg(pool) => consume!(pool, PgInbox, "$", (inbox, sub, cfg, stop, progress, phase)),
            Db::Sqlite(pool) => {
                consume!(
                    pool,
                    SqliteInbox,
                    "?",
                    (inbox, sub, cfg, stop, progress, phase)
                )
            }
        }
    })
    .await
    .map_err(|_| {
        format!(
            "{tag}: {} of {n} handled in 300 s",
            progress.done.load(Ordering::Acquire)
        )
    })?;
    let _ = report;
    figures(db, tag, &progress).await
}

/// A finished inbox phase's figures, once the table is checked to hold one effect per message.
async fn figures(db: &Db, tag: &str, progress: &Progress) -> Result<Figures, String> {
    let n = progress.n;
    let took = progress.elapsed().ok_or("no message handled")?;
    let (rows, distinct) = db.distinct(tag).await?;
    if distinct as usize != n || rows < distinct {
        return Err(format!(
            "{tag}: {distinct} of {n} effects stored ({rows} rows)"
        ));
    }
    let h = progress.hist.lock();
    Ok(Figures {
        per_s: n as f64 / took.as_secs_f64(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
    })
}

/// How a Kafka phase turns an input into its output.
type Transform = Arc<dyn Fn(&Message) -> Message + Send + Sync>;

/// Records/s consuming `n` inputs and producing one output each, at-least-once or in
/// transactions of 500, on the mock cluster at `bootstrap`.
async fn kafka_phase(
    mock: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    txn: bool,
    n: usize,
    tag: &str,
) -> Result<f64, String> {
    let (input_topic, output) = (format!("eo-in-{tag}"), format!("eo-out-{tag}"));
    for t in [&input_topic, &output] {
        mock.create_topic(t, 4, 1)
            .map_err(|e| format!("topic: {e}"))?;
    }
    let kafka = KafkaBackend::connect(KafkaConfig::new(mock.bootstrap_servers()))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let publisher = Batcher::new(
        kafka.sink().await.map_err(|e| e.to_string())?,
        BatchConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    let inputs = (0..n).map(|i| input(&input_topic, i).with_key(format!("k{}", i % 64)));
    backlog(&publisher, inputs).await?;
    let transform: Transform = {
        let output = output.clone();
        Arc::new(move |m: &Message| Message::new(output.as_str(), m.payload().clone()))
    };
    // From the first record handed over (the group join is not the form's cost) to the last
    // output committed.
    let took = if txn {
        transactions(&kafka, &input_topic, transform, n, tag).await?
    } else {
        at_least_once(&kafka, &publisher, &input_topic, transform, n, tag).await?
    };
    let _ = publisher.close(Duration::from_secs(5)).await;
    // The mock writes no transaction markers: each offset is one output.
    let stored: i64 = kafka
        .watermarks(&output)
        .await
        .map_err(|e| format!("count outputs: {e}"))?
        .iter()
        .map(|(_, lo, hi)| hi - lo)
        .sum();
    if stored as usize != n {
        return Err(format!("{tag}: {stored} outputs stored for {n} inputs"));
    }
    Ok(n as f64 / took.as_secs_f64())
}

/// `TxnProcessor` over `input`, 500 records per transaction, until all `n` are consumed: the
/// time from the first record handed over to the commit that consumes the last.
async fn transactions(
    kafka: &KafkaBackend,
    input: &str,
    transform: Transform,
    n: usize,
    tag: &str,
) -> Result<Duration, String> {
    let first = Arc::new(std::sync::OnceLock::<Instant>::new());
    let t0 = Arc::clone(&first);
    let processor = kafka
        .transactional(TxnSpec::new(tag, [input], tag).max_batch(500))
        .await
        .map_err(|e| format!("processor: {e}"))?;
    let mut progress = processor.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(processor.run(
        move |m: Message| {
            t0.get_or_init(Instant::now);
            let out = transform(&m);
            async move { Ok(vec![out]) }
        },
        async move {
            let _ = stopped.await;
        },
    ));
    // The exact event: the commit that makes the last input consumed.
    tokio::time::timeout(
        Duration::from_secs(120),
        progress.wait_for(|s| s.consumed as usize >= n),
    )
    .await
    .map_err(|_| format!("{tag}: not all committed in 120 s"))?
    .map_err(|_| format!("{tag}: the processor stopped"))?;
    let took = first.get().ok_or("no record")?.elapsed();
    let _ = stop.send(());
    let stats = running
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("processor: {e}"))?;
    if stats.consumed as usize != n {
        return Err(format!("{tag}: {} of {n} committed", stats.consumed));
    }
    Ok(took)
}

/// The SDK's subscriber over `input`, each input acked once its output (published through
/// `publisher`) is acked: the time from the first record handed over to the last such ack.
async fn at_least_once<S: eventbus_core::BatchSink>(
    kafka: &KafkaBackend,
    publisher: &Batcher<S>,
    input: &str,
    transform: Transform,
    n: usize,
    tag: &str,
) -> Result<Duration, String> {
    let mut first = None;
    // Inputs whose output was acked and which were acked themselves.
    let done = Arc::new(AtomicUsize::new(0));
    let mut sub = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new(input).group(tag))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let finished = Arc::new(Notify::new());
    let mut pending = 0usize;
    while pending < n {
        let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .map_err(|_| format!("{tag}: {pending} of {n} delivered in 60 s"))?
            .ok_or("subscription ended")?
            .map_err(|e| e.to_string())?;
        first.get_or_insert_with(Instant::now);
        pending += 1;
        let ack = publisher
            .publish(transform(d.message()))
            .await
            .map_err(|e| e.to_string())?;
        let (done, finished) = (Arc::clone(&done), Arc::clone(&finished));
        tokio::spawn(async move {
            if ack.await.is_acked()
                && d.ack().await.is_ok()
                && done.fetch_add(1, Ordering::AcqRel) + 1 == n
            {
                finished.notify_one();
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), finished.notified())
        .await
        .map_err(|_| format!("{tag}: outputs not all acked in 60 s"))?;
    let took = first.ok_or("no record")?.elapsed();
    sub.close().await;
    Ok(took)
}

/// The ratio cell of row `i` (row 0 is the baseline) against the goal of at least 0.5x.
fn against_half(i: usize, ratio: f64) -> String {
    if i == 0 {
        return "1.00x".to_owned();
    }
    let verdict = if ratio >= 0.5 { "met" } else { "**not met**" };
    format!("{ratio:.2}x ({verdict})")
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The inbox rows of `db`: plain and inbox phases of `n` messages, interleaved, twice.
async fn inbox_rows(
    md: &mut String,
    backend: &NatsBackend,
    db: &Db,
    n: usize,
) -> Result<(), String> {
    db.setup().await?;
    let label = db.label();
    let mut got: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..2 {
        for (i, inbox) in [false, true].into_iter().enumerate() {
            eprintln!(
                "==> exactly-once study: {label}, inbox {inbox}, repetition {}",
                rep + 1
            );
            let tag = format!("{}{}{rep}", &label[..2].to_ascii_lowercase(), i);
            got[i].push(inbox_phase(backend, db, inbox, n, &tag).await?);
        }
    }
    let mean = |v: &[Figures]| v.iter().map(|f| f.per_s).sum::<f64>() / v.len() as f64;
    let plain = mean(&got[0]);
    let joined = |f: &[Figures], q: fn(&Figures) -> u64| {
        f.iter().map(|x| ms(q(x))).collect::<Vec<_>>().join(" / ")
    };
    for (i, name) in ["handler's own transaction", "inbox"].iter().enumerate() {
        let f = &got[i];
        let rate = mean(f);
        let _ = writeln!(
            md,
            "| {label} | {name} | {rate:.0} | {} | {} | {} |",
            joined(f, |x| x.p50_us),
            joined(f, |x| x.p99_us),
            against_half(i, rate / plain)
        );
    }
    Ok(())
}

/// The Kafka transactions rows: at-least-once and `TxnProcessor` phases of `n` records each,
/// interleaved, twice, on a mock cluster of their own.
async fn kafka_rows(md: &mut String, n: usize) -> Result<(), String> {
    let _ = writeln!(
        md,
        "\n**Kafka transactions**, on librdkafka's mock cluster (in-process, no disk: it runs the \
         client's whole transaction protocol but keeps no transaction markers; tansu 0.6.0 \
         cannot commit a transaction and Apache Kafka cannot be installed here, so this measures \
         the client's side only). {n} 100-byte inputs over 4 partitions, one output each; \
         at-least-once: the SDK's subscriber, each input acked once its output's publish is \
         acked; transactions: `TxnProcessor`, 500 records per transaction. From the first record handed over to \
         the last output committed; each phase checks the output topic holds them all.\n\n\
         | path | records/s (each repetition) | vs at-least-once (goal >= 0.5x) |\n|---|---|---|"
    );
    let mock = rdkafka::mocking::MockCluster::new(1).map_err(|e| format!("mock cluster: {e}"))?;
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..2 {
        for (i, txn) in [false, true].into_iter().enumerate() {
            eprintln!(
                "==> exactly-once study: Kafka, transactions {txn}, repetition {}",
                rep + 1
            );
            rates[i].push(kafka_phase(&mock, txn, n, &format!("k{i}{rep}")).await?);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let base = mean(&rates[0]);
    for (i, name) in ["at-least-once", "transactions (500)"].iter().enumerate() {
        let ratio = mean(&rates[i]) / base;
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            rates[i]
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            against_half(i, ratio)
        );
    }
    Ok(())
}

pub(crate) async fn study(args: &Args) -> Result<bool, String> {
    let n = if args.quick { 2_000 } else { 10_000 };
    let env = crate::outbox::StudyEnv::start(
        "EO_STUDY",
        "eo.>",
        (CONCURRENCY as u32 + 2, CONCURRENCY as u32 + 2),
        "inbox",
    )
    .await?;
    let (backend, pool, lite) = (&env.backend, env.pg.clone(), env.lite.clone());
    let mut md = format!(
        "# Exactly once: what each form costs beside the at-least-once path\n\n\
         Written by `cargo xtask bench --exactly-once-study{}` (eventbus-bench, \
         `exactly_once.rs`); phases interleaved in one run (plain, inbox, plain, inbox), {n} \
         messages per phase.\n\n\
         **Inbox**: a backlog of 100-byte messages on a local nats-server (file stream), consumed \
         by the handler runtime (concurrency {CONCURRENCY}); each message's effect is one row \
         written in a transaction by the handler itself (plain, at-least-once) or through the \
         inbox (the id recorded in the same transaction). PostgreSQL 15 (fsync off, the \
         project's fixture), SQLite (WAL). Handler time: from the handler's call to its commit.\n\n\
         | store | phase | msg/s (mean of 2) | handler p50 ms | handler p99 ms | msg/s vs plain (goal: the inbox costs <= 2x, >= 0.50x) |\n|---|---|---|---|---|---|\n",
        if args.quick { " --quick" } else { "" }
    );
    for db in [Db::Pg(pool), Db::Sqlite(lite)] {
        inbox_rows(&mut md, backend, &db, n).await?;
    }
    kafka_rows(&mut md, n * 5).await?;
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let path = args.out.join("exactly-once.md");
    std::fs::write(&path, &md).map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("{md}");
    Ok(true)
}
