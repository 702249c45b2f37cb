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
mod registry;

use std::sync::Arc;
use std::time::Duration;

pub use eventbus_batch::{BacklogEvent, BacklogWatch, BatchConfig, Batcher, OnFull, WindowStats};
use eventbus_core::backend::{ArcSubscriber, BoxSink, DynBackend};
use eventbus_core::ops::{Health, Lag};
/// Everything from `eventbus-core` (messages, the traits, errors, the handler runtime, lag and
/// health), so that a service needs only this crate.
#[doc(no_inline)]
pub use eventbus_core::*;

pub use registry::*;

/// The transactional outbox (feature `outbox`): enqueue messages in your own PostgreSQL or
/// SQLite transaction, and a relay publishes them through a [`Bus::publisher`] once it commits.
#[cfg(feature = "outbox")]
pub use eventbus_outbox as outbox;

/// The workspace README's examples, compiled as doctests of this crate: they use `eventbus`
/// alone (a test checks that they name no other eventbus crate). The outbox example needs the
/// `outbox` feature: `cargo xtask test` runs them with every feature.
#[cfg(all(doctest, feature = "outbox"))]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;

/// A connected backend, whichever the config names: one [`Backend`] behind a pointer. It makes
/// publishers (the batching engine over the backend's sink) and subscribers, provisions topics
/// and checks health; what only one backend offers is one [`Bus::backend`] call away.
/// Cloning is cheap.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<dyn DynBackend>,
    config: BusConfig,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .finish()
    }
}

impl Bus {
    /// Validate the config and connect the backend it names.
    pub async fn connect(config: &BusConfig) -> Result<Bus, Error> {
        config.validate()?;
        let backend = config.connect_backend(config.backend).await?;
        Ok(Bus {
            backend,
            config: config.clone(),
        })
    }

    /// A bus over a backend connected elsewhere (one you configured by hand, a shared
    /// [`MemoryBroker`] in a test, or your own [`Backend`]); `config` supplies the `[batch]`
    /// and `[handler]` settings, its backend sections (and `backend`, which may name another
    /// one) are not used. Unlike [`Bus::connect`] it does not validate `config`: a bad `[batch]`
    /// fails at [`Bus::publisher`].
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use eventbus::{Bus, BusConfig, MemoryBroker, Message, Publisher};
    /// let broker = MemoryBroker::new();
    /// let bus = Bus::with_backend(broker.clone(), BusConfig::default());
    /// let publisher = bus.publisher().await.unwrap();
    /// publisher.publish(Message::new("orders", "{}")).await.unwrap().await.into_result().unwrap();
    /// assert_eq!(broker.topic_len("orders"), 1);
    /// assert!(bus.backend::<MemoryBroker>().is_some());
    /// # });
    /// ```
    pub fn with_backend(backend: impl Backend, config: BusConfig) -> Bus {
        Bus {
            backend: Arc::new(backend),
            config,
        }
    }

    /// The config it was connected with.
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// The backend's short name (`"nats"`, `"kafka"`, `"memory"`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The concrete backend, when it is a `B` (`bus.backend::<NatsBackend>()` for streams and
    /// publish modes the bus does not cover).
    pub fn backend<B: Backend>(&self) -> Option<&B> {
        self.backend.as_any().downcast_ref()
    }

    /// A publisher: the batching engine with the config's `[batch]` settings over a new sink.
    pub async fn publisher(&self) -> Result<BusPublisher, Error> {
        Batcher::new(self.backend.sink_dyn().await?, self.config.batch.clone())
    }

    /// A subscriber.
    pub fn subscriber(&self) -> BusSubscriber {
        BusSubscriber(self.backend.subscriber_dyn(), self.backend.name())
    }

    /// Make sure a topic can be published to and subscribed, as the backend provisions topics
    /// (its [`Backend::ensure_topic`]: for NATS a file stream named after the topic, for Kafka a
    /// topic with partitions). Takes a name or a [`TopicSpec`]; an option the backend lacks
    /// ([`Bus::capabilities`]) is refused with [`ErrorKind::Unsupported`]. What exists is left
    /// as it is. Production setups usually provision through their own tooling instead.
    ///
    /// ```no_run
    /// # async fn demo(bus: eventbus::Bus) -> Result<(), eventbus::Error> {
    /// use eventbus::TopicSpec;
    /// bus.ensure_topic("audit").await?;
    /// let orders = TopicSpec::new("orders");
    /// let orders = if bus.capabilities().partitions { orders.partitions(6) } else { orders };
    /// bus.ensure_topic(orders).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure_topic(&self, spec: impl Into<TopicSpec>) -> Result<(), Error> {
        self.backend.ensure_topic_dyn(&spec.into()).await
    }

    /// What the backend can do ([`Backend::capabilities`]).
    pub fn capabilities(&self) -> Capabilities {
        self.backend.capabilities_dyn()
    }

    /// The backend's health check.
    pub async fn health(&self, timeout: Duration) -> Health {
        self.backend.health_dyn(timeout).await
    }
}

/// A bus is itself a [`Backend`], so code generic over backends (your own layers, the
/// project's conformance suite) runs over whichever one the config names, through the same
/// boxed sink and subscriber the bus hands out. [`Backend::sink`] is the backend's raw sink,
/// without the `[batch]` engine: publish through [`Bus::publisher`]. A bus given to
/// [`Bus::with_backend`] is nested: [`Bus::backend`] of the outer one finds only the inner
/// `Bus`.
impl Backend for Bus {
    type Sink = BoxSink;
    type Subscriber = BusSubscriber;

    fn name(&self) -> &'static str {
        self.backend.name()
    }

    async fn sink(&self) -> Result<BoxSink, Error> {
        self.backend.sink_dyn().await
    }

    fn subscriber(&self) -> BusSubscriber {
        Bus::subscriber(self)
    }

    fn capabilities(&self) -> Capabilities {
        self.backend.capabilities_dyn()
    }

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), Error> {
        self.backend.ensure_topic_dyn(spec).await
    }
}

impl eventbus_core::ops::HealthCheck for Bus {
    async fn health(&self, timeout: Duration) -> Health {
        self.backend.health_dyn(timeout).await
    }
}

/// A publisher on whichever backend the bus uses: the batching engine over the backend's sink,
/// boxed once per batch.
pub type BusPublisher = Batcher<BoxSink>;

/// A subscriber on whichever backend the bus uses. Cloning is cheap.
#[derive(Clone)]
pub struct BusSubscriber(ArcSubscriber, &'static str);

impl std::fmt::Debug for BusSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BusSubscriber").field(&self.1).finish()
    }
}

impl Subscriber for BusSubscriber {
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Subscription, Error> {
        self.0.subscribe(spec).await
    }

    async fn lag(&self, topic: &Topic, group: &str) -> Result<Lag, Error> {
        self.0.lag(topic, group).await
    }
}
