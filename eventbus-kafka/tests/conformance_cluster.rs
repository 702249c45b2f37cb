//! The shared conformance suite against three tansu brokers over one SQLite file (tansu's
//! brokers are stateless over shared storage), the client given all three as bootstrap
//! servers. A missing tansu binary fails the test.

mod support;

use eventbus_brokers::TansuCluster;
use support::KafkaHarness;

async fn cluster() -> KafkaHarness<TansuCluster> {
    let brokers =
        TansuCluster::start(3).unwrap_or_else(|e| panic!("cannot start 3 tansu brokers: {e}"));
    let bootstrap = brokers.bootstrap();
    KafkaHarness::connect(brokers, bootstrap).await
}

eventbus_conformance::conformance_tests!(cluster().await);
