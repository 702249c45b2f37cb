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
#[cfg(feature = "kafka")]
mod kafka;
mod mode;
#[cfg(feature = "nats")]
mod nats;
mod report;
mod sys;

use std::path::PathBuf;

use clap::Parser;

use crate::mode::{Measure, Mode};

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
    /// drain-sdk and drain-raw (read the backlog scenario in a consumer group).
    #[arg(long, value_delimiter = ',')]
    pub mode: Vec<Mode>,
    /// Storage class: durable (JetStream file storage, tansu SQLite), memory (JetStream memory
    /// storage, tansu memory engine), replicated (a 3-node NATS cluster with R3 file streams,
    /// 3 tansu brokers over one SQLite file), both (durable and memory) or all.
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
    /// Seconds of publishing per window in `--dedup-study`.
    #[arg(long, default_value_t = 150)]
    pub study_secs: u64,
    /// SDK batches in flight (`max_in_flight_batches`). Default: the engine's default.
    #[arg(long)]
    pub batches: Option<usize>,
    /// SDK linger in milliseconds. Default: the engine's default (0).
    #[arg(long)]
    pub linger: Option<u64>,
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
    /// Rewrite the results block of this README (and docs/bench/throughput.svg beside it).
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
}

const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "low",
        messages: 500,
        payload: 108,
        topics: 5,
        publishers: 5,
    },
    Scenario {
        name: "medium",
        messages: 2_000,
        payload: 108,
        topics: 5,
        publishers: 5,
    },
    Scenario {
        name: "high",
        messages: 5_000,
        payload: 108,
        topics: 5,
        publishers: 5,
    },
    Scenario {
        name: "extreme",
        messages: 10_000,
        payload: 108,
        topics: 5,
        publishers: 5,
    },
    Scenario {
        name: "sustained",
        messages: 1_000_000,
        payload: 108,
        topics: 5,
        publishers: 5,
    },
    Scenario {
        name: "sustained-1k",
        messages: 200_000,
        payload: 1024,
        topics: 5,
        publishers: 5,
    },
    Scenario {
        name: "backlog",
        messages: 1_000_000,
        payload: 108,
        topics: 5,
        publishers: 5,
    },
];

/// The backlog drained by the drain modes (and nothing else runs on it).
const BACKLOG: &str = "backlog";
/// Sustained and the backlog without `--full`: sized so that the default run finishes in
/// minutes on a 2-core machine.
const DEFAULT_LARGE: usize = 100_000;
/// The drained backlog without `--full`: a drain of 100,000 lasts well under a second, short
/// enough for start-up effects to swing the rate by a third.
const DEFAULT_BACKLOG: usize = 200_000;

/// Naive runs are capped: at ~1k (Kafka, librdkafka linger) to ~30k (NATS) msg/s, a million
/// one-by-one acks would take minutes and show nothing new (the rate is one round trip per
/// message per publisher from the first message on). The record says how many messages were
/// actually sent.
const NAIVE_CAP: usize = 5_000;
/// Kafka's naive cap: one record per linger + round trip per publisher is ~750 msg/s on tansu,
/// so 1,000 messages (200 per publisher) take ~1.3 s instead of ~7 s for 5,000.
const NAIVE_CAP_KAFKA: usize = 1_000;
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
                "\nSOME RUNS FAILED VERIFICATION: see `verified` and `verify_note` above and in the JSON."
            );
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// ACK windows and engine lingers (ms) the sweep tries.
const SWEEP_WINDOWS: [usize; 6] = [1, 16, 256, 4_096, 16_384, 100_000];
const SWEEP_LINGERS_MS: [u64; 4] = [0, 1, 5, 20];

