//! `eventbus-reliability`: runs the fault scenarios against real brokers and prints a table of
//! figures per scenario and backend. Exits non-zero if any assertion failed.
#![allow(missing_docs)]
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line report

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use eventbus_reliability::plan::{Scenario, Target as On};
use eventbus_reliability::scenario::{self, Reader, Row, Size};
use eventbus_reliability::target::Target;

#[derive(Parser, Debug)]
#[command(about = "Fault scenarios against real brokers: lost must be 0")]
struct Args {
    /// CI-sized (shorter stalls, fewer messages).
    #[arg(long)]
    quick: bool,
    /// Backends (comma separated): nats, kafka, and the clusters nats-cluster (3 nodes, R3
    /// streams; faults hit the stream leader) and kafka-cluster (3 tansu brokers over one
    /// SQLite file), and the raw clients with no SDK through the same rows: nats-cluster-raw
    /// (async-nats; every nats-cluster row but pause), kafka-cluster-raw (rdkafka;
    /// kill-restart, consume-kill), and nats-raw / kafka-raw (single broker; the raw
    /// consumers in consume-kill and consume-blackhole).
    /// Default: nats, kafka.
    #[arg(long, value_delimiter = ',')]
    backend: Vec<On>,
    /// Scenarios (comma separated): kill-restart, consume-kill (a group subscription kept open
    /// through a kill and restart), consume-blackhole (the same through a blackhole of its
    /// connection), pause, stall-memory, slow-consumer, blackhole, wire, shutdown, cancel,
    /// absent, security, on nats and kafka outbox and outbox-broker (three relay processes on
    /// PostgreSQL publishing through the `eventbus` facade while a relay, PostgreSQL and the
    /// broker are killed), outbox-db-pause (PostgreSQL SIGSTOPped), inbox-kill and
    /// inbox-kill-sqlite (a consumer process using the inbox SIGKILLed at random points, many
    /// times: every message applied exactly once), inbox-db-restart (PostgreSQL SIGKILLed and
    /// restarted under the running inbox consumer), and on nats-cluster only stepdown, kill-connected (kill the node the
    /// client is attached to), consume-kill-connected (kill the node the live consumer is
    /// attached to), consume-partition (the live consumer while the stream leader is cut
    /// off), rolling-restart and partition (the stream leader cut off from the other two by
    /// route proxies). Default: all but the nats-cluster-only ones.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Output directory for reliability.json and reliability.md.
    #[arg(long, default_value = "target/reliability")]
    out: PathBuf,
    /// Also write the Markdown report here (e.g. docs/reliability.md).
    #[arg(long)]
    doc: Option<PathBuf>,
}

/// tansu's SQLite fetch sums the size of every record from the fetch offset to the high
/// watermark (a window function in `record_fetch.sql`) before it cuts the response, so each
/// fetch costs O(backlog): a deep backlog drains quadratically (the first fetch of 40,000 x
/// 1 KiB took 58 s). The slow consumer therefore runs on tansu's memory engine.
#[cfg(feature = "kafka")]
fn storage(s: Scenario) -> eventbus_reliability::target::kafka::TansuStorage {
    use eventbus_reliability::target::kafka::TansuStorage;
    if s == Scenario::SlowConsumer {
        TansuStorage::Memory
    } else {
        TansuStorage::Sqlite
    }
}

async fn run_on<T: Target>(t: &mut T, s: Scenario, size: Size) -> Row {
    use scenario::{InboxFault, Store};
    match s {
        Scenario::KillRestart => scenario::kill_restart(t, size).await,
        Scenario::ConsumeKill | Scenario::ConsumeBlackhole => {
            consume_on(t, s, size, Reader::Sdk).await
        }
        Scenario::Pause => scenario::pause(t, size).await,
        Scenario::StallMemory => scenario::stall_memory(t, size).await,
        Scenario::SlowConsumer => scenario::slow_consumer(t, size).await,
        Scenario::Blackhole => scenario::blackhole(t, size).await,
        Scenario::Wire => scenario::wire(t, size).await,
        Scenario::Shutdown => scenario::shutdown(t, size).await,
        Scenario::Cancel => scenario::cancel(t, size).await,
        Scenario::Outbox => scenario::outbox(t, size).await,
        Scenario::OutboxBroker => scenario::outbox_broker(t, size).await,
        Scenario::OutboxDbPause => scenario::outbox_db_pause(t, size).await,
        Scenario::InboxKill => {
            scenario::inbox_kill(t, size, Store::Postgres, InboxFault::KillConsumer).await
        }
        Scenario::InboxKillSqlite => {
            scenario::inbox_kill(t, size, Store::Sqlite, InboxFault::KillConsumer).await
        }
        Scenario::InboxDbRestart => {
            scenario::inbox_kill(t, size, Store::Postgres, InboxFault::RestartDatabase).await
        }
        other => not_here(other, t.name()),
    }
}

