//! The shared conformance suite against a real nats-server (2.15, JetStream, file storage),
//! one server per test on a random port, once per publish mode (`async`, `atomic`, `fast`). A missing
//! nats-server binary fails the test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_brokers::NatsServer;
use eventbus_conformance::{Caps, Harness};
use eventbus_core::Topic;
use eventbus_nats::{
    NatsBackend, NatsConfig, NatsSink, NatsSubscriber, PublishMode, SinkOptions, StreamSpec,
};

struct NatsHarness {
    _server: NatsServer,
    backend: NatsBackend,
    mode: PublishMode,
    next: AtomicU64,
}

impl NatsHarness {
    async fn start(mode: PublishMode) -> Self {
        let server =
            NatsServer::start().unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        let backend = NatsBackend::connect(NatsConfig::new(server.url()))
            .await
            .expect("connect to nats-server");
        NatsHarness {
            _server: server,
            backend,
            mode,
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
