//! What a bench run covers: the command line's selection ([`Selection`]), and every run it
//! asks for, in order and sized ([`plan`]).

use std::str::FromStr;

use crate::drive::Run;
use crate::mode::{Backend, Measure, Mode, Publish, Storage};
use crate::{Args, SCENARIOS, Scenario};

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

/// What the command line asks for, typed and with its defaults filled in.
pub(crate) struct Selection {
    /// Scenarios in table order, sized for `--quick`, the default run or `--full`.
    pub(crate) scenarios: Vec<Scenario>,
    /// Backends in the order asked for.
    pub(crate) backends: Vec<Backend>,
    /// Modes in the order asked for (each repetition runs them in this order).
    pub(crate) modes: Vec<Mode>,
    /// What the clock covers for the modes that publish.
    pub(crate) measures: Vec<Measure>,
    /// Storage classes in the order asked for.
    pub(crate) storages: Vec<Storage>,
    /// Repetitions per (scenario, backend, mode, measure, storage), at least one.
    pub(crate) reps: usize,
}

impl Selection {
    /// The selection `args` make. An unknown scenario or backend ends the bench (exit status
    /// 2, naming the known ones); an unknown storage class is an error.
    pub(crate) fn from_args(args: &Args) -> Result<Selection, String> {
        let scenarios = scenarios(args);
        let backends = pick(&args.backend, &Backend::ALL);
        let modes = if args.mode.is_empty() {
            default_modes(args.full)
        } else {
            args.mode.clone()
        };
        let measures = if args.measure.is_empty() {
            vec![Measure::Publish, Measure::EndToEnd]
        } else {
            args.measure.clone()
        };
        let storages = Storage::classes(&args.storage)?;
        let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
        Ok(Selection {
            scenarios,
            backends,
            modes,
            measures,
            storages,
            reps,
        })
    }
}

/// The values `names` names, in its order (`default` when it is empty). An unknown name ends
/// the bench with exit status 2.
fn pick<T: FromStr<Err = String> + Clone>(names: &[String], default: &[T]) -> Vec<T> {
    if names.is_empty() {
        return default.to_vec();
    }
    names
        .iter()
        .map(|n| {
            n.parse().unwrap_or_else(|e: String| {
                eprintln!("{e}");
                std::process::exit(2)
            })
        })
        .collect()
}

