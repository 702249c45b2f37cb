//! The user-facing subscribe API: subscriptions yield deliveries, each acked exactly once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::message::{Message, Topic};
use crate::outcome::Position;

/// Where a new consumer (group) starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// Everything the broker still retains (default).
    #[default]
    Earliest,
    /// Only messages published after the subscription was created.
    Latest,
}

/// What to subscribe to and how.
///
/// ```
/// use std::time::Duration;
/// use eventbus_core::SubscribeSpec;
/// let spec = SubscribeSpec::new("orders.created").group("billing").ack_wait(Duration::from_secs(5));
/// assert_eq!(spec.group.as_deref(), Some("billing"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscribeSpec {
    /// The topic or pattern. What a backend accepts:
    /// - NATS: a subject or a subject filter with wildcards (`orders.*`, `orders.>`), within
    ///   one stream.
    /// - Kafka: a topic name, or a regular expression starting with `^` (librdkafka's
    ///   convention, e.g. `^orders\..*`), matched against the cluster's topics when the
    ///   subscription starts (topics created later are not picked up).
    /// - memory: a topic name.
    pub topic: Topic,
    /// More topics or patterns read by the same subscription (see
    /// [`SubscribeSpec::topics`]). Default none.
    pub more_topics: Vec<Topic>,
    /// Consumer group: every group sees every message, members of one group share them.
    /// `None` gives an exclusive, non-durable subscription that sees every message.
    pub group: Option<String>,
    /// How long a delivery may stay un-acked before it is redelivered. Default 30 s.
    pub ack_wait: Duration,
    /// Deliveries before a message is given up on (dead-lettered where supported). Default: none.
    pub max_deliveries: Option<u32>,
    /// Most deliveries buffered ahead of the handler. Default 256.
    pub prefetch: usize,
    /// Where a new group starts. Default [`StartFrom::Earliest`].
    pub start: StartFrom,
    /// Where a message goes once it has been delivered `max_deliveries` times without an ack:
    /// it is published there (see [`dead_letter`]) and only then removed from this
    /// subscription. Without it, such a message is dropped with a warning. Default: none.
    pub dead_letter: Option<Topic>,
}

impl SubscribeSpec {
    /// Subscribe to `topic` with defaults.
    pub fn new(topic: impl Into<Topic>) -> Self {
        SubscribeSpec {
            topic: topic.into(),
            more_topics: Vec::new(),
            group: None,
            ack_wait: Duration::from_secs(30),
            max_deliveries: None,
            prefetch: 256,
            start: StartFrom::Earliest,
            dead_letter: None,
        }
    }
    /// Subscribe to every topic or pattern in `topics` with one subscription: deliveries of
    /// all of them arrive on the one stream, each acked on its own topic; a group shares each
    /// topic among its members. Panics if `topics` is empty.
    ///
    /// ```
    /// use eventbus_core::SubscribeSpec;
    /// let spec = SubscribeSpec::topics(["orders", "payments", "refunds"]).group("audit");
    /// assert_eq!(spec.all_topics().count(), 3);
    /// ```
    pub fn topics<T: Into<Topic>>(topics: impl IntoIterator<Item = T>) -> Self {
        let mut all = topics.into_iter().map(Into::into);
        let first = all
            .next()
            .expect("SubscribeSpec::topics needs at least one topic");
        SubscribeSpec {
            more_topics: all.collect(),
            ..SubscribeSpec::new(first)
        }
    }
    /// Also read `topic` (or pattern) in this subscription.
    pub fn also(mut self, topic: impl Into<Topic>) -> Self {
        self.more_topics.push(topic.into());
        self
    }
    /// Every topic or pattern of this subscription, the first one first.
    pub fn all_topics(&self) -> impl Iterator<Item = &Topic> {
        std::iter::once(&self.topic).chain(&self.more_topics)
    }
    /// One spec per distinct topic, each with this spec's settings: what a backend that reads
    /// one topic per consumer subscribes, before [`Subscription::merge`] joins them. Filters
    /// that overlap (`a.*` and `a.b`) are separate consumers: a message both match is delivered
    /// twice.
    pub fn split(&self) -> Vec<SubscribeSpec> {
        let mut seen = std::collections::HashSet::new();
        self.all_topics()
            .filter(|t| seen.insert(t.as_str()))
            .map(|t| SubscribeSpec {
                topic: t.clone(),
                more_topics: Vec::new(),
                ..self.clone()
            })
            .collect()
    }
    /// Join consumer group `name`.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Some(name.into());
        self
    }
    /// Set the ack wait.
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }
    /// Set the maximum deliveries.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }
    /// Set the prefetch bound (at least 1).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// Set the start position.
    pub fn start(mut self, s: StartFrom) -> Self {
        self.start = s;
        self
    }
    /// Dead-letter exhausted messages to `topic` (use with [`SubscribeSpec::max_deliveries`]).
    pub fn dead_letter(mut self, topic: impl Into<Topic>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }
}

