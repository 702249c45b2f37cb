//! What the command line can ask for: the fault scenarios and the targets they run on, typed,
//! and which scenario runs on which target.

use clap::ValueEnum;

/// A fault scenario, by its kebab-case name on the command line (`kill-restart`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// SIGKILL the broker under load, restart it.
    KillRestart,
    /// A group subscription kept open through a kill and restart.
    ConsumeKill,
    /// A group subscription kept open through a blackhole of its connection.
    ConsumeBlackhole,
    /// SIGSTOP the broker with a short ack deadline.
    Pause,
    /// The broker stalled long: memory stays bounded.
    StallMemory,
    /// A consumer far behind a deep backlog.
    SlowConsumer,
    /// The connection blackholed by the fault proxy.
    Blackhole,
    /// A silent connection.
    Wire,
    /// Close under load.
    Shutdown,
    /// Callers cancelled mid-publish.
    Cancel,
    /// No broker at the address.
    Absent,
    /// TLS and credentials, good and bad.
    Security,
    /// Three outbox relay processes on PostgreSQL, a relay killed.
    Outbox,
    /// The outbox with the broker killed.
    OutboxBroker,
    /// The outbox with PostgreSQL SIGSTOPped.
    OutboxDbPause,
    /// An inbox consumer process SIGKILLed at random points.
    InboxKill,
    /// The same on the SQLite inbox.
    InboxKillSqlite,
    /// PostgreSQL SIGKILLed and restarted under the inbox consumer.
    InboxDbRestart,
    /// The stream leader steps down (NATS cluster).
    Stepdown,
    /// Kill the node the client is attached to (NATS cluster).
    KillConnected,
    /// Kill the node the live consumer is attached to (NATS cluster).
    ConsumeKillConnected,
    /// The live consumer while the stream leader is cut off (NATS cluster).
    ConsumePartition,
    /// Every node restarted in turn (NATS cluster).
    RollingRestart,
    /// The stream leader cut off by route proxies (NATS cluster).
    Partition,
}

/// Where a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runs {
    /// Every broker, single and cluster.
    Everywhere,
    /// The single brokers only: the outbox and inbox rows (PostgreSQL and a broker together),
    /// and the rows that start brokers of their own (security, absent).
    Singles,
    /// The single NATS server only. `inbox-kill-sqlite` on tansu: its groups do not survive
    /// the kills, so each restart reads every message again in a new group, and the SQLite
    /// inbox (one writer at a time, a write transaction per delivery, duplicates included)
    /// fell behind: 1,137 of 2,000 applied after 90 s, twice; none applied twice.
    NatsSingle,
    /// The NATS cluster only.
    NatsCluster,
}

impl Scenario {
    /// The name on the command line and in the reports.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    fn runs(self) -> Runs {
        use Scenario::*;
        match self {
            Outbox | OutboxBroker | OutboxDbPause | InboxKill | InboxDbRestart | Security
            | Absent => Runs::Singles,
            InboxKillSqlite => Runs::NatsSingle,
            Stepdown | KillConnected | ConsumeKillConnected | ConsumePartition | RollingRestart
            | Partition => Runs::NatsCluster,
            _ => Runs::Everywhere,
        }
    }

    /// The scenarios a run without `--scenario` covers: all but the NATS-cluster-only ones.
    pub fn default_set() -> Vec<Scenario> {
        Scenario::value_variants()
            .iter()
            .copied()
            .filter(|s| s.runs() != Runs::NatsCluster)
            .collect()
    }

    /// The client reaches the broker through a fault proxy.
    pub fn proxied(self) -> bool {
        matches!(
            self,
            Scenario::Blackhole | Scenario::Wire | Scenario::ConsumeBlackhole
        )
    }

    /// A row that keeps a group subscription open through the fault.
    pub fn consumes(self) -> bool {
        matches!(
            self,
            Scenario::ConsumeKill
                | Scenario::ConsumeBlackhole
                | Scenario::ConsumeKillConnected
                | Scenario::ConsumePartition
        )
    }
}

