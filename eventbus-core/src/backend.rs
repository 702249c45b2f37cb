//! The one seam a backend implements: [`Backend`], and its object-safe twins for code that picks
//! the backend at run time.
//!
//! A backend crate implements [`Backend`] (and through it [`BatchSink`] and [`Subscriber`]) with
//! its own concrete types, so a service that names one backend pays for no boxing at all. The
//! `eventbus` facade holds any backend as `Arc<dyn DynBackend>`: every [`Backend`] is a
//! [`DynBackend`] through a blanket impl, in the way opendal pairs `Access` with `AccessDyn`
//! and object_store offers `DynObjectStore`. The dyn path boxes one future per *batch* (and per
//! subscribe, lag or health call), never one per message.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use eventbus_core::backend::{Backend, DynBackend};
//! use eventbus_core::ops::{Health, HealthCheck, Lag};
//! use eventbus_core::*;
//!
//! /// A backend that refuses everything: the least a backend provides.
//! #[derive(Clone)]
//! struct Closed;
//! impl BatchSink for Closed {
//!     fn name(&self) -> &'static str { "closed" }
//!     fn limits(&self) -> SinkLimits { SinkLimits::none() }
//!     fn validate(&self, _: &Message) -> Result<(), Error> { Ok(()) }
//!     fn send_batch(&self, batch: Vec<Message>)
//!         -> impl std::future::Future<Output = Vec<Outcome>> + Send + 'static {
//!         let n = batch.len();
//!         async move {
//!             (0..n).map(|_| Outcome::Failed(Error::new(ErrorKind::Closed, "closed"))).collect()
//!         }
//!     }
//! }
//! impl Subscriber for Closed {
//!     async fn subscribe(&self, _: SubscribeSpec) -> Result<Subscription, Error> {
//!         Err(Error::new(ErrorKind::Closed, "closed"))
//!     }
//!     async fn lag(&self, _: &Topic, _: &str) -> Result<Lag, Error> {
//!         Err(Error::new(ErrorKind::Closed, "closed"))
//!     }
//! }
//! impl HealthCheck for Closed {
//!     async fn health(&self, _: Duration) -> Health {
//!         Health::down("closed", Duration::ZERO, "always closed")
//!     }
//! }
//! impl Backend for Closed {
//!     type Sink = Closed;
//!     type Subscriber = Closed;
//!     fn name(&self) -> &'static str { "closed" }
//!     async fn sink(&self) -> Result<Closed, Error> { Ok(Closed) }
//!     fn subscriber(&self) -> Closed { Closed }
//!     async fn ensure_topic(&self, _: &str, _: u32) -> Result<(), Error> { Ok(()) }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // Chosen at run time: any backend behind one pointer.
//! let backend: Arc<dyn DynBackend> = Arc::new(Closed);
//! let sink = backend.sink_dyn().await.unwrap();
//! let outcomes = sink.send_batch(vec![Message::new("a", "x")]).await;
//! assert!(matches!(&outcomes[..], [Outcome::Failed(_)]));
//! assert!(backend.as_any().downcast_ref::<Closed>().is_some());
//! # });
//! ```

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::message::{Message, Topic};
use crate::ops::{Health, HealthCheck, Lag};
use crate::outcome::Outcome;
use crate::sink::{BatchSink, SinkLimits};
use crate::subscriber::{SubscribeSpec, Subscriber, Subscription};

/// A boxed, sendable future: what the dyn twins return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connected backend: it makes publishing sinks and subscribers, provisions topics and checks
/// its own health.
///
/// Each backend owns its policy: how a topic maps to the broker's objects (a NATS stream named
/// after the topic, a Kafka topic with partitions), its configuration and environment forms,
/// its publish modes. Code above this trait (the `eventbus` facade, the conformance suite, a
/// service's own wiring) sees none of that.
pub trait Backend: HealthCheck + Send + Sync + 'static {
    /// The publishing sink (wrap it in `eventbus_batch::Batcher`).
    type Sink: BatchSink;
    /// The subscriber.
    type Subscriber: Subscriber + 'static;

    /// Short backend name (`"nats"`, `"kafka"`, `"memory"`), as in errors and metrics.
    fn name(&self) -> &'static str;

    /// A new publishing sink, configured as the backend's config says.
    fn sink(&self) -> impl Future<Output = Result<Self::Sink, Error>> + Send;

    /// A subscriber.
    fn subscriber(&self) -> Self::Subscriber;

    /// Make sure `topic` can be published to and subscribed, creating what the broker needs
    /// (with `partitions` where the broker has them) unless it exists. What exists is left as
    /// it is.
    fn ensure_topic(
        &self,
        topic: &str,
        partitions: u32,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The object-safe twin of [`BatchSink`]; every `BatchSink` is one (see [`BoxSink`]).
pub trait DynBatchSink: Send + Sync + 'static {
    /// [`BatchSink::name`].
    fn name(&self) -> &'static str;
    /// [`BatchSink::limits`].
    fn limits(&self) -> SinkLimits;
    /// [`BatchSink::validate`].
    fn validate(&self, msg: &Message) -> Result<(), Error>;
    /// [`BatchSink::send_batch`], boxed once per batch. The inner `send_batch` is called before
    /// this returns, so its synchronous ordering work happens in call order.
    fn send_batch_dyn(&self, batch: Vec<Message>) -> BoxFuture<'static, Vec<Outcome>>;
    /// [`BatchSink::close`].
    fn close_dyn(&self) -> BoxFuture<'_, ()>;
}

