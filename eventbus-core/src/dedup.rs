//! Consumer-side de-duplication: at-least-once delivery plus retried publishes can store one
//! message twice (Kafka has no broker-side de-duplication by id; NATS only within the stream's
//! duplicate window). [`Subscription::dedup`] hands each message id to the handler once.
//!
//! ```no_run
//! use std::time::Duration;
//! use eventbus_core::{DedupConfig, SubscribeSpec, Subscriber};
//! # async fn demo(subscriber: impl Subscriber) -> Result<(), eventbus_core::Error> {
//! let sub = subscriber
//!     .subscribe(SubscribeSpec::new("orders").group("billing"))
//!     .await?
//!     .dedup(DedupConfig::default().capacity(100_000).max_age(Duration::from_secs(600)));
//! # drop(sub); Ok(()) }
//! ```
//!
//! # Semantics
//! - A delivery whose id was already seen *at another position* (another stored copy) within
//!   the window is acked and not handed over; the metric `eventbus_dedup_skipped_total` counts
//!   it. The first copy stays stored until it is acked, so skipping the second loses nothing:
//!   if the first copy's handling fails, the first copy is redelivered.
//! - A redelivery of the same copy (same position: nack, ack wait, restart) is handed over
//!   again, so at-least-once handling is kept.
//! - The window is bounded by `capacity` ids and by `max_age`; the oldest ids leave first. A
//!   copy that arrives after its id left the window is handed over.
//! - The window is per subscription (per process): members of one group that receive the two
//!   copies each handle one. Keys (Kafka) or a stream's own duplicate window (NATS) keep copies
//!   of one message together on one member.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::outcome::Position;
use crate::subscriber::{Delivery, Layer, Step, Subscription};

/// How many message ids [`Subscription::dedup`] remembers, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DedupConfig {
    /// Most ids remembered. Default 100,000.
    pub capacity: usize,
    /// How long an id is remembered. Default 10 minutes: longer than a publish's retry horizon
    /// with the default ack timeouts (30 s) and NATS's default duplicate window (2 minutes).
    pub max_age: Duration,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            capacity: 100_000,
            max_age: Duration::from_secs(600),
        }
    }
}

impl DedupConfig {
    /// Set the capacity (at least 1).
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }
    /// Set the maximum age.
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }
}

/// What [`Window::check`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time (or a redelivery of the same copy): hand it over.
    New,
    /// Another copy of an id in the window: settle it without handling.
    Duplicate,
}

/// The remembered ids: first position and when it was seen, oldest first.
pub(crate) struct Window {
    cfg: DedupConfig,
    seen: HashMap<String, (Position, Instant)>,
    order: VecDeque<(String, Instant)>,
}

impl Window {
    pub(crate) fn new(cfg: DedupConfig) -> Self {
        Window {
            cfg,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn check(&mut self, id: &str, at: &Position, now: Instant) -> Seen {
        self.expire(now);
        if let Some((first, _)) = self.seen.get(id) {
            return if first == at {
                Seen::New
            } else {
                Seen::Duplicate
            };
        }
        self.seen.insert(id.to_owned(), (at.clone(), now));
        self.order.push_back((id.to_owned(), now));
        while self.seen.len() > self.cfg.capacity {
            self.pop_oldest();
        }
        Seen::New
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, t)| now.duration_since(*t) > self.cfg.max_age)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((id, t)) = self.order.pop_front()
            && self.seen.get(&id).is_some_and(|(_, seen)| *seen == t)
        {
            self.seen.remove(&id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

impl Subscription {
    /// Hand each message id over once (see [`crate::dedup`]): later copies of an id already
    /// seen at another position are acked and skipped; redeliveries of the same copy pass.
    pub fn dedup(self, cfg: DedupConfig) -> Subscription {
        self.layer(Window::new(cfg))
    }
}

impl Layer for Window {
    fn step(&mut self, d: Delivery) -> Step {
        match self.check(
            &d.message().id().to_string(),
            &d.info().position,
            Instant::now(),
        ) {
            Seen::New => Step::Pass(d),
            Seen::Duplicate => Step::Aside(Box::pin(async move {
                metrics::counter!("eventbus_dedup_skipped_total").increment(1);
                tracing::debug!(id = %d.message().id(), "duplicate copy skipped");
                if let Err(e) = d.ack().await {
                    tracing::warn!(error = %e, "ack of a skipped duplicate failed");
                }
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: i64) -> Position {
        Position::Partition {
            partition: 0,
            offset,
        }
    }

    #[test]
    fn copies_skipped_redeliveries_kept_window_bounded() {
        let mut w = Window::new(
            DedupConfig::default()
                .capacity(2)
                .max_age(Duration::from_secs(10)),
        );
        let t0 = Instant::now();
        assert_eq!(w.check("a", &at(1), t0), Seen::New);
        assert_eq!(
            w.check("a", &at(1), t0),
            Seen::New,
            "redelivery of the same copy"
        );
        assert_eq!(w.check("a", &at(7), t0), Seen::Duplicate, "another copy");
        assert_eq!(w.check("b", &at(2), t0), Seen::New);
        assert_eq!(w.check("c", &at(3), t0), Seen::New);
        assert_eq!(w.len(), 2, "capacity");
        assert_eq!(w.check("a", &at(8), t0), Seen::New, "a left the window");
        let later = t0 + Duration::from_secs(11);
        assert_eq!(w.check("d", &at(4), later), Seen::New);
        assert_eq!(w.len(), 1, "older ids expired");
    }
}
