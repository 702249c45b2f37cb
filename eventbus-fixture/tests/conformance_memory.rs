//! The shared conformance suite against the in-memory backend, through the facade's `Bus`.

use eventbus_fixture::{Fixture, Select};

eventbus_conformance::conformance_tests!(
    Fixture::start(Select::Memory, &[])
        .await
        .expect("memory backend")
        .harness()
);
