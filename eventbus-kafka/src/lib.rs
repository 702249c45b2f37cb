//! Kafka backend for eventbus (rdkafka). **Not implemented yet**: this crate is an empty
//! placeholder in the workspace layout; see the project README for status.
