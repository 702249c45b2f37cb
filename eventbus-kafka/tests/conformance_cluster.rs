//! The shared conformance suite against three tansu brokers over one SQLite file (tansu's
//! brokers are stateless over shared storage), the client given all three as bootstrap
//! servers. A missing tansu binary fails the test.

mod support;

use eventbus_brokers::BrokerKind;

eventbus_conformance::conformance_tests!(
    support::tansu(BrokerKind::TansuCluster { nodes: 3 }).await
);
