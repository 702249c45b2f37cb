//! The transactional outbox through faults: writers commit business rows and their events in
//! one PostgreSQL transaction (one in ten rolled back) while three relay **processes** publish
//! to the target's broker; a relay is SIGKILLed and restarted, PostgreSQL is SIGKILLed and
//! restarted, and (in the `outbox-broker` row) the broker is SIGKILLed and restarted. The ledger
//! counts a committed message as acked and a rolled-back one as failed, so the checker's
//! **lost** is a committed event never published and **failed but stored** a phantom (a
//! rolled-back event published).
//!
//! A relay process is a service as users write one: the `eventbus` facade, configured by
//! `EVENTBUS_*` variables ([`Target::bus_env`]), whichever backend they name.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::{Bus, BusConfig};
use eventbus_brokers::Postgres;
use eventbus_outbox::sqlx::{self, PgPool};
use eventbus_outbox::{OutboxStore, PgOutbox, Relay, RelayConfig};

use super::{Row, Size, blocking, ms, run_id};
use crate::check::{self, Class, Ledger};
use crate::record;
use crate::target::Target;

/// The subcommand the reliability binary runs as a relay process.
pub const RELAY_COMMAND: &str = "outbox-relay";

/// Relay processes running side by side.
const RELAYS: usize = 3;

/// Publishes per row allowed: one, plus the rows a killed relay or a lost mark sends again
/// (uncoordinated relays publish every row about [`RELAYS`] times).
const MAX_PUBLISHES_PER_ROW: f64 = 1.2;

/// Run as a relay process: `outbox-relay <database url>`, publishing through the backend its
/// `EVENTBUS_*` variables name, until stdin closes (the parent is gone) or the process is killed.
pub async fn relay_process(database: &str) -> Result<(), String> {
    let pool = PgPool::connect(database)
        .await
        .map_err(|e| format!("connect PostgreSQL: {e}"))?;
    let bus = bus_from_env().await?;
    let engine = bus
        .publisher()
        .await
        .map_err(|e| format!("publisher: {e}"))?;
    let relay = Relay::start(
        PgOutbox::new(pool),
        engine,
        // Published rows kept for the run: the row counts their publishes.
        RelayConfig::default()
            .poll(Duration::from_millis(100))
            .retention(Duration::from_secs(3_600)),
    );
    until_stdin_closes().await;
    relay.close(Duration::from_secs(5)).await;
    Ok(())
}

/// The bus a worker process's `EVENTBUS_*` variables describe, connected.
pub(super) async fn bus_from_env() -> Result<Bus, String> {
    let config = BusConfig::load(None).map_err(|e| format!("bus config: {e}"))?;
    Bus::connect(&config)
        .await
        .map_err(|e| format!("connect {}: {e}", config.backend))
}

/// A child process of this binary (a relay, a consumer): a service on the `eventbus` facade,
/// configured by `EVENTBUS_*` variables only, killed when dropped.
pub(super) struct Worker {
    child: Child,
}