async fn sweep(args: &Args, backends: &[String], storages: &[&str]) -> Result<bool, String> {
    let name = args.scenario.first().map_or("extreme", String::as_str);
    let scenario = SCENARIOS
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("unknown scenario {name}"))?;
    // One storage class unless asked for explicitly: the sweep is about the SDK's knobs.
    let storages: Vec<&str> = if storages.len() > 1 {
        vec!["durable"]
    } else {
        storages.to_vec()
    };
    let backends: Vec<String> = backends
        .iter()
        .filter(|b| *b != "memory")
        .cloned()
        .collect();
    let env = drive::Env::start(
        args,
        backends.iter().any(|b| b == "nats"),
        backends.iter().any(|b| b == "kafka"),
        &storages,
    )
    .await?;
    eprintln!("{}", env.describe());
    let total = backends.len() * storages.len() * SWEEP_WINDOWS.len() * SWEEP_LINGERS_MS.len();
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("template"),
    );
    let mut records = Vec::new();
    for b in &backends {
        for st in &storages {
            for window in SWEEP_WINDOWS {
                for linger in SWEEP_LINGERS_MS {
                    let mut a = args.clone();
                    a.window = Some(window);
                    a.linger = Some(linger);
                    let mut s = scenario;
                    if window <= 16 {
                        s.messages = s.messages.min(2_000); // near one-at-a-time speed
                    }
                    bar.set_message(format!("{b} {st} window {window} linger {linger} ms"));
                    let run = drive::Run {
                        s,
                        backend: b,
                        mode: Mode::SDK,
                        measure: Measure::EndToEnd,
                        storage: st,
                        rep: 0,
                        setting: None,
                    };
                    for mut r in env.run_or_fail(&a, run, "run").await {
                        r.window = window;
                        r.linger_ms = linger;
                        if !r.verified {
                            bar.println(format!(
                                "VERIFICATION FAILED: {b} {st} window {window} linger {linger}: {}",
                                r.verify_note
                            ));
                        }
                        records.push(r);
                    }
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    report::write_sweep(args, &env.describe(), &records)?;
    env.stop().await;
    Ok(records.iter().all(|r| r.verified))
}

async fn run(args: Args) -> Result<bool, String> {
    #[cfg(feature = "nats")]
    if args.dedup_study {
        return dedup::study(&args).await;
    }
    if let Some(path) = &args.from_json {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let doc = report::Saved::parse(&text, path)
            .map_err(|e| format!("parse {}: {e}", path.display()))?;
        report::write(&args, &doc.machine, &doc.records)?;
        return Ok(doc.records.iter().all(|r| r.verified));
    }
    let pick = |list: &[String], all: &[&str], default: &[&str]| -> Vec<String> {
        let chosen: Vec<String> = if list.is_empty() {
            default.iter().map(|s| s.to_string()).collect()
        } else {
            list.to_vec()
        };
        for c in &chosen {
            if !all.contains(&c.as_str()) {
                eprintln!("unknown value {c:?}: expected one of {}", all.join(", "));
                std::process::exit(2);
            }
        }
        chosen
    };
    let default_scen: &[&str] = if args.quick {
        &["low", "extreme", "sustained", BACKLOG]
    } else {
        &["low", "medium", "high", "extreme", "sustained", BACKLOG]
    };
    let scen_names = pick(&args.scenario, &SCENARIOS.map(|s| s.name), default_scen);
    let mut scenarios: Vec<Scenario> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| scen_names.iter().any(|n| n == s.name))
        .collect();
    for s in &mut scenarios {
        if args.quick {
            s.messages = s.messages.min(20_000);
        } else if !args.full {
            s.messages = s.messages.min(if s.name == BACKLOG {
                DEFAULT_BACKLOG
            } else {
                DEFAULT_LARGE
            });
        }
    }
    let backends = pick(
        &args.backend,
        &["nats", "kafka", "memory"],
        &["nats", "kafka", "memory"],
    );
    let modes: Vec<Mode> = if args.mode.is_empty() {
        let mut m: Vec<Mode> = [
            "naive",
            "sdk",
            "sdk-nodedup",
            "raw",
            "raw-dedup",
            "ceiling-js",
            "ceiling-core",
            "drain-sdk",
            "drain-raw",
        ]
        .iter()
        .map(|m| m.parse().expect("a known mode"))
        .collect();
        if args.full {
            m.extend(["sdk-async", "sdk-atomic"].map(|m| m.parse::<Mode>().expect("a known mode")));
        }
        m
    } else {
        args.mode.clone()
    };
    let measures: Vec<Measure> = if args.measure.is_empty() {
        vec![Measure::Publish, Measure::EndToEnd]
    } else {
        args.measure.clone()
    };
    let storages: Vec<&str> = match args.storage.as_str() {
        "both" => vec!["durable", "memory"],
        "all" => vec!["durable", "memory", "replicated"],
        "durable" => vec!["durable"],
        "memory" => vec!["memory"],
        "replicated" => vec!["replicated"],
        other => {
            return Err(format!(
                "--storage must be durable, memory, replicated, both or all, not {other}"
            ));
        }
    };
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    if args.sweep {
        return sweep(&args, &backends, &storages).await;
    }
    let plan = plan(
        &args, &scenarios, &backends, &modes, &measures, &storages, reps,
    );
    // tansu's SQLite engine reads too slowly to drain: Kafka drains run on its memory engine.
    let mut env_storages = storages.clone();
    if plan.iter().any(|p| p.storage == "memory") && !env_storages.contains(&"memory") {
        env_storages.push("memory");
    }
    let env = drive::Env::start(
        &args,
        backends.iter().any(|b| b == "nats"),
        backends.iter().any(|b| b == "kafka"),
        &env_storages,
    )
    .await?;
    eprintln!("{}", env.describe());

    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(plan.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} {bar:40} {pos}/{len} {msg}")
            .expect("template"),
    );
    let mut records = Vec::new();
    // Raw baselines probe every window (NATS) or linger (Kafka) once, then repeat the best.
    let mut raw_best: std::collections::HashMap<String, (usize, f64)> = Default::default();
    for p in plan {
        let mut run = drive::Run {
            s: p.s,
            backend: &p.backend,
            mode: p.mode,
            measure: p.measure,
            storage: p.storage,
            rep: p.rep,
            setting: None,
        };
        if run.mode == Mode::Naive {
            run.s.messages = run.s.messages.min(if p.backend == "kafka" {
                NAIVE_CAP_KAFKA
            } else {
                NAIVE_CAP
            });
        }
        #[cfg(feature = "kafka")]
        if p.backend == "kafka" && kafka::on_sqlite(p.storage) && args.kafka_brokers.is_none() {
            // tansu's SQLite engine takes ~20-40k msg/s here: half the size keeps the default
            // run within minutes.
            let cap = if args.full {
                kafka::DURABLE_CAP
            } else {
                kafka::DURABLE_CAP / 2
            };
            run.s.messages = run.s.messages.min(cap);
        }
        let label = format!(
            "{} {} {} {} {} #{}",
            p.s.name,
            p.backend,
            p.mode,
            p.measure,
            p.storage,
            p.rep + 1
        );
        bar.set_message(label.clone());
        // One probe per path serves both measures.
        let key = format!("{} {} {} {}", p.s.name, p.backend, p.storage, p.mode);
        let probes = run.mode.probes();
        run.setting = raw_best.get(&key).filter(|_| probes).map(|b| b.0);
        // A raw mode's first run probes every candidate setting once; the fastest verified
        // one is what this and every later repetition run at.
        let mut phases = Vec::new();
        if probes && run.setting.is_none() {
            let mut probe = run;
            probe.s.messages = run.s.messages.min(RAW_PROBE_MESSAGES);
            phases.push((probe, "probe"));
        }
        phases.push((run, "run"));
        for (mut one, what) in phases {
            if what == "probe" {
                bar.set_message(format!(
                    "{label}: probing settings at {} messages",
                    one.s.messages
                ));
            } else {
                one.setting = raw_best.get(&key).filter(|_| probes).map(|b| b.0);
            }
            for mut rec in env.run_or_fail(&args, one, what).await {
                rec.probe = what == "probe";
                // Candidates compete only while no setting is chosen (probes, or a run after
                // every probe failed, which tries every candidate again).
                let best = raw_best.get(&key).map_or(0.0, |b| b.1);
                if probes
                    && one.setting.is_none()
                    && rec.verified
                    && rec.publish_msgs_per_sec > best
                {
                    raw_best.insert(key.clone(), (rec.window, rec.publish_msgs_per_sec));
                }
                if !rec.verified {
                    bar.println(format!(
                        "VERIFICATION FAILED: {label} {what} (window {}): {}",
                        rec.window, rec.verify_note
                    ));
                }
                records.push(rec);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("{}", time_spent(&records, started.elapsed()));
    let all_ok = records.iter().all(|r| r.verified);
    report::write(&args, &env.describe(), &records)?;
    env.stop().await;
    Ok(all_ok)
}

/// One planned run.
struct Planned {
    s: Scenario,
    backend: String,
    mode: Mode,
    measure: Measure,
    storage: &'static str,
    rep: usize,
}

/// Every run, repetitions interleaved: one repetition of every mode, then the next, so a slow
/// phase of a shared machine hits all modes alike rather than one mode's repetitions together.
fn plan(
    args: &Args,
    scenarios: &[Scenario],
    backends: &[String],
    modes: &[Mode],
    measures: &[Measure],
    storages: &[&str],
    reps: usize,
) -> Vec<Planned> {
    let mut plan = Vec::new();
    for s in scenarios {
        for b in backends {
            for (i, st) in storages.iter().enumerate() {
                let st: &'static str = match *st {
                    "durable" => "durable",
                    "memory" => "memory",
                    _ => "replicated",
                };
                if b == "memory" && st != "memory" && storages.len() > 1 {
                    continue; // the in-process backend has one storage class: memory
                }
                // tansu's SQLite engine reads at ~1.4k msg/s: Kafka drains its memory engine,
                // once per run whatever the storage classes.
                let drain_st = if b == "kafka" { "memory" } else { st };
                if s.name == BACKLOG && b == "kafka" && i > 0 {
                    continue;
                }
                for rep in 0..reps {
                    for &m in modes {
                        // The other NATS publish modes stay on the seed's scenarios in a
                        // default run: at 1M messages each costs a minute per repetition;
                        // `--mode` runs them anywhere.
                        let big_extra = args.mode.is_empty()
                            && s.messages > 100_000
                            && matches!(
                                m,
                                Mode::Sdk {
                                    publish: mode::Publish::Async | mode::Publish::Atomic,
                                    ..
                                }
                            );
                        // The core ceiling is verified by the server's monitoring endpoint,
                        // which a server the bench did not start may not have.
                        let unverifiable = m == Mode::CeilingCore && args.nats_url.is_some();
                        if !m.runs_on(b)
                            || big_extra
                            || unverifiable
                            || m.drain() != (s.name == BACKLOG)
                        {
                            continue;
                        }
                        for measure in m.measures(measures) {
                            // tansu's SQLite engine is verified by watermarks with no consumer
                            // at all, so its end-to-end run would repeat the publish-only one.
                            if b == "kafka"
                                && st != "memory"
                                && measure == Measure::EndToEnd
                                && measures.contains(&Measure::Publish)
                                && args.kafka_brokers.is_none()
                            {
                                continue;
                            }
                            plan.push(Planned {
                                s: *s,
                                backend: b.clone(),
                                mode: m,
                                measure,
                                storage: if m.drain() { drain_st } else { st },
                                rep,
                            });
                        }
                    }
                }
            }
        }
    }
    plan
}

/// Where the bench's time went: wall seconds per backend and scenario (every run's setup,
/// publishing, consumer drain, verification and teardown), and the total.
fn time_spent(records: &[report::Record], total: std::time::Duration) -> String {
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
