//! Consumer groups behind the `Subscriber` trait: at-least-once, only the acked prefix of each
//! partition is ever committed.
//!
//! One plain thread per subscription polls librdkafka (so rebalance callbacks may block briefly
//! without stalling the async runtime) and hands deliveries to the subscription's channel.
//! Acks, nacks and terms are local bookkeeping; the thread commits, per partition, the offset
//! just past the longest run of settled messages: every 100 ms while acks arrive, on revoke
//! and on close. A nacked or un-acked (after `ack_wait`) message is delivered again by the
//! same member; a message whose member goes away is delivered again by the next owner of its
//! partition (Kafka keeps no per-message delivery count, so the count restarts there).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::spi::{AckToken, DeadLetters, Feed, SharedAck, TrySend};
use eventbus_core::{
    Acker, Delivery, DeliveryInfo, Error, ErrorKind, Message, Position, StartFrom, SubscribeSpec,
    Subscriber, Subscription, Topic,
};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::KafkaConfig;
use crate::error::{self, BACKEND};

/// Longest `Subscription::close` waits for the final commit and the group leave.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How often acked progress is committed while acks keep arriving.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// Longest single `poll` when idle (also the latency of a nack with zero delay).
const IDLE_POLL: Duration = Duration::from_millis(20);
/// How long the handler may stay behind before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Longest a revoke waits for deliveries already handed to the handler to be settled.
const REVOKE_DRAIN: Duration = Duration::from_secs(10);

/// Subscribes with Kafka consumers. `group: Some(g)` joins consumer group `g` (Kafka's own
/// group protocol shares partitions among members); `group: None` reads every partition of the
/// topic on its own and commits nothing.
///
/// Kafka-specific behaviour: members of a group share *partitions*, so a topic with one
/// partition gives everything to one member; a delivery's count is kept by this member only.
#[derive(Clone, Debug)]
pub struct KafkaSubscriber {
    pub(crate) config: KafkaConfig,
    pub(crate) lag_readers: LagReaders,
}

/// Most groups whose lag reader is kept; lag of further groups uses a one-off consumer.
const MAX_LAG_READERS: usize = 32;

/// Idle consumers that read committed offsets, one per group (offsets are read *as* the group;
/// the consumer never joins it). Kept and shared by the backend's subscribers, so a lag watch
/// polling every few seconds reuses one connection instead of opening one per reading.
#[derive(Clone, Default)]
pub(crate) struct LagReaders(Arc<Mutex<HashMap<String, Arc<BaseConsumer>>>>);

impl std::fmt::Debug for LagReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagReaders")
            .field("groups", &self.0.lock().len())
            .finish()
    }
}

impl LagReaders {
    fn get(&self, config: &KafkaConfig, group: &str) -> Result<Arc<BaseConsumer>, Error> {
        if let Some(c) = self.0.lock().get(group) {
            return Ok(Arc::clone(c));
        }
        let consumer: Arc<BaseConsumer> = Arc::new(
            config
                .consumer_config(group, true)
                .create()
                .map_err(|e| error::other("invalid Kafka consumer configuration", e))?,
        );
        let mut readers = self.0.lock();
        if readers.len() < MAX_LAG_READERS {
            return Ok(Arc::clone(
                readers.entry(group.to_owned()).or_insert(consumer),
            ));
        }
        Ok(consumer)
    }
}

impl Subscriber for KafkaSubscriber {
    /// Per partition, the high watermark minus the group's committed offset (from the earliest
    /// retained offset when the group has committed nothing there), summed. Kafka has no
    /// separate count of delivered-but-unacked messages: they are in `pending` until committed.
    fn lag(
        &self,
        topic: &Topic,
        group: &str,
    ) -> impl Future<Output = Result<eventbus_core::ops::Lag, Error>> + Send {
        let (config, readers) = (self.config.clone(), self.lag_readers.clone());
        let (topic, group) = (topic.as_str().to_owned(), group.to_owned());
        async move {
            tokio::task::spawn_blocking(move || group_lag(&config, &readers, &topic, &group))
                .await
                .map_err(|_| error::err(ErrorKind::Other, "lag task failed"))?
        }
    }

    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send {
        let config = self.config.clone();
        async move {
            // Before any I/O: a bad dead-letter topic is refused as such, whatever the
            // patterns match (resolving them does not touch the dead-letter settings).
            let letters = DeadLetters::for_spec(&spec, &crate::TOPIC_RULES, BACKEND, || {
                let producer = LetterProducer::new(&config)?;
                Ok(move |letter| producer.clone().send(letter))
            })?;
            let spec = resolve_patterns(&config, spec).await?;
            Subscription::per_topic(spec, letters, |one, feed| subscribe_one(&config, one, feed))
                .await
        }
    }
}

