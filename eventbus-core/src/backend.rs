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
//!     fn capabilities(&self) -> Capabilities { Capabilities::none() }
//!     async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), Error> {
//!         spec.check(&self.capabilities(), "closed")
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // Chosen at run time: any backend behind one pointer.
//! let backend: Arc<dyn DynBackend> = Arc::new(Closed);
//! let sink = backend.sink_dyn().await.unwrap();
//! let outcomes = sink.send_batch(vec![Message::new("a", "x")]).await;
//! assert!(matches!(&outcomes[..], [Outcome::Failed(_)]));
//! assert!(backend.as_any().downcast_ref::<Closed>().is_some());
//! // Options beyond the capabilities are refused, typed.
//! let spec = TopicSpec::new("t").partitions(3);
//! let e = backend.ensure_topic_dyn(&spec).await.unwrap_err();
//! assert_eq!(e.kind(), ErrorKind::Unsupported);
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
use crate::topic::{Capabilities, TopicSpec};

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

    /// What this backend can do: which [`TopicSpec`] options it honours, how a group's
    /// members share a topic, whether the broker drops duplicate ids.
    fn capabilities(&self) -> Capabilities;

    /// Make sure `spec`'s topic can be published to and subscribed, creating what the broker
    /// needs with `spec`'s options unless it exists. What exists is left as it is. An option
    /// beyond [`Backend::capabilities`] is refused with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), before anything is created
    /// ([`TopicSpec::check`]).
    fn ensure_topic(&self, spec: &TopicSpec) -> impl Future<Output = Result<(), Error>> + Send;
}

/// What an environment variable read by a backend sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvTarget {
    /// A field of the backend's config section (`url`, `auth`, `publish_mode`).
    Field(&'static str),
    /// An option passed through to the backend's client library by its own name (librdkafka's
    /// `sasl.password`).
    ClientOption(&'static str),
}

impl std::fmt::Display for EnvTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvTarget::Field(name) => write!(f, "`{name}`"),
            EnvTarget::ClientOption(name) => write!(f, "client option `{name}`"),
        }
    }
}

/// An environment variable a backend reads itself, beside the generic
/// `EVENTBUS_<SECTION>_<FIELD>` form every config field has: its short forms for connections
/// and credentials. Each backend lists its variables once, in its [`BackendConfig::ENV`]; the
/// facade's docs and the README's table are made from those lists.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct EnvVar {
    /// The variable (`EVENTBUS_NATS_URL`).
    pub name: &'static str,
    /// What it sets.
    pub sets: EnvTarget,
    /// The values it takes, in a few words.
    pub values: &'static str,
    /// Its value is a secret. The backend's config keeps it out of `Debug` and errors itself;
    /// this flag marks it in generated docs (the README's table) and for tools that print
    /// settings.
    pub secret: bool,
}

impl EnvVar {
    /// A variable `name` that sets `sets`, taking `values`.
    pub const fn new(name: &'static str, sets: EnvTarget, values: &'static str) -> Self {
        EnvVar {
            name,
            sets,
            values,
            secret: false,
        }
    }

    /// The same variable, marked secret.
    pub const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}

