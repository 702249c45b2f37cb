//! # eventbus
//!
//! One entry point to the SDK: a [`BusConfig`] (TOML file and `EVENTBUS_*` variables) picks
//! the backend, [`Bus::connect`] connects it, and the bus builds publishers (the batching
//! engine over the backend's sink) and subscribers. Backends are features (`nats` and
//! `memory` by default, `kafka`): a service that uses
//! `eventbus = { default-features = false, features = ["nats"] }` never compiles librdkafka.
//!
//! ```no_run
//! # async fn demo() -> Result<(), eventbus::Error> {
//! use std::time::Duration;
//! use eventbus::{Bus, BusConfig, Message, Publisher, SubscribeSpec, Subscriber};
//!
//! // eventbus.toml, then EVENTBUS_* on top (EVENTBUS_NATS_URL, EVENTBUS_BATCH_MAX_IN_FLIGHT, ...)
//! let config = BusConfig::load(Some("eventbus.toml".as_ref()))?;
//! let bus = Bus::connect(&config).await?;
//! let publisher = bus.publisher().await?;
//! publisher.publish(Message::new("orders.created", "{}")).await?.await.into_result()?;
//! let mut sub = bus.subscriber().subscribe(SubscribeSpec::new("orders.created").group("billing")).await?;
//! let health = bus.health(Duration::from_secs(2)).await;
//! assert!(health.up);
//! publisher.close(Duration::from_secs(5)).await?;
//! # let _ = sub.next().await; Ok(()) }
//! ```

#[cfg(not(any(feature = "nats", feature = "kafka", feature = "memory")))]
compile_error!("enable at least one backend feature of `eventbus`: nats, kafka or memory");

mod config;

use std::time::Duration;

pub use eventbus_batch::{BacklogEvent, BacklogWatch, BatchConfig, Batcher, OnFull, WindowStats};
use eventbus_core::ops::{Health, HealthCheck, Lag};
/// Everything from `eventbus-core` (messages, the traits, errors, the handler runtime, lag and
/// health), so that a service needs only this crate.
#[doc(no_inline)]
pub use eventbus_core::*;

pub use config::{BackendKind, BusConfig};

/// The NATS JetStream backend crate (feature `nats`), for what the [`Bus`] does not cover:
/// stream provisioning, publish modes, the sink's own options.
#[cfg(feature = "nats")]
pub use eventbus_nats as nats;
#[cfg(feature = "nats")]
pub use eventbus_nats::{NatsAuth, NatsBackend, NatsConfig, NatsSink, StreamSpec};

/// The Kafka backend crate (feature `kafka`).
#[cfg(feature = "kafka")]
pub use eventbus_kafka as kafka;
#[cfg(feature = "kafka")]
pub use eventbus_kafka::{KafkaBackend, KafkaConfig, KafkaSink};

/// The in-process backend crate (feature `memory`), for a service's own tests.
#[cfg(feature = "memory")]
pub use eventbus_memory as memory;
#[cfg(feature = "memory")]
pub use eventbus_memory::MemoryBroker;

/// The workspace README's examples, compiled as doctests of this crate: they use `eventbus`
/// alone (a test checks that they name no other eventbus crate).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;

/// A connected backend. Few exist per process, so the variants are not boxed.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum Bus {
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsBackend, BusConfig),
    /// A Kafka-protocol cluster.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaBackend, BusConfig),
    /// The in-process backend.
    #[cfg(feature = "memory")]
    Memory(eventbus_memory::MemoryBroker, BusConfig),
}

impl Bus {
    /// Validate the config and connect the backend it names.
    pub async fn connect(config: &BusConfig) -> Result<Bus, Error> {
        config.validate()?;
        let config = config.clone();
        match config.backend {
            #[cfg(feature = "nats")]
            BackendKind::Nats => Ok(Bus::Nats(
                eventbus_nats::NatsBackend::connect(config.nats.clone()).await?,
                config,
            )),
            #[cfg(feature = "kafka")]
            BackendKind::Kafka => Ok(Bus::Kafka(
                eventbus_kafka::KafkaBackend::connect(config.kafka.clone()).await?,
                config,
            )),
            #[cfg(feature = "memory")]
            BackendKind::Memory => Ok(Bus::Memory(eventbus_memory::MemoryBroker::new(), config)),
            #[allow(unreachable_patterns)]
            other => Err(Error::new(
                ErrorKind::Config,
                format!("backend {other} is not built in"),
            )),
        }
    }

    /// The config it was connected with.
    pub fn config(&self) -> &BusConfig {
        match self {
            #[cfg(feature = "nats")]
            Bus::Nats(_, c) => c,
            #[cfg(feature = "kafka")]
            Bus::Kafka(_, c) => c,
            #[cfg(feature = "memory")]
            Bus::Memory(_, c) => c,
        }
    }

    /// A publisher: the batching engine with the config's `[batch]` settings over a new sink.
    pub async fn publisher(&self) -> Result<BusPublisher, Error> {
        let batch = self.config().batch.clone();
        Ok(match self {
            #[cfg(feature = "nats")]
            Bus::Nats(b, _) => BusPublisher::Nats(Batcher::new(b.sink().await?, batch)?),
            #[cfg(feature = "kafka")]
            Bus::Kafka(b, _) => BusPublisher::Kafka(Batcher::new(b.sink()?, batch)?),
            #[cfg(feature = "memory")]
            Bus::Memory(b, _) => BusPublisher::Memory(Batcher::new(b.sink(), batch)?),
        })
    }

