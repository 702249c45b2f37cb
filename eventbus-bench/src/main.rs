//! `eventbus-bench`: the seed's scenarios (500 / 2,000 / 5,000 / 10,000 messages of 108 bytes,
//! 5 topics, 5 publishers) plus Sustained, for each backend and mode:
//!
//! - `naive`: each publisher awaits every ack before the next publish (what the seed's NATS
//!   backend effectively did);
//! - `sdk`: through the batching engine with its default config;
//! - `raw`: the bare client at its best, no SDK (async-nats JetStream context, pipelined, best
//!   of several ack windows);
//! - NATS ceilings: JetStream ingest acked only every 1,000 messages, core NATS with no stream;
//! - drains: a backlog read in a consumer group through the SDK and through the bare client.
//!
//! Each publish path is measured publish-only (no consumer while publishing) and end-to-end (a
//! consumer reads every message meanwhile). Clocks stop on exact events (the last ack, the last
//! distinct delivery), and every run is verified against the broker (stream state, distinct ids
//! read).
#![allow(missing_docs)]
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line report

mod chart;
#[cfg(feature = "nats")]
mod dedup;
mod drive;
#[cfg(all(feature = "nats", feature = "kafka"))]
mod exactly_once;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(all(feature = "nats", feature = "kafka"))]
mod latency;
mod mode;
#[cfg(feature = "nats")]
mod nats;
#[cfg(all(feature = "nats", feature = "kafka"))]
mod outbox;
mod plan;
mod profile;
mod report;
mod sys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;

use crate::drive::{Env, Run};
use crate::mode::{Backend, Measure, Mode, Storage};
use crate::plan::Selection;
use crate::report::Record;

