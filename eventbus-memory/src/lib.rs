#![doc = include_str!("../README.md")]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_core::spi::{AckToken, DeadLetters, Feed, SharedAck};
use eventbus_core::{
    Ack, Acker, BatchSink, Delivery, DeliveryInfo, Error, ErrorKind, Message, Outcome, Position,
    SinkLimits, StartFrom, SubscribeSpec, Subscriber, Subscription, Topic,
};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

const BACKEND: &str = "memory";

/// An in-process broker. Clones share state.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<BrokerInner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct BrokerInner {
    topics: Mutex<HashMap<Topic, Arc<TopicState>>>,
    blocked: Mutex<HashSet<Topic>>,
    max_message_bytes: AtomicU64,
    next_ephemeral: AtomicU64,
}

#[derive(Default)]
struct TopicState {
    log: Mutex<TopicLog>,
    notify: Notify,
}

#[derive(Default)]
struct TopicLog {
    messages: Vec<Message>,
    groups: HashMap<String, GroupState>,
}

struct GroupState {
    next: u64,
    pending: BTreeMap<u64, PendingEntry>,
    /// (due, offset) for every pending entry.
    due: BTreeSet<(Instant, u64)>,
    members: usize,
    ephemeral: bool,
}

struct PendingEntry {
    deliveries: u32,
    due: Instant,
    token: u64,
}

static TOKENS: AtomicU64 = AtomicU64::new(1);

impl eventbus_core::ops::HealthCheck for MemoryBroker {
    fn health(
        &self,
        _timeout: std::time::Duration,
    ) -> impl Future<Output = eventbus_core::ops::Health> + Send {
        std::future::ready(eventbus_core::ops::Health::up(
            BACKEND,
            std::time::Duration::ZERO,
            "in-process",
        ))
    }
}

impl eventbus_core::Backend for MemoryBroker {
    type Sink = MemorySink;
    type Subscriber = MemorySubscriber;
    fn name(&self) -> &'static str {
        BACKEND
    }
    /// A publishing sink; wrap it in `eventbus_batch::Batcher`.
    async fn sink(&self) -> Result<MemorySink, Error> {
        Ok(MemorySink::new(self))
    }
    fn subscriber(&self) -> MemorySubscriber {
        MemorySubscriber {
            broker: self.clone(),
        }
    }
    /// One process, one copy, nothing expires: no topic options; a group's members share a
    /// topic message by message.
    fn capabilities(&self) -> eventbus_core::Capabilities {
        eventbus_core::Capabilities::none()
    }
    /// Topics need nothing here; the name is checked as a publish would check it, and options
    /// are refused.
    async fn ensure_topic(&self, spec: &eventbus_core::TopicSpec) -> Result<(), Error> {
        eventbus_core::validate::topic(spec.name(), &eventbus_core::validate::PORTABLE)?;
        spec.check(&self.capabilities(), BACKEND)
    }
}

/// The `[memory]` section of a bus config: a new, empty [`MemoryBroker`] per connect.
///
/// ```
/// use eventbus_core::backend::BackendConfig;
/// use eventbus_core::{Backend, BatchSink, Message};
/// use eventbus_memory::MemoryConfig;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut config = MemoryConfig::default();
/// config.max_message_bytes = 1024;
/// let broker = config.connect().await.unwrap();
/// let sink = Backend::sink(&broker).await.unwrap();
/// assert!(sink.validate(&Message::new("t", vec![0u8; 2048])).is_err());
/// # });
/// ```
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// The largest accepted message ([`Message::encoded_len`]). Default 1 MiB.
    pub max_message_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_message_bytes: 1 << 20,
        }
    }
}

impl eventbus_core::backend::BackendConfig for MemoryConfig {
    type Backend = MemoryBroker;
    const NAME: &'static str = BACKEND;
    const ENV: &'static [eventbus_core::backend::EnvVar] = &[];

    fn with_vars(self, _vars: Vec<(String, String)>) -> Result<Self, Error> {
        Ok(self)
    }

    async fn connect(self) -> Result<MemoryBroker, Error> {
        let broker = MemoryBroker::new();
        broker.set_max_message_bytes(self.max_message_bytes);
        Ok(broker)
    }
}

impl MemoryBroker {
    /// A new, empty broker. The default message size limit is 1 MiB.
    pub fn new() -> Self {
        let b = MemoryBroker::default();
        b.inner.max_message_bytes.store(1 << 20, Ordering::Relaxed);
        b
    }

    /// Change the largest accepted message ([`Message::encoded_len`]).
    pub fn set_max_message_bytes(&self, n: usize) {
        self.inner
            .max_message_bytes
            .store(n as u64, Ordering::Relaxed);
    }

    /// Make the broker refuse writes to `topic` (each such message resolves as
    /// [`Outcome::Failed`] with [`ErrorKind::Rejected`]), like a NATS subject no stream covers.
    pub fn block_topic(&self, topic: impl Into<Topic>) {
        self.inner.blocked.lock().insert(topic.into());
    }