/// Replace every `^regex` topic of `spec` with the cluster's topics it matches (internal
/// `__` topics excepted), and validate plain names. A pattern that matches nothing is a
/// `Rejected` error naming the pattern.
async fn resolve_patterns(
    config: &KafkaConfig,
    spec: SubscribeSpec,
) -> Result<SubscribeSpec, Error> {
    let mut names: Vec<Topic> = Vec::new();
    let mut cluster: Option<Vec<String>> = None;
    for t in spec.all_topics() {
        let Some(_) = t.as_str().strip_prefix('^') else {
            eventbus_core::validate::topic(t.as_str(), &crate::TOPIC_RULES)
                .map_err(|e| e.with_backend(BACKEND))?;
            if !names.contains(t) {
                names.push(t.clone());
            }
            continue;
        };
        let re = regex::Regex::new(t.as_str()).map_err(|e| {
            error::err(
                ErrorKind::InvalidMessage,
                format!("invalid topic pattern {:?}: {e}", t.as_str()),
            )
        })?;
        if cluster.is_none() {
            let c = config.clone();
            let timeout = config.connect_timeout;
            cluster = Some(
                tokio::task::spawn_blocking(move || {
                    let client: BaseConsumer = c
                        .client_config()
                        .create()
                        .map_err(|e| error::other("invalid Kafka client configuration", e))?;
                    let md = client
                        .fetch_metadata(None, timeout)
                        .map_err(|e| error::other("could not list the cluster's topics", e))?;
                    Ok::<_, Error>(md.topics().iter().map(|t| t.name().to_owned()).collect())
                })
                .await
                .map_err(|_| error::err(ErrorKind::Other, "topic listing task failed"))??,
            );
        }
        // Internal topics and this subscription's own dead-letter topic are never read.
        let dead_letter = spec.dead_letter.as_ref().map(Topic::as_str);
        let mut matched: Vec<&String> = cluster
            .iter()
            .flatten()
            .filter(|n| !n.starts_with("__") && Some(n.as_str()) != dead_letter && re.is_match(n))
            .collect();
        matched.sort();
        let any = !matched.is_empty();
        for n in matched {
            let topic = Topic::new(n);
            if !names.contains(&topic) {
                names.push(topic);
            }
        }
        if !any {
            return Err(error::err(
                ErrorKind::Rejected,
                format!(
                    "no topic of the cluster matches the pattern {:?}",
                    t.as_str()
                ),
            ));
        }
    }
    let mut names = names.into_iter();
    let mut spec = spec;
    spec.topic = names.next().expect("at least one topic");
    spec.more_topics = names.collect();
    Ok(spec)
}

/// One topic's subscription: a consumer (and its thread) in the spec's group.
async fn subscribe_one(config: &KafkaConfig, spec: SubscribeSpec, feed: Feed) -> Result<(), Error> {
    let config = config.clone();
    let rt = tokio::runtime::Handle::current();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("eventbus-kafka-sub".into())
        .spawn(move || match start(&config, &spec) {
            Ok((consumer, shared)) => {
                let _ = ready_tx.send(Ok(()));
                let _rt = rt.enter();
                pump(&consumer, &shared, &spec, &feed);
                // The feed outlives the leave: `Subscription::close` returns once the
                // acked prefix is committed and the member has left the group, so the
                // next member gets the partitions at once, even if this process exits
                // right after (otherwise the group waits out `session.timeout.ms`).
                // Bounded: against a cluster that is down, the commit and the leave can take
                // librdkafka's own timeouts; `close` then returns after CLOSE_WAIT and the
                // consumer finishes leaving in the background.
                let (left, leaving) = std::sync::mpsc::channel::<()>();
                let _ = std::thread::Builder::new()
                    .name("eventbus-kafka-close".into())
                    .spawn(move || {
                        let _ = leaving.recv_timeout(CLOSE_WAIT);
                        drop(feed);
                    });
                shutdown(consumer, &shared);
                drop(left);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| {
            error::err(ErrorKind::Other, "could not start the consumer thread").with_source(e)
        })?;
    ready_rx
        .await
        .map_err(|_| error::err(ErrorKind::Other, "consumer thread ended"))??;
    Ok(())
}

/// The partitions of `topic`; an unknown topic is a `Rejected` error.
fn partitions_of<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    wait: Duration,
) -> Result<Vec<i32>, Error> {
    let md = consumer
        .fetch_metadata(Some(topic), wait)
        .map_err(|e| error::other("could not read topic metadata", e))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(error::err(
            ErrorKind::Rejected,
            format!("unknown topic {topic:?}: create it first"),
        ));
    }
    Ok(partitions)
}

/// Committed offsets of `group` against the high watermarks of `topic` (a consumer that never
/// subscribes, so it does not join the group or disturb its members).
fn group_lag(
    config: &KafkaConfig,
    readers: &LagReaders,
    topic: &str,
    group: &str,
) -> Result<eventbus_core::ops::Lag, Error> {
    let consumer = readers.get(config, group)?;
    let wait = config.connect_timeout.max(Duration::from_secs(10));
    let partitions = partitions_of(&consumer, topic, wait)?;
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, wait)
        .map_err(|e| error::other("committed offsets", e))?;
    let mut pending = 0u64;
    for e in committed.elements() {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, e.partition(), wait)
            .map_err(|e| error::other("watermarks", e))?;
        let from = match e.offset() {
            Offset::Offset(o) => o.max(lo),
            _ => lo,
        };
        pending += (hi - from).max(0) as u64;
    }
    Ok(eventbus_core::ops::Lag::new(pending, 0))
}

/// A started consumer and its shared state.
type Started = (BaseConsumer<Ctx>, Arc<Shared>);