/// Dead-lettering, the same on every backend: the dead letter is a copy of the message (key,
/// headers, payload) on the dead-letter topic, with a derived id (`dlq-<original id>`, so a
/// stream that de-duplicates by id never mistakes it for the original) and these headers.
pub mod dead_letter {
    use crate::message::{Message, MessageId, Topic};
    use crate::outcome::Position;

    /// The original message id.
    pub const ID: &str = "eventbus-dlq-id";
    /// The topic the message was read from.
    pub const TOPIC: &str = "eventbus-dlq-topic";
    /// Where it was stored there, as [`Position`](crate::Position) displays it.
    pub const POSITION: &str = "eventbus-dlq-position";
    /// How many times the broker delivered it, counting the delivery that moved it here:
    /// normally `max_deliveries + 1`, of which the handler saw `max_deliveries` (more when a
    /// refused dead letter was offered again). Kafka counts only since the partition's current
    /// owner read it.
    pub const DELIVERIES: &str = "eventbus-dlq-deliveries";
    /// Why it was dead-lettered.
    pub const REASON: &str = "eventbus-dlq-reason";

    /// The reason used when `max_deliveries` is exhausted.
    pub const MAX_DELIVERIES: &str = "max deliveries exceeded";
    /// On a message built by [`replay`]: the id of the original message.
    pub const REPLAY_OF: &str = "eventbus-replay-of";

    /// Turn a dead letter back into a message for the topic it came from, to publish again once
    /// the cause is fixed: same key, payload and headers, minus the dead-letter headers, plus
    /// [`REPLAY_OF`]. Its id is `replay-<dead letter id>`: a new id, so a stream that
    /// de-duplicates does not drop it as the original, yet replaying the same dead letter twice
    /// is de-duplicated like any retry. `None` if `dead` has no [`TOPIC`] header (it is not a
    /// dead letter) or it is empty.
    ///
    /// ```
    /// use eventbus_core::{Message, Position, Topic, dead_letter};
    /// let original = Message::new("orders", "{}").with_key("o-1");
    /// let dead = dead_letter::message(&original, &Topic::new("orders.dlq"),
    ///     &Position::Offset(7), 5, dead_letter::MAX_DELIVERIES);
    /// let again = dead_letter::replay(&dead).unwrap();
    /// assert_eq!(again.topic().as_str(), "orders");
    /// assert_eq!(again.key(), original.key());
    /// assert_eq!(again.headers().get(dead_letter::REPLAY_OF), Some(original.id().to_string().as_str()));
    /// assert!(again.headers().get(dead_letter::REASON).is_none());
    /// ```
    pub fn replay(dead: &Message) -> Option<Message> {
        let topic = dead.headers().get(TOPIC)?.to_owned();
        if topic.is_empty() {
            return None;
        }
        let original_id = dead.headers().get(ID).map(str::to_owned);
        let (id, _, key, mut headers, payload) = dead.clone().into_parts();
        for h in [ID, TOPIC, POSITION, DELIVERIES, REASON, REPLAY_OF] {
            headers.remove(h);
        }
        if let Some(orig) = original_id {
            headers.append(REPLAY_OF, orig);
        }
        Some(Message::from_parts(
            MessageId::custom(format!("replay-{id}")),
            Topic::new(topic),
            key,
            headers,
            payload,
        ))
    }