/// The row of a scenario dispatched to a target that does not run it (a bug in this file's
/// dispatch, reported as a failed row rather than a panic).
fn not_here(s: Scenario, target: &str) -> Row {
    Row {
        scenario: s.name(),
        backend: target.into(),
        failures: vec![format!("{} is not dispatched on {target}", s.name())],
        ..Row::default()
    }
}

/// A consumer row that every target runs, with the live consumer `reader`.
async fn consume_on<T: Target>(t: &mut T, s: Scenario, size: Size, reader: Reader) -> Row {
    match s {
        Scenario::ConsumeKill => scenario::consume_kill(t, size, reader).await,
        Scenario::ConsumeBlackhole => scenario::consume_blackhole(t, size, reader).await,
        other => not_here(other, t.name()),
    }
}

/// A consumer row on the NATS cluster, with the live consumer `reader`.
#[cfg(feature = "nats")]
async fn consume_on_nats_cluster(
    t: &mut eventbus_reliability::target::nats_cluster::NatsCluster3,
    s: Scenario,
    size: Size,
    reader: Reader,
) -> Row {
    use eventbus_reliability::target::nats_cluster::Aim;
    let mut row = match s {
        Scenario::ConsumePartition => return scenario::consume_partition(t, size, reader).await,
        Scenario::ConsumeKillConnected => {
            t.aim(Aim::SubscriberNode);
            let mut row = scenario::consume_kill(t, size, reader).await;
            row.scenario = s.name();
            row
        }
        _ => consume_on(t, s, size, reader).await,
    };
    if let Some(v) = t.last_victim() {
        row.notes.push(format!("the faults hit node n{v}"));
    }
    row
}

/// The NATS cluster's own rows, and the others with the node they hit noted.
#[cfg(feature = "nats")]
async fn run_on_nats_cluster(s: Scenario, size: Size) -> Result<Row, String> {
    use eventbus_reliability::target::nats_cluster::{Aim, NatsCluster3};
    let mut t = NatsCluster3::start_for(s).await?;
    if s.consumes() {
        return Ok(consume_on_nats_cluster(&mut t, s, size, Reader::Sdk).await);
    }
    let mut row = match s {
        Scenario::Stepdown => return Ok(scenario::stepdown(&mut t, size).await),
        Scenario::RollingRestart => return Ok(scenario::rolling_restart(&mut t, size).await),
        Scenario::Partition => return Ok(scenario::partition(&mut t, size).await),
        Scenario::KillConnected => {
            t.aim(Aim::ClientNode);
            let mut row = scenario::kill_restart(&mut t, size).await;
            row.scenario = s.name();
            row
        }
        _ => run_on(&mut t, s, size).await,
    };
    if let Some(v) = t.last_victim() {
        row.notes.push(format!("the faults hit node n{v}"));
    }
    if matches!(s, Scenario::KillRestart | Scenario::KillConnected) {
        // An election inside the ack deadline: the SDK resends (same ids) until the new
        // leader stores, so the caller sees every message acked.
        scenario::require_no_failed(&mut row, "a node kill");
        row.require(
            row.figures.first_unknown == 0,
            format!(
                "a node kill reached the caller: {} unknown first outcomes",
                row.figures.first_unknown
            ),
        );
    }
    Ok(row)
}

async fn run(on: On, s: Scenario, size: Size) -> Row {
    let failed = |e: String| Row {
        scenario: s.name(),
        backend: on.name(),
        failures: vec![e],
        ..Row::default()
    };
    match s {
        Scenario::Security => return scenario::security(on).await,
        Scenario::Absent => return scenario::absent(on).await,
        _ => {}
    }
    on_target(on, s, size).await.unwrap_or_else(failed)
}