    /// Messages stored in `topic`.
    pub fn topic_len(&self, topic: impl Into<Topic>) -> usize {
        self.topic(&topic.into()).log.lock().messages.len()
    }

    /// A copy of the messages stored in `topic`, in order.
    pub fn messages(&self, topic: impl Into<Topic>) -> Vec<Message> {
        self.topic(&topic.into()).log.lock().messages.clone()
    }

    /// Un-acked deliveries of `group` on `topic` plus messages it has not received yet: its lag.
    pub fn group_lag(&self, topic: impl Into<Topic>, group: &str) -> u64 {
        let t = self.topic(&topic.into());
        let log = t.log.lock();
        let len = log.messages.len() as u64;
        log.groups
            .get(group)
            .map_or(len, |g| len - g.next + g.pending.len() as u64)
    }

    fn topic(&self, name: &Topic) -> Arc<TopicState> {
        let mut topics = self.inner.topics.lock();
        Arc::clone(topics.entry(name.clone()).or_default())
    }

    fn append(&self, msg: Message) -> Outcome {
        if self.inner.blocked.lock().contains(msg.topic()) {
            return Outcome::Failed(
                Error::new(
                    ErrorKind::Rejected,
                    format!("topic {} refuses writes", msg.topic()),
                )
                .with_backend(BACKEND),
            );
        }
        let t = self.topic(msg.topic());
        let offset = {
            let mut log = t.log.lock();
            log.messages.push(msg);
            log.messages.len() as u64 - 1
        };
        t.notify.notify_waiters();
        Outcome::Acked(Ack {
            position: Position::Offset(offset),
        })
    }
}

/// The publishing side of a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub struct MemorySink {
    broker: MemoryBroker,
}

impl MemorySink {
    /// A sink publishing to `broker`: [`Backend::sink`](eventbus_core::Backend::sink) without
    /// the `await`, for synchronous setup code (nothing here can fail).
    pub fn new(broker: &MemoryBroker) -> Self {
        MemorySink {
            broker: broker.clone(),
        }
    }
}

impl BatchSink for MemorySink {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> SinkLimits {
        SinkLimits::none()
            .max_message_bytes(self.broker.inner.max_message_bytes.load(Ordering::Relaxed) as usize)
    }

    fn validate(&self, msg: &Message) -> Result<(), Error> {
        eventbus_core::validate::message(
            msg,
            &eventbus_core::validate::PORTABLE,
            self.limits().max_message_bytes,
        )
    }

    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        // Appended synchronously: batches are stored in call order.
        let outcomes: Vec<Outcome> = batch.into_iter().map(|m| self.broker.append(m)).collect();
        std::future::ready(outcomes)
    }
}

/// The subscribing side of a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub struct MemorySubscriber {
    broker: MemoryBroker,
}

impl Subscriber for MemorySubscriber {
    fn lag(
        &self,
        topic: &Topic,
        group: &str,
    ) -> impl Future<Output = Result<eventbus_core::ops::Lag, Error>> + Send {
        let t = self.broker.topic(topic);
        let log = t.log.lock();
        let len = log.messages.len() as u64;
        let lag = log.groups.get(group).map(|g| {
            eventbus_core::ops::Lag::new(len.saturating_sub(g.next), g.pending.len() as u64)
        });
        drop(log);
        std::future::ready(lag.ok_or_else(|| {
            Error::new(ErrorKind::Rejected, "no such consumer group on this topic")
                .with_backend(BACKEND)
        }))
    }

    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send {
        let broker = self.broker.clone();
        async move {
            for t in spec.all_topics() {
                eventbus_core::validate::topic(t.as_str(), &eventbus_core::validate::PORTABLE)
                    .map_err(|e| e.with_backend(BACKEND))?;
            }
            let letters =
                DeadLetters::for_spec(&spec, &eventbus_core::validate::PORTABLE, BACKEND, || {
                    let broker = broker.clone();
                    Ok(move |letter| {
                        std::future::ready(broker.append(letter).into_result().map(drop))
                    })
                })?;
            Subscription::per_topic(spec, letters, |one, feed| subscribe_one(&broker, one, feed))
                .await
        }
    }
}

/// One topic's subscription.
async fn subscribe_one(
    broker: &MemoryBroker,
    spec: SubscribeSpec,
    feed: Feed,
) -> Result<(), Error> {
    let topic = broker.topic(&spec.topic);
    let (group, ephemeral) = match &spec.group {
        Some(g) => (g.clone(), false),
        None => (
            format!(
                "_ephemeral_{}",
                broker.inner.next_ephemeral.fetch_add(1, Ordering::Relaxed)
            ),
            true,
        ),
    };
    {
        let mut log = topic.log.lock();
        let len = log.messages.len() as u64;
        let g = log
            .groups
            .entry(group.clone())
            .or_insert_with(|| GroupState {
                next: if spec.start == StartFrom::Latest {
                    len
                } else {
                    0
                },
                pending: BTreeMap::new(),
                due: BTreeSet::new(),
                members: 0,
                ephemeral,
            });
        g.members += 1;
    }
    tokio::spawn(member(topic, group, spec, feed));
    Ok(())
}