    /// Build the dead letter for `original`, read at `position` and delivered `deliveries` times.
    pub fn message(
        original: &Message,
        to: &Topic,
        position: &Position,
        deliveries: u32,
        reason: &str,
    ) -> Message {
        let id = original.id().to_string();
        let (_, _, key, headers, payload) = original.clone().into_parts();
        Message::from_parts(
            MessageId::custom(format!("dlq-{id}")),
            to.clone(),
            key,
            headers,
            payload,
        )
        .with_header(ID, id)
        .with_header(TOPIC, original.topic().as_str())
        .with_header(POSITION, position.to_string())
        .with_header(DELIVERIES, deliveries.to_string())
        .with_header(REASON, reason)
    }
}

/// The dead-letter layer every backend puts on a subscription whose spec has both
/// [`SubscribeSpec::dead_letter`] and [`SubscribeSpec::max_deliveries`]: a delivery past
/// `max_deliveries` never reaches the handler; its dead letter ([`dead_letter::message`]) is
/// published, and only once that publish is acked is the message terminated. A refused or
/// failed publish nacks it instead, so the broker offers it again (and the layer tries again)
/// after [`DeadLetters::RETRY`]: nothing is dropped. A backend only has to keep redelivering
/// past `max_deliveries` with an honest delivery count, and say how to publish (any
/// [`Publisher`](crate::Publisher), or its own producer).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use eventbus_core::{DeadLetters, Message, SubscribeSpec, Topic};
/// let spec = SubscribeSpec::new("orders").max_deliveries(5).dead_letter("orders.dlq");
/// let layer = DeadLetters::for_spec(&spec, |letter: Message| async move {
///     assert_eq!(letter.topic().as_str(), "orders.dlq");
///     Ok(()) // publish it somewhere
/// });
/// assert!(layer.is_some());
/// assert!(DeadLetters::for_spec(&SubscribeSpec::new("orders"), |_| async { Ok(()) }).is_none());
/// # });
/// ```
#[derive(Clone)]
pub struct DeadLetters {
    to: Topic,
    max: u32,
    post: std::sync::Arc<
        dyn Fn(Message) -> crate::backend::BoxFuture<'static, Result<(), Error>> + Send + Sync,
    >,
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("to", &self.to)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// How long a message whose dead letter was refused waits before it is offered again.
    pub const RETRY: Duration = Duration::from_secs(1);

    /// Dead-letter to `to` the deliveries past `max`, publishing each letter with `post`
    /// (`Ok` once the broker stored it).
    pub fn new<F, Fut>(to: Topic, max: u32, post: F) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        DeadLetters {
            to,
            max,
            post: std::sync::Arc::new(move |m| Box::pin(post(m))),
        }
    }

    /// Like [`DeadLetters::new`], publishing through `publisher` and waiting for the ack.
    pub fn through<P: crate::Publisher + 'static>(to: Topic, max: u32, publisher: P) -> Self {
        let publisher = std::sync::Arc::new(publisher);
        Self::new(to, max, move |letter| {
            let publisher = std::sync::Arc::clone(&publisher);
            async move {
                publisher
                    .publish(letter)
                    .await?
                    .await
                    .into_result()
                    .map(drop)
            }
        })
    }

    /// The layer `spec` asks for (`dead_letter` and `max_deliveries` both set), if any.
    pub fn for_spec<F, Fut>(spec: &SubscribeSpec, post: F) -> Option<Self>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let to = spec.dead_letter.clone()?;
        let max = spec.max_deliveries?;
        Some(Self::new(to, max, post))
    }

    /// The topic letters go to.
    pub fn topic(&self) -> &Topic {
        &self.to
    }

    /// Whether `d` is past the limit.
    fn exhausted(&self, d: &Delivery) -> bool {
        d.info().delivery_count > self.max
    }

    /// Publish `d`'s dead letter, then terminate `d`; nack it if the publish fails.
    async fn move_out(&self, d: Delivery) {
        let (msg, info, acker) = d.split();
        let letter = dead_letter::message(
            &msg,
            &self.to,
            &info.position,
            info.delivery_count,
            dead_letter::MAX_DELIVERIES,
        );
        match (self.post)(letter).await {
            Ok(()) => {
                if let Err(e) = acker.term().await {
                    tracing::warn!(error = %e, to = %self.to, "dead letter stored, but the original was not terminated; it may be dead-lettered again");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, to = %self.to, "dead letter not stored; the message is kept and offered again");
                let _ = acker.nack(Self::RETRY).await;
            }
        }
    }
}

