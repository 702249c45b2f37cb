//! The shared conformance suite against a real tansu broker (Kafka protocol, SQLite storage),
//! one broker per test on its own port. A missing tansu binary fails the test.
//!
//! Why SQLite and not tansu's faster memory engine: tansu 0.6.0's memory (dynostore) engine
//! answers a fetch from an offset inside a record batch with only the batches that *start* at
//! or after it (`offsets.split_off(&offset)` in `tansu-storage/src/dynostore.rs`), so a consumer
//! resuming mid-batch (after a commit, a pause or a rebalance) skips the rest of that batch or
//! stalls. Kafka itself returns the batch containing the offset; tansu's SQLite engine does too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_brokers::{Tansu, TansuStorage};
use eventbus_conformance::{Caps, Harness};
use eventbus_core::Topic;
use eventbus_kafka::{KafkaBackend, KafkaConfig, KafkaSink, KafkaSubscriber};

/// Partitions per test topic: enough for two group members to share.
const PARTITIONS: i32 = 3;

struct KafkaHarness {
    _broker: Tansu,
    backend: KafkaBackend,
    next: AtomicU64,
}

impl KafkaHarness {
    async fn start() -> Self {
        let broker = Tansu::start(TansuStorage::Sqlite)
            .unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
        let backend = KafkaBackend::connect(KafkaConfig::new(broker.bootstrap()))
            .await
            .expect("connect to tansu");
        KafkaHarness {
            _broker: broker,
            backend,
            next: AtomicU64::new(0),
        }
    }
}

impl Harness for KafkaHarness {
    type Sink = KafkaSink;
    type Sub = KafkaSubscriber;

    fn caps(&self) -> Caps {
        // Group members share partitions, not messages: one member may get every key.
        Caps::default()
            .members_share_evenly(false)
            .min_ack_wait(Duration::from_secs(1))
    }

    async fn topic(&self, hint: &str) -> Topic {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{n}.{hint}");
        self.backend
            .ensure_topic(&name, PARTITIONS)
            .await
            .expect("create topic");
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

    async fn health(&self, timeout: std::time::Duration) -> eventbus_core::ops::Health {
        use eventbus_core::ops::HealthCheck;
        self.backend.health(timeout).await
    }
}

eventbus_conformance::conformance_tests!(KafkaHarness::start().await);