enum Next {
    Deliver(Delivery),
    Wait(Option<Instant>),
}

async fn member(topic: Arc<TopicState>, group: String, spec: SubscribeSpec, mut feed: Feed) {
    let acks: Arc<dyn SharedAck> = Arc::new(GroupAcks {
        topic: Arc::clone(&topic),
        group: group.clone(),
    });
    loop {
        let notified = topic.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = next_delivery(&topic, &group, &spec, &acks);
        match next {
            Next::Deliver(d) => {
                if let Err(Ok(d)) = feed.send(Ok(d)).await {
                    let _ = d.nack(Duration::ZERO).await;
                    break;
                }
            }
            Next::Wait(due) => {
                let sleep = async {
                    match due {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = notified => {}
                    _ = sleep => {}
                    _ = feed.stopped() => break,
                }
            }
        }
    }
    let mut log = topic.log.lock();
    let remove = match log.groups.get_mut(&group) {
        Some(g) => {
            g.members -= 1;
            g.members == 0 && g.ephemeral
        }
        None => false,
    };
    if remove {
        log.groups.remove(&group);
    }
    drop(log);
    // Other members may now pick up what this one released.
    topic.notify.notify_waiters();
}

fn next_delivery(
    topic: &Arc<TopicState>,
    group: &str,
    spec: &SubscribeSpec,
    acks: &Arc<dyn SharedAck>,
) -> Next {
    let now = Instant::now();
    let mut log = topic.log.lock();
    let TopicLog { messages, groups } = &mut *log;
    let Some(g) = groups.get_mut(group) else {
        return Next::Wait(None);
    };
    // 1. A pending delivery whose ack wait expired or whose nack delay passed.
    if let Some(&(due, offset)) = g.due.first()
        && due <= now
    {
        g.due.pop_first();
        let p = g
            .pending
            .get_mut(&offset)
            .expect("due index matches pending");
        // Delivered again even past `max_deliveries`: the subscription gives up on it.
        p.deliveries += 1;
        p.due = now + spec.ack_wait;
        p.token = TOKENS.fetch_add(1, Ordering::Relaxed);
        g.due.insert((p.due, offset));
        let d = make_delivery(
            acks,
            &messages[offset as usize],
            offset,
            p.deliveries,
            p.token,
        );
        return Next::Deliver(d);
    }
    // 2. The next new message.
    if (g.next as usize) < messages.len() {
        let offset = g.next;
        g.next += 1;
        let token = TOKENS.fetch_add(1, Ordering::Relaxed);
        let due = now + spec.ack_wait;
        g.pending.insert(
            offset,
            PendingEntry {
                deliveries: 1,
                due,
                token,
            },
        );
        g.due.insert((due, offset));
        return Next::Deliver(make_delivery(
            acks,
            &messages[offset as usize],
            offset,
            1,
            token,
        ));
    }
    Next::Wait(g.due.first().map(|(d, _)| *d))
}

fn make_delivery(
    acks: &Arc<dyn SharedAck>,
    msg: &Message,
    offset: u64,
    n: u32,
    token: u64,
) -> Delivery {
    Delivery::new(
        msg.clone(),
        DeliveryInfo::new(n, Position::Offset(offset)),
        Acker::shared(Arc::clone(acks), AckToken([offset, token, 0])),
    )
}

/// Settles one group member's deliveries; a delivery's token holds its offset and the
/// delivery token its pending entry had when it was handed over.
struct GroupAcks {
    topic: Arc<TopicState>,
    group: String,
}

impl GroupAcks {
    /// Drop the pending entry (`None`) or set it to be redelivered at `redeliver_at`, if
    /// `token` is still its current delivery.
    fn settle(&self, token: AckToken, redeliver_at: Option<Instant>) {
        let [offset, token, _] = token.0;
        let mut log = self.topic.log.lock();
        if let Some(g) = log.groups.get_mut(&self.group)
            && let Some(p) = g.pending.get_mut(&offset)
        {
            if p.token != token {
                return; // stale: already redelivered to someone else
            }
            g.due.remove(&(p.due, offset));
            match redeliver_at {
                Some(at) => {
                    p.due = at;
                    p.token = 0;
                    g.due.insert((at, offset));
                }
                None => {
                    g.pending.remove(&offset);
                }
            }
        }
        drop(log);
        if redeliver_at.is_some() {
            self.topic.notify.notify_waiters();
        }
    }
}

impl SharedAck for GroupAcks {
    fn ack(&self, token: AckToken) -> Result<(), Error> {
        self.settle(token, None);
        Ok(())
    }
    fn nack(&self, token: AckToken, delay: Duration) -> Result<(), Error> {
        self.settle(token, Some(Instant::now() + delay));
        Ok(())
    }
    fn term(&self, token: AckToken) -> Result<(), Error> {
        self.settle(token, None);
        Ok(())
    }
}