/// Settles one delivery. Backends implement it; users call it through [`Delivery`].
#[async_trait::async_trait]
pub trait AckHandle: Send + Sync + 'static {
    /// Processed: never deliver again.
    async fn ack(self: Box<Self>) -> Result<(), Error>;
    /// Not processed: deliver again after `delay`.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), Error>;
    /// Never deliver again, without processing (poison message).
    async fn term(self: Box<Self>) -> Result<(), Error>;
}

/// A boxed [`AckHandle`].
pub struct Acker(Box<dyn AckHandle>);

impl Acker {
    /// Wrap a backend's handle.
    pub fn new(h: impl AckHandle) -> Self {
        Acker(Box::new(h))
    }
    /// See [`AckHandle::ack`].
    pub async fn ack(self) -> Result<(), Error> {
        self.0.ack().await
    }
    /// See [`AckHandle::nack`].
    pub async fn nack(self, delay: Duration) -> Result<(), Error> {
        self.0.nack(delay).await
    }
    /// See [`AckHandle::term`].
    pub async fn term(self) -> Result<(), Error> {
        self.0.term().await
    }
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acker")
    }
}

/// Broker-side facts about a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryInfo {
    /// 1 on first delivery, then 2, 3, ...
    pub delivery_count: u32,
    /// Where the message is stored.
    pub position: Position,
}

impl DeliveryInfo {
    /// New info.
    pub fn new(delivery_count: u32, position: Position) -> Self {
        DeliveryInfo {
            delivery_count,
            position,
        }
    }
}

/// A received message and the handle to settle it.
#[derive(Debug)]
pub struct Delivery {
    message: Message,
    info: DeliveryInfo,
    acker: Acker,
}

impl Delivery {
    /// Assemble a delivery (backends).
    pub fn new(message: Message, info: DeliveryInfo, acker: Acker) -> Self {
        Delivery {
            message,
            info,
            acker,
        }
    }
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }
    /// Delivery facts.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }
    /// Acknowledge.
    pub async fn ack(self) -> Result<(), Error> {
        self.acker.ack().await
    }
    /// Ask for redelivery after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), Error> {
        self.acker.nack(delay).await
    }
    /// Terminate: never redeliver.
    pub async fn term(self) -> Result<(), Error> {
        self.acker.term().await
    }
    /// Take the parts, e.g. to move the message into a handler and ack later.
    pub fn split(self) -> (Message, DeliveryInfo, Acker) {
        (self.message, self.info, self.acker)
    }
}