impl Worker {
    /// Run this binary with `args` and, of the `EVENTBUS_*` variables, only `env`.
    pub(super) fn spawn(args: &[&str], env: &[(&'static str, String)]) -> std::io::Result<Worker> {
        let mut cmd = Command::new(std::env::current_exe()?);
        // Only the bus's own variables: the facade refuses an `EVENTBUS_*` variable it does
        // not know (this run's `EVENTBUS_NATS_SERVER`, say) as a likely typo.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EVENTBUS_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Worker { child })
    }

    /// SIGKILL: no close, nothing flushed, its database session dropped by the kernel.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Blocks until the parent closes our stdin (or is gone): how a worker process learns to stop.
pub(super) async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await;
}

/// What every relay process is started with: the database and the broker.
struct RelaySetup {
    database: String,
    env: Vec<(&'static str, String)>,
}

/// A relay process: this binary with [`RELAY_COMMAND`].
struct RelayProcess;

impl RelayProcess {
    fn spawn(setup: &RelaySetup) -> std::io::Result<Worker> {
        let mut env = setup.env.clone();
        // The engine waits longer than a broker's restart: a resend, not an unknown outcome.
        env.push(("EVENTBUS_BATCH_ACK_TIMEOUT", "10000".into()));
        Worker::spawn(&[RELAY_COMMAND, &setup.database], &env)
    }
}

/// Which faults a row applies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Faults {
    /// A relay SIGKILLed and restarted, then PostgreSQL SIGKILLed and restarted.
    RelayAndDatabase,
    /// Those, then the broker SIGKILLed and restarted.
    AlsoBroker,
    /// PostgreSQL paused (SIGSTOP, every process) for [`DB_PAUSE`], then resumed: connections
    /// stay open and nothing answers, longer than the writers' pool waits.
    DatabasePause,
}

/// How long the `outbox-db-pause` row keeps PostgreSQL stopped.
const DB_PAUSE: Duration = Duration::from_secs(4);

/// `outbox-db-pause`: PostgreSQL SIGSTOPped under load, then resumed.
pub async fn outbox_db_pause<T: Target>(t: &mut T, size: Size) -> Row {
    outbox_with(t, size, Faults::DatabasePause, "outbox-db-pause").await
}

/// `outbox`: a relay and PostgreSQL killed under load.
pub async fn outbox<T: Target>(t: &mut T, size: Size) -> Row {
    outbox_with(t, size, Faults::RelayAndDatabase, "outbox").await
}

/// `outbox-broker`: the same, and the broker killed and restarted too.
pub async fn outbox_broker<T: Target>(t: &mut T, size: Size) -> Row {
    outbox_with(t, size, Faults::AlsoBroker, "outbox-broker").await
}

async fn outbox_with<T: Target>(t: &mut T, size: Size, faults: Faults, name: &str) -> Row {
    let mut row = Row::new(name, &format!("{}+postgres", t.name()));
    let mut pg = match blocking(Postgres::start).await {
        Ok(pg) => pg,
        Err(e) => {
            row.failures.push(format!("start PostgreSQL: {e}"));
            return row;
        }
    };
    let run = run_id("outbox");
    let (topics, filter) = try_setup!(
        row,
        t.provision(&run, 1)
            .await
            .map_err(|e| format!("provision: {e}"))
    );
    let (pool, outbox) = try_setup!(row, open(&pg).await);
    let setup = RelaySetup {
        database: pg.url(),
        env: t.bus_env(),
    };
    let mut relays = Vec::new();
    for _ in 0..RELAYS {
        relays.push(try_setup!(
            row,
            RelayProcess::spawn(&setup).map_err(|e| format!("relay process: {e}"))
        ));
    }
    let ledger = Ledger::default();
    let per = if size.quick { 300 } else { 1_000 };
    let topic: Arc<str> = topics[0].as_str().into();
    let writers = writers(&pool, &outbox, &ledger, (&run, &topic), per, size);
    // The faults, while the writers commit (about 6-8 s).
    let log = inflict(t, &mut pg, &mut relays, &setup, faults, &mut row).await;
    for w in writers {
        let _ = w.await;
    }
    // Every committed row published: the outbox empties.
    let pending = drained(&outbox, Duration::from_secs(60)).await;
    row.require(
        pending == 0,
        format!("{pending} rows still pending after 60 s"),
    );
    drop(relays);
    count_publishes(&pool, &mut row).await;
    let stored = t.stored(&run).await.map(|n| n as usize);
    read_back(t, &filter, stored, &ledger, &mut row).await;
    row.notes.extend(log);
    row.notes.push(format!(
        "{RELAYS} relay processes; 5 writers, {per} transactions each, one in ten rolled back; the broker holds {}",
        stored.map_or("?".into(), |n| n.to_string())
    ));
    // Safety, and the outbox's own promises: no phantom (a rolled-back event published), no
    // copy past the broker's or the consumer's de-duplication, per-key commit order whichever
    // relay published.
    row.require_safety();
    row.require(row.figures.duplicates == 0, "duplicates stored");
    row.require(
        row.figures.key_reorders == 0,
        format!(
            "{} messages out of commit order within their key",
            row.figures.key_reorders
        ),
    );
    row
}

/// Read the run back as a consumer would and check it against what the writers committed.
/// Without the broker's de-duplication, the consumer's layer drops copies a relay published
/// again (killed before it marked them): what a consumer then sees is checked.
async fn read_back<T: Target>(
    t: &T,
    filter: &str,
    stored: Option<usize>,
    ledger: &Ledger,
    row: &mut Row,
) {
    let (expect, dedup) = if t.drops_copies() {
        (stored, None)
    } else {
        (None, Some(eventbus_core::DedupConfig::default()))
    };
    match check::drain_with(
        &t.subscriber(),
        filter,
        expect,
        Duration::from_secs(3),
        Duration::from_secs(60),
        dedup,
    )
    .await
    {
        Ok(reads) => {
            if dedup.is_some()
                && let Some(n) = stored
            {
                row.notes.push(format!(
                    "{} copies stored under an id already stored, dropped by the consumer's de-duplication",
                    n.saturating_sub(reads.len())
                ));
            }
            row.figures = check::check(ledger, &reads, 0);
        }
        Err(e) => row.failures.push(format!("drain failed: {e:?}")),
    }
}

/// A pool on `pg`, the outbox table and the business table.
async fn open(pg: &Postgres) -> Result<(sqlx::PgPool, PgOutbox), String> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&pg.url())
        .await
        .map_err(|e| format!("connect PostgreSQL: {e}"))?;
    let outbox = PgOutbox::new(pool.clone());
    outbox.migrate().await.map_err(|e| format!("schema: {e}"))?;
    sqlx::query("CREATE TABLE orders (id BIGINT)")
        .execute(&pool)
        .await
        .map_err(|e| format!("schema: {e}"))?;
    Ok((pool, outbox))
}

