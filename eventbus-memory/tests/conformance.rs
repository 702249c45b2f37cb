//! The shared conformance suite against the in-memory backend.

use eventbus_conformance::{Caps, Harness};
use eventbus_core::Topic;
use eventbus_memory::{MemoryBroker, MemorySink, MemorySubscriber};

struct MemoryHarness {
    broker: MemoryBroker,
}

impl Harness for MemoryHarness {
    type Sink = MemorySink;
    type Sub = MemorySubscriber;

    fn caps(&self) -> Caps {
        Caps::default()
    }
    async fn topic(&self, hint: &str) -> Topic {
        Topic::new(format!("t.{hint}"))
    }
    async fn unroutable_topic(&self) -> Topic {
        self.broker.block_topic("nowhere");
        Topic::new("nowhere")
    }
    async fn sink(&self) -> MemorySink {
        self.broker.sink()
    }
    async fn subscriber(&self) -> MemorySubscriber {
        self.broker.subscriber()
    }

    async fn health(&self, timeout: std::time::Duration) -> eventbus_core::ops::Health {
        use eventbus_core::ops::HealthCheck;
        self.broker.health(timeout).await
    }
}

eventbus_conformance::conformance_tests!(MemoryHarness {
    broker: MemoryBroker::new()
});
