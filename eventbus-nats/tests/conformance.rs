//! The shared conformance suite against a real nats-server (2.15, JetStream, file storage),
//! one server per test on a random port, once per publish mode (`async`, `atomic`, `fast`), and
//! against a 3-node cluster with R3 streams (fast mode). A missing nats-server binary fails the
//! test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_brokers::{NatsCluster, NatsServer};
use eventbus_conformance::{Caps, Harness};
use eventbus_core::Topic;
use eventbus_nats::{
    NatsBackend, NatsConfig, NatsSink, NatsSubscriber, PublishMode, SinkOptions, StreamSpec,
};

/// What serves a harness (kept alive, killed on drop): one server, or a cluster.
enum Broker {
    Single(#[allow(dead_code)] NatsServer),
    Cluster(#[allow(dead_code)] NatsCluster),
}

struct NatsHarness {
    _broker: Broker,
    backend: NatsBackend,
    mode: PublishMode,
    /// Stream replicas: 3 on a cluster.
    replicas: usize,
    next: AtomicU64,
}

impl NatsHarness {
    async fn start(mode: PublishMode) -> Self {
        let server =
            NatsServer::start().unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        Self::connect(server.url(), Broker::Single(server), mode, 1).await
    }

    /// A 3-node cluster, R3 streams, the client given every node as a seed.
    async fn cluster(mode: PublishMode) -> Self {
        let cluster =
            NatsCluster::start(3).unwrap_or_else(|e| panic!("cannot start a NATS cluster: {e}"));
        Self::connect(cluster.urls(), Broker::Cluster(cluster), mode, 3).await
    }

    async fn connect(url: String, broker: Broker, mode: PublishMode, replicas: usize) -> Self {
        let backend = NatsBackend::connect(NatsConfig::new(url))
            .await
            .expect("connect to nats-server");
        NatsHarness {
            _broker: broker,
            backend,
            mode,
            replicas,
            next: AtomicU64::new(0),
        }
    }
}

impl Harness for NatsHarness {
    type Sink = NatsSink;
    type Sub = NatsSubscriber;

    fn caps(&self) -> Caps {
        Caps::default().min_ack_wait(Duration::from_secs(1))
    }

    async fn topic(&self, hint: &str) -> Topic {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let subject = format!("t{n}.{hint}");
        let stream = format!("S{n}_{hint}");
        self.backend
            .ensure_stream(
                &StreamSpec::new(stream, [subject.clone()])
                    .replicas(self.replicas)
                    .allow_atomic(self.mode == PublishMode::Atomic)
                    .allow_batched(self.mode == PublishMode::Fast),
            )
            .await
            .expect("ensure stream");
        Topic::new(subject)
    }

    async fn unroutable_topic(&self) -> Topic {
        Topic::new("no.stream.here")
    }

    async fn sink(&self) -> NatsSink {
        self.backend
            .sink_with(SinkOptions::default().mode(self.mode))
            .await
            .expect("sink")
    }

    async fn subscriber(&self) -> NatsSubscriber {
        self.backend.subscriber()
    }

    async fn health(&self, timeout: std::time::Duration) -> eventbus_core::ops::Health {
        use eventbus_core::ops::HealthCheck;
        self.backend.health(timeout).await
    }
}

mod async_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(NatsHarness::start(PublishMode::Async).await);
}

mod atomic_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(NatsHarness::start(PublishMode::Atomic).await);
}

mod fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(NatsHarness::start(PublishMode::Fast).await);
}

/// The whole suite on a 3-node cluster with R3 streams, in the default (fast-ingest) mode.
mod cluster_fast_mode {
    use super::*;
    eventbus_conformance::conformance_tests!(NatsHarness::cluster(PublishMode::Fast).await);
}
