//! What one run measures: the client path ([`Mode`]) and what the clock covers ([`Measure`]),
//! and where it runs: the [`Backend`] and its [`Storage`] class.

use std::fmt;
use std::str::FromStr;

/// The NATS publish mode an SDK run asks for ([`Publish::Default`] on Kafka).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Publish {
    /// The backend's default (NATS: fast-ingest batches).
    Default,
    /// NATS: one ack per message.
    Async,
    /// NATS: fast-ingest batches, asked for explicitly.
    Fast,
    /// NATS: one ack per all-or-nothing batch.
    Atomic,
}

/// The client path a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Mode {
    /// The SDK, each publisher awaiting every ack before its next publish (what the seed's
    /// NATS backend effectively did).
    Naive,
    /// The SDK through the batching engine; `ids` is the default de-duplication id (NATS
    /// `Nats-Msg-Id`, Kafka the `eventbus-id` header).
    Sdk { publish: Publish, ids: bool },
    /// The bare client at its best, no SDK; `ids` sends the same id the SDK sends by default.
    Raw { ids: bool },
    /// Kafka: rdkafka's `FutureProducer`, one future per message.
    RawFuture,
    /// NATS: JetStream ingest with almost no acks (core publishes into the stream, every
    /// 1,000th of each publisher acked): the server's limit for a stream, not a way to publish
    /// safely.
    CeilingJetStream,
    /// NATS: core publishes with no stream and no subscriber, flushed: the wire's limit.
    CeilingCore,
    /// Drain a backlog through the SDK's subscriber in a consumer group, acking each message.
    DrainSdk,
    /// Drain the same backlog with the bare client's consumer, acking each message.
    DrainRaw,
    /// Kafka: drain it with rdkafka's consumer at librdkafka's own read-ahead defaults (64 MiB
    /// queued, 50 MiB fetches) instead of the SDK's bounded 4 MiB, storing each offset.
    DrainRawDefaults,
}

/// What the clock of a run covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Measure {
    /// Publishing only: no consumer runs while the publishers do; the run is verified
    /// afterwards (broker state, then reading it back).
    Publish,
    /// Publishing with a verifying consumer reading every message on the same machine.
    EndToEnd,
    /// Reading a backlog published before the clock started.
    Drain,
}

/// The backend a run publishes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Backend {
    /// NATS JetStream (a nats-server or cluster the bench starts, or `--nats-url`).
    Nats,
    /// The Kafka protocol through librdkafka (tansu brokers, or `--kafka-brokers`).
    Kafka,
    /// The in-process memory backend: the engine and subscriber with no broker below.
    Memory,
}

/// A storage class: how the broker keeps what it acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Storage {
    /// JetStream file storage, tansu's SQLite engine.
    Durable,
    /// JetStream memory storage, tansu's memory engine (neither survives a restart).
    Memory,
    /// A 3-node NATS cluster with R3 file streams, 3 tansu brokers over one SQLite file.
    Replicated,
}

impl Backend {
    /// Every backend, in the default run's order.
    pub(crate) const ALL: [Backend; 3] = [Backend::Nats, Backend::Kafka, Backend::Memory];
}

impl Storage {
    /// Every storage class, in the order `--storage all` runs them.
    pub(crate) const ALL: [Storage; 3] = [Storage::Durable, Storage::Memory, Storage::Replicated];

    /// The classes `--storage` names: one class, `both` (durable and memory) or `all`.
    pub(crate) fn classes(arg: &str) -> Result<Vec<Storage>, String> {
        match arg {
            "both" => Ok(vec![Storage::Durable, Storage::Memory]),
            "all" => Ok(Storage::ALL.to_vec()),
            one => one.parse().map(|st| vec![st]).map_err(|_| {
                format!("--storage must be durable, memory, replicated, both or all, not {one}")
            }),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nats => "nats",
            Backend::Kafka => "kafka",
            Backend::Memory => "memory",
        })
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        one_of(s, &Backend::ALL)
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Storage::Durable => "durable",
            Storage::Memory => "memory",
            Storage::Replicated => "replicated",
        })
    }
}

impl FromStr for Storage {
    type Err = String;

    fn from_str(s: &str) -> Result<Storage, String> {
        one_of(s, &Storage::ALL)
    }
}

/// The value of `all` named `s`, or an error naming every value.
pub(crate) fn one_of<T: Copy + fmt::Display>(s: &str, all: &[T]) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|v| v.to_string() == s)
        .ok_or_else(|| {
            let names: Vec<String> = all.iter().map(T::to_string).collect();
            format!("unknown value {s:?}: expected one of {}", names.join(", "))
        })
}

impl Mode {
    /// Every mode the bench knows, in table order.
    pub(crate) const ALL: [Mode; 17] = [
        Mode::Naive,
        Mode::Sdk {
            publish: Publish::Default,
            ids: true,
        },
        Mode::Sdk {
            publish: Publish::Default,
            ids: false,
        },
        Mode::Sdk {
            publish: Publish::Async,
            ids: true,
        },
        Mode::Sdk {
            publish: Publish::Async,
            ids: false,
        },
        Mode::Sdk {
            publish: Publish::Fast,
            ids: true,
        },
        Mode::Sdk {
            publish: Publish::Fast,
            ids: false,
        },
        Mode::Sdk {
            publish: Publish::Atomic,
            ids: true,
        },
        Mode::Sdk {
            publish: Publish::Atomic,
            ids: false,
        },
        Mode::Raw { ids: false },
        Mode::Raw { ids: true },
        Mode::RawFuture,
        Mode::CeilingJetStream,
        Mode::CeilingCore,
        Mode::DrainSdk,
        Mode::DrainRaw,
        Mode::DrainRawDefaults,
    ];