/// A backend's config section, and how it connects: what a backend crate exports so that the
/// `eventbus` facade can offer it by name (`backend = "nats"`, a `[nats]` section,
/// `EVENTBUS_NATS_*` variables) with one registry line.
///
/// The section is plain serde (unknown fields are errors); `Debug` redacts secrets. The facade
/// sets its fields from `EVENTBUS_<NAME>_<FIELD>` variables generically and hands the
/// backend's own variables ([`BackendConfig::ENV`]) to [`BackendConfig::with_vars`].
///
/// ```
/// use eventbus_core::backend::{BackendConfig, EnvTarget, EnvVar};
/// # use eventbus_core::{Error, Backend};
/// # #[derive(Clone)] struct Closed;
/// # impl eventbus_core::BatchSink for Closed {
/// #     fn name(&self) -> &'static str { "closed" }
/// #     fn limits(&self) -> eventbus_core::SinkLimits { eventbus_core::SinkLimits::none() }
/// #     fn validate(&self, _: &eventbus_core::Message) -> Result<(), Error> { Ok(()) }
/// #     fn send_batch(&self, b: Vec<eventbus_core::Message>)
/// #         -> impl std::future::Future<Output = Vec<eventbus_core::Outcome>> + Send + 'static {
/// #         async move { Vec::new() }
/// #     }
/// # }
/// # impl eventbus_core::Subscriber for Closed {
/// #     async fn subscribe(&self, _: eventbus_core::SubscribeSpec) -> Result<eventbus_core::Subscription, Error> {
/// #         Err(Error::new(eventbus_core::ErrorKind::Closed, "closed"))
/// #     }
/// #     async fn lag(&self, _: &eventbus_core::Topic, _: &str) -> Result<eventbus_core::ops::Lag, Error> {
/// #         Err(Error::new(eventbus_core::ErrorKind::Closed, "closed"))
/// #     }
/// # }
/// # impl eventbus_core::ops::HealthCheck for Closed {
/// #     async fn health(&self, _: std::time::Duration) -> eventbus_core::ops::Health {
/// #         eventbus_core::ops::Health::down("closed", std::time::Duration::ZERO, "closed")
/// #     }
/// # }
/// # impl Backend for Closed {
/// #     type Sink = Closed; type Subscriber = Closed;
/// #     fn name(&self) -> &'static str { "closed" }
/// #     async fn sink(&self) -> Result<Closed, Error> { Ok(Closed) }
/// #     fn subscriber(&self) -> Closed { Closed }
/// #     fn capabilities(&self) -> eventbus_core::Capabilities { eventbus_core::Capabilities::none() }
/// #     async fn ensure_topic(&self, _: &eventbus_core::TopicSpec) -> Result<(), Error> { Ok(()) }
/// # }
/// /// `[closed]`: where the (imaginary) server is.
/// #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct ClosedConfig { url: String }
///
/// impl BackendConfig for ClosedConfig {
///     type Backend = Closed;
///     const NAME: &'static str = "closed";
///     const ENV: &'static [EnvVar] =
///         &[EnvVar::new("EVENTBUS_CLOSED_URL", EnvTarget::Field("url"), "a URL")];
///     fn with_vars(mut self, vars: Vec<(String, String)>) -> Result<Self, Error> {
///         for (k, v) in vars {
///             if k == "EVENTBUS_CLOSED_URL" { self.url = v; }
///         }
///         Ok(self)
///     }
///     async fn connect(self) -> Result<Closed, Error> { Ok(Closed) }
/// }
///
/// let c = ClosedConfig::default()
///     .with_vars(vec![("EVENTBUS_CLOSED_URL".into(), "x://h".into())])
///     .unwrap();
/// assert_eq!(c.url, "x://h");
/// ```
pub trait BackendConfig:
    Clone
    + Default
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The backend it connects.
    type Backend: Backend;

    /// The backend's name: `backend = "<NAME>"`, the `[<NAME>]` section, the
    /// `EVENTBUS_<NAME>_*` variables, the cargo feature of the facade.
    const NAME: &'static str;

    /// The variables the backend reads itself ([`BackendConfig::with_vars`]), each listed once
    /// here.
    const ENV: &'static [EnvVar];

    /// Apply those of `vars` that are in [`BackendConfig::ENV`] on top of this config (others
    /// are ignored). Errors name the variable, never its value.
    fn with_vars(self, vars: Vec<(String, String)>) -> Result<Self, Error>;

    /// Check values beyond their shape (credentials that come in pairs, known option values).
    /// Errors name the field or variable, never a value. Default: nothing to check.
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Connect the backend.
    fn connect(self) -> impl Future<Output = Result<Self::Backend, Error>> + Send;
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
    /// [`Backend::capabilities`].
    fn capabilities_dyn(&self) -> Capabilities;
    /// [`Backend::ensure_topic`].
    fn ensure_topic_dyn<'a>(&'a self, spec: &'a TopicSpec) -> BoxFuture<'a, Result<(), Error>>;
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
    fn capabilities_dyn(&self) -> Capabilities {
        self.capabilities()
    }
    fn ensure_topic_dyn<'a>(&'a self, spec: &'a TopicSpec) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.ensure_topic(spec))
    }
    fn health_dyn(&self, timeout: Duration) -> BoxFuture<'_, Health> {
        Box::pin(self.health(timeout))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
