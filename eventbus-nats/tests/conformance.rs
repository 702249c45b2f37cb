//! The shared conformance suite against a real nats-server (2.15, JetStream, file storage),
//! one server per test on a random port, once per publish mode (`async`, `atomic`, `fast`), and
//! against a 3-node cluster with R3 streams (fast mode). A missing nats-server binary fails the
//! test. The single-server fast-mode client reaches its server through a fault proxy, so
//! `per_key_order_through_a_cut` cuts it; async and atomic mode keep no per-key order through
//! such a cut (see the README), and a cluster's client would reconnect around a proxy on one
//! node, so those run the scenario without the cut.

use std::time::Duration;

use std::sync::Arc;

use eventbus_brokers::BrokerKind;
use eventbus_brokers::proxy::{FaultProxy, Mode};
use eventbus_conformance::{BackendHarness, Quirks};
use eventbus_nats::{NatsBackend, NatsConfig, PublishMode};

/// A NATS backend in `mode` on a fresh `kind` of broker; streams get one replica per node.
/// `proxied`: the client connects through a fault proxy the harness can cut.
async fn nats(kind: BrokerKind, mode: PublishMode, proxied: bool) -> BackendHarness<NatsBackend> {
    let broker = kind
        .start()
        .unwrap_or_else(|e| panic!("cannot start {kind:?}: {e}"));
    let proxy = match proxied {
        true => {
            let upstream = broker
                .address()
                .trim_start_matches("nats://")
                .parse()
                .expect("addr");
            Some(Arc::new(FaultProxy::start(upstream).await.expect("proxy")))
        }
        false => None,
    };
    let address = match &proxy {
        Some(p) => format!("nats://{}", p.addr()),
        None => broker.address(),
    };
    let config = NatsConfig::new(address)
        .publish_mode(mode)
        .stream_replicas(broker.nodes());
    let backend = NatsBackend::connect(config)
        .await
        .expect("connect to nats-server");
    let harness = BackendHarness::new(backend)
        .keep(broker)
        .quirks(Quirks::default().min_ack_wait(Duration::from_secs(1)))
        .unroutable("no.stream.here".into());
    match proxy {
        Some(p) => {
            let q = Arc::clone(&p);
            harness.fault(
                move || p.set(Mode::Hold),
                move || {
                    q.reset();
                    q.set(Mode::Pass);
                },
            )
        }
        None => harness,
    }
}

mod async_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(
        nats(BrokerKind::Nats, PublishMode::Async, false).await
    );
}

mod atomic_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(
        nats(BrokerKind::Nats, PublishMode::Atomic, false).await
    );
}

mod fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(nats(BrokerKind::Nats, PublishMode::Fast, true).await);
}

/// The whole suite on a 3-node cluster with R3 streams, in the default (fast-ingest) mode.
mod cluster_fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(
        nats(
            BrokerKind::NatsCluster { nodes: 3 },
            PublishMode::Fast,
            false
        )
        .await
    );
}