/// Start target `on` for scenario `s` and run it; `Err` when the target did not start.
async fn on_target(on: On, s: Scenario, size: Size) -> Result<Row, String> {
    use eventbus_brokers::BrokerKind;
    #[cfg(feature = "kafka")]
    use eventbus_reliability::target::kafka_cluster::TansuCluster3;
    #[cfg(feature = "nats")]
    use eventbus_reliability::target::nats_cluster::NatsCluster3;
    use eventbus_reliability::target::single::Single;
    #[cfg(feature = "nats")]
    let nats = || Single::start(BrokerKind::Nats, s.proxied());
    #[cfg(feature = "kafka")]
    let kafka = || Single::start(BrokerKind::Tansu(storage(s)), s.proxied());
    Ok(match on {
        #[cfg(feature = "nats")]
        On::Nats => run_on(&mut nats().await?, s, size).await,
        #[cfg(feature = "kafka")]
        On::Kafka => run_on(&mut kafka().await?, s, size).await,
        #[cfg(feature = "nats")]
        On::NatsCluster => run_on_nats_cluster(s, size).await?,
        #[cfg(feature = "nats")]
        On::NatsClusterRaw => {
            let mut t = NatsCluster3::start_for(s).await?;
            if s.consumes() {
                consume_on_nats_cluster(&mut t, s, size, Reader::Raw).await
            } else {
                scenario::raw_nats(&mut t, s, size).await
            }
        }
        #[cfg(feature = "kafka")]
        On::KafkaClusterRaw => {
            let mut t = TansuCluster3::start().await?;
            if s.consumes() {
                let mut row = consume_on(&mut t, s, size, Reader::Raw).await;
                row.notes.push(t.kill_note());
                row
            } else {
                scenario::raw_kafka(&mut t, size).await
            }
        }
        #[cfg(feature = "nats")]
        On::NatsRaw => consume_on(&mut nats().await?, s, size, Reader::Raw).await,
        #[cfg(feature = "kafka")]
        On::KafkaRaw => consume_on(&mut kafka().await?, s, size, Reader::Raw).await,
        #[cfg(feature = "kafka")]
        On::KafkaCluster => {
            let mut t = TansuCluster3::start().await?;
            let mut row = run_on(&mut t, s, size).await;
            if s == Scenario::KillRestart {
                row.notes.push(t.kill_note());
            }
            row
        }
        #[allow(unreachable_patterns)] // every target is built with both features
        _ => return Err(format!("backend {} not built", on.name())),
    })
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The rows that kept a group subscription open through the fault: what it saw.
fn consumers(s: &mut String, rows: &[Row]) {
    let live: Vec<_> = rows
        .iter()
        .filter_map(|r| r.consumer.map(|c| (r, c)))
        .collect();
    if live.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nConsumers through faults (one group subscription kept open):\n\n| scenario | backend | **missing** | duplicate deliveries | longest pause ms | resumed ms after the broker side could serve | verdict |\n|---|---|---|---|---|---|---|"
    );
    for (r, c) in live {
        let _ = writeln!(
            s,
            "| {} | {} | **{}** | {} | {} | {} | {} |",
            r.scenario,
            r.backend,
            c.missing,
            c.duplicates,
            c.longest_pause_ms,
            opt(c.resume_ms),
            if r.passed() { "pass" } else { "FAIL" },
        );
    }
}

fn markdown(rows: &[Row], quick: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | backend | sent | acked | failed | unknown | first failed / unknown | refused | retried | stored | **lost** | **failed but stored** | dup | reorder (producer) | reorder (key) | corrupt | detect ms | recover ms | max ack ms | peak in flight / window | RSS growth | verdict |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(22));
    for r in rows {
        let f = &r.figures;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | **{}** | **{}** | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            r.scenario,
            r.backend,
            f.sent,
            f.acked,
            f.failed,
            f.unknown,
            f.first_failed,
            f.first_unknown,
            f.refused,
            f.retried,
            f.stored,
            f.lost,
            f.failed_but_stored,
            f.duplicates,
            f.reorders,
            f.key_reorders,
            f.corrupt,
            opt(r.detect_ms),
            opt(r.recover_ms),
            r.max_resolve_ms,
            r.peak_in_flight,
            r.window,
            r.rss_growth_bytes
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            if r.passed() { "pass" } else { "FAIL" },
        );
    }
    consumers(&mut s, rows);
    let _ = writeln!(s, "\nNotes{}:\n", if quick { " (quick run)" } else { "" });
    for r in rows {
        for n in r
            .notes
            .iter()
            .chain(r.failures.iter().map(|f| f as &String))
        {
            let _ = writeln!(s, "- {} / {}: {n}", r.scenario, r.backend);
        }
    }
    s
}

