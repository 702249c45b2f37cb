//! The conformance harness for the Kafka backend, whichever broker serves it: a guard that
//! keeps the broker alive (a tansu process, librdkafka's mock cluster) and a connected backend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_conformance::{Caps, Harness};
use eventbus_core::Topic;
use eventbus_kafka::{KafkaBackend, KafkaConfig, KafkaSink, KafkaSubscriber};

/// Partitions per test topic: enough for two group members to share.
const PARTITIONS: i32 = 3;

/// What keeps a broker alive for a harness, and creates topics on it when the admin API cannot
/// (librdkafka's mock cluster does not serve CreateTopics).
pub(crate) trait Broker: Send + Sync + 'static {
    /// Create `name` with `partitions` by the broker's own means; `None`: use the admin API.
    fn create_topic(&self, _name: &str, _partitions: i32) -> Option<Result<(), String>> {
        None
    }
    /// How the broker's behaviour differs from the suite's defaults.
    fn caps(&self, caps: Caps) -> Caps {
        caps
    }
}

impl Broker for eventbus_brokers::Tansu {
    fn caps(&self, caps: Caps) -> Caps {
        caps.rejoin_after_churn(false)
    }
}

impl Broker for eventbus_brokers::TansuCluster {
    fn caps(&self, caps: Caps) -> Caps {
        caps.rejoin_after_churn(false)
    }
}

/// A Kafka backend on the broker `G` keeps alive.
pub(crate) struct KafkaHarness<G> {
    broker: G,
    backend: KafkaBackend,
    next: AtomicU64,
}

impl<G: Broker> KafkaHarness<G> {
    /// Connect to `bootstrap`; `broker` is dropped with the harness.
    pub(crate) async fn connect(broker: G, bootstrap: String) -> Self {
        let backend = KafkaBackend::connect(KafkaConfig::new(bootstrap))
            .await
            .expect("connect to the broker");
        KafkaHarness {
            broker,
            backend,
            next: AtomicU64::new(0),
        }
    }
}

impl<G: Broker> Harness for KafkaHarness<G> {
    type Sink = KafkaSink;
    type Sub = KafkaSubscriber;

    fn caps(&self) -> Caps {
        // Group members share partitions, not messages: one member may get every key.
        self.broker.caps(
            Caps::default()
                .members_share_evenly(false)
                .min_ack_wait(Duration::from_secs(1)),
        )
    }

    async fn topic(&self, hint: &str) -> Topic {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{n}.{hint}");
        match self.broker.create_topic(&name, PARTITIONS) {
            Some(r) => r.expect("create topic"),
            None => self
                .backend
                .ensure_topic(&name, PARTITIONS)
                .await
                .expect("create topic"),
        }
        Topic::new(name)
    }

    async fn unroutable_topic(&self) -> Topic {
        Topic::new("no-such-topic")
    }

    async fn sink(&self) -> KafkaSink {
        self.backend.sink().expect("sink")
    }

    async fn subscriber(&self) -> KafkaSubscriber {
        self.backend.subscriber()
    }

    async fn health(&self, timeout: Duration) -> eventbus_core::ops::Health {
        use eventbus_core::ops::HealthCheck;
        self.backend.health(timeout).await
    }
}
