//! The shared conformance suite against the in-memory backend.

use eventbus_conformance::BackendHarness;
use eventbus_core::Topic;
use eventbus_memory::MemoryBroker;

fn memory() -> BackendHarness<MemoryBroker> {
    let broker = MemoryBroker::new();
    broker.block_topic("nowhere");
    BackendHarness::new(broker).unroutable(Topic::new("nowhere"))
}

eventbus_conformance::conformance_tests!(memory());