/// A stream of deliveries. Close it with [`Subscription::close`]: buffered, unhandled deliveries
/// are then handed back for immediate redelivery (dropping it does the same in the background).
pub struct Subscription {
    rx: mpsc::Receiver<Result<Delivery, Error>>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

/// The backend's end of a [`Subscription`].
pub struct Feed {
    tx: mpsc::Sender<Result<Delivery, Error>>,
    stop: oneshot::Receiver<()>,
    /// `stop` has resolved (a oneshot receiver must not be polled again after that).
    stopped: bool,
    _done: oneshot::Sender<()>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl fmt::Debug for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl Subscription {
    /// A linked pair; `prefetch` bounds the deliveries buffered in between.
    pub fn channel(prefetch: usize) -> (Subscription, Feed) {
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        (
            Subscription {
                rx,
                stop: Some(stop_tx),
                done: Some(done_rx),
            },
            Feed {
                tx,
                stop: stop_rx,
                stopped: false,
                _done: done_tx,
            },
        )
    }

    /// The next delivery; `None` once the backend ended the subscription. Each delivery is the
    /// DEBUG event `eventbus.deliver` (fields `id`, `topic`, `delivery`, and the message's W3C
    /// `traceparent` if it carries one), on every backend.
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        let next = self.rx.recv().await;
        if let Some(Ok(d)) = &next
            && tracing::enabled!(tracing::Level::DEBUG)
        {
            let m = d.message();
            tracing::debug!(
                id = %m.id(),
                topic = %m.topic(),
                delivery = d.info().delivery_count,
                traceparent = crate::trace::TraceParent::extract(m).map(|p| p.to_string()),
                "eventbus.deliver"
            );
        }
        next
    }

