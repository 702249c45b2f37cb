//! Jepsen-style reliability checks for eventbus, against real brokers on loopback.
//!
//! - [`record`]: test messages that carry a producer id, a sequence number and a payload hash,
//!   with stable ids so a retry after an unknown outcome reuses them;
//! - [`check`]: the ledger of every publish outcome, the load driver, the drain (a fresh
//!   consumer reads back what the broker holds) and the checker: **lost** (acked, never read),
//!   **failed-but-stored**, duplicates, reorders within a producer, corrupt payloads;
//! - [`proxy`]: an in-process TCP fault proxy (delay, bandwidth cap, blackhole without RST,
//!   reset, cut mid-frame);
//! - [`tls_proxy`]: a TLS-terminating proxy (tansu has no TLS listener of its own);
//! - [`target`]: a broker process (nats-server, tansu) with kill -9 / SIGSTOP / SIGCONT /
//!   restart on the same store, and the backend's sink and subscriber;
//! - [`raw`]: the raw clients (no SDK), driven through the same ledger for comparison rows;
//! - [`scenario`]: the fault scenarios; `cargo xtask reliability` runs them all and prints the
//!   table (`--quick` is the CI subset);
//! - [`plan`]: the scenarios and targets the command line names, typed, and which runs where.
//!
//! ```
//! use eventbus_reliability::check::{check, Ledger};
//! use eventbus_reliability::record;
//!
//! let m = record::message("run1", "orders.created", 0, 7, 64);
//! let read = record::read(&m).expect("a test message");
//! assert!(read.intact);
//! // Nothing published, one message read: nothing lost, nothing failed-but-stored.
//! let f = check(&Ledger::default(), &[read], 0);
//! assert_eq!((f.lost, f.failed_but_stored, f.stored), (0, 0, 1));
//! ```

pub mod check;
pub mod facade_probe;
pub mod plan;
pub use eventbus_brokers::proxy;
pub mod raw;
pub mod record;
pub mod scenario;
pub mod target;
pub mod tls_proxy;