/// Create the consumer, check the topic exists, and subscribe (group) or assign (exclusive).
fn start(config: &KafkaConfig, spec: &SubscribeSpec) -> Result<Started, Error> {
    let topic = spec.topic.as_str();
    let group = spec.group.clone().unwrap_or_else(|| {
        format!(
            "eventbus-exclusive-{}",
            eventbus_core::MessageId::generate()
        )
    });
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        pending: Mutex::new(Vec::with_capacity(BURST)),
        ack_wait: spec.ack_wait,
        grouped: spec.group.is_some(),
    });
    let consumer: BaseConsumer<Ctx> = config
        .consumer_config(&group, spec.start == StartFrom::Earliest)
        .create_with_context(Ctx {
            shared: Arc::clone(&shared),
        })
        .map_err(|e| error::other("could not create the Kafka consumer", e))?;
    let partitions = partitions_of(&consumer, topic, config.connect_timeout)?;
    if spec.group.is_some() {
        consumer
            .subscribe(&[topic])
            .map_err(|e| error::other("could not join the consumer group", e))?;
    } else {
        let start = match spec.start {
            StartFrom::Latest => Offset::End,
            _ => Offset::Beginning,
        };
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, start)
                .map_err(|e| error::other("invalid partition list", e))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| error::other("could not assign partitions", e))?;
        shared.state.lock().assigned(&partitions);
    }
    Ok((consumer, shared))
}

/// How the dead-letter layer publishes a letter here: one idempotent producer per
/// subscription, a letter done once its delivery report says it is stored.
#[derive(Clone)]
struct LetterProducer {
    producer: FutureProducer,
    timeout: Duration,
}

impl LetterProducer {
    fn new(config: &KafkaConfig) -> Result<Self, Error> {
        Ok(LetterProducer {
            producer: config
                .producer_config()
                .create()
                .map_err(|e| error::other("could not create the dead-letter producer", e))?,
            timeout: config.message_timeout,
        })
    }

    async fn send(self, letter: Message) -> Result<(), Error> {
        let (id, topic, key, headers, payload) = letter.into_parts();
        let mut scratch = String::new();
        let h = crate::headers::encode(&id, &headers, true, &mut scratch);
        let mut record = FutureRecord::to(topic.as_str()).payload(&payload[..]);
        if let Some(h) = h {
            record = record.headers(h);
        }
        if let Some(k) = &key {
            record = record.key(&k[..]);
        }
        self.producer
            .send(record, self.timeout)
            .await
            .map(drop)
            .map_err(|(e, _)| error::other("dead letter not stored", e))
    }
}

/// Identifies one delivery of one message in one assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    partition: i32,
    offset: i64,
    /// Assignment epoch: acks from before a revoke are ignored (the partition's next owner
    /// delivers the message again).
    epoch: u64,
    /// Delivery round: a nack or ack-wait timer only counts for the latest delivery.
    round: u32,
}

impl Key {
    /// The key as the token its delivery's [`Acker`] carries: partition and round share a word.
    fn token(self) -> AckToken {
        let low = u64::from(self.partition as u32) | (u64::from(self.round) << 32);
        AckToken([low, self.offset as u64, self.epoch])
    }

