//! Metric handles, registered once per engine through the `metrics` facade.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `eventbus_batches_total` | counter | `backend`, `trigger` (`count`, `bytes`, `linger`, `immediate`, `flush`) |
//! | `eventbus_batch_messages` | histogram | `backend` |
//! | `eventbus_batch_bytes` | histogram | `backend` |
//! | `eventbus_in_flight_messages` | gauge | `backend` |
//! | `eventbus_ack_latency_seconds` | histogram | `backend` |
//! | `eventbus_publish_outcomes_total` | counter | `backend`, `outcome` (`acked`, `failed`, `unknown`) |
//! | `eventbus_publish_rejected_total` | counter | `backend`, `reason` (`invalid`, `overloaded`) |

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

#[derive(Clone, Copy)]
pub(crate) enum Trigger {
    Count,
    Bytes,
    Linger,
    Immediate,
    Flush,
    /// The ACK window is full: nothing more can be admitted until this batch is acked, so
    /// lingering would only add latency.
    Window,
}

pub(crate) struct EngineMetrics {
    batches: [Counter; 6],
    pub(crate) batch_messages: Histogram,
    pub(crate) batch_bytes: Histogram,
    pub(crate) in_flight: Gauge,
    pub(crate) ack_latency: Histogram,
    pub(crate) acked: Counter,
    pub(crate) failed: Counter,
    pub(crate) unknown: Counter,
    pub(crate) invalid: Counter,
    pub(crate) overloaded: Counter,
}

impl EngineMetrics {
    pub(crate) fn new(backend: &'static str) -> Self {
        let b = |t: Trigger| counter!("eventbus_batches_total", "backend" => backend, "trigger" => t.label());
        let o = |t: &'static str| counter!("eventbus_publish_outcomes_total", "backend" => backend, "outcome" => t);
        let r = |t: &'static str| counter!("eventbus_publish_rejected_total", "backend" => backend, "reason" => t);
        EngineMetrics {
            batches: [
                b(Trigger::Count),
                b(Trigger::Bytes),
                b(Trigger::Linger),
                b(Trigger::Immediate),
                b(Trigger::Flush),
                b(Trigger::Window),
            ],
            batch_messages: histogram!("eventbus_batch_messages", "backend" => backend),
            batch_bytes: histogram!("eventbus_batch_bytes", "backend" => backend),
            in_flight: gauge!("eventbus_in_flight_messages", "backend" => backend),
            ack_latency: histogram!("eventbus_ack_latency_seconds", "backend" => backend),
            acked: o("acked"),
            failed: o("failed"),
            unknown: o("unknown"),
            invalid: r("invalid"),
            overloaded: r("overloaded"),
        }
    }

    pub(crate) fn batches(&self, t: Trigger) -> &Counter {
        &self.batches[t as usize]
    }
}

impl Trigger {
    /// The label used in metrics and spans.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Trigger::Count => "count",
            Trigger::Bytes => "bytes",
            Trigger::Linger => "linger",
            Trigger::Immediate => "immediate",
            Trigger::Flush => "flush",
            Trigger::Window => "window",
        }
    }
}
