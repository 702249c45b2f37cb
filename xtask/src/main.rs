//! `cargo xtask`: the project's own commands.
//!
//! - `cargo xtask test` installs (pinned, cached) and checks the brokers, then runs every test
//!   of the workspace with `EVENTBUS_REQUIRE_BACKENDS=1`: a test that needs a broker and cannot
//!   start one fails.
//! - `cargo xtask bench [ARGS]` installs and starts the brokers, then runs the benchmark
//!   (`eventbus-bench`, release build) with ARGS; `--help` lists them.
//! - `cargo xtask reliability [ARGS]` runs the fault scenarios (kill -9 / restart, SIGSTOP,
//!   TCP fault proxy, shutdown, cancellation, absent broker) and prints the figures table;
//!   `--quick` is the CI subset, `--doc docs/reliability.md` rewrites the committed report.
//! - `cargo xtask examples` runs every example of the `eventbus` crate against a fresh
//!   nats-server and a fresh tansu and checks its output (also the last step of `test`).
//! - `cargo xtask brokers up [--cluster]|down|status` starts / stops / shows local brokers for
//!   your own use: one nats-server and one tansu, or (`--cluster`) a 3-node NATS cluster and
//!   three tansu brokers over one SQLite file; and a PostgreSQL server either way
//!   (`DATABASE_URL=...`).
//! - `cargo xtask ci` is what `.ci/run` runs: fmt, clippy, doc, test, bench --quick,
//!   reliability --quick.
#![allow(missing_docs)]
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};

use eventbus_brokers as brokers;