    fn from_token(t: AckToken) -> Key {
        let [low, offset, epoch] = t.0;
        Key {
            partition: low as u32 as i32,
            round: (low >> 32) as u32,
            offset: offset as i64,
            epoch,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting in the backlog or for a redelivery timer: not with the handler.
    Queued,
    /// Handed to the subscription (buffered or with the handler).
    Out,
    /// Acked or terminated.
    Settled,
}

struct Entry {
    message: Message,
    count: u32,
    round: u32,
    stage: Stage,
}

impl Entry {
    /// `k` is this message's latest delivery and it is not settled: its timer still counts,
    /// its delivery may still be handed over.
    fn is_current(&self, k: &Key) -> bool {
        self.round == k.round && self.stage != Stage::Settled
    }
}

/// A partition's messages in flight, in offset order. They are polled in offset order, so an
/// entry is appended at the back and a settled run leaves from the front; a lookup first tries
/// the slot the offset would have with no gaps (offsets are contiguous unless the log has
/// gaps, such as transaction markers or compaction), then a binary search.
#[derive(Default)]
struct Ledger {
    items: VecDeque<(i64, Entry)>,
    /// The most entries held since [`Ledger::first_open`] last judged the capacity.
    peak: usize,
}

impl Ledger {
    fn index(&self, offset: i64) -> Option<usize> {
        let (first, _) = self.items.front()?;
        if let Ok(i) = usize::try_from(offset - first)
            && self.items.get(i).is_some_and(|(o, _)| *o == offset)
        {
            return Some(i);
        }
        self.items.binary_search_by_key(&offset, |(o, _)| *o).ok()
    }

    fn get(&self, offset: i64) -> Option<&Entry> {
        self.index(offset).map(|i| &self.items[i].1)
    }

    fn get_mut(&mut self, offset: i64) -> Option<&mut Entry> {
        self.index(offset).map(|i| &mut self.items[i].1)
    }

    /// Add `entry` at `offset`, unless one is there already (`false`).
    fn insert(&mut self, offset: i64, entry: Entry) -> bool {
        match self.items.back() {
            Some((last, _)) if *last >= offset => {
                match self.items.binary_search_by_key(&offset, |(o, _)| *o) {
                    Ok(_) => false,
                    Err(i) => {
                        self.items.insert(i, (offset, entry));
                        self.peak = self.peak.max(self.items.len());
                        true
                    }
                }
            }
            _ => {
                self.items.push_back((offset, entry));
                self.peak = self.peak.max(self.items.len());
                true
            }
        }
    }

    /// Drop the settled run at the front; the offset of the first entry still in flight.
    /// Gives memory back after a burst (a deque keeps its largest capacity): once a whole
    /// interval between two calls held under a quarter of it, so a steady flow, which fills
    /// and empties the ledger between commits, does not shrink and regrow it every time.
    fn first_open(&mut self) -> Option<i64> {
        while self
            .items
            .front()
            .is_some_and(|(_, e)| e.stage == Stage::Settled)
        {
            self.items.pop_front();
        }
        if let Some(cap) = shrunk(self.peak.max(self.items.len()), self.items.capacity()) {
            self.items.shrink_to(cap);
        }
        self.peak = self.items.len();
        self.items.front().map(|(offset, _)| *offset)
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.items.iter().map(|(_, e)| e)
    }
}

/// Redelivery timers: the ack wait of every delivery handed over, and the delay of every nack.
///
/// Ack-wait timers are set in time order (one fixed wait added to each pass's `now`), so they
/// queue first in, first out; nack delays vary and go in a heap. A timer whose delivery was
/// settled stays until it is due, so left alone the timers would number every message handed
/// over in the last ack wait (30 s at 100,000 msg/s: 3 million of 40 B, over 100 MB).
/// [`Timers::compact`] drops those once there are more than twice the messages in flight
/// plus [`TIMER_SLACK`].
#[derive(Default)]
struct Timers {
    waits: VecDeque<(Instant, Key)>,
    delays: BinaryHeap<Reverse<(Instant, Key)>>,
}

/// Timers beyond twice the messages in flight that [`Timers::compact`] lets accumulate before
/// it walks them. Each walk leaves at most one timer per message in flight, so its cost is
/// spread over the timers it removed.
const TIMER_SLACK: usize = 4_096;

impl Timers {
    fn len(&self) -> usize {
        self.waits.len() + self.delays.len()
    }

    /// An ack-wait timer. One set earlier than the last (not expected) goes in the heap, so
    /// the queue stays in time order.
    fn wait(&mut self, at: Instant, k: Key) {
        if self.waits.back().is_some_and(|(last, _)| *last > at) {
            self.delays.push(Reverse((at, k)));
        } else {
            self.waits.push_back((at, k));
        }
    }

    /// A nack's redelivery timer.
    fn delay(&mut self, at: Instant, k: Key) {
        self.delays.push(Reverse((at, k)));
    }

    /// When the earliest timer is due.
    fn next_at(&self) -> Option<Instant> {
        let wait = self.waits.front().map(|(at, _)| *at);
        let delay = self.delays.peek().map(|Reverse((at, _))| *at);
        match (wait, delay) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (w, d) => w.or(d),
        }
    }

    /// Take the earliest timer due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Key> {
        let wait = self
            .waits
            .front()
            .map(|(at, _)| *at)
            .filter(|at| *at <= now);
        let delay = self
            .delays
            .peek()
            .map(|Reverse((at, _))| *at)
            .filter(|at| *at <= now);
        match (wait, delay) {
            (Some(w), Some(d)) if d < w => self.delays.pop().map(|Reverse((_, k))| k),
            (Some(_), _) => self.waits.pop_front().map(|(_, k)| k),
            (None, Some(_)) => self.delays.pop().map(|Reverse((_, k))| k),
            (None, None) => None,
        }
    }

    /// Keep only the timers `live` says still count, once there are more than twice
    /// `in_flight` (at most one timer per message in flight counts) plus [`TIMER_SLACK`].
    fn compact(&mut self, in_flight: usize, live: impl Fn(&Key) -> bool) {
        if self.len() <= in_flight.saturating_mul(2).saturating_add(TIMER_SLACK) {
            return;
        }
        self.waits.retain(|(_, k)| live(k));
        self.delays.retain(|Reverse((_, k))| live(k));
        if let Some(cap) = shrunk(self.waits.len(), self.waits.capacity()) {
            self.waits.shrink_to(cap);
        }
        if let Some(cap) = shrunk(self.delays.len(), self.delays.capacity()) {
            self.delays.shrink_to(cap);
        }
    }
}

/// The capacity to give a buffer back to after a burst (collections keep their largest
/// capacity): twice its length once it is over 4,096 and under a quarter full.
fn shrunk(len: usize, capacity: usize) -> Option<usize> {
    (capacity > 4_096 && len < capacity / 4).then_some(len * 2)
}

struct Part {
    epoch: u64,
    entries: Ledger,
    /// Offset after the last message polled, once one was.
    next: Option<i64>,
    /// Last offset committed by us.
    committed: Option<i64>,
}

impl Part {
    /// Its messages still in flight (polled, not settled): what leaves the unsettled count
    /// when the partition's books are dropped.
    fn open(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.stage != Stage::Settled)
            .count()
    }

    /// Drop the settled run at the front; the offset to commit (first unsettled, or after the
    /// last polled message).
    fn commit_point(&mut self) -> Option<i64> {
        self.entries.first_open().or(self.next)
    }
}

/// `k` is the latest delivery of a message in flight in the current assignment of its
/// partition: its timer fires, its delivery is handed over. [`State::compact_timers`] keeps
/// exactly the timers this holds for.
fn current(parts: &HashMap<i32, Part>, k: &Key) -> bool {
    parts
        .get(&k.partition)
        .filter(|p| p.epoch == k.epoch)
        .and_then(|p| p.entries.get(k.offset))
        .is_some_and(|e| e.is_current(k))
}