    /// The SDK's default publish path.
    pub(crate) const SDK: Mode = Mode::Sdk {
        publish: Publish::Default,
        ids: true,
    };

    /// Whether `backend` has this path.
    pub(crate) fn runs_on(self, backend: Backend) -> bool {
        match (backend, self) {
            (Backend::Memory, m) => matches!(m, Mode::Naive | Mode::SDK),
            (Backend::Kafka, Mode::Sdk { publish, .. }) => publish == Publish::Default,
            (Backend::Kafka, Mode::CeilingJetStream | Mode::CeilingCore) => false,
            (Backend::Nats, Mode::RawFuture | Mode::DrainRawDefaults) => false,
            _ => true,
        }
    }

    /// A bare-client baseline whose window (NATS) or linger (Kafka) is probed first.
    pub(crate) fn probes(self) -> bool {
        matches!(self, Mode::Raw { .. } | Mode::RawFuture)
    }

    /// The measures this mode is run under.
    pub(crate) fn measures(self, asked: &[Measure]) -> Vec<Measure> {
        match self {
            Mode::DrainSdk | Mode::DrainRaw | Mode::DrainRawDefaults => vec![Measure::Drain],
            // One ack per message is slow enough that a consumer beside it changes nothing, and
            // a ceiling has no consumer worth timing beside it.
            Mode::Naive | Mode::CeilingJetStream | Mode::CeilingCore => asked
                .iter()
                .copied()
                .filter(|m| *m == Measure::Publish)
                .collect(),
            _ => asked
                .iter()
                .copied()
                .filter(|m| *m != Measure::Drain)
                .collect(),
        }
    }

    /// Whether this mode drains a backlog rather than publishing.
    pub(crate) fn drain(self) -> bool {
        matches!(
            self,
            Mode::DrainSdk | Mode::DrainRaw | Mode::DrainRawDefaults
        )
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Naive => f.write_str("naive"),
            Mode::Sdk { publish, ids } => {
                f.write_str("sdk")?;
                match publish {
                    Publish::Default => {}
                    Publish::Async => f.write_str("-async")?,
                    Publish::Fast => f.write_str("-fast")?,
                    Publish::Atomic => f.write_str("-atomic")?,
                }
                if !ids {
                    f.write_str("-nodedup")?;
                }
                Ok(())
            }
            Mode::Raw { ids: false } => f.write_str("raw"),
            Mode::Raw { ids: true } => f.write_str("raw-dedup"),
            Mode::RawFuture => f.write_str("raw-future"),
            Mode::CeilingJetStream => f.write_str("ceiling-js"),
            Mode::CeilingCore => f.write_str("ceiling-core"),
            Mode::DrainSdk => f.write_str("drain-sdk"),
            Mode::DrainRaw => f.write_str("drain-raw"),
            Mode::DrainRawDefaults => f.write_str("drain-raw-defaults"),
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.to_string() == s)
            .ok_or_else(|| {
                let all: Vec<String> = Mode::ALL.iter().map(Mode::to_string).collect();
                format!("unknown mode {s:?}: expected one of {}", all.join(", "))
            })
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Measure::Publish => "publish",
            Measure::EndToEnd => "e2e",
            Measure::Drain => "drain",
        })
    }
}

impl FromStr for Measure {
    type Err = String;

    fn from_str(s: &str) -> Result<Measure, String> {
        match s {
            "publish" => Ok(Measure::Publish),
            "e2e" => Ok(Measure::EndToEnd),
            "drain" => Ok(Measure::Drain),
            _ => Err(format!(
                "unknown measure {s:?}: expected publish, e2e or drain"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_through_its_name() {
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        assert!("sdk-slow".parse::<Mode>().is_err());
    }

    #[test]
    fn drains_are_only_measured_as_drains_and_ceilings_only_publish_only() {
        let both = [Measure::Publish, Measure::EndToEnd];
        assert_eq!(Mode::DrainRaw.measures(&both), vec![Measure::Drain]);
        assert_eq!(
            Mode::CeilingJetStream.measures(&both),
            vec![Measure::Publish]
        );
        assert_eq!(Mode::SDK.measures(&both), both.to_vec());
        assert!(!Mode::CeilingCore.runs_on(Backend::Kafka));
        assert!(!Mode::Raw { ids: true }.runs_on(Backend::Memory));
    }

    #[test]
    fn backends_and_storage_classes_round_trip_and_name_every_value_when_unknown() {
        for b in Backend::ALL {
            assert_eq!(b.to_string().parse::<Backend>(), Ok(b));
        }
        for st in Storage::ALL {
            assert_eq!(st.to_string().parse::<Storage>(), Ok(st));
        }
        assert_eq!(
            "foo".parse::<Backend>(),
            Err(r#"unknown value "foo": expected one of nats, kafka, memory"#.into())
        );
        assert_eq!(
            Storage::classes("both"),
            Ok(vec![Storage::Durable, Storage::Memory])
        );
        assert_eq!(
            Storage::classes("replicated"),
            Ok(vec![Storage::Replicated])
        );
        assert_eq!(
            Storage::classes("quux"),
            Err("--storage must be durable, memory, replicated, both or all, not quux".into())
        );
    }
}
