//! Batching and window configuration.

use std::time::Duration;

use eventbus_core::{Error, ErrorKind, SinkLimits};
use serde::{Deserialize, Serialize};

/// What `publish` does when the ACK window is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnFull {
    /// Wait for room (default): backpressure.
    #[default]
    Wait,
    /// Wait at most this long, then fail with [`ErrorKind::Overloaded`].
    #[serde(with = "eventbus_core::serde_millis")]
    WaitFor(Duration),
    /// Fail at once with [`ErrorKind::Overloaded`].
    Error,
}

/// Flush policy and ACK window of a [`Batcher`](crate::Batcher).
///
/// A batch is sent when the **first** of these fires: `linger` elapsed since its first message,
/// `max_messages` reached, `max_bytes` reached. With `linger = 0` (the default) a batch goes out
/// as soon as the engine is free to send it, so batches stay small at low load (low latency)
/// and grow under load (natural batching).
///
/// The ACK window bounds what is admitted but not yet resolved: at most `max_in_flight`
/// messages **and** `max_in_flight_bytes` bytes. That bounds memory when a broker stalls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BatchConfig {
    /// Longest a message waits for its batch to fill. Default 0 (natural batching).
    #[serde(with = "eventbus_core::serde_millis")]
    pub linger: Duration,
    /// Most messages per batch. Default 1,000 (clamped to the backend's limit).
    pub max_messages: usize,
    /// Most bytes per batch. Default 1 MiB (clamped to the backend's limit).
    pub max_bytes: usize,
    /// Most messages admitted and not yet resolved. Default 16,384.
    pub max_in_flight: usize,
    /// Most bytes admitted and not yet resolved. Default 64 MiB.
    pub max_in_flight_bytes: usize,
    /// Most batches sent and not yet resolved. Default 64 (clamped to the backend's limit).
    pub max_in_flight_batches: usize,
    /// Deadline for each message, from admission: past it the message resolves as
    /// [`Outcome::Unknown`](eventbus_core::Outcome::Unknown) and its slot is freed. Default 30 s.
    #[serde(with = "eventbus_core::serde_millis")]
    pub ack_timeout: Duration,
    /// Behaviour when the window is full. Default [`OnFull::Wait`].
    pub on_full: OnFull,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            linger: Duration::ZERO,
            max_messages: 1_000,
            max_bytes: 1 << 20,
            max_in_flight: 16_384,
            max_in_flight_bytes: 64 << 20,
            max_in_flight_batches: 64,
            ack_timeout: Duration::from_secs(30),
            on_full: OnFull::Wait,
        }
    }
}

impl BatchConfig {
    /// Set `linger`.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }
    /// Set `max_messages`.
    pub fn max_messages(mut self, n: usize) -> Self {
        self.max_messages = n;
        self
    }
    /// Set `max_bytes`.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }
    /// Set `max_in_flight`.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }
    /// Set `max_in_flight_bytes`.
    pub fn max_in_flight_bytes(mut self, n: usize) -> Self {
        self.max_in_flight_bytes = n;
        self
    }
    /// Set `max_in_flight_batches`.
    pub fn max_in_flight_batches(mut self, n: usize) -> Self {
        self.max_in_flight_batches = n;
        self
    }
    /// Set `ack_timeout`.
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self
    }
    /// Set `on_full`.
    pub fn on_full(mut self, o: OnFull) -> Self {
        self.on_full = o;
        self
    }

    /// Validate and clamp to the backend's limits. Errors name the bad field.
    pub fn resolve(&self, limits: &SinkLimits) -> Result<BatchConfig, Error> {
        let mut c = self.clone();
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::new(
                    ErrorKind::Config,
                    format!("batch config: `{name}` must be at least 1"),
                ))
            } else {
                Ok(())
            }
        };
        positive("max_messages", c.max_messages)?;
        positive("max_bytes", c.max_bytes)?;
        positive("max_in_flight", c.max_in_flight)?;
        positive("max_in_flight_bytes", c.max_in_flight_bytes)?;
        positive("max_in_flight_batches", c.max_in_flight_batches)?;
        if c.ack_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "batch config: `ack_timeout` must be positive",
            ));
        }
        if let Some(m) = limits.max_batch_messages {
            c.max_messages = c.max_messages.min(m);
        }
        if let Some(m) = limits.max_batch_bytes {
            c.max_bytes = c.max_bytes.min(m);
        }
        if let Some(m) = limits.max_inflight_batches {
            c.max_in_flight_batches = c.max_in_flight_batches.min(m);
        }
        // Semaphores count in u32 per acquisition and at most usize::MAX >> 3 in total.
        c.max_in_flight = c.max_in_flight.min(u32::MAX as usize);
        c.max_in_flight_bytes = c.max_in_flight_bytes.min(u32::MAX as usize);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_clamps_and_names_bad_fields() {
        let limits = SinkLimits::none()
            .max_batch_messages(10)
            .max_inflight_batches(2);
        let c = BatchConfig::default().resolve(&limits).unwrap();
        assert_eq!(c.max_messages, 10);
        assert_eq!(c.max_in_flight_batches, 2);
        let e = BatchConfig::default()
            .max_in_flight(0)
            .resolve(&limits)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("max_in_flight"));
        let e = BatchConfig::default()
            .ack_timeout(Duration::ZERO)
            .resolve(&limits)
            .unwrap_err();
        assert!(e.to_string().contains("ack_timeout"));
    }
}
