//! The conformance harness for the Kafka backend, whichever broker serves it (a tansu process,
//! three of them, librdkafka's mock cluster).

use std::time::Duration;

use eventbus_brokers::{BrokerKind, Tansu, TansuStorage};
use eventbus_conformance::{BackendHarness, Quirks};
use eventbus_kafka::{KafkaBackend, KafkaConfig};

/// How the Kafka-protocol brokers under test differ from the suite's defaults: ack waits of a
/// second or more. (Group members sharing by partition is a capability the backend reports.)
pub(crate) fn quirks() -> Quirks {
    Quirks::default().min_ack_wait(Duration::from_secs(1))
}

/// A Kafka backend connected to `bootstrap`.
pub(crate) async fn harness(bootstrap: String) -> BackendHarness<KafkaBackend> {
    let backend = KafkaBackend::connect(KafkaConfig::new(bootstrap))
        .await
        .expect("connect to the broker");
    BackendHarness::new(backend)
        .quirks(quirks())
        .unroutable("no-such-topic".into())
}

/// A Kafka backend on a fresh `kind` of tansu broker. tansu 0.6.0 keeps a departed group leader
/// in one case (see [`Quirks::rejoin_after_churn`]).
#[allow(dead_code)] // not every test binary that includes this module starts tansu
pub(crate) async fn tansu(kind: BrokerKind) -> BackendHarness<KafkaBackend> {
    let broker = kind
        .start()
        .unwrap_or_else(|e| panic!("cannot start {kind:?}: {e}"));
    harness(broker.address())
        .await
        .keep(broker)
        .quirks(quirks().rejoin_after_churn(false))
}

/// A Kafka backend on a fresh tansu that advertises a fault proxy's port, so every client
/// connection goes through the proxy, and the harness can cut it
/// ([`eventbus_conformance::Harness::cut`]).
#[allow(dead_code)] // not every test binary that includes this module starts tansu
pub(crate) async fn tansu_proxied(storage: TansuStorage) -> BackendHarness<KafkaBackend> {
    use eventbus_brokers::proxy::{FaultProxy, Mode};
    use std::sync::Arc;
    let port = eventbus_brokers::free_port().expect("free port");
    let broker = Tansu::start_advertising(storage, Some(port))
        .unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let upstream = ([127, 0, 0, 1], broker.port()).into();
    let proxy = Arc::new(FaultProxy::start_on(port, upstream).await.expect("proxy"));
    let restore = Arc::clone(&proxy);
    harness(proxy.addr().to_string())
        .await
        .keep(broker)
        .quirks(quirks().rejoin_after_churn(false))
        .fault(
            move || proxy.set(Mode::Hold),
            move || {
                restore.reset();
                restore.set(Mode::Pass);
            },
        )
}