#[derive(Parser, Debug, Clone)]
#[command(about = "Reproduce the seed's NATS-vs-Kafka table against real brokers, honestly timed")]
pub(crate) struct Args {
    /// CI-sized: fewer messages, one repetition, durable storage only.
    #[arg(long)]
    pub quick: bool,
    /// The complete run: Sustained and the drained backlog at 1,000,000 messages, and the
    /// NATS publish modes async and atomic on the seed's scenarios. Without it the run is sized
    /// to finish in minutes (Sustained at 100,000, the backlog at 200,000).
    #[arg(long, conflicts_with = "quick")]
    pub full: bool,
    /// Scenarios (comma separated): low, medium, high, extreme, sustained, sustained-1k,
    /// backlog (the drain modes' backlog).
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// What the clock covers (comma separated): publish (no consumer while publishing), e2e
    /// (a consumer reads every message meanwhile). Default both; drains are always `drain`.
    #[arg(long, value_delimiter = ',')]
    pub measure: Vec<Measure>,
    /// Backends (comma separated): nats, kafka, memory.
    // Names, not `Backend`s: `Selection::from_args` rejects an unknown one with its own
    // message and exit status 2, as it does an unknown scenario.
    #[arg(long, value_delimiter = ',')]
    pub backend: Vec<String>,
    /// Modes (comma separated): naive, sdk (defaults: NATS fast-ingest batches with
    /// Nats-Msg-Id), sdk-nodedup (NATS without Nats-Msg-Id, Kafka without the eventbus-id
    /// header), NATS publish modes sdk-async (one ack per message), sdk-fast, sdk-atomic (one
    /// ack per all-or-nothing batch), each also as `sdk-<mode>-nodedup`, raw, and raw-dedup
    /// (raw with ids like the SDK's default: NATS Nats-Msg-Id, Kafka the eventbus-id header),
    /// raw-future (Kafka: rdkafka's FutureProducer, one future per message, instead of raw's
    /// ThreadedProducer with a delivery callback; not in the default run), ceiling-js (NATS:
    /// JetStream ingest acked only every 1,000 messages per publisher), ceiling-core (NATS:
    /// core publishes, no stream; not with --nats-url),
    /// drain-sdk and drain-raw (read the backlog scenario in a consumer group), drain-raw-defaults
    /// (Kafka: rdkafka's consumer at librdkafka's own read-ahead, 64 MiB queued).
    #[arg(long, value_delimiter = ',')]
    pub mode: Vec<Mode>,
    /// Storage class: durable (JetStream file storage, tansu SQLite), memory (JetStream memory
    /// storage, tansu memory engine), replicated (a 3-node NATS cluster with R3 file streams,
    /// 3 tansu brokers over one SQLite file), both (durable and memory) or all.
    // Read by `Storage::classes`: both and all name sets of classes.
    #[arg(long, default_value = "durable")]
    pub storage: String,
    /// Repetitions per (scenario, backend, mode); the median is reported with min and max.
    #[arg(long)]
    pub reps: Option<usize>,
    /// SDK ACK window (messages in flight). Default: the engine's default.
    #[arg(long)]
    pub window: Option<usize>,
    /// Sweep the SDK's ACK window (1 .. 100,000) x linger (0 .. 20 ms) on one scenario (default
    /// extreme) and storage class (default durable), mode sdk: writes sweep.{json,md,svg}, the SVG
    /// being ACK latency p99 against throughput.
    #[arg(long)]
    pub sweep: bool,
    /// Measure what JetStream's duplicate window costs nats-server (RSS, throughput) at 30 s,
    /// 2 min and 10 min windows over a sustained publish with ids on: writes dedup-window.md.
    #[arg(long)]
    pub dedup_study: bool,
    /// Measure the transactional outbox on PostgreSQL and SQLite, relaying to NATS and Kafka
    /// (tansu): what the enqueue (and, for scale, any second row) costs a writer, the relay's
    /// throughput and lag, commit-to-ack latency at 1,000 transactions/s with LISTEN/NOTIFY and
    /// with polling: writes outbox.md.
    #[arg(long)]
    pub outbox_study: bool,
    /// Measure what exactly-once costs beside at-least-once: the inbox on PostgreSQL and
    /// SQLite behind a NATS consumer, Kafka transactions on librdkafka's mock cluster: writes
    /// exactly-once.md.
    #[arg(long)]
    pub exactly_once_study: bool,
    /// Measure publish -> ack and publish -> handler latency (p50 / p99 / p99.9) at 1,000,
    /// 10,000 and 50,000 msg/s offered, the SDK's default beside the raw clients with ids, on
    /// NATS and Kafka: writes latency.md and latency.svg.
    #[arg(long)]
    pub latency_study: bool,
    /// Offered rates (msg/s, comma separated) of the latency rows (the main run's and
    /// `--latency-study`'s). Default 1000,10000,50000.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// Seconds of publishing per window in `--dedup-study`.
    #[arg(long, default_value_t = 150)]
    pub study_secs: u64,
    /// SDK batches in flight (`max_in_flight_batches`). Default: the engine's default.
    #[arg(long)]
    pub batches: Option<usize>,
    /// Give the SDK modes' messages keys, this many per publisher (round robin): NATS fast
    /// mode then spreads them over its lanes (per-key order) instead of one run per batch.
    /// The raw baselines publish the same keys (NATS: in the SDK's key header; Kafka: as the
    /// record key). Default: no keys.
    #[arg(long, default_value_t = 0)]
    pub keys: usize,
    /// SDK linger in milliseconds. Default: the engine's default (0).
    #[arg(long)]
    pub linger: Option<u64>,
    /// Record a flame graph of the bench process (`perf record`, folded with inferno) over
    /// every timed run, into `<out>/profile/NN-<run>.svg` (and its `.perf.data` for `perf
    /// report`). Narrow it to one row with `--backend`, `--scenario`, `--measure`, `--mode`
    /// and `--reps 1`. Profiled runs carry perf's own cost: not for the tables.
    #[arg(long)]
    pub profile: bool,
    /// Output directory for JSON, CSV and the Markdown table.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Use this NATS server instead of starting a local one.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Do not run anything: re-render the tables, chart (and README with --readme) from a
    /// JSON file written by an earlier run.
    #[arg(long)]
    pub from_json: Option<PathBuf>,
    /// Rewrite the results block of this README (and the charts beside it:
    /// docs/bench/throughput.svg, docs/bench/latency-run.svg).
    #[arg(long)]
    pub readme: Option<PathBuf>,
    /// Use this Kafka cluster (bootstrap servers) instead of starting local tansu brokers.
    /// Every run is then verified by reading it back, unless `--trust-watermarks`.
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// With `--kafka-brokers`: verify runs by the brokers' high watermarks instead of reading
    /// every message back. Only for brokers whose watermarks are exact (tansu 0.6.0's memory
    /// engine's are not).
    #[arg(long, requires = "kafka_brokers")]
    pub trust_watermarks: bool,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Scenario {
    pub name: &'static str,
    pub messages: usize,
    pub payload: usize,
    pub topics: usize,
    pub publishers: usize,
    /// Keys per publisher on the SDK's messages (`--keys`); 0: no key.
    pub keys: usize,
}

const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "low",
        messages: 500,
        payload: 108,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
    Scenario {
        name: "medium",
        messages: 2_000,
        payload: 108,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
    Scenario {
        name: "high",
        messages: 5_000,
        payload: 108,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
    Scenario {
        name: "extreme",
        messages: 10_000,
        payload: 108,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
    Scenario {
        name: "sustained",
        messages: 1_000_000,
        payload: 108,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
    Scenario {
        name: "sustained-1k",
        messages: 200_000,
        payload: 1024,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
    Scenario {
        name: "backlog",
        messages: 1_000_000,
        payload: 108,
        topics: 5,
        publishers: 5,
        keys: 0,
    },
];

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;

    /// The scenario named `s`, at its full size.
    fn from_str(s: &str) -> Result<Scenario, String> {
        mode::one_of(s, &SCENARIOS)
    }
}

/// A raw baseline first probes its candidate windows (NATS) or lingers (Kafka) once each, at
/// the scenario's size up to this many messages, and then runs every repetition at the best
/// one, exactly as often as the SDK modes run. (Counting the best of the candidates as the
/// first repetition gave raw a best-of-three sample in its median.) At 1M messages a
/// full-size candidate would cost ~15-20 s, bounded by the consumer reading back.
const RAW_PROBE_MESSAGES: usize = 100_000;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "\nSOME RUNS FAILED VERIFICATION: see `verified` and `verify_note` above and in the JSON, \
                 and the latency rows (\"incomplete\", or an error above)."
            );
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole bench (or `--dedup-study`, `--from-json`, `--sweep`): whether every run verified.
async fn run(args: Args) -> Result<bool, String> {
    #[cfg(feature = "nats")]
    if args.dedup_study {
        return dedup::study(&args).await;
    }
    #[cfg(all(feature = "nats", feature = "kafka"))]
    if args.outbox_study {
        return outbox::study(&args).await;
    }
    #[cfg(all(feature = "nats", feature = "kafka"))]
    if args.exactly_once_study {
        return exactly_once::study(&args).await;
    }
    #[cfg(all(feature = "nats", feature = "kafka"))]
    if args.latency_study {
        return latency::study(&args).await;
    }
    if let Some(path) = &args.from_json {
        return rerender(&args, path);
    }
    let sel = Selection::from_args(&args)?;
    if args.profile {
        profile::enable(&args.out.join("profile"))?;
    }
    if args.sweep {
        return sweep(&args, &sel.backends, &sel.storages).await;
    }
    let plan = plan::plan(&args, &sel);
    let env = Env::start(
        &args,
        &sel.backends,
        &plan::env_storages(&sel.storages, &plan),
    )
    .await?;
    eprintln!("{}", env.describe());
    let started = Instant::now();
    let records = Bench::new(&args, &env, plan.len()).run_all(plan).await;
    eprintln!("{}", time_spent(&records, started.elapsed()));
    let machine = env.describe();
    env.stop().await;
    // Saved before the latency rows run, so a hang there loses none of the above; written
    // again with them.
    report::write(&args, &machine, &records, None, false)?;
    // A latency row that cannot run fails the bench, after the other rows are reported.
    let (latency, latency_ok) = match latency_rows(&args).await {
        Ok(l) => {
            let ok = l.as_ref().is_none_or(|l| l.ok);
            (l, ok)
        }
        Err(e) => {
            eprintln!("bench: latency rows: {e}");
            (None, false)
        }
    };
    report::write(&args, &machine, &records, latency.as_ref(), true)?;
    Ok(records.iter().all(|r| r.verified) && latency_ok)
}

/// The latency rows of a whole run (`--latency-study` measures them on their own, longer):
/// `None` when the run is narrowed to some scenarios, modes or measures or to backends other
/// than NATS and Kafka, benches brokers of yours, profiles, or this build lacks a backend they
/// compare.
async fn latency_rows(args: &Args) -> Result<Option<report::LatencySection>, String> {
    let whole = args.scenario.is_empty()
        && args.mode.is_empty()
        && args.measure.is_empty()
        && (args.backend.is_empty() || args.backend.iter().any(|b| b == "nats" || b == "kafka"))
        && args.nats_url.is_none()
        && args.kafka_brokers.is_none()
        && !args.profile;
    #[cfg(all(feature = "nats", feature = "kafka"))]
    if whole {
        let started = Instant::now();
        let section = latency::measure(args, latency::Size::run(args)).await?;
        eprintln!("latency rows: {:.0} s", started.elapsed().as_secs_f64());
        return Ok(Some(section));
    }
    let _ = whole;
    Ok(None)
}

/// `--from-json`: the report of an earlier run, written again; whether all its runs verified.
fn rerender(args: &Args, path: &Path) -> Result<bool, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let doc =
        report::Saved::parse(&text, path).map_err(|e| format!("parse {}: {e}", path.display()))?;
    report::write(args, &doc.machine, &doc.records, doc.latency.as_ref(), true)?;
    Ok(doc.records.iter().all(|r| r.verified) && doc.latency.as_ref().is_none_or(|l| l.ok))
}

/// A progress bar of `len` steps drawn with `template`.
fn progress(len: usize, template: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(len as u64)
        .with_style(indicatif::ProgressStyle::with_template(template).expect("template"))
}

/// The planned runs in order, each raw baseline at its probed setting.
struct Bench<'a> {
    args: &'a Args,
    env: &'a Env,
    /// The raw baselines' settings, chosen as the runs go.
    probes: RawProbes,
    bar: indicatif::ProgressBar,
    /// Every run's and probe's records, in the order they ran.
    records: Vec<Record>,
}

impl<'a> Bench<'a> {
    /// A bench of `len` planned runs on `env`.
    fn new(args: &'a Args, env: &'a Env, len: usize) -> Bench<'a> {
        Bench {
            args,
            env,
            probes: RawProbes::default(),
            bar: progress(len, "{elapsed_precise} {bar:40} {pos}/{len} {msg}"),
            records: Vec::new(),
        }
    }