/// The scenarios asked for (without `--scenario`: the seed's, Sustained and the backlog; only
/// low and extreme of the seed's with `--quick`), in table order, each sized: at most 20,000
/// messages with `--quick`, Sustained and the backlog smaller without `--full`.
fn scenarios(args: &Args) -> Vec<Scenario> {
    let default: &[&str] = if args.quick {
        &["low", "extreme", "sustained", BACKLOG]
    } else {
        &["low", "medium", "high", "extreme", "sustained", BACKLOG]
    };
    let default: Vec<Scenario> = SCENARIOS
        .into_iter()
        .filter(|s| default.contains(&s.name))
        .collect();
    let asked = pick(&args.scenario, &default);
    let mut chosen: Vec<Scenario> = SCENARIOS
        .into_iter()
        .filter(|s| asked.iter().any(|a| a.name == s.name))
        .collect();
    for s in &mut chosen {
        s.keys = args.keys;
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
    chosen
}

/// The modes of a run without `--mode`; `--full` adds the NATS publish modes async and atomic.
fn default_modes(full: bool) -> Vec<Mode> {
    let mut modes = vec![
        Mode::Naive,
        Mode::SDK,
        Mode::Sdk {
            publish: Publish::Default,
            ids: false,
        },
        Mode::Raw { ids: false },
        Mode::Raw { ids: true },
        Mode::CeilingJetStream,
        Mode::CeilingCore,
        Mode::DrainSdk,
        Mode::DrainRaw,
        Mode::DrainRawDefaults,
    ];
    if full {
        modes.extend(
            [Publish::Async, Publish::Atomic].map(|publish| Mode::Sdk { publish, ids: true }),
        );
    }
    modes
}

/// Every run, repetitions interleaved: one repetition of every mode, then the next, so a slow
/// phase of a shared machine hits all modes alike rather than one mode's repetitions together.
pub(crate) fn plan(args: &Args, sel: &Selection) -> Vec<Run> {
    let mut plan = Vec::new();
    for s in &sel.scenarios {
        for &backend in &sel.backends {
            for (i, &storage) in sel.storages.iter().enumerate() {
                if skips_storage(sel, s, backend, i, storage) {
                    continue;
                }
                for rep in 0..sel.reps {
                    for &mode in &sel.modes {
                        if skips_mode(args, s, backend, mode) {
                            continue;
                        }
                        for measure in mode.measures(&sel.measures) {
                            if repeats_publish_only(args, sel, backend, storage, measure) {
                                continue;
                            }
                            let run = Run {
                                s: *s,
                                backend,
                                mode,
                                measure,
                                storage: if mode.drain() {
                                    drain_storage(backend, storage)
                                } else {
                                    storage
                                },
                                rep,
                                setting: None,
                            };
                            plan.push(capped(args, run));
                        }
                    }
                }
            }
        }
    }
    plan
}

/// Whether `backend` leaves out storage class `storage`, the `i`th asked for, on `s`.
fn skips_storage(
    sel: &Selection,
    s: &Scenario,
    backend: Backend,
    i: usize,
    storage: Storage,
) -> bool {
    // The in-process backend has one storage class: memory.
    let other_class =
        backend == Backend::Memory && storage != Storage::Memory && sel.storages.len() > 1;
    // Kafka drains its memory engine ([`drain_storage`]), once whatever the storage classes.
    other_class || (s.name == BACKLOG && backend == Backend::Kafka && i > 0)
}

/// The storage class a drain on `backend` reads: tansu's SQLite engine reads at ~1.4k msg/s,
/// so Kafka drains its memory engine.
fn drain_storage(backend: Backend, storage: Storage) -> Storage {
    if backend == Backend::Kafka {
        Storage::Memory
    } else {
        storage
    }
}

/// Whether `mode` is left out of scenario `s` on `backend`.
fn skips_mode(args: &Args, s: &Scenario, backend: Backend, mode: Mode) -> bool {
    // The other NATS publish modes stay on the seed's scenarios in a default run: at 1M
    // messages each costs a minute per repetition; `--mode` runs them anywhere.
    let big_extra = args.mode.is_empty()
        && s.messages > 100_000
        && matches!(
            mode,
            Mode::Sdk {
                publish: Publish::Async | Publish::Atomic,
                ..
            }
        );
    // The core ceiling is verified by the server's monitoring endpoint, which a server the
    // bench did not start may not have.
    let unverifiable = mode == Mode::CeilingCore && args.nats_url.is_some();
    !mode.runs_on(backend) || big_extra || unverifiable || mode.drain() != (s.name == BACKLOG)
}

/// Whether an end-to-end run would repeat the publish-only one: tansu's SQLite engine is
/// verified by watermarks with no consumer at all.
fn repeats_publish_only(
    args: &Args,
    sel: &Selection,
    backend: Backend,
    storage: Storage,
    measure: Measure,
) -> bool {
    backend == Backend::Kafka
        && storage != Storage::Memory
        && measure == Measure::EndToEnd
        && sel.measures.contains(&Measure::Publish)
        && args.kafka_brokers.is_none()
}

/// `run` at most as large as its mode and broker allow: naive runs are capped, and so are
/// runs on tansu's SQLite engine.
fn capped(args: &Args, mut run: Run) -> Run {
    if run.mode == Mode::Naive {
        run.s.messages = run.s.messages.min(if run.backend == Backend::Kafka {
            NAIVE_CAP_KAFKA
        } else {
            NAIVE_CAP
        });
    }
    #[cfg(feature = "kafka")]
    if run.backend == Backend::Kafka
        && crate::kafka::on_sqlite(run.storage)
        && args.kafka_brokers.is_none()
    {
        // tansu's SQLite engine takes ~20-40k msg/s here: half the size keeps the default
        // run within minutes.
        let cap = if args.full {
            crate::kafka::DURABLE_CAP
        } else {
            crate::kafka::DURABLE_CAP / 2
        };
        run.s.messages = run.s.messages.min(cap);
    }
    #[cfg(not(feature = "kafka"))]
    let _ = args;
    run
}

/// The storage classes the brokers start with: those asked for, and memory for the drains
/// Kafka runs on its memory engine ([`drain_storage`]).
pub(crate) fn env_storages(storages: &[Storage], plan: &[Run]) -> Vec<Storage> {
    let mut env = storages.to_vec();
    if plan.iter().any(|r| r.storage == Storage::Memory) && !env.contains(&Storage::Memory) {
        env.push(Storage::Memory);
    }
    env
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn planned(argv: &[&str]) -> Vec<Run> {
        let args = Args::parse_from(std::iter::once("bench").chain(argv.iter().copied()));
        plan(
            &args,
            &Selection::from_args(&args).expect("a valid selection"),
        )
    }

    #[test]
    fn the_default_modes_are_the_documented_ones() {
        let names =
            |full| -> Vec<String> { default_modes(full).iter().map(Mode::to_string).collect() };
        let default = [
            "naive",
            "sdk",
            "sdk-nodedup",
            "raw",
            "raw-dedup",
            "ceiling-js",
            "ceiling-core",
            "drain-sdk",
            "drain-raw",
            "drain-raw-defaults",
        ];
        assert_eq!(names(false), default);
        assert_eq!(names(true)[default.len()..], ["sdk-async", "sdk-atomic"]);
    }

    #[test]
    fn repetitions_interleave_and_kafka_drains_its_memory_engine_once() {
        let plan = planned(&["--backend", "kafka", "--storage", "all"]);
        let low: Vec<(usize, Mode)> = plan
            .iter()
            .filter(|r| r.s.name == "low" && r.storage == Storage::Durable)
            .map(|r| (r.rep, r.mode))
            .collect();
        assert_eq!(low[0], (0, Mode::Naive));
        assert!(
            low.windows(2).all(|w| w[0].0 <= w[1].0),
            "rep 0, then 1, then 2"
        );
        let drains: Vec<&Run> = plan.iter().filter(|r| r.mode.drain()).collect();
        assert_eq!(
            drains.len(),
            3 * 3,
            "drain-sdk, drain-raw and drain-raw-defaults, once per repetition"
        );
        assert!(drains.iter().all(|r| r.storage == Storage::Memory));
        assert!(
            !plan
                .iter()
                .any(|r| r.storage == Storage::Durable && r.measure == Measure::EndToEnd),
            "tansu SQLite's end-to-end run would repeat its publish-only one"
        );
    }

    #[test]
    fn naive_runs_are_capped_per_backend() {
        let plan = planned(&["--full", "--scenario", "sustained", "--mode", "naive,sdk"]);
        let messages = |b, m| {
            plan.iter()
                .find(|r| r.backend == b && r.mode == m)
                .map(|r| r.s.messages)
        };
        assert_eq!(messages(Backend::Nats, Mode::Naive), Some(NAIVE_CAP));
        assert_eq!(messages(Backend::Kafka, Mode::Naive), Some(NAIVE_CAP_KAFKA));
        assert_eq!(messages(Backend::Nats, Mode::SDK), Some(1_000_000));
    }
}