/// What a scenario runs on: a backend on one broker or a cluster, or a raw client with no SDK
/// through the same rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// NATS on one nats-server.
    Nats,
    /// Kafka on one tansu.
    Kafka,
    /// NATS on three nodes, R3 streams.
    NatsCluster,
    /// Kafka on three tansu brokers over one SQLite file.
    KafkaCluster,
    /// async-nats with no SDK on the NATS cluster.
    NatsClusterRaw,
    /// rdkafka with no SDK on the tansu cluster.
    KafkaClusterRaw,
    /// async-nats's consumer with no SDK on one server.
    NatsRaw,
    /// rdkafka's consumer with no SDK on one tansu.
    KafkaRaw,
}

impl Target {
    /// The name on the command line and in the reports.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// The targets a run without `--backend` covers: the single brokers built in.
    pub fn default_set() -> Vec<Target> {
        let mut v = Vec::new();
        if cfg!(feature = "nats") {
            v.push(Target::Nats);
        }
        if cfg!(feature = "kafka") {
            v.push(Target::Kafka);
        }
        v
    }

    /// A cluster of brokers.
    pub fn is_cluster(self) -> bool {
        matches!(
            self,
            Target::NatsCluster
                | Target::KafkaCluster
                | Target::NatsClusterRaw
                | Target::KafkaClusterRaw
        )
    }

    /// Whether this target runs `s` (the cluster-only and raw-client rows run on their own
    /// targets only).
    pub fn runs(self, s: Scenario) -> bool {
        use Scenario::*;
        match self {
            Target::NatsClusterRaw => matches!(
                s,
                KillRestart
                    | Stepdown
                    | KillConnected
                    | RollingRestart
                    | Partition
                    | ConsumeKill
                    | ConsumeKillConnected
                    | ConsumePartition
            ),
            Target::KafkaClusterRaw => matches!(s, KillRestart | ConsumeKill),
            Target::NatsRaw | Target::KafkaRaw => matches!(s, ConsumeKill | ConsumeBlackhole),
            Target::NatsCluster => matches!(s.runs(), Runs::Everywhere | Runs::NatsCluster),
            Target::Nats => s.runs() != Runs::NatsCluster,
            Target::Kafka => matches!(s.runs(), Runs::Everywhere | Runs::Singles),
            Target::KafkaCluster => s.runs() == Runs::Everywhere,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_command_line_names() {
        assert_eq!(Scenario::KillRestart.name(), "kill-restart");
        assert_eq!(Scenario::InboxKillSqlite.name(), "inbox-kill-sqlite");
        assert_eq!(
            Scenario::ConsumeKillConnected.name(),
            "consume-kill-connected"
        );
        assert_eq!(Target::NatsClusterRaw.name(), "nats-cluster-raw");
        assert_eq!(
            Scenario::from_str("outbox-db-pause", false),
            Ok(Scenario::OutboxDbPause)
        );
    }

    #[test]
    fn each_scenario_runs_where_it_can() {
        use Scenario::*;
        // The outbox and inbox rows need PostgreSQL beside a single broker.
        assert!(Target::Nats.runs(Outbox) && Target::Kafka.runs(Outbox));
        assert!(!Target::NatsCluster.runs(Outbox) && !Target::KafkaCluster.runs(InboxKill));
        assert!(Target::Nats.runs(InboxKillSqlite) && !Target::Kafka.runs(InboxKillSqlite));
        assert!(Target::NatsCluster.runs(Partition) && !Target::Nats.runs(Partition));
        assert!(!Target::KafkaCluster.runs(Stepdown));
        assert!(!Target::NatsCluster.runs(Security) && Target::Kafka.runs(Absent));
        assert!(Target::KafkaClusterRaw.runs(ConsumeKill) && !Target::KafkaClusterRaw.runs(Pause));
        assert!(!Scenario::default_set().contains(&RollingRestart));
        assert!(Scenario::default_set().contains(&Security));
    }
}