    /// Run `plan` in order: the records of every run and probe.
    async fn run_all(mut self, plan: Vec<Run>) -> Vec<Record> {
        for run in plan {
            self.run_planned(run).await;
        }
        self.bar.finish_and_clear();
        self.records
    }

    /// One planned run: the probe of its raw setting when none is chosen yet, then the run.
    async fn run_planned(&mut self, run: Run) {
        let label = format!(
            "{} {} {} {} {} #{}",
            run.s.name,
            run.backend,
            run.mode,
            run.measure,
            run.storage,
            run.rep + 1
        );
        self.bar.set_message(label.clone());
        if let Some(probe) = self.probes.probe(run) {
            let at = probe.s.messages;
            self.bar
                .set_message(format!("{label}: probing settings at {at} messages"));
            self.phase(probe, true, &label).await;
        }
        let setting = self.probes.setting(&run);
        self.phase(Run { setting, ..run }, false, &label).await;
        self.bar.inc(1);
    }

    /// Run `run` (a `probe` of the raw settings, or the run itself), keeping its records and
    /// offering each to the raw baselines' probes.
    async fn phase(&mut self, run: Run, probe: bool, label: &str) {
        let what = if probe { "probe" } else { "run" };
        for mut rec in self.env.run_or_fail(self.args, run, what).await {
            rec.probe = probe;
            self.probes.offer(&run, &rec);
            if !rec.verified {
                self.bar.println(format!(
                    "VERIFICATION FAILED: {label} {what} (window {}): {}",
                    rec.window, rec.verify_note
                ));
            }
            self.records.push(rec);
        }
    }
}

