//! The shared conformance suite against a real tansu broker (Kafka protocol, SQLite storage),
//! one broker per test on its own port, reached through a fault proxy (tansu advertises the
//! proxy's port) so that `per_key_order_through_a_cut` can cut the connections, through the
//! facade's `Bus`. A missing tansu binary fails the test.
//!
//! Why SQLite and not tansu's faster memory engine: tansu 0.6.0's memory (dynostore) engine
//! answers a fetch from an offset inside a record batch with only the batches that *start* at
//! or after it (`offsets.split_off(&offset)` in `tansu-storage/src/dynostore.rs`), so a consumer
//! resuming mid-batch (after a commit, a pause or a rebalance) skips the rest of that batch or
//! stalls. Kafka itself returns the batch containing the offset; tansu's SQLite engine does too.

use eventbus_brokers::{BrokerKind, TansuStorage};
use eventbus_fixture::{Fixture, Select};

eventbus_conformance::conformance_tests!(
    Fixture::start(
        Select::Proxied(BrokerKind::Tansu(TansuStorage::Sqlite)),
        &[]
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .harness()
);