#[derive(Default)]
struct State {
    parts: HashMap<i32, Part>,
    timers: Timers,
    backlog: VecDeque<(Key, Delivery)>,
    /// Messages polled and not yet settled, over all partitions.
    unsettled: usize,
    /// Something was settled since the last commit.
    dirty: bool,
    paused: bool,
    /// The subscription is shutting down: a revoke commits at once, without draining.
    closing: bool,
    next_epoch: u64,
}

impl State {
    fn assigned(&mut self, partitions: &[i32]) {
        tracing::debug!(
            ?partitions,
            unsettled = self.unsettled,
            "partitions assigned"
        );
        for p in partitions {
            self.next_epoch += 1;
            let replaced = self.parts.insert(
                *p,
                Part {
                    epoch: self.next_epoch,
                    entries: Ledger::default(),
                    next: None,
                    committed: None,
                },
            );
            // Assigned again without a revoke first (rdkafka's default handling of a rebalance
            // error unassigns without one): the old assignment's messages are no longer in
            // flight here.
            if let Some(old) = replaced {
                self.unsettled -= old.open();
            }
        }
        self.paused = false;
    }

    fn entry(&mut self, k: &Key) -> Option<&mut Entry> {
        let part = self.parts.get_mut(&k.partition)?;
        if part.epoch != k.epoch {
            return None;
        }
        part.entries.get_mut(k.offset)
    }

    /// Drop the timers of deliveries settled or replaced since (see [`Timers`]).
    fn compact_timers(&mut self) {
        let State {
            parts,
            timers,
            unsettled,
            ..
        } = self;
        timers.compact(*unsettled, |k| current(parts, k));
    }

    fn settle(&mut self, k: &Key) {
        if let Some(e) = self.entry(k)
            && e.stage != Stage::Settled
        {
            e.stage = Stage::Settled;
            self.unsettled -= 1;
            self.dirty = true;
        }
    }

    /// Queue (another) delivery of the entry at `k` in a new round.
    fn deliver(&mut self, shared: &Arc<Shared>, k: Key) {
        let Some(e) = self.entry(&k) else { return };
        e.round += 1;
        e.count += 1;
        e.stage = Stage::Queued;
        let key = Key {
            round: e.round,
            ..k
        };
        let d = Delivery::new(
            e.message.clone(),
            DeliveryInfo::new(
                e.count,
                Position::Partition {
                    partition: k.partition,
                    offset: k.offset,
                },
            ),
            Acker::shared(Arc::clone(shared) as Arc<dyn SharedAck>, key.token()),
        );
        self.backlog.push_back((key, d));
    }

    /// Offsets to commit for `partitions` (all when `None`) where they moved.
    fn take_commits(&mut self, topic: &str, partitions: Option<&[i32]>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, part) in &mut self.parts {
            if partitions.is_some_and(|ps| !ps.contains(p)) {
                continue;
            }
            if let Some(at) = part.commit_point()
                && part.committed != Some(at)
                && tpl
                    .add_partition_offset(topic, *p, Offset::Offset(at))
                    .is_ok()
            {
                part.committed = Some(at);
            }
        }
        self.dirty = false;
        tpl
    }
}

struct Shared {
    state: Mutex<State>,
    /// Messages polled in the current burst, not yet admitted. A rebalance callback (which
    /// runs inside a poll) admits them first, so each is registered under the assignment it
    /// was fetched in.
    pending: Mutex<Vec<Polled>>,
    ack_wait: Duration,
    grouped: bool,
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        admit(&self.shared);
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let Some(topic) = tpl.elements().first().map(|e| e.topic().to_owned()) else {
            return;
        };
        // Deliveries the handler already has get a bounded chance to be settled, so the next
        // owner does not process them a second time.
        let drain_until = Instant::now() + REVOKE_DRAIN.min(self.shared.ack_wait);
        loop {
            let mut st = self.shared.state.lock();
            st.backlog.retain(|(k, _)| !revoked.contains(&k.partition));
            let out = revoked
                .iter()
                .filter_map(|p| st.parts.get(p))
                .flat_map(|p| p.entries.values())
                .filter(|e| e.stage == Stage::Out)
                .count();
            if out == 0 || st.closing || Instant::now() >= drain_until {
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut st = self.shared.state.lock();
        let commit = st.take_commits(&topic, Some(&revoked));
        for p in &revoked {
            if let Some(part) = st.parts.remove(p) {
                st.unsettled -= part.open();
            }
        }
        drop(st);
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "commit on revoke failed; the next owner may redeliver");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        admit(&self.shared);
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.shared.state.lock().assigned(&parts);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; uncommitted messages may be redelivered");
        }
    }
}