/// A raw baseline's path: its scenario, backend, storage class and mode (one probe per path
/// serves both measures).
type RawPath = (&'static str, Backend, Storage, Mode);

/// The raw baselines' settings: a raw mode's first run on a path probes every candidate setting
/// once, at up to [`RAW_PROBE_MESSAGES`]; it and every later run of the path use the fastest
/// verified one.
#[derive(Default)]
struct RawProbes {
    /// Per path, the fastest verified setting and its publish rate.
    best: HashMap<RawPath, (usize, f64)>,
}

impl RawProbes {
    /// `run`'s path.
    fn path(run: &Run) -> RawPath {
        (run.s.name, run.backend, run.storage, run.mode)
    }

    /// The setting `run` uses: its path's fastest verified one (raw modes only).
    fn setting(&self, run: &Run) -> Option<usize> {
        let best = self.best.get(&Self::path(run));
        best.filter(|_| run.mode.probes()).map(|b| b.0)
    }

    /// The probe to run before `run` when its path has no setting yet: every candidate, at up
    /// to [`RAW_PROBE_MESSAGES`].
    fn probe(&self, run: Run) -> Option<Run> {
        if !run.mode.probes() || self.setting(&run).is_some() {
            return None;
        }
        let mut probe = Run {
            setting: None,
            ..run
        };
        probe.s.messages = run.s.messages.min(RAW_PROBE_MESSAGES);
        Some(probe)
    }

    /// Keep `rec`'s setting (its window) if it is its path's fastest verified one yet.
    /// Candidates compete only while no setting is chosen (probes, or a run after every probe
    /// failed, which tries every candidate again).
    fn offer(&mut self, run: &Run, rec: &Record) {
        let best = self.best.get(&Self::path(run)).map_or(0.0, |b| b.1);
        let rate = rec.publish_msgs_per_sec;
        if run.mode.probes() && run.setting.is_none() && rec.verified && rate > best {
            self.best.insert(Self::path(run), (rec.window, rate));
        }
    }
}

/// ACK windows and engine lingers (ms) the sweep tries.
const SWEEP_WINDOWS: [usize; 6] = [1, 16, 256, 4_096, 16_384, 100_000];
const SWEEP_LINGERS_MS: [u64; 4] = [0, 1, 5, 20];

/// `--sweep`: the SDK's default mode end-to-end at every window and linger, on one scenario
/// (default extreme, at full size) and one storage class unless asked for explicitly; whether
/// every run verified.
async fn sweep(args: &Args, backends: &[Backend], storages: &[Storage]) -> Result<bool, String> {
    let name = args.scenario.first().map_or("extreme", String::as_str);
    let scenario: Scenario = name
        .parse()
        .map_err(|_| format!("unknown scenario {name}"))?;
    // One storage class unless asked for explicitly: the sweep is about the SDK's knobs.
    let storages: Vec<Storage> = if storages.len() > 1 {
        vec![Storage::Durable]
    } else {
        storages.to_vec()
    };
    let backends: Vec<Backend> = backends
        .iter()
        .copied()
        .filter(|b| *b != Backend::Memory)
        .collect();
    let env = Env::start(args, &backends, &storages).await?;
    eprintln!("{}", env.describe());
    let points = sweep_points(&backends, &storages);
    let bar = progress(points.len(), "{bar:40} {pos}/{len} {msg}");
    let mut records = Vec::new();
    for point in points {
        records.extend(sweep_point(&env, args, scenario, point, &bar).await);
        bar.inc(1);
    }
    bar.finish_and_clear();
    report::write_sweep(args, &env.describe(), &records)?;
    env.stop().await;
    Ok(records.iter().all(|r| r.verified))
}

/// One point of the sweep.
#[derive(Clone, Copy)]
struct SweepPoint {
    backend: Backend,
    storage: Storage,
    /// The SDK's ACK window.
    window: usize,
    /// The SDK's linger.
    linger_ms: u64,
}

/// Every point of the sweep, in the order it runs them.
fn sweep_points(backends: &[Backend], storages: &[Storage]) -> Vec<SweepPoint> {
    let mut points = Vec::new();
    for &backend in backends {
        for &storage in storages {
            for window in SWEEP_WINDOWS {
                for linger_ms in SWEEP_LINGERS_MS {
                    points.push(SweepPoint {
                        backend,
                        storage,
                        window,
                        linger_ms,
                    });
                }
            }
        }
    }
    points
}

/// One sweep point's records: `s` end-to-end through the SDK at the point's window and linger.
async fn sweep_point(
    env: &Env,
    args: &Args,
    mut s: Scenario,
    p: SweepPoint,
    bar: &indicatif::ProgressBar,
) -> Vec<Record> {
    let (b, st, window, linger) = (p.backend, p.storage, p.window, p.linger_ms);
    let mut a = args.clone();
    a.window = Some(window);
    a.linger = Some(linger);
    if window <= 16 {
        s.messages = s.messages.min(2_000); // near one-at-a-time speed
    }
    bar.set_message(format!("{b} {st} window {window} linger {linger} ms"));
    let run = Run {
        s,
        backend: b,
        mode: Mode::SDK,
        measure: Measure::EndToEnd,
        storage: st,
        rep: 0,
        setting: None,
    };
    let mut records = env.run_or_fail(&a, run, "run").await;
    for r in &mut records {
        r.window = window;
        r.linger_ms = linger;
        if !r.verified {
            bar.println(format!(
                "VERIFICATION FAILED: {b} {st} window {window} linger {linger}: {}",
                r.verify_note
            ));
        }
    }
    records
}

/// Where the bench's time went: wall seconds per backend and scenario (every run's setup,
/// publishing, consumer drain, verification and teardown), and the total.
fn time_spent(records: &[Record], total: std::time::Duration) -> String {
    let mut by: std::collections::BTreeMap<(&str, &str), f64> = Default::default();
    for r in records {
        *by.entry((r.backend.as_str(), r.scenario.as_str()))
            .or_default() += r.wall_secs;
    }
    let parts: Vec<String> = by
        .iter()
        .map(|((b, s), secs)| format!("{b} {s} {secs:.0} s"))
        .collect();
    format!(
        "bench time: {:.0} s once the brokers were up ({})",
        total.as_secs_f64(),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(rate: f64, window: usize, verified: bool) -> (Run, Record) {
        let run = Run {
            s: SCENARIOS[4],
            backend: Backend::Nats,
            mode: Mode::Raw { ids: false },
            measure: Measure::Publish,
            storage: Storage::Durable,
            rep: 0,
            setting: None,
        };
        let mut rec = Record::new(&run);
        (rec.publish_msgs_per_sec, rec.window, rec.verified) = (rate, window, verified);
        (run, rec)
    }

    #[test]
    fn a_raw_path_probes_once_then_runs_at_its_fastest_verified_setting() {
        let mut probes = RawProbes::default();
        let (run, _) = raw(0.0, 0, false);
        let probe = probes.probe(run).expect("no setting yet: probe");
        assert_eq!(probe.s.messages, RAW_PROBE_MESSAGES);
        for (rate, window, verified) in [
            (10.0, 1_024, true),
            (30.0, 4_096, false),
            (20.0, 16_384, true),
        ] {
            probes.offer(&probe, &raw(rate, window, verified).1);
        }
        assert_eq!(probes.setting(&run), Some(16_384), "fastest verified");
        assert!(probes.probe(run).is_none());
        // A run at the chosen setting does not compete.
        let chosen = Run {
            setting: Some(16_384),
            ..run
        };
        probes.offer(&chosen, &raw(99.0, 1_024, true).1);
        assert_eq!(probes.setting(&run), Some(16_384));
        // Other measures share the path's probe; other modes never probe.
        assert_eq!(
            probes.setting(&Run {
                measure: Measure::EndToEnd,
                ..run
            }),
            Some(16_384)
        );
        assert!(
            probes
                .probe(Run {
                    mode: Mode::SDK,
                    ..run
                })
                .is_none()
        );
    }
}
