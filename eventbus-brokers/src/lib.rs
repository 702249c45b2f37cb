#![doc = include_str!("../README.md")]
#![allow(clippy::print_stderr)] // progress output while installing is the point

mod broker;
mod install;
mod nats;
mod postgres;
mod process;
#[cfg(feature = "proxy")]
pub mod proxy;
mod tansu;
#[cfg(feature = "tls")]
pub mod tls;

pub use broker::{BrokerKind, Protocol, TestBroker};
pub use install::{
    NATS_VERSION, TANSU_VERSION, cache_dir, install_nats, install_tansu, nats_server_path,
    tansu_path,
};
pub use nats::{NatsCluster, NatsClusterPlan, NatsOptions, NatsServer};
pub use postgres::{POSTGRES_USER, Postgres, postgres_bin_dir};
pub use process::{free_port, http_get, panic_in_log, panics_in_log, wait_for_port};
pub use tansu::{Tansu, TansuCluster, TansuStorage};