/// Poll, hand over, redeliver and commit until the subscription is closed.
fn pump(consumer: &BaseConsumer<Ctx>, shared: &Arc<Shared>, spec: &SubscribeSpec, feed: &Feed) {
    let topic = spec.topic.as_str();
    let mut last_commit = Instant::now();
    let mut flow = Flow {
        max_unsettled: spec.prefetch.saturating_mul(8).max(1_000),
        behind_since: None,
    };
    let mut last_topic: Option<Topic> = None;
    loop {
        if feed.is_stopped() {
            return;
        }
        let now = Instant::now();
        let mut st = shared.state.lock();
        st.redeliver_due(shared, now);
        if !st.hand_over(feed, shared, now) {
            return;
        }
        st.compact_timers();
        let (behind, pause) = flow.control(&mut st, consumer, topic, now);
        let wait = if behind {
            Duration::from_millis(1)
        } else {
            st.timers
                .next_at()
                .map_or(IDLE_POLL, |at| at.saturating_duration_since(now))
                .min(IDLE_POLL)
        };
        let commit = (shared.grouped && st.dirty && last_commit.elapsed() >= COMMIT_EVERY)
            .then(|| st.take_commits(topic, None));
        drop(st);
        if let Some(tpl) = commit {
            last_commit = Instant::now();
            if tpl.count() > 0
                && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
            {
                tracing::debug!(error = %e, "async commit not queued");
            }
        }
        if behind && !pause {
            std::thread::sleep(wait);
            continue;
        }
        poll_burst(consumer, shared, feed, wait, &mut last_topic);
    }
}

impl State {
    /// Deliver again what is due: its ack wait expired or its nack delay is over. Past
    /// `max_deliveries` too: the subscription gives up on it (dead letter or termination) with
    /// the count this delivery carries.
    fn redeliver_due(&mut self, shared: &Arc<Shared>, now: Instant) {
        while let Some(k) = self.timers.pop_due(now) {
            if current(&self.parts, &k) {
                self.deliver(shared, k);
            }
        }
    }