/// 5 writers committing `per` transactions each to `topic` of `run`, one in ten rolled back,
/// each recorded in `ledger` (a rollback as failed).
fn writers(
    pool: &sqlx::PgPool,
    outbox: &PgOutbox,
    ledger: &Ledger,
    (run, topic): (&str, &Arc<str>),
    per: u64,
    size: Size,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..5u32)
        .map(|w| {
            let (pool, outbox, ledger) = (pool.clone(), outbox.clone(), ledger.clone());
            let (run, topic) = (run.to_owned(), Arc::clone(topic));
            tokio::spawn(async move {
                for seq in 0..per {
                    let msg = record::message(&run, &topic, w, seq, 100);
                    let commit = seq % 10 != 7;
                    let at = Instant::now();
                    write(&pool, &outbox, &msg, commit).await;
                    let class = if commit { Class::Acked } else { Class::Failed };
                    ledger.record((w, seq), at, class, None);
                    tokio::time::sleep(Duration::from_millis(if size.quick { 20 } else { 8 }))
                        .await;
                }
            })
        })
        .collect()
}

/// The row's faults, from 1 s in: what happened, for the row's notes.
async fn inflict<T: Target>(
    t: &mut T,
    pg: &mut Postgres,
    relays: &mut [Worker],
    setup: &RelaySetup,
    faults: Faults,
    row: &mut Row,
) -> Vec<String> {
    let mut log = Vec::new();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    if faults == Faults::DatabasePause {
        let down = Instant::now();
        let paused = blocking(|| {
            let paused = pg.pause();
            std::thread::sleep(DB_PAUSE);
            // Resumed whatever the pause did: never leave the database stopped.
            let resumed = pg.resume();
            paused.and(resumed)
        })
        .await;
        if let Err(e) = paused {
            row.failures.push(format!("pause PostgreSQL: {e}"));
        }
        log.push(format!(
            "PostgreSQL SIGSTOPped at 1.0 s, resumed after {} ms",
            ms(down.elapsed())
        ));
    } else {
        relays[0].kill();
        log.push("relay 0 SIGKILLed at 1.0 s".to_owned());
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        match RelayProcess::spawn(setup) {
            Ok(r) => relays[0] = r,
            Err(e) => row.failures.push(format!("restart relay: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let down = Instant::now();
        let restarted = blocking(|| {
            pg.kill();
            std::thread::sleep(Duration::from_millis(500));
            pg.restart()
        })
        .await;
        if let Err(e) = restarted {
            row.failures.push(format!("restart PostgreSQL: {e}"));
        }
        log.push(format!(
            "PostgreSQL SIGKILLed, back after {} ms",
            ms(down.elapsed())
        ));
    }
    if faults == Faults::AlsoBroker {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let down = Instant::now();
        t.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Err(e) = blocking(|| t.restart()).await {
            row.failures.push(format!("restart the broker: {e}"));
        }
        log.push(format!(
            "{} SIGKILLed, back after {} ms",
            t.broker().describe(),
            ms(down.elapsed())
        ));
    }
    log
}

/// Wait until no row is pending, at most `limit`: the rows still pending then (`u64::MAX` if
/// the table could not be read).
async fn drained(outbox: &PgOutbox, limit: Duration) -> u64 {
    let until = Instant::now() + limit;
    let mut pending = u64::MAX;
    while Instant::now() < until {
        match outbox.stats().await {
            Ok(s) if s.pending == 0 => return 0,
            Ok(s) => pending = s.pending,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pending
}

/// Publishes per row the relays recorded, required to be about one.
async fn count_publishes(pool: &sqlx::PgPool, row: &mut Row) {
    // Every publish a relay recorded (marked, or sent back for a retry) adds one attempt: more
    // than about one per row means relays published the same rows side by side.
    let publishes: Result<(i64, i64), _> = sqlx::query_as(
        "SELECT count(*), coalesce(sum(attempts), 0)::int8 FROM eventbus_outbox WHERE state = 1",
    )
    .fetch_one(pool)
    .await;
    match publishes {
        Ok((rows, attempts)) => {
            let per = attempts as f64 / rows.max(1) as f64;
            row.notes.push(format!(
                "{attempts} publishes recorded for {rows} rows ({per:.3} per row)"
            ));
            row.require(
                per <= MAX_PUBLISHES_PER_ROW,
                format!(
                    "{per:.2} publishes per row (at most {MAX_PUBLISHES_PER_ROW}): relays published the same rows"
                ),
            );
        }
        Err(e) => row.failures.push(format!("counting publishes: {e}")),
    }
}

/// One business transaction: an order row and `msg` enqueued, committed when `commit`, else
/// rolled back. A transaction PostgreSQL did not take (down, restarting) is tried again; a
/// commit whose answer was lost may have committed, and its retry enqueues the same message
/// id again, which NATS's de-duplication drops.
async fn write(pool: &PgPool, outbox: &PgOutbox, msg: &eventbus_core::Message, commit: bool) {
    loop {
        let attempt = async {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO orders (id) VALUES (1)")
                .execute(&mut *tx)
                .await?;
            outbox
                .enqueue(&mut tx, msg)
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            if commit {
                tx.commit().await
            } else {
                tx.rollback().await
            }
        };
        match attempt.await {
            Ok(()) => return,
            // Never committed: nothing to retry for a rollback.
            Err(_) if !commit => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