    /// Stop receiving, hand back buffered deliveries for redelivery, and wait for the backend
    /// task to finish.
    pub async fn close(mut self) {
        self.stop.take();
        self.rx.close();
        while let Some(d) = self.rx.recv().await {
            if let Ok(d) = d {
                let _ = d.nack(Duration::ZERO).await;
            }
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

/// What [`Subscription::relay`]'s step does with a delivery.
pub(crate) enum Relayed {
    /// Hand it over.
    Pass(Delivery),
    /// The step settled it.
    Settled,
    /// This future settles it, beside the relay (finished before the relay closes).
    Aside(crate::backend::BoxFuture<'static, ()>),
}

impl Subscription {
    /// For backends that read one topic per consumer: subscribe each topic of `spec` (see
    /// [`SubscribeSpec::split`]) with `one`, and [`merge`](Subscription::merge) the parts. If
    /// one fails, the parts made so far are closed and its error is returned.
    pub async fn per_topic<F, Fut>(spec: SubscribeSpec, mut one: F) -> Result<Subscription, Error>
    where
        F: FnMut(SubscribeSpec) -> Fut,
        Fut: Future<Output = Result<Subscription, Error>>,
    {
        let prefetch = spec.prefetch;
        let mut parts = Vec::new();
        for s in spec.split() {
            match one(s).await {
                Ok(p) => parts.push(p),
                Err(e) => {
                    for p in parts {
                        p.close().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Subscription::merge(parts, prefetch))
    }

    /// This subscription with `layer` on it, if any: deliveries past its limit are
    /// dead-lettered instead of handed over (see [`DeadLetters`]). A delivery the layer is
    /// moving out when the subscription is closed is finished (published, then terminated or
    /// nacked) before [`Subscription::close`] returns. Takes an `Option` too, so a backend can
    /// pass [`DeadLetters::for_spec`]'s answer as it is.
    pub fn dead_letters(self, layer: impl Into<Option<DeadLetters>>) -> Subscription {
        let Some(layer) = layer.into() else {
            return self;
        };
        self.relay(move |d| {
            std::future::ready(if layer.exhausted(&d) {
                // Off the delivery path: a slow or refusing dead-letter topic holds back only
                // the messages it is moving, never the others.
                let layer = layer.clone();
                Relayed::Aside(Box::pin(async move { layer.move_out(d).await }))
            } else {
                Relayed::Pass(d)
            })
        })
    }

    /// A subscription that hands over, settles or sets aside each of this one's deliveries as
    /// `step` says ([`Relayed`]). Errors pass as they are. Closing it finishes the work set
    /// aside, then closes this one.
    pub(crate) fn relay<F, Fut>(mut self, mut step: F) -> Subscription
    where
        F: FnMut(Delivery) -> Fut + Send + 'static,
        Fut: Future<Output = Relayed> + Send,
    {
        let (outer, mut feed) = Subscription::channel(self.rx.max_capacity());
        tokio::spawn(async move {
            let mut aside = tokio::task::JoinSet::new();
            loop {
                let next = tokio::select! {
                    _ = feed.stopped() => break,
                    Some(_) = aside.join_next(), if !aside.is_empty() => continue,
                    // Not `next()`: the outer subscription records the delivery event.
                    next = self.rx.recv() => next,
                };
                let item = match next {
                    None => break,
                    Some(Err(e)) => Err(e),
                    Some(Ok(d)) => match step(d).await {
                        Relayed::Pass(d) => Ok(d),
                        Relayed::Settled => continue,
                        Relayed::Aside(work) => {
                            aside.spawn(work);
                            continue;
                        }
                    },
                };
                if let Err(item) = feed.send(item).await {
                    if let Ok(d) = item {
                        let _ = d.nack(Duration::ZERO).await;
                    }
                    break;
                }
            }
            while aside.join_next().await.is_some() {}
            self.close().await;
            drop(feed);
        });
        outer
    }

    /// One subscription reading from all of `parts` (for example one per topic); `prefetch`
    /// bounds the deliveries buffered ahead of the handler in between. Closing it closes every
    /// part (their buffered deliveries are handed back for redelivery) before `close` returns.
    pub fn merge(parts: Vec<Subscription>, prefetch: usize) -> Subscription {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        let (outer, mut feed) = Subscription::channel(prefetch);
        let (tx, mut rx) = mpsc::channel::<Result<Delivery, Error>>(prefetch.max(1));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for mut part in parts {
            let tx = tx.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        next = part.rx.recv() => next,
                    };
                    let Some(d) = next else {
                        // This part ended on its own (its consumer is gone): say so on the
                        // merged stream, which goes on with the others.
                        let _ = tx
                            .send(Err(Error::closed(
                                "the subscription of one of the topics ended",
                            )))
                            .await;
                        break;
                    };
                    if let Err(mpsc::error::SendError(d)) = tx.send(d).await {
                        if let Ok(d) = d {
                            let _ = d.nack(Duration::ZERO).await;
                        }
                        break;
                    }
                }
                part.close().await;
            });
        }
        drop(tx);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = feed.stopped() => break,
                    d = rx.recv() => match d {
                        Some(d) => {
                            if let Err(d) = feed.send(d).await {
                                if let Ok(d) = d {
                                    let _ = d.nack(Duration::ZERO).await;
                                }
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
            let _ = stop_tx.send(true);
            // Hand back what the parts forwarded but nobody received; the channel ends when
            // every part has closed.
            while let Some(d) = rx.recv().await {
                if let Ok(d) = d {
                    let _ = d.nack(Duration::ZERO).await;
                }
            }
            while tasks.join_next().await.is_some() {}
            drop(feed);
        });
        outer
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.done.is_none() {
            return; // closed explicitly
        }
        self.stop.take();
        self.rx.close();
        let mut buffered = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            if let Ok(d) = d {
                buffered.push(d);
            }
        }
        if !buffered.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                for d in buffered {
                    let _ = d.nack(Duration::ZERO).await;
                }
            });
        }
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<Delivery, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Feed {
    /// Hand a delivery to the subscriber, waiting for buffer room. Returns the delivery back
    /// when the subscription is closed, so the backend can release it.
    pub async fn send(
        &mut self,
        d: Result<Delivery, Error>,
    ) -> Result<(), Result<Delivery, Error>> {
        if self.stopped {
            return Err(d);
        }
        tokio::select! {
            biased;
            _ = &mut self.stop => {
                self.stopped = true;
                Err(d)
            }
            permit = self.tx.reserve() => match permit {
                Ok(p) => { p.send(d); Ok(()) }
                Err(_) => Err(d),
            },
        }
    }

    /// Hand a delivery over without waiting, for backends that poll from a plain thread.
    /// On failure the delivery comes back with the reason.
    #[expect(
        clippy::result_large_err,
        reason = "the delivery comes back by value: no allocation when the buffer is full"
    )]
    pub fn try_send(&self, d: Result<Delivery, Error>) -> Result<(), TrySend> {
        match self.tx.try_reserve() {
            Ok(p) => {
                p.send(d);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(TrySend::Full(d)),
            Err(mpsc::error::TrySendError::Closed(())) => Err(TrySend::Closed(d)),
        }
    }

    /// Resolves when the subscriber closed or dropped the subscription.
    pub async fn stopped(&mut self) {
        if !self.stopped {
            let _ = (&mut self.stop).await;
            self.stopped = true;
        }
    }

    /// `true` once the subscriber is gone.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Why [`Feed::try_send`] did not hand a delivery over; the delivery comes back.
#[derive(Debug)]
pub enum TrySend {
    /// The subscriber's buffer is full (`prefetch` deliveries waiting): try again later.
    Full(Result<Delivery, Error>),
    /// The subscription was closed or dropped: release the delivery.
    Closed(Result<Delivery, Error>),
}

/// Creates subscriptions.
///
/// # Contract
/// - Every group sees every message; members of one group share them; `group: None` sees every
///   message on its own.
/// - A delivery not acked within `ack_wait`, or nacked, is delivered again (at least once).
/// - Dropping or closing a subscription loses nothing: unsettled deliveries are redelivered.
pub trait Subscriber: Send + Sync {
    /// Start a subscription.
    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send;

    /// How far consumer group `group` is behind on `topic`, from the broker's own bookkeeping
    /// (so any process can read it). A group the broker does not know is a
    /// [`Rejected`](crate::ErrorKind::Rejected) error where the broker can tell (JetStream,
    /// memory); Kafka counts a group with nothing committed from the earliest retained offset.
    /// See [`crate::ops::LagWatch`] for a metric and a threshold callback.
    fn lag(
        &self,
        topic: &Topic,
        group: &str,
    ) -> impl Future<Output = Result<crate::ops::Lag, Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in backend: hands `items` over, then holds its end until the subscriber stops.
    fn part(items: Vec<Result<Delivery, Error>>) -> Subscription {
        let (sub, mut feed) = Subscription::channel(1);
        tokio::spawn(async move {
            for d in items {
                if feed.send(d).await.is_err() {
                    break;
                }
            }
            feed.stopped().await;
        });
        sub
    }

    #[tokio::test]
    async fn a_merged_subscription_passes_errors_and_closes_every_part() {
        let errors = |n| (0..n).map(|_| Err(Error::closed("part error"))).collect();
        let mut merged = Subscription::merge(vec![part(errors(3)), part(errors(3))], 1);
        let first = tokio::time::timeout(Duration::from_secs(5), merged.next())
            .await
            .expect("an item")
            .expect("open");
        assert!(first.is_err(), "errors pass through");
        // Parts still hold errors the merged stream has not taken: closing now must neither
        // hang nor leave a part running.
        tokio::time::timeout(Duration::from_secs(5), merged.close())
            .await
            .expect("close returns once every part has closed");
    }

    #[tokio::test]
    async fn a_part_that_ends_is_reported() {
        let (ended, feed) = Subscription::channel(1);
        drop(feed);
        let mut merged = Subscription::merge(vec![ended, part(Vec::new())], 4);
        let item = tokio::time::timeout(Duration::from_secs(5), merged.next())
            .await
            .expect("an item")
            .expect("open");
        let e = item.expect_err("the ended part is reported");
        assert_eq!(e.kind(), crate::ErrorKind::Closed);
        tokio::time::timeout(Duration::from_secs(5), merged.close())
            .await
            .expect("close");
    }

    #[test]
    fn split_drops_repeated_topics() {
        let spec = SubscribeSpec::topics(["a", "b", "a"]).group("g");
        let parts: Vec<String> = spec
            .split()
            .iter()
            .map(|s| s.topic.as_str().to_owned())
            .collect();
        assert_eq!(parts, ["a", "b"]);
        assert!(spec.split().iter().all(|s| s.group.as_deref() == Some("g")));
    }
}