    /// Hand over what is waiting, as far as the buffer takes it; `false` once the
    /// subscription is gone. A delivery whose message was settled meanwhile (an earlier
    /// delivery acked after its ack wait ran out) or that a later round replaced is dropped:
    /// handing it over would count a settled message as in flight again.
    fn hand_over(&mut self, feed: &Feed, shared: &Shared, now: Instant) -> bool {
        while let Some((k, d)) = self.backlog.pop_front() {
            if !current(&self.parts, &k) {
                continue;
            }
            match feed.try_send(Ok(d)) {
                Ok(()) => {
                    if let Some(e) = self.entry(&k) {
                        e.stage = Stage::Out;
                    }
                    // `now` is this pass's: the burst was polled just before it.
                    self.timers.wait(now + shared.ack_wait, k);
                }
                Err(TrySend::Full(Ok(d))) => {
                    self.backlog.push_front((k, d));
                    break;
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// Flow control. The handler is behind when its buffer is full or it holds too many unsettled
/// messages. Then stop polling (librdkafka's own bounded queue keeps what it prefetched); if
/// that lasts, pause the partitions (which makes librdkafka drop its prefetched data and
/// refetch on resume) and keep polling for group events only.
struct Flow {
    max_unsettled: usize,
    behind_since: Option<Instant>,
}

impl Flow {
    /// Whether the handler is behind, and whether the partitions are (now) paused.
    fn control(
        &mut self,
        st: &mut State,
        consumer: &BaseConsumer<Ctx>,
        topic: &str,
        now: Instant,
    ) -> (bool, bool) {
        let behind = !st.backlog.is_empty() || st.unsettled >= self.max_unsettled;
        if !behind {
            self.behind_since = None;
        }
        let pause = behind && now - *self.behind_since.get_or_insert(now) >= PAUSE_AFTER;
        if pause != st.paused {
            tracing::debug!(
                topic,
                pause,
                unsettled = st.unsettled,
                backlog = st.backlog.len(),
                "handler behind: partitions paused or resumed"
            );
            st.paused = pause;
            if let Ok(tpl) = consumer.assignment() {
                let r = if pause {
                    consumer.pause(&tpl)
                } else {
                    consumer.resume(&tpl)
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "pause/resume failed");
                }
            }
        }
        (behind, pause)
    }
}

/// Poll once for up to `wait`, then take what librdkafka already holds before handing over,
/// so the handler's task is woken once per burst rather than once per message, and the state
/// is locked once per burst, not per message (acks contend for it). A poll that runs a
/// rebalance callback admits what came before it (`Shared::pending`).
fn poll_burst(
    consumer: &BaseConsumer<Ctx>,
    shared: &Arc<Shared>,
    feed: &Feed,
    wait: Duration,
    last_topic: &mut Option<Topic>,
) {
    match consumer.poll(wait) {
        None => {}
        Some(Ok(m)) => {
            let first = polled(&m, last_topic);
            shared.pending.lock().push(first);
            for _ in 1..BURST {
                match consumer.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        let next = polled(&m, last_topic);
                        shared.pending.lock().push(next);
                    }
                    Some(Err(e)) => {
                        consumer_error(feed, e);
                        break;
                    }
                    None => break,
                }
            }
            admit(shared);
        }
        Some(Err(e)) => consumer_error(feed, e),
    }
}

/// Most messages taken from librdkafka in one go before they are handed over.
const BURST: usize = 256;

/// Report what the handler must know (credentials, a missing topic); log the rest.
fn consumer_error(feed: &Feed, e: rdkafka::error::KafkaError) {
    let err = error::other("consumer error", e);
    if matches!(err.kind(), ErrorKind::Auth | ErrorKind::Rejected) {
        // librdkafka reports such an error again on later polls; a full buffer only delays it.
        if let Err(TrySend::Full(Err(err))) = feed.try_send(Err(err)) {
            tracing::warn!(error = %err, "consumer error not handed over yet: the subscription's buffer is full");
        }
    } else {
        tracing::debug!(error = %err, "transient consumer error");
    }
}

/// A polled message, decoded outside the state lock: its partition, offset and message.
type Polled = (i32, i64, Message);

/// Decode a freshly polled message (outside the state lock) for [`admit`].
fn polled(m: &rdkafka::message::BorrowedMessage<'_>, topic: &mut Option<Topic>) -> Polled {
    use rdkafka::Message as _;
    (
        m.partition(),
        m.offset(),
        crate::headers::decode_reusing(m, topic),
    )
}

/// Register the freshly polled messages ([`Shared::pending`]) and queue their first
/// deliveries, under one lock.
fn admit(shared: &Arc<Shared>) {
    let mut burst = {
        let mut pending = shared.pending.lock();
        if pending.is_empty() {
            return;
        }
        std::mem::take(&mut *pending)
    };
    let mut st = shared.state.lock();
    for (partition, offset, message) in burst.drain(..) {
        let Some(part) = st.parts.get_mut(&partition) else {
            continue; // revoked meanwhile: the next owner reads it
        };
        part.next = Some(offset + 1);
        let epoch = part.epoch;
        let fresh = Entry {
            message,
            count: 0,
            round: 0,
            stage: Stage::Queued,
        };
        if !part.entries.insert(offset, fresh) {
            continue;
        }
        st.unsettled += 1;
        st.deliver(
            shared,
            Key {
                partition,
                offset,
                epoch,
                round: 0,
            },
        );
    }
    drop(st);
    // The buffer goes back for the next burst with its capacity: taken empty, it grew again
    // from nothing at every burst (a reallocation and a copy of the messages at each doubling).
    let mut pending = shared.pending.lock();
    if pending.is_empty() {
        *pending = burst;
    }
}

/// Commit what was settled, then leave the group and close the consumer.
fn shutdown(consumer: BaseConsumer<Ctx>, shared: &Arc<Shared>) {
    // Dead letters on their way were settled before this: closing or dropping a subscription
    // finishes the work its layers set aside before it stops the consumers.
    let mut st = shared.state.lock();
    st.closing = true;
    st.backlog.clear();
    let topic = consumer
        .assignment()
        .ok()
        .and_then(|t| t.elements().first().map(|e| e.topic().to_owned()));
    let commit = match (&topic, shared.grouped) {
        (Some(t), true) => Some(st.take_commits(t, None)),
        _ => None,
    };
    drop(st);
    if let Some(tpl) = commit
        && tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
    {
        tracing::warn!(error = %e, "final commit failed; the group may redeliver");
    }
    consumer.unsubscribe();
}

/// Settling is bookkeeping under the state's lock (the offsets are committed later, from the
/// pump), so every delivery shares this one state: no handle per message.
impl SharedAck for Shared {
    fn ack(&self, token: AckToken) -> Result<(), Error> {
        self.state.lock().settle(&Key::from_token(token));
        Ok(())
    }
    fn nack(&self, token: AckToken, delay: Duration) -> Result<(), Error> {
        let mut st = self.state.lock();
        let k = Key::from_token(token);
        if let Some(e) = st.entry(&k)
            && e.is_current(&k)
        {
            // A new round: the pending ack-wait timer of this delivery no longer counts,
            // the nack timer does.
            e.round += 1;
            e.stage = Stage::Queued;
            let again = Key {
                round: e.round,
                ..k
            };
            st.timers.delay(Instant::now() + delay, again);
        }
        Ok(())
    }
    fn term(&self, token: AckToken) -> Result<(), Error> {
        self.state.lock().settle(&Key::from_token(token));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: i64) -> Entry {
        Entry {
            message: Message::new("t", n.to_string()),
            count: 0,
            round: 0,
            stage: Stage::Queued,
        }
    }

    fn offsets(l: &Ledger) -> Vec<i64> {
        l.items.iter().map(|(o, _)| *o).collect()
    }

    #[test]
    fn ledger_finds_entries_across_gaps_and_late_inserts() {
        let mut l = Ledger::default();
        for o in [5, 6, 7, 10, 11, 20] {
            assert!(l.insert(o, entry(o)));
        }
        // Already there: refused, the first one kept.
        assert!(!l.insert(10, entry(-1)));
        // Below the last one and missing: put in its place.
        assert!(l.insert(8, entry(8)));
        assert_eq!(offsets(&l), [5, 6, 7, 8, 10, 11, 20]);
        for o in [5, 6, 7, 8, 10, 11, 20] {
            let e = l.get_mut(o).expect("present");
            assert_eq!(&e.message.payload()[..], o.to_string().as_bytes());
        }
        for o in [4, 9, 12, 19, 21] {
            assert!(l.get_mut(o).is_none(), "{o} is not in the ledger");
        }
    }

    #[test]
    fn ledger_gives_memory_back_after_a_burst() {
        let mut part = Part {
            epoch: 1,
            entries: Ledger::default(),
            next: Some(10_000),
            committed: None,
        };
        for o in 0..10_000 {
            part.entries.insert(o, entry(o));
        }
        let peak = part.entries.items.capacity();
        for o in 0..9_990 {
            part.entries.get_mut(o).expect("present").stage = Stage::Settled;
        }
        assert_eq!(part.commit_point(), Some(9_990));
        assert_eq!(part.entries.items.len(), 10);
        // The interval just ended held the burst: kept until one passes without it.
        assert_eq!(part.entries.items.capacity(), peak);
        assert_eq!(part.commit_point(), Some(9_990));
        assert!(
            part.entries.items.capacity() < peak / 4,
            "kept {}",
            part.entries.items.capacity()
        );
    }

    fn key(offset: i64, round: u32) -> Key {
        Key {
            partition: 0,
            offset,
            epoch: 1,
            round,
        }
    }

    #[test]
    fn keys_survive_the_ack_token() {
        for k in [
            key(0, 0),
            Key {
                partition: i32::MAX,
                offset: i64::MAX,
                epoch: u64::MAX,
                round: u32::MAX,
            },
            Key {
                partition: 7,
                offset: 1 << 40,
                epoch: 3,
                round: 2,
            },
            Key {
                partition: -1,
                offset: -1001,
                epoch: 0,
                round: 1,
            },
            Key {
                partition: i32::MIN,
                offset: i64::MIN,
                epoch: 1,
                round: 0,
            },
        ] {
            assert_eq!(Key::from_token(k.token()), k);
        }
        assert_ne!(key(1, 0).token(), key(1, 1).token());
    }

    #[test]
    fn timers_fire_earliest_first_across_waits_and_delays() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Timers::default();
        t.wait(at(10), key(1, 0));
        t.wait(at(20), key(2, 0));
        t.delay(at(15), key(3, 1));
        t.delay(at(5), key(4, 1));
        // Earlier than the last wait: kept in order all the same.
        t.wait(at(12), key(5, 0));
        assert_eq!(t.next_at(), Some(at(5)));
        assert_eq!(t.pop_due(at(4)), None);
        let mut fired = Vec::new();
        while let Some(k) = t.pop_due(at(30)) {
            fired.push(k.offset);
        }
        assert_eq!(fired, [4, 1, 5, 3, 2]);
        assert_eq!(t.next_at(), None);
    }

    #[test]
    fn timers_of_settled_deliveries_do_not_accumulate() {
        let t0 = Instant::now();
        let mut st = State::default();
        st.parts.insert(
            0,
            Part {
                epoch: 1,
                entries: Ledger::default(),
                next: None,
                committed: None,
            },
        );
        // A steady stream: each message handed over (an ack-wait timer set), then acked.
        // Ten stay open throughout, as with a handler that is a few messages behind.
        let total: i64 = 100_000;
        let mut peak = 0;
        for o in 0..total {
            let part = st.parts.get_mut(&0).expect("assigned");
            part.entries.insert(o, entry(o));
            part.entries.get_mut(o).expect("inserted").stage = Stage::Out;
            st.unsettled += 1;
            st.timers.wait(t0 + Duration::from_secs(30), key(o, 0));
            if o >= 10 {
                st.settle(&key(o - 10, 0));
            }
            st.compact_timers();
            peak = peak.max(st.timers.len());
        }
        assert_eq!(st.unsettled, 10);
        assert!(
            peak <= 2 * 10 + TIMER_SLACK,
            "{peak} timers for 10 messages in flight"
        );
        // The timers of the ten still in flight survive every compaction and fire.
        let mut fired = Vec::new();
        while let Some(k) = st.timers.pop_due(t0 + Duration::from_secs(31)) {
            if current(&st.parts, &k) {
                fired.push(k.offset);
            }
        }
        assert_eq!(fired, (total - 10..total).collect::<Vec<_>>());
    }

    #[test]
    fn compaction_keeps_a_nacks_delay_and_drops_the_replaced_wait() {
        let t0 = Instant::now();
        let mut st = State::default();
        let mut part = Part {
            epoch: 1,
            entries: Ledger::default(),
            next: None,
            committed: None,
        };
        part.entries.insert(0, entry(0));
        st.parts.insert(0, part);
        st.unsettled = 1;
        // Handed over in round 0, then nacked: round 1 waits for its delay.
        st.timers.wait(t0 + Duration::from_secs(30), key(0, 0));
        st.entry(&key(0, 0)).expect("entry").round = 1;
        st.timers.delay(t0 + Duration::from_secs(1), key(0, 1));
        // Enough dead timers of other offsets to make compaction walk.
        for o in 1..=TIMER_SLACK as i64 + 10 {
            st.timers.wait(t0 + Duration::from_secs(30), key(o, 0));
        }
        st.compact_timers();
        assert_eq!(st.timers.len(), 1, "only the delay of round 1 counts");
        assert_eq!(
            st.timers.pop_due(t0 + Duration::from_secs(1)),
            Some(key(0, 1))
        );
    }

    #[test]
    fn commit_point_drops_the_settled_front() {
        let mut part = Part {
            epoch: 1,
            entries: Ledger::default(),
            next: Some(13),
            committed: None,
        };
        for o in [10, 11, 12] {
            part.entries.insert(o, entry(o));
        }
        part.entries.get_mut(10).expect("10").stage = Stage::Settled;
        part.entries.get_mut(12).expect("12").stage = Stage::Settled;
        assert_eq!(part.commit_point(), Some(11));
        assert_eq!(offsets(&part.entries), [11, 12]);
        assert_eq!(part.open(), 1);
        part.entries.get_mut(11).expect("11").stage = Stage::Settled;
        assert_eq!(part.commit_point(), Some(13));
        assert!(part.entries.items.is_empty());
    }
}
