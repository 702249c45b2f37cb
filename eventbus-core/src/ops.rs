//! Operating a bus: consumer lag (with a threshold watch and a metric) and health checks (a
//! backend's connectivity, and an end-to-end heartbeat through a real topic).
//!
//! ```no_run
//! # async fn demo<S: eventbus_core::Subscriber + Clone + 'static>(sub: S) {
//! use std::time::Duration;
//! use eventbus_core::{Topic, ops::{LagWatch, LagEvent}};
//! // Poll the lag of group "billing" every 5 s; call back when it crosses 10,000 either way.
//! let watch = LagWatch::start(sub, Topic::new("orders.created"), "billing",
//!     Duration::from_secs(5), 10_000, |e: LagEvent| eprintln!("lag: {e:?}"));
//! // ... dropping `watch` stops it.
//! # drop(watch); }
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind};
use crate::message::{Message, Topic};
use crate::publisher::Publisher;
use crate::subscriber::{StartFrom, SubscribeSpec, Subscriber};

/// How far a consumer group is behind on a topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lag {
    /// Stored messages not yet handed to the group (Kafka: high watermark minus committed
    /// offset, summed over partitions; JetStream: the consumer's pending count).
    pub pending: u64,
    /// Messages handed to the group but not yet acknowledged (JetStream: ack pending; Kafka
    /// counts them in `pending` until their offsets are committed).
    pub unacked: u64,
}

impl Lag {
    /// A lag of `pending` not yet delivered and `unacked` delivered but unacknowledged.
    pub fn new(pending: u64, unacked: u64) -> Self {
        Lag { pending, unacked }
    }

    /// Everything the group still has to get through.
    pub fn total(&self) -> u64 {
        self.pending + self.unacked
    }
}

/// Edge detector for threshold callbacks ([`LagWatch`], the batch engine's backlog watch): fed
/// one reading at a time, it tells when the reading crosses the threshold either way. It starts
/// below, so a first reading at or above the threshold counts as a crossing and one below does
/// not.
///
/// ```
/// use eventbus_core::ops::Crossing;
/// let mut c = Crossing::default();
/// assert_eq!(c.update(false), None);
/// assert_eq!(c.update(true), Some(true));
/// assert_eq!(c.update(true), None);
/// assert_eq!(c.update(false), Some(false));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crossing {
    above: bool,
}

impl Crossing {
    /// Feed whether the reading is at or above the threshold: `Some(true)` when it just went
    /// up across it, `Some(false)` when it just fell below, `None` otherwise.
    pub fn update(&mut self, above: bool) -> Option<bool> {
        let crossed = above != self.above;
        self.above = above;
        crossed.then_some(above)
    }
}

/// What a [`LagWatch`] reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum LagEvent {
    /// The lag reached the threshold (it was below, or this is the first reading).
    Above(Lag),
    /// The lag fell below the threshold again.
    Below(Lag),
    /// Reading the lag failed (the watch keeps polling).
    Unavailable(Error),
}

/// Polls [`Subscriber::lag`] for one group and topic, publishes it as the gauge
/// `eventbus_consumer_lag{topic, group}` and calls back when it crosses a threshold. Stops when
/// dropped.
#[derive(Debug)]
pub struct LagWatch {
    task: tokio::task::JoinHandle<()>,
}

impl LagWatch {
    /// Start polling every `every`; `on_event` runs on the watch's task.
    pub fn start<S, F>(
        subscriber: S,
        topic: Topic,
        group: impl Into<String>,
        every: Duration,
        threshold: u64,
        mut on_event: F,
    ) -> LagWatch
    where
        S: Subscriber + 'static,
        F: FnMut(LagEvent) + Send + 'static,
    {
        let group = group.into();
        let task = tokio::spawn(async move {
            let gauge = metrics::gauge!(
                "eventbus_consumer_lag",
                "topic" => topic.as_str().to_owned(),
                "group" => group.clone()
            );
            let mut crossing = Crossing::default();
            let mut failing = false;
            loop {
                match subscriber.lag(&topic, &group).await {
                    Ok(lag) => {
                        failing = false;
                        gauge.set(lag.total() as f64);
                        match crossing.update(lag.total() >= threshold) {
                            Some(true) => on_event(LagEvent::Above(lag)),
                            Some(false) => on_event(LagEvent::Below(lag)),
                            None => {}
                        }
                    }
                    Err(e) => {
                        if !failing {
                            on_event(LagEvent::Unavailable(e));
                        }
                        failing = true;
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        LagWatch { task }
    }
}

impl Drop for LagWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend's view of its own health, for liveness and readiness probes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// `"nats"`, `"kafka"`, `"memory"`.
    pub backend: &'static str,
    /// The broker answered.
    pub up: bool,
    /// How long the check's round trip took.
    pub latency: Duration,
    /// What was checked, or why it failed (no secrets).
    pub detail: String,
}

impl Health {
    /// A healthy report.
    pub fn up(backend: &'static str, latency: Duration, detail: impl Into<String>) -> Self {
        Health {
            backend,
            up: true,
            latency,
            detail: detail.into(),
        }
    }

    /// An unhealthy report.
    pub fn down(backend: &'static str, latency: Duration, detail: impl Into<String>) -> Self {
        Health {
            backend,
            up: false,
            latency,
            detail: detail.into(),
        }
    }
}

/// Backends that can check their connection to the broker.
///
/// # Contract
/// `health` never fails and never hangs past `timeout` (plus scheduling slack): a broker that
/// does not answer in time is reported down.
pub trait HealthCheck: Send + Sync {
    /// Ask the broker for a round trip (NATS: a server ping; Kafka: cluster metadata).
    fn health(&self, timeout: Duration) -> impl Future<Output = Health> + Send;
}

/// End-to-end heartbeat: publish one message to `topic` and wait until a fresh subscriber
/// receives it. Returns the round trip. Use a topic of its own (with short retention): old
/// heartbeats on it are skipped.
pub async fn heartbeat<P: Publisher, S: Subscriber>(
    publisher: &P,
    subscriber: &S,
    topic: &Topic,
    timeout: Duration,
) -> Result<Duration, Error> {
    let deadline = Instant::now() + timeout;
    let timed_out = || Error::new(ErrorKind::Timeout, "heartbeat timed out").temporary();
    let within = |d: Instant| d.saturating_duration_since(Instant::now());
    let start = Instant::now();
    let mut sub = tokio::time::timeout(
        within(deadline),
        subscriber.subscribe(
            SubscribeSpec::new(topic.clone())
                .start(StartFrom::Earliest)
                .prefetch(64),
        ),
    )
    .await
    .map_err(|_| timed_out())??;
    let beat = Message::new(topic.clone(), "heartbeat");
    let id = beat.id().clone();
    let pending = tokio::time::timeout(within(deadline), publisher.publish(beat))
        .await
        .map_err(|_| timed_out())??;
    tokio::time::timeout(within(deadline), pending)
        .await
        .map_err(|_| timed_out())?
        .into_result()?;
    let found = tokio::time::timeout(within(deadline), async {
        while let Some(d) = sub.next().await {
            let d = d?;
            let mine = d.message().id() == &id;
            d.ack().await?;
            if mine {
                return Ok(true);
            }
        }
        Ok::<bool, Error>(false)
    })
    .await;
    sub.close().await;
    match found {
        Ok(Ok(true)) => Ok(start.elapsed()),
        Ok(Ok(false)) => Err(Error::closed("heartbeat subscription ended")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(timed_out()),
    }
}
