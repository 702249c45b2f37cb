//! The shared conformance suite against three tansu brokers over one SQLite file (tansu's
//! brokers are stateless over shared storage), the client given all three as bootstrap
//! servers, through the facade's `Bus`. A missing tansu binary fails the test.

use eventbus_brokers::BrokerKind;
use eventbus_fixture::{Fixture, Select};

eventbus_conformance::conformance_tests!(
    Fixture::start(Select::Broker(BrokerKind::TansuCluster { nodes: 3 }), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .harness()
);