impl<S: BatchSink> DynBatchSink for S {
    fn name(&self) -> &'static str {
        BatchSink::name(self)
    }
    fn limits(&self) -> SinkLimits {
        BatchSink::limits(self)
    }
    fn validate(&self, msg: &Message) -> Result<(), Error> {
        BatchSink::validate(self, msg)
    }
    fn send_batch_dyn(&self, batch: Vec<Message>) -> BoxFuture<'static, Vec<Outcome>> {
        Box::pin(self.send_batch(batch))
    }
    fn close_dyn(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }
}

/// Any backend's sink, itself a [`BatchSink`], so the batching engine runs over it unchanged.
/// (A struct rather than `Box<dyn DynBatchSink>`: a type without a trait-object lifetime in it
/// keeps `Send` inference in callers' async code simple.)
pub struct BoxSink(Box<dyn DynBatchSink>);

impl BoxSink {
    /// Box `sink`.
    pub fn new(sink: impl BatchSink) -> Self {
        BoxSink(Box::new(sink))
    }
}

impl std::fmt::Debug for BoxSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BoxSink").field(&self.0.name()).finish()
    }
}

impl BatchSink for BoxSink {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn limits(&self) -> SinkLimits {
        self.0.limits()
    }
    fn validate(&self, msg: &Message) -> Result<(), Error> {
        self.0.validate(msg)
    }
    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        self.0.send_batch_dyn(batch)
    }
    fn close(&self) -> impl Future<Output = ()> + Send {
        self.0.close_dyn()
    }
}

/// The object-safe twin of [`Subscriber`]; every `Subscriber` is one.
pub trait DynSubscriber: Send + Sync + 'static {
    /// [`Subscriber::subscribe`].
    fn subscribe_dyn(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, Error>>;
    /// [`Subscriber::lag`].
    fn lag_dyn<'a>(&'a self, topic: &'a Topic, group: &'a str)
    -> BoxFuture<'a, Result<Lag, Error>>;
}

impl<S: Subscriber + 'static> DynSubscriber for S {
    fn subscribe_dyn(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, Error>> {
        Box::pin(self.subscribe(spec))
    }
    fn lag_dyn<'a>(
        &'a self,
        topic: &'a Topic,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Lag, Error>> {
        Box::pin(self.lag(topic, group))
    }
}

/// Any backend's subscriber; cloning is cheap.
pub type ArcSubscriber = Arc<dyn DynSubscriber>;

impl Subscriber for ArcSubscriber {
    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send {
        (**self).subscribe_dyn(spec)
    }
    // `async fn`: the boxed future has one lifetime, the returned one holds three borrows.
    async fn lag(&self, topic: &Topic, group: &str) -> Result<Lag, Error> {
        (**self).lag_dyn(topic, group).await
    }
}

/// The object-safe twin of [`Backend`]; every `Backend` is one.
pub trait DynBackend: Send + Sync + 'static {
    /// [`Backend::name`].
    fn name(&self) -> &'static str;
    /// [`Backend::sink`], boxed.
    fn sink_dyn(&self) -> BoxFuture<'_, Result<BoxSink, Error>>;
    /// [`Backend::subscriber`], shared.
    fn subscriber_dyn(&self) -> ArcSubscriber;
    /// [`Backend::ensure_topic`].
    fn ensure_topic_dyn<'a>(
        &'a self,
        topic: &'a str,
        partitions: u32,
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// [`HealthCheck::health`].
    fn health_dyn(&self, timeout: Duration) -> BoxFuture<'_, Health>;
    /// The concrete backend, to reach what only it offers (`downcast_ref::<NatsBackend>()`).
    fn as_any(&self) -> &dyn Any;
}

impl<B: Backend> DynBackend for B {
    fn name(&self) -> &'static str {
        Backend::name(self)
    }
    fn sink_dyn(&self) -> BoxFuture<'_, Result<BoxSink, Error>> {
        Box::pin(async move { Ok(BoxSink::new(self.sink().await?)) })
    }
    fn subscriber_dyn(&self) -> ArcSubscriber {
        Arc::new(self.subscriber())
    }
    fn ensure_topic_dyn<'a>(
        &'a self,
        topic: &'a str,
        partitions: u32,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.ensure_topic(topic, partitions))
    }
    fn health_dyn(&self, timeout: Duration) -> BoxFuture<'_, Health> {
        Box::pin(self.health(timeout))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
