//! The shared conformance suite against a real nats-server (2.15, JetStream, file storage),
//! one server per test on a random port, once per publish mode (`async`, `atomic`, `fast`), and
//! against a 3-node cluster with R3 streams (fast mode). A missing nats-server binary fails the
//! test.

use std::time::Duration;

use eventbus_brokers::BrokerKind;
use eventbus_conformance::{BackendHarness, Caps};
use eventbus_nats::{NatsBackend, NatsConfig, PublishMode};

/// A NATS backend in `mode` on a fresh `kind` of broker; streams get one replica per node.
async fn nats(kind: BrokerKind, mode: PublishMode) -> BackendHarness<NatsBackend> {
    let broker = kind
        .start()
        .unwrap_or_else(|e| panic!("cannot start {kind:?}: {e}"));
    let config = NatsConfig::new(broker.address())
        .publish_mode(mode)
        .stream_replicas(broker.nodes());
    let backend = NatsBackend::connect(config)
        .await
        .expect("connect to nats-server");
    BackendHarness::new(backend)
        .keep(broker)
        .caps(Caps::default().min_ack_wait(Duration::from_secs(1)))
        .unroutable("no.stream.here".into())
}

mod async_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(nats(BrokerKind::Nats, PublishMode::Async).await);
}

mod atomic_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(nats(BrokerKind::Nats, PublishMode::Atomic).await);
}

mod fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(nats(BrokerKind::Nats, PublishMode::Fast).await);
}

/// The whole suite on a 3-node cluster with R3 streams, in the default (fast-ingest) mode.
mod cluster_fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(
        nats(BrokerKind::NatsCluster { nodes: 3 }, PublishMode::Fast).await
    );
}