/// The heading of `--doc` for the single-broker backends.
fn single_doc_header(command: &str) -> String {
    format!(
        "# Reliability figures\n\nWritten by `{command} --doc ...` (eventbus-reliability); \
         see the crate docs for what each scenario does and asserts. **lost** (acked, never read \
         back) and **failed but stored** must be 0 everywhere. Kafka runs on tansu 0.6.0 (SQLite; \
         memory for `slow-consumer`, whose deep backlog tansu's SQLite fetch serves in O(backlog) \
         per fetch); its `security` row uses a TLS-terminating proxy in front of tansu (tansu has \
         no TLS listener) and tansu's own SASL SCRAM."
    )
}

/// The heading of `--doc` for the cluster backends: what each row does to the cluster.
fn cluster_doc_header(command: &str) -> String {
    format!(
        "# Reliability figures on clusters

Written by `{command} --doc ...` (eventbus-reliability), same ledger and checker as [the
single-broker report](reliability.md): **lost** (acked, never read back) and **failed but
stored** must be 0 everywhere. **first failed / unknown** is what the caller saw on its first
attempt; unknown outcomes are then published again with the same id. **recover ms** is the time
from the (last) fault to the first ack of a message admitted after it.

- `nats-cluster`: three nats-server 2.15.1 nodes (JetStream, a store each, routes on
  loopback), one R3 file stream per run, the client given all three seeds with a 2 s wire
  `ack_timeout` (after which a silent publish is sent again with its id).
  - `kill-restart`: SIGKILL the node that leads the stream (read from the nodes' `/jsz`) twice
    under load, restart it each time; ack deadline 10 s. A NATS node kill must reach the caller
    as acked: 0 first failed, 0 first unknown, 0 duplicates.
  - `kill-connected`: the same, on the node the client is attached to (found through `/connz`);
    the client fails over to another seed. Same assertions.
  - `consume-kill`: one group subscription kept open while the stream leader is SIGKILLed and
    restarted once under load; `consume-kill-connected` the same on the node the live consumer
    is attached to; `consume-partition` the same while the stream leader is cut off as in
    `partition` (the broker side serves again once the majority elected a leader, if the
    consumer is attached to the majority, else when the partition heals). The consumer must
    miss nothing acked; how soon it delivers again after the broker side can serve is
    reported (after a kill it includes the election).
  - `stepdown`: the leader steps down through the JetStream API twice under load; 5 s deadline;
    nothing may reach the caller.
  - `rolling-restart`: every node in turn gets SIGTERM, is started again on its store, and the
    next waits until every node reports healthy; 10 s deadline; 0 first failed.
  - `partition`: the stream leader is cut off from the other two for 10 s (5 s quick) by fault
    proxies on its routes (one per direction of every node pair; they hold every byte, no RST);
    20 s deadline. The majority elects a new leader once the raft election timeout (4-9 s)
    passes; a client attached to the cut-off node keeps its connection, so it does not fail
    over, and its publishes are stored when the partition heals (the row notes say where the
    client was).
  - `pause`: SIGSTOP the stream leader for 5 s with a 1 s ack deadline (unknown outcomes are
    the point of that row).
- `kafka-cluster`: three tansu 0.6.0 brokers over one SQLite file, the client given all three.
  Every tansu broker answers metadata naming itself the leader of every partition, so
  librdkafka produces to whichever broker it heard from last: `kill-restart` SIGKILLs the broker
  this process holds the most connections to (the one in use) twice and restarts it; `pause`
  SIGSTOPs every broker for 5 s with a 1 s ack deadline. tansu 0.6.0 panics at start-up when
  another broker holds the shared file locked (`broker.rs:137`, \"database is locked\"): the
  harness starts it again (up to 5 times) and leaves that start-up panic out of the crash
  check.
- `nats-cluster raw` and `kafka-cluster raw`: the raw clients with no SDK through the same rows
  and ledger, as their docs show them: async-nats's JetStream context (`publish_with_headers`
  with `Nats-Msg-Id`, each ack future awaited, window 16,384, ack timeout 2 s) and rdkafka's
  `FutureProducer` (idempotent, `acks=all`, `message.timeout.ms` = the SDK row's deadline).
  The consumer rows read with async-nats's durable pull consumer (`Consumer::messages`, each
  message acked) and rdkafka's `StreamConsumer` at its defaults.
  Only safety is asserted on them; what their caller saw is the comparison."
    )
}

/// The rows' process, and each worker process (its stderr inherited), logs to stderr only when
/// `RUST_LOG` asks for it: the way to see why a relay or a consumer stopped or was slow.
fn worker_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

fn main() -> std::process::ExitCode {
    if let Some(code) = worker_process() {
        return code;
    }
    let args = Args::parse();
    worker_logs();
    let backends: Vec<On> = if args.backend.is_empty() {
        On::default_set()
    } else {
        args.backend.clone()
    };
    let scenarios: Vec<Scenario> = if args.scenario.is_empty() {
        Scenario::default_set()
    } else {
        args.scenario.clone()
    };
    // Lives until main returns: dropping it waits for blocking tasks the rows left behind
    // (clients closing), which must not hold back the reports.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let rows = run_rows(&rt, &scenarios, &backends, Size { quick: args.quick });
    let md = markdown(&rows, args.quick);
    println!("\n{md}");
    write_reports(&args, &rows, &md, &backends, &scenarios);
    if rows.iter().all(Row::passed) {
        std::process::ExitCode::SUCCESS
    } else {
        // Repeated last so that a log's tail (all CI keeps) names the row and why.
        eprintln!("reliability: some scenarios FAILED:");
        for row in rows.iter().filter(|r| !r.passed()) {
            eprintln!(
                "  {} on {}: {}",
                row.scenario,
                row.backend,
                row.failures.join("; ")
            );
        }
        std::process::ExitCode::FAILURE
    }
}

/// A worker process's work (it borrows the process's arguments).
type Work<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

/// When this process was started as one of the rows' worker processes (an outbox relay, an
/// inbox consumer), run it: its exit code.
fn worker_process() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let (what, work): (&str, Work<'_>) = match args.as_slice() {
        [_, cmd, database] if cmd == scenario::RELAY_COMMAND => {
            ("outbox relay", Box::pin(scenario::relay_process(database)))
        }
        [_, cmd, database, filter, group] if cmd == scenario::INBOX_COMMAND => (
            "inbox consumer",
            Box::pin(scenario::consumer_process(database, filter, group)),
        ),
        _ => return None,
    };
    worker_logs();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    Some(match rt.block_on(work) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// Every scenario on every backend that runs it, in order, each timed and its verdict printed.
fn run_rows(
    rt: &tokio::runtime::Runtime,
    scenarios: &[Scenario],
    backends: &[On],
    size: Size,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &s in scenarios {
        for &b in backends {
            if !b.runs(s) {
                continue;
            }
            eprint!("==> {} on {} ... ", s.name(), b.name());
            let t0 = Instant::now();
            let mut row = rt.block_on(run(b, s, size));
            row.secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "{} in {:.1} s{}",
                if row.passed() { "pass" } else { "FAIL" },
                row.secs,
                if row.passed() {
                    String::new()
                } else {
                    format!(": {}", row.failures.join("; "))
                }
            );
            rows.push(row);
        }
    }
    rows
}

/// `reliability.json` and `reliability.md` in `--out`, and the page `--doc` names (the table
/// under a header that says how it was run).
fn write_reports(args: &Args, rows: &[Row], md: &str, backends: &[On], scenarios: &[Scenario]) {
    let _ = std::fs::create_dir_all(&args.out);
    let _ = std::fs::write(
        args.out.join("reliability.json"),
        serde_json::to_string_pretty(&rows).unwrap_or_default(),
    );
    let _ = std::fs::write(args.out.join("reliability.md"), md);
    let Some(doc) = &args.doc else { return };
    let clusters = backends.iter().any(|b| b.is_cluster());
    let names = |v: Vec<String>| v.join(",");
    let command = format!(
        "cargo xtask reliability{} --backend {}{}",
        if args.quick { " --quick" } else { "" },
        names(backends.iter().map(|b| b.name()).collect()),
        if args.scenario.is_empty() {
            String::new()
        } else {
            format!(
                " --scenario {}",
                names(scenarios.iter().map(|s| s.name()).collect())
            )
        }
    );
    let text = format!(
        "{}\n\n{md}",
        if clusters {
            cluster_doc_header(&command)
        } else {
            single_doc_header(&command)
        }
    );
    if let Err(e) = std::fs::write(doc, text) {
        eprintln!("could not write {}: {e}", doc.display());
    }
}