    /// A subscriber.
    pub fn subscriber(&self) -> BusSubscriber {
        match self {
            #[cfg(feature = "nats")]
            Bus::Nats(b, _) => BusSubscriber::Nats(b.subscriber()),
            #[cfg(feature = "kafka")]
            Bus::Kafka(b, _) => BusSubscriber::Kafka(b.subscriber()),
            #[cfg(feature = "memory")]
            Bus::Memory(b, _) => BusSubscriber::Memory(b.subscriber()),
        }
    }

    /// Make sure `topic` can be published to and subscribed: Kafka creates the topic with
    /// `partitions` (replication factor 1) unless it exists; NATS creates a file stream named
    /// after it (`.` becomes `_`, e.g. `orders_created`) capturing `topic` and `topic.>`
    /// unless one exists; memory needs nothing. Existing topics and streams are left as they
    /// are. Production setups usually provision through their own tooling instead.
    pub async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), Error> {
        // Only Kafka topics have partitions.
        #[cfg(not(feature = "kafka"))]
        let _ = partitions;
        match self {
            #[cfg(feature = "nats")]
            Bus::Nats(b, _) => {
                eventbus_core::validate::topic(topic, eventbus_core::TopicRules::Nats)?;
                let name = topic.replace('.', "_");
                b.ensure_stream(&eventbus_nats::StreamSpec::new(
                    name,
                    [topic.to_owned(), format!("{topic}.>")],
                ))
                .await
            }
            #[cfg(feature = "kafka")]
            Bus::Kafka(b, _) => {
                let partitions = i32::try_from(partitions.max(1))
                    .map_err(|_| Error::new(ErrorKind::Config, "partitions must fit in an i32"))?;
                b.ensure_topic(topic, partitions).await
            }
            #[cfg(feature = "memory")]
            Bus::Memory(..) => Ok(()),
        }
    }

    /// The backend's health check.
    pub async fn health(&self, timeout: Duration) -> Health {
        match self {
            #[cfg(feature = "nats")]
            Bus::Nats(b, _) => b.health(timeout).await,
            #[cfg(feature = "kafka")]
            Bus::Kafka(b, _) => b.health(timeout).await,
            #[cfg(feature = "memory")]
            Bus::Memory(b, _) => b.health(timeout).await,
        }
    }
}

/// A publisher on whichever backend the bus uses.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum BusPublisher {
    /// NATS.
    #[cfg(feature = "nats")]
    Nats(Batcher<eventbus_nats::NatsSink>),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(Batcher<eventbus_kafka::KafkaSink>),
    /// In-process.
    #[cfg(feature = "memory")]
    Memory(Batcher<eventbus_memory::MemorySink>),
}

/// `match` over every built-in variant of `$e`, binding the inner value to `$p`.
macro_rules! each {
    ($ty:ident, $e:expr, $p:ident => $body:expr) => {
        match $e {
            #[cfg(feature = "nats")]
            $ty::Nats($p) => $body,
            #[cfg(feature = "kafka")]
            $ty::Kafka($p) => $body,
            #[cfg(feature = "memory")]
            $ty::Memory($p) => $body,
        }
    };
}

impl BusPublisher {
    /// Current ACK window use (see [`Batcher::stats`]).
    pub fn stats(&self) -> WindowStats {
        each!(BusPublisher, self, p => p.stats())
    }

    /// Call `on_event` when the publisher's backlog crosses `threshold` messages in flight,
    /// checked every `every` (see [`Batcher::watch_backlog`]).
    pub fn watch_backlog<F>(&self, every: Duration, threshold: usize, on_event: F) -> BacklogWatch
    where
        F: FnMut(BacklogEvent) + Send + 'static,
    {
        each!(BusPublisher, self, p => p.watch_backlog(every, threshold, on_event))
    }
}

impl Publisher for BusPublisher {
    async fn publish(&self, msg: Message) -> Result<PendingAck, Error> {
        each!(BusPublisher, self, p => p.publish(msg).await)
    }

    async fn flush(&self) -> Result<(), Error> {
        each!(BusPublisher, self, p => p.flush().await)
    }

    async fn close(&self, deadline: Duration) -> Result<CloseReport, Error> {
        each!(BusPublisher, self, p => p.close(deadline).await)
    }
}

/// A subscriber on whichever backend the bus uses.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum BusSubscriber {
    /// NATS.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsSubscriber),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaSubscriber),
    /// In-process.
    #[cfg(feature = "memory")]
    Memory(eventbus_memory::MemorySubscriber),
}

impl Subscriber for BusSubscriber {
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Subscription, Error> {
        each!(BusSubscriber, self, s => s.subscribe(spec).await)
    }

    async fn lag(&self, topic: &Topic, group: &str) -> Result<Lag, Error> {
        each!(BusSubscriber, self, s => s.lag(topic, group).await)
    }
}
