//! The shared conformance suite against a real nats-server (2.15, JetStream, file storage), one
//! server per test on a random port, once per publish mode (`async`, `atomic`, `fast`), and
//! against a 3-node cluster with R3 streams (fast mode), each through the facade's `Bus`
//! connected from `EVENTBUS_*` variables. A missing nats-server binary fails the test. The
//! single-server fast-mode client reaches its server through a fault proxy, so
//! `per_key_order_through_a_cut` cuts it; async and atomic mode keep no per-key order through
//! such a cut (see the README), and a cluster's client would reconnect around a proxy on one
//! node, so those run the scenario without the cut.

use eventbus::Bus;
use eventbus_brokers::BrokerKind;
use eventbus_conformance::BackendHarness;
use eventbus_fixture::{Fixture, Select};

async fn nats(select: Select, mode: &str) -> BackendHarness<Bus> {
    Fixture::start(select, &[("EVENTBUS_NATS_PUBLISH_MODE", mode)])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .harness()
}

mod async_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(nats(Select::Broker(BrokerKind::Nats), "async").await);
}

mod atomic_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(
        nats(Select::Broker(BrokerKind::Nats), "atomic").await
    );
}

mod fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(nats(Select::Proxied(BrokerKind::Nats), "fast").await);
}

/// The whole suite on a 3-node cluster with R3 streams, in the default (fast-ingest) mode.
mod cluster_fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(
        nats(Select::Broker(BrokerKind::NatsCluster { nodes: 3 }), "fast").await
    );
}