mod examples;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("reliability") => reliability(&args[1..]),
        Some("brokers") => brokers_cmd(&args[1..]),
        Some("ci") => ci(),
        Some("install") => install(),
        Some("examples") => install().and_then(|()| examples::examples()),
        _ => {
            eprintln!(
                "usage: cargo xtask <test [cargo test args] | examples | bench [bench args] | reliability [args] | brokers up|down|status | install | ci>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Set by `ci`: a CI run starts cold and builds each crate once, so incremental state (it
/// was half of a warm `target/`) is only disk spent.
static ONE_SHOT: AtomicBool = AtomicBool::new(false);

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    if ONE_SHOT.load(Ordering::Relaxed) {
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

/// Bytes under `dir`, files only (hard links counted once per link; cargo makes few).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The workspace's `target/`, or `CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// One line after each CI phase: what `target/` holds, so a run that outgrows the disk shows
/// which phase grew it.
fn report_target(phase: &str) {
    let target = target_dir();
    let gib = tree_bytes(&target) as f64 / (1u64 << 30) as f64;
    eprintln!("==> after {phase}: {} holds {gib:.1} GiB", target.display());
}

fn run(mut c: Command) -> Result {
    eprintln!("==> {c:?}");
    let s = c
        .status()
        .map_err(|e| format!("could not run {c:?}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("{c:?} failed: {s}"))
    }
}

/// Install every pinned broker the tests and benchmarks use (cached; no-op when present).
fn install() -> Result {
    let nats = brokers::install_nats().map_err(|e| e.to_string())?;
    eprintln!(
        "==> nats-server {}: {}",
        brokers::NATS_VERSION,
        nats.display()
    );
    let tansu = brokers::install_tansu().map_err(|e| e.to_string())?;
    eprintln!("==> tansu {}: {}", brokers::TANSU_VERSION, tansu.display());
    Ok(())
}

fn broker_env(c: &mut Command) {
    c.env("EVENTBUS_NATS_SERVER", brokers::nats_server_path());
    c.env("EVENTBUS_TANSU", brokers::tansu_path());
    c.env("EVENTBUS_REQUIRE_BACKENDS", "1");
}

fn test(extra: &[String]) -> Result {
    install()?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--all-targets"]).args(extra);
    broker_env(&mut c);
    run(c)?;
    // The facade's Kafka variant is behind a non-default feature: test it with every backend.
    let mut f = cargo();
    f.args(["test", "-p", "eventbus", "--all-features"])
        .args(extra);
    broker_env(&mut f);
    run(f)?;
    // And with one backend: what a left-out backend's name and variables get.
    let mut m = cargo();
    m.args([
        "test",
        "-p",
        "eventbus",
        "--no-default-features",
        "--features",
        "memory",
        "--lib",
    ]);
    run(m)?;
    let mut d = cargo();
    d.args(["test", "--workspace", "--doc"]);
    broker_env(&mut d);
    run(d)?;
    // The examples are part of the tests: each runs against both real brokers.
    examples::examples()
}

fn bench(extra: &[String]) -> Result {
    let external = extra.iter().any(|a| a == "--nats-url");
    if !external {
        install()?;
    }
    let mut c = cargo();
    c.args(["run", "--release", "-p", "eventbus-bench", "--"])
        .args(extra);
    broker_env(&mut c);
    run(c)?;
    // The whole bench also measures the outbox (PostgreSQL and SQLite relaying to NATS) and
    // what exactly-once costs (the inbox; Kafka transactions on librdkafka's mock cluster).
    // Latency at fixed offered rates is part of the main run.
    let whole = extra.iter().all(|a| a == "--quick" || a == "--full");
    if whole {
        for study in ["--outbox-study", "--exactly-once-study"] {
            let mut c = cargo();
            c.args(["run", "--release", "-p", "eventbus-bench", "--", study]);
            if extra.iter().any(|a| a == "--quick") {
                c.arg("--quick");
            }
            broker_env(&mut c);
            run(c)?;
        }
    }
    Ok(())
}

/// Run the fault scenarios (`eventbus-reliability`, release build); each starts its own brokers.
/// The Kafka security row also runs `facade-probe`, built here.
fn reliability(extra: &[String]) -> Result {
    install()?;
    let probe = build_facade_probe()?;
    let mut c = cargo();
    c.args(["run", "--release", "-p", "eventbus-reliability", "--"])
        .args(extra)
        .env("EVENTBUS_FACADE_PROBE", probe);
    broker_env(&mut c);
    run(c)
}

/// Build `facade-probe/`: a program that depends on the `eventbus` facade alone (feature `kafka`),
/// outside the workspace, so that no other member's features are unified into its build. It
/// starts from the workspace's lock file (the same versions) and shares `target/`, so only
/// what its features change is compiled again.
fn build_facade_probe() -> Result<PathBuf> {
    let dir = root().join("facade-probe");
    std::fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock"))
        .map_err(|e| format!("copy Cargo.lock to facade-probe: {e}"))?;
    let target = target_dir();
    let mut c = cargo();
    c.arg("build")
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    run(c)?;
    Ok(target.join("debug").join("facade-probe"))
}

fn state_file() -> PathBuf {
    brokers::cache_dir().join("brokers.state")
}

fn alive(pid: &str) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

fn brokers_cmd(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        Some("up") => {
            if state_file().exists() {
                brokers_cmd(&["down".into()])?;
            }
            install()?;
            let cluster = args[1..].iter().any(|a| a == "--cluster");
            let mut state = if cluster { up_cluster()? } else { up_single()? };
            // Optional: the brokers are useful without it.
            match up_postgres() {
                Ok(line) => state.push_str(&line),
                Err(e) => eprintln!("# postgres not started: {e}"),
            }
            std::fs::create_dir_all(brokers::cache_dir()).map_err(|e| e.to_string())?;
            std::fs::write(state_file(), &state).map_err(|e| e.to_string())?;
            brokers_cmd(&["status".into()])
        }
        Some("status") => {
            let state = std::fs::read_to_string(state_file()).unwrap_or_default();
            for line in state.lines() {
                let parts: Vec<&str> = line.split(' ').collect();
                if let [name, pid, var, log] = parts[..] {
                    if alive(pid) {
                        // Cluster nodes after the first carry no variable of their own.
                        if var != "-" {
                            println!("{var}");
                        }
                        eprintln!("# {name}: pid {pid}, log {log}");
                    } else {
                        eprintln!("# {name}: pid {pid} is not running (log {log})");
                    }
                }
            }
            Ok(())
        }
        Some("down") => {
            let state = std::fs::read_to_string(state_file()).unwrap_or_default();
            for line in state.lines() {
                let parts: Vec<&str> = line.split(' ').collect();
                if let [name, pid, ..] = parts[..]
                    && alive(pid)
                {
                    // PostgreSQL's SIGTERM waits for its clients to leave; SIGINT does not.
                    let sig = if name == "postgres" { "-INT" } else { "-TERM" };
                    let _ = Command::new("kill").args([sig, pid]).status();
                    eprintln!("# stopped {name} (pid {pid})");
                }
            }
            let _ = std::fs::remove_file(state_file());
            Ok(())
        }
        _ => Err("usage: cargo xtask brokers up [--cluster]|down|status".into()),
    }
}

/// A PostgreSQL server (for the outbox and the inbox); its state file line.
fn up_postgres() -> Result<String> {
    let pg = brokers::Postgres::start().map_err(|e| format!("postgres: {e}"))?;
    let (url, log) = (pg.url(), pg.log_path().to_path_buf());
    let pid = pg.detach().ok_or("postgres has no pid")?;
    Ok(format!(
        "postgres {pid} DATABASE_URL={url} {}\n",
        log.display()
    ))
}

/// One nats-server and one tansu (SQLite: its watermarks are exact, so a bench pointed at it
/// can verify by them); the state file's lines.
fn up_single() -> Result<String> {
    let nats = brokers::NatsServer::start().map_err(|e| e.to_string())?;
    let url = nats.url();
    let log = nats.log_path().to_path_buf();
    let pid = nats.detach().ok_or("nats-server has no pid")?;
    let mut state = format!("nats {pid} NATS_URL={url} {}\n", log.display());
    let t = brokers::Tansu::start(brokers::TansuStorage::Sqlite).map_err(|e| e.to_string())?;
    let (b, log) = (t.bootstrap(), t.log_path().to_path_buf());
    let pid = t.detach().ok_or("tansu has no pid")?;
    state.push_str(&format!(
        "tansu {pid} KAFKA_BROKERS={b} {}\n",
        log.display()
    ));
    Ok(state)
}

/// A 3-node NATS cluster (JetStream, routes on loopback) and three tansu brokers over one
/// SQLite file; the state file's lines (the seed lists on each cluster's first line).
fn up_cluster() -> Result<String> {
    let nats = brokers::NatsCluster::start(3).map_err(|e| e.to_string())?;
    let urls = nats.urls();
    let logs: Vec<PathBuf> = nats
        .nodes()
        .iter()
        .map(|n| n.log_path().to_path_buf())
        .collect();
    let mut state = String::new();
    for (i, (pid, log)) in nats.detach().into_iter().zip(logs).enumerate() {
        let pid = pid.ok_or("nats-server has no pid")?;
        let var = if i == 0 {
            format!("NATS_URL={urls}")
        } else {
            "-".into()
        };
        state.push_str(&format!("nats-n{i} {pid} {var} {}\n", log.display()));
    }
    let tansu = brokers::TansuCluster::start(3).map_err(|e| e.to_string())?;
    let bootstrap = tansu.bootstrap();
    let logs: Vec<PathBuf> = tansu
        .brokers()
        .iter()
        .map(|t| t.log_path().to_path_buf())
        .collect();
    for (i, (pid, log)) in tansu.detach().into_iter().zip(logs).enumerate() {
        let pid = pid.ok_or("tansu has no pid")?;
        let var = if i == 0 {
            format!("KAFKA_BROKERS={bootstrap}")
        } else {
            "-".into()
        };
        state.push_str(&format!("tansu-{i} {pid} {var} {}\n", log.display()));
    }
    Ok(state)
}

fn ci() -> Result {
    ONE_SHOT.store(true, Ordering::Relaxed);
    static_checks()?;
    report_target("clippy, doc and checks");
    test(&[])?;
    report_target("test");
    bench(&["--quick".into()])?;
    report_target("bench");
    reliability(&["--quick".into()])?;
    report_target("reliability");
    // The NATS cluster under load: the stream leader killed and restarted, paused, asked to
    // step down and cut off from the other nodes; the client's own node killed; every node
    // restarted in turn; a live consumer through a leader kill, its own node's kill and a
    // partition. The Kafka cluster: every broker paused. (Killing a tansu broker of the cluster
    // is in the full run only: tansu 0.6.0 then panicked in its idempotence check in 1 of 3
    // full-size runs, `storage/src/lite.rs:503`, a broker bug that would fail CI by chance.)
    cluster_reliability(
        "nats-cluster",
        "kill-restart,consume-kill,consume-kill-connected,consume-partition,pause,stepdown,kill-connected,rolling-restart,partition",
    )?;
    cluster_reliability("kafka-cluster", "pause")?;
    // The raw consumers beside the SDK's, through the same consumer rows.
    cluster_reliability("nats-raw,kafka-raw", "consume-kill,consume-blackhole")?;
    report_target("cluster reliability");
    Ok(())
}

/// fmt, clippy, doc, and each library and backend building on its own.
fn static_checks() -> Result {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut fmt = cargo();
    fmt.args([
        "fmt",
        "--manifest-path",
        "facade-probe/Cargo.toml",
        "--",
        "--check",
    ]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run(doc)?;
    // Users depend on single crates: each library must build on its own, without features
    // another workspace member happens to switch on.
    for krate in LIBRARIES {
        let mut check = cargo();
        check.args(["check", "--quiet", "-p", krate]);
        run(check)?;
    }
    // A service that uses one backend never compiles the other: the facade and the bench build
    // with either alone, and with NATS alone librdkafka is not even in the dependency tree.
    for backend in ["nats", "kafka", "memory"] {
        check_alone("eventbus", backend)?;
    }
    let tree = cargo()
        .args([
            "tree",
            "-p",
            "eventbus",
            "--no-default-features",
            "--features",
            "nats",
            "-e",
            "normal,build",
        ])
        .output()
        .map_err(|e| format!("cargo tree: {e}"))?;
    let tree = String::from_utf8_lossy(&tree.stdout);
    if tree.contains("rdkafka") {
        return Err("eventbus with only the nats feature depends on rdkafka".into());
    }
    for backend in ["nats", "kafka"] {
        check_alone("eventbus-bench", backend)?;
    }
    Ok(())
}

/// `reliability --quick` of `scenarios` on the (cluster) backends `backend`.
fn cluster_reliability(backend: &str, scenarios: &str) -> Result {
    reliability(&[
        "--quick".into(),
        "--backend".into(),
        backend.into(),
        "--scenario".into(),
        scenarios.into(),
        "--out".into(),
        format!("target/reliability-{}", backend.replace(',', "-")),
    ])
}

/// `cargo check` crate `krate` with only feature `backend`.
fn check_alone(krate: &str, backend: &str) -> Result {
    let mut check = cargo();
    check.args([
        "check",
        "--quiet",
        "-p",
        krate,
        "--no-default-features",
        "--features",
        backend,
    ]);
    run(check)
}

/// The published library crates.
const LIBRARIES: [&str; 7] = [
    "eventbus",
    "eventbus-outbox",
    "eventbus-core",
    "eventbus-batch",
    "eventbus-memory",
    "eventbus-nats",
    "eventbus-kafka",
];
