//! Kafka side of the bench: tansu brokers (SQLite = durable, memory engine = not durable),
//! SDK and raw rdkafka producers, a plain consumer that counts distinct ids.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eventbus_batch::Batcher;
use eventbus_brokers::{BrokerKind, Protocol, TansuStorage};
use eventbus_core::{Backend as _, Message, Publisher, Topic, TopicSpec};
use eventbus_fixture::{Fixture, Select};
use eventbus_kafka::KafkaBackend;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::drive::{
    Attempt, Env, Published, Received, Run, Seen, Target, drive_sdk, joined, payload, share, timed,
    timed_drain,
};
use crate::mode::{Measure, Mode, Storage};
use crate::report::Record;
use crate::{Args, Scenario};

/// librdkafka lingers (ms) tried for the raw producer; the best is the baseline.
const RAW_LINGERS_MS: [usize; 3] = [1, 5, 20];
/// tansu's SQLite engine takes tens of thousands of msg/s here: cap its runs so the
/// default bench stays within minutes. The record's `messages` says what was sent.
pub(crate) const DURABLE_CAP: usize = 100_000;

/// One storage class: its name, and the brokers the bench started for it (or the user's) with
/// a bus connected to them.
struct StorageClass {
    /// The class the brokers serve.
    storage: Storage,
    fixture: Fixture,
}

impl StorageClass {
    /// The broker process whose CPU the bench reports (node 0; `None` when external).
    fn pid(&self) -> Option<u32> {
        self.fixture.broker().and_then(|t| t.pid(0))
    }

    /// Whether the brokers are the user's (`--kafka-brokers`), not the bench's.
    fn external(&self) -> bool {
        self.fixture.broker().is_none()
    }

    /// The connected backend.
    fn backend(&self) -> &KafkaBackend {
        self.fixture.bus().backend().expect("a Kafka bus")
    }
}

pub(crate) struct KafkaEnv {
    // Declared before the brokers, so dropped before them: clients close before their brokers.
    /// Warm producers by (storage, mode, linger): a service keeps its producer, and a new
    /// idempotent producer costs ~0.5 s before its first send (librdkafka's producer-id timer).
    producers: tokio::sync::Mutex<HashMap<String, Arc<Producer>>>,
    brokers: Vec<StorageClass>,
    /// External brokers only: what their metadata says (broker count, cluster id).
    reported: Option<String>,
    /// External brokers only: verify by high watermarks (`--trust-watermarks`).
    trust_watermarks: bool,
}

/// What Kafka-protocol brokers at `bootstrap` say of themselves: how many brokers the metadata
/// lists and the cluster id.
fn reported_by(bootstrap: &str) -> String {
    let consumer: Result<BaseConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create();
    let Ok(consumer) = consumer else {
        return "no metadata".into();
    };
    let brokers = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_or("no metadata".to_owned(), |m| {
            format!("{} broker(s) in metadata", m.brokers().len())
        });
    let id = consumer
        .client()
        .fetch_cluster_id(rdkafka::util::Timeout::After(Duration::from_secs(10)))
        .unwrap_or_else(|| "none".into());
    format!("{brokers}, cluster id {id}")
}

/// Whether a storage class runs on tansu's SQLite engine (read back by watermarks only).
pub(crate) fn on_sqlite(storage: Storage) -> bool {
    storage != Storage::Memory
}

impl KafkaEnv {
    /// Start tansu brokers for each storage class (or connect to `--kafka-brokers` for each).
    pub(crate) async fn start(args: &Args, storages: &[Storage]) -> Result<KafkaEnv, String> {
        let mut brokers = Vec::new();
        for &storage in storages {
            let select = match &args.kafka_brokers {
                Some(b) => Select::External(Protocol::Kafka, b.clone()),
                None => Select::Broker(match storage {
                    Storage::Replicated => BrokerKind::TansuCluster { nodes: 3 },
                    Storage::Durable => BrokerKind::Tansu(TansuStorage::Sqlite),
                    Storage::Memory => BrokerKind::Tansu(TansuStorage::Memory),
                }),
            };
            let fixture = Fixture::start(select, &[])
                .await
                .map_err(|e| format!("Kafka ({storage}): {e}"))?;
            brokers.push(StorageClass { storage, fixture });
        }
        let reported = args.kafka_brokers.as_deref().map(reported_by);
        Ok(KafkaEnv {
            brokers,
            producers: Default::default(),
            reported,
            trust_watermarks: args.trust_watermarks,
        })
    }

    pub(crate) fn describe(&self) -> String {
        self.brokers
            .iter()
            .map(|c| match c.fixture.broker() {
                Some(t) => format!(
                    "{} ({}) at {}",
                    t.describe(),
                    c.storage,
                    c.backend().config().brokers
                ),
                None => format!(
                    "external Kafka-protocol brokers at {} ({}; run as the {} class, engine \
                     unknown to the bench; verified by {})",
                    c.backend().config().brokers,
                    self.reported.as_deref().unwrap_or("no metadata"),
                    c.storage,
                    if self.trust_watermarks {
                        "high watermarks (--trust-watermarks)"
                    } else {
                        "reading every message back"
                    }
                ),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The warm producer for `run`'s storage and mode at `linger`, made on first use.
    async fn producer(
        &self,
        kafka: &KafkaBackend,
        run: Run,
        linger: u64,
        warm: &str,
        cfg: &eventbus_batch::BatchConfig,
    ) -> Result<Arc<Producer>, String> {
        let key = producer_key(run, linger, cfg);
        let mut all = self.producers.lock().await;
        if let Some(p) = all.get(&key) {
            return Ok(Arc::clone(p));
        }
        let bootstrap = &kafka.config().brokers;
        let p = Arc::new(Producer::warm(kafka, run.mode, bootstrap, linger, warm, cfg).await?);
        all.insert(key, Arc::clone(&p));
        Ok(p)
    }

    /// Drop the producer of a run that failed: what it still holds must not reach a later run.
    async fn forget(&self, run: Run, linger: u64, cfg: &eventbus_batch::BatchConfig) {
        if let Some(p) = self
            .producers
            .lock()
            .await
            .remove(&producer_key(run, linger, cfg))
        {
            p.close().await;
        }
    }

    /// Close the SDK producers (flushing them).
    pub(crate) async fn stop(&self) {
        for p in self.producers.lock().await.values() {
            p.close().await;
        }
    }

    fn broker(&self, storage: Storage) -> Result<&StorageClass, String> {
        self.brokers
            .iter()
            .find(|c| c.storage == storage)
            .ok_or_else(|| format!("no Kafka broker for storage {storage}"))
    }

    /// Whether runs on `class` are verified by high watermarks rather than a consumer. tansu's
    /// SQLite engine serves reads at ~1.4k msg/s and slows as it grows: its runs are verified
    /// by high watermarks only; memory-engine runs and external brokers by a consumer (unless
    /// the user trusts the brokers' watermarks).
    fn by_watermarks(&self, class: &StorageClass) -> bool {
        if class.external() {
            self.trust_watermarks
        } else {
            on_sqlite(class.storage)
        }
    }

    /// Publish the scenario to topics of its own, at one linger: end-to-end, a consumer
    /// reads every message meanwhile (unless verified by watermarks); publish-only, it reads
    /// them back afterwards.
    async fn publish(
        &self,
        class: &StorageClass,
        run: Run,
        at: Attempt,
        cfg: &eventbus_batch::BatchConfig,
        rec: &mut Record,
    ) -> Result<(), String> {
        let (kafka, s, linger) = (class.backend(), run.s, at.setting as u64);
        let topics = RunTopics::create(kafka, at, s.topics).await?;
        rec.topic_or_stream = format!("bench.r{}l{}.t*", at.id, at.index);
        // Producer up and warm (connection, idempotent producer id) before the clock starts.
        let connect = Instant::now();
        let producer = self.producer(kafka, run, linger, &topics.warm, cfg).await?;
        rec.window = match run.mode {
            Mode::Raw { .. } | Mode::RawFuture => at.setting,
            _ => cfg.max_in_flight,
        };
        rec.connect_ms = connect.elapsed().as_secs_f64() * 1e3;
        let bootstrap = &kafka.config().brokers;
        let consumer = |t0, done| {
            let names = topics.names.clone();
            joined(consume(
                bootstrap.clone(),
                names,
                s.messages as u64,
                t0,
                done,
            ))
        };
        let by_watermarks = self.by_watermarks(class);
        let during = (!by_watermarks && run.measure == Measure::EndToEnd).then_some(consumer);
        let publish = async |t0| {
            let published = producer.drive(run.mode, s, &topics.topics, &topics.names, t0);
            match published.await {
                Ok(p) => Ok(p),
                Err(e) => {
                    self.forget(run, linger, cfg).await;
                    Err(e)
                }
            }
        };
        let timed = timed(rec, run.measure, class.pid(), during, publish).await?;
        // Publish-only: read back once the clock has stopped.
        let received = match timed.received {
            None if !by_watermarks => Some(consumer(timed.t0, timed.done).await?),
            r => r,
        };
        verify(class, &topics.names, received, rec).await
    }

    /// Publish a backlog to one topic of [`DRAIN_PARTITIONS`] partitions (untimed, the SDK
    /// without ids), then time reading all of it in a consumer group, every message acked:
    /// through the SDK's subscriber, or rdkafka's `StreamConsumer` storing each offset after
    /// the message is processed and committing them in the background.
    async fn drain(
        &self,
        class: &StorageClass,
        run: Run,
        id: u64,
        rec: &mut Record,
    ) -> Result<(), String> {
        let kafka = class.backend();
        let topic = format!("bench.r{id}.backlog");
        kafka
            .ensure_topic(&TopicSpec::new(&topic).partitions(DRAIN_PARTITIONS))
            .await
            .map_err(|e| format!("create topic: {e}"))?;
        let sink = kafka.sink_without_id().map_err(|e| e.to_string())?;
        crate::drive::backlog(sink, run.s, &[Topic::new(&topic)]).await?;
        let expected = run.s.messages as u64;
        let read = async |t0| match run.mode {
            Mode::DrainSdk => {
                use eventbus_core::{SubscribeSpec, Subscriber};
                let sub = kafka
                    .subscriber()
                    .subscribe(
                        SubscribeSpec::new(topic.as_str())
                            .group("drain")
                            .prefetch(1024),
                    )
                    .await
                    .map_err(|e| format!("subscribe: {e}"))?;
                crate::drive::read_back(sub, expected, t0).await
            }
            _ => {
                let (bootstrap, topic) = (kafka.config().brokers.clone(), topic.clone());
                let defaults = run.mode == Mode::DrainRawDefaults;
                tokio::task::spawn_blocking(move || {
                    drain_raw(&bootstrap, &topic, expected, t0, defaults)
                })
                .await
                .map_err(|e| e.to_string())?
            }
        };
        let received = timed_drain(rec, class.pid(), expected, read).await?;
        rec.topic_or_stream = topic;
        rec.verify(
            received.distinct,
            true,
            "distinct ids drained (the backlog's publish was acked in full)",
        );
        Ok(())
    }
}

impl Target for KafkaEnv {
    const CANDIDATES: &'static [usize] = &RAW_LINGERS_MS;

    /// Run `run` once on the brokers of its storage class: a drain, or a publish at one linger.
    async fn once(
        &self,
        args: &Args,
        run: Run,
        at: Attempt,
        rec: &mut Record,
    ) -> Result<(), String> {
        let class = self.broker(run.storage)?;
        let mut s = run.s;
        if on_sqlite(run.storage) && !class.external() {
            // Capped by the caller in a default run; never beyond this.
            s.messages = s.messages.min(DURABLE_CAP);
        }
        rec.messages = s.messages;
        let run = Run { s, ..run };
        if run.mode.drain() {
            return self.drain(class, run, at.id, rec).await;
        }
        self.publish(class, run, at, &Env::sdk_config(args), rec)
            .await
    }
}

/// One attempt's topics: the scenario's, and the producer's warm-up topic.
struct RunTopics {
    /// The scenario's topics, named.
    names: Vec<String>,
    /// The same topics, for the SDK.
    topics: Vec<Topic>,
    /// The topic a new producer's warm-up message goes to.
    warm: String,
}

impl RunTopics {
    /// Create `n` topics of one partition (and the warm-up topic) named for `at`.
    async fn create(kafka: &KafkaBackend, at: Attempt, n: usize) -> Result<RunTopics, String> {
        let (id, li) = (at.id, at.index);
        let names: Vec<String> = (0..n).map(|t| format!("bench.r{id}l{li}.t{t}")).collect();
        let warm = format!("bench.r{id}l{li}.warmup");
        let mut all = names.clone();
        all.push(warm.clone());
        kafka
            .ensure_topics(&all.iter().map(TopicSpec::new).collect::<Vec<_>>())
            .await
            .map_err(|e| format!("create topics: {e}"))?;
        let topics = names.iter().map(Topic::new).collect();
        Ok(RunTopics {
            names,
            topics,
            warm,
        })
    }
}

/// Check a run against the brokers: by their high watermarks when no consumer read it, else by
/// the distinct ids the consumer read.
async fn verify(
    class: &StorageClass,
    names: &[String],
    received: Option<Received>,
    rec: &mut Record,
) -> Result<(), String> {
    let external = class.external();
    match received {
        None => {
            let stored = watermark_total(class.backend(), names).await?;
            rec.verify(
                stored,
                false,
                if external {
                    "high watermarks (--trust-watermarks)"
                } else {
                    "SQLite high watermarks (no consumer: tansu SQLite reads are too slow)"
                },
            );
        }
        // tansu 0.6.0's memory engine misreports high watermarks, and an external broker's
        // engine is unknown: count what a consumer reads.
        Some(r) => {
            rec.read_back(&r);
            rec.verify(
                r.distinct,
                true,
                if external {
                    "distinct ids consumed (external broker)"
                } else {
                    "distinct ids consumed (memory engine watermarks are unreliable)"
                },
            )
        }
    }
    Ok(())
}

/// The warm-producer cache's key: storage, mode, linger and the engine's settings (a sweep
/// changes them between runs).
fn producer_key(run: Run, linger: u64, cfg: &eventbus_batch::BatchConfig) -> String {
    format!("{} {} {linger} {cfg:?}", run.storage, run.mode)
}

/// Partitions of the drained topic.
const DRAIN_PARTITIONS: u32 = 4;

/// rdkafka's consumer in a group, committing like the SDK does: each offset stored after its
/// message is processed, committed in the background. With `defaults`, librdkafka's own
/// read-ahead (what a user of rdkafka gets without tuning) instead of the SDK's bounded one.
fn drain_raw(
    bootstrap: &str,
    topic: &str,
    expected: u64,
    t0: Instant,
    defaults: bool,
) -> Result<Received, String> {
    use rdkafka::Message as _;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "drain-raw")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    if !defaults {
        // The SDK consumer's settings (eventbus-kafka's `consumer_config` with the default
        // 4 MiB read-ahead), but committing what is stored on librdkafka's own timer.
        config
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .set("queued.max.messages.kbytes", "4096")
            .set("fetch.max.bytes", (4 << 20).to_string())
            .set("fetch.queue.backoff.ms", "10");
    }
    let consumer: BaseConsumer = config.create().map_err(|e| format!("consumer: {e}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut seen = Seen::new(expected, t0);
    let mut idle = Instant::now();
    while !seen.complete() && idle.elapsed() < Duration::from_secs(15) {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.map_err(|e| format!("poll: {e}"))?;
        idle = Instant::now();
        seen.saw(m.payload().unwrap_or_default());
        consumer
            .store_offset_from_message(&m)
            .map_err(|e| format!("store offset: {e}"))?;
    }
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(seen.into_received())
}

/// The producer a run publishes through, warmed up before the clock starts.
enum Producer {
    Sdk(Batcher<eventbus_kafka::KafkaSink>),
    Future(FutureProducer),
    Threaded(Arc<ThreadedProducer<TallyCtx>>, Arc<Tally>),
}

impl Producer {
    async fn warm(
        kafka: &KafkaBackend,
        mode: Mode,
        bootstrap: &str,
        linger: u64,
        warm: &str,
        cfg: &eventbus_batch::BatchConfig,
    ) -> Result<Producer, String> {
        match mode {
            Mode::Raw { .. } => {
                let tally = Arc::new(Tally::new());
                let p: ThreadedProducer<TallyCtx> = raw_config(bootstrap, linger)
                    .create_with_context(TallyCtx(Arc::clone(&tally)))
                    .map_err(|e| format!("raw producer: {e}"))?;
                p.send(
                    BaseRecord::<(), [u8], _>::with_opaque_to(warm, Box::new(None))
                        .payload(&b"warmup"[..]),
                )
                .map_err(|(e, _)| format!("raw warm-up: {e}"))?;
                tokio::time::timeout(Duration::from_secs(30), tally.warm.notified())
                    .await
                    .map_err(|_| "raw warm-up: no delivery report in 30 s".to_string())?;
                Ok(Producer::Threaded(Arc::new(p), tally))
            }
            Mode::RawFuture => {
                let p: FutureProducer = raw_config(bootstrap, linger)
                    .create()
                    .map_err(|e| format!("raw producer: {e}"))?;
                p.send(
                    FutureRecord::<(), [u8]>::to(warm).payload(&b"warmup"[..]),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| format!("raw warm-up: {e}"))?;
                Ok(Producer::Future(p))
            }
            Mode::Naive | Mode::Sdk { .. } => {
                let sink = match mode {
                    Mode::Sdk { ids: false, .. } => kafka.sink_without_id(),
                    _ => kafka.sink().await,
                };
                let b = Batcher::new(sink.map_err(|e| e.to_string())?, cfg.clone())
                    .map_err(|e| e.to_string())?;
                b.publish(Message::new(warm, "warmup"))
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .into_result()
                    .map_err(|e| format!("sdk warm-up: {e}"))?;
                Ok(Producer::Sdk(b))
            }
            other => Err(format!("mode {other} does not run on Kafka")),
        }
    }

    async fn drive(
        &self,
        mode: Mode,
        s: Scenario,
        topics: &[Topic],
        names: &[String],
        t0: Instant,
    ) -> Result<Published, String> {
        Ok(match self {
            Producer::Sdk(b) => drive_sdk(b, s, topics, mode == Mode::Naive, t0).await,
            Producer::Future(p) => drive_raw(p, s, names, t0).await,
            Producer::Threaded(p, tally) => {
                drive_threaded(p, tally, s, names, t0, mode == Mode::Raw { ids: true }).await?
            }
        })
    }

    async fn close(&self) {
        if let Producer::Sdk(b) = self {
            let _ = b.close(Duration::from_secs(10)).await;
        }
    }
}

async fn watermark_total(kafka: &KafkaBackend, names: &[String]) -> Result<u64, String> {
    let mut total = 0;
    for n in names {
        for (_, lo, hi) in kafka.watermarks(n).await.map_err(|e| e.to_string())? {
            total += (hi - lo).max(0) as u64;
        }
    }
    Ok(total)
}

/// The raw producers' settings: idempotent, `acks=all`, `linger`, big batches, and a queue big
/// enough that it never binds before the broker does.
fn raw_config(bootstrap: &str, linger: u64) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger.to_string())
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097151");
    c
}

/// Delivery reports of a `raw` run: tallied by librdkafka's poll thread, the time of
/// each report taken when it arrives (the exact event).
pub(crate) struct Tally {
    state: parking_lot::Mutex<(Published, Option<Instant>, u64)>,
    /// Reports that complete the current run.
    expected: std::sync::atomic::AtomicU64,
    /// The current run: reports of an earlier run (one that failed) are not counted.
    run: std::sync::atomic::AtomicU64,
    done: tokio::sync::Notify,
    warm: tokio::sync::Notify,
}

impl Tally {
    fn new() -> Self {
        Tally {
            state: parking_lot::Mutex::new((Published::empty(), None, 0)),
            expected: std::sync::atomic::AtomicU64::new(u64::MAX),
            run: std::sync::atomic::AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            warm: tokio::sync::Notify::new(),
        }
    }
}

/// `ThreadedProducer` context: one callback per delivery report, no future per message (what
/// the SDK's sink does too, minus the SDK).
pub(crate) struct TallyCtx(Arc<Tally>);

impl rdkafka::ClientContext for TallyCtx {}

impl ProducerContext for TallyCtx {
    /// The run and when the message was handed to librdkafka; `None` for the warm-up message.
    type DeliveryOpaque = Box<Option<(u64, Instant)>>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Self::DeliveryOpaque) {
        let now = Instant::now();
        let Some((run, sent)) = *sent else {
            self.0.warm.notify_one();
            return;
        };
        if run != self.0.run.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let outcome =
            crate::drive::raw_outcome(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
        let mut st = self.0.state.lock();
        st.0.record(outcome, now - sent);
        st.1 = Some(now);
        st.2 += 1;
        if st.2 == self.0.expected.load(std::sync::atomic::Ordering::Relaxed) {
            self.0.done.notify_one();
        }
    }
}

/// `raw`: 5 publisher tasks hand records to one `ThreadedProducer`; the run ends at the last
/// delivery report. Measured against `raw-future` (a `FutureProducer`, one future per message):
/// on tansu's memory engine, 1M x 108 B, ~510k vs ~320-365k msg/s, so this is the baseline.
/// `raw-dedup` (`with_id`) adds one header per record, the same `eventbus-id` header with a
/// fresh id the SDK's default sink sends, so the two do the same work on the broker (Kafka does
/// not de-duplicate by it; the name is shared with NATS's raw-with-`Nats-Msg-Id`).
async fn drive_threaded(
    p: &Arc<ThreadedProducer<TallyCtx>>,
    tally: &Arc<Tally>,
    s: Scenario,
    topics: &[String],
    t0: Instant,
    with_id: bool,
) -> Result<Published, String> {
    // A fresh tally for this run (the producer is kept warm across runs).
    let run = {
        let mut st = tally.state.lock();
        *st = (Published::empty(), None, 0);
        tally
            .expected
            .store(s.messages as u64, std::sync::atomic::Ordering::Relaxed);
        tally.run.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    };
    let mut tasks = Vec::new();
    for w in 0..s.publishers {
        let (p, topics) = (Arc::clone(p), topics.to_vec());
        tasks.push(tokio::spawn(async move {
            for i in 0..share(&s, w) {
                let body = payload(s.payload, w as u32, i as u64, t0);
                let topic = &topics[i % topics.len()];
                let sent = Instant::now();
                let id = with_id.then(|| eventbus_core::MessageId::generate().to_string());
                let key = crate::drive::key(&s, w, i);
                let record = RawRecord {
                    topic,
                    body: &body,
                    id: id.as_deref(),
                    key: key.as_deref(),
                };
                send_threaded(&p, record, (run, sent)).await?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("publisher task: {e}"))??;
    }
    tokio::time::timeout(Duration::from_secs(300), tally.done.notified())
        .await
        .map_err(|_| "raw: delivery reports missing after 300 s".to_string())?;
    let mut st = tally.state.lock();
    let last = st.1.unwrap_or(t0);
    let published = std::mem::replace(&mut st.0, Published::empty());
    Ok(published.finish(t0, last))
}

/// One raw record: its topic, payload, `eventbus-id` header (`raw-dedup`) and key (`--keys`).
struct RawRecord<'a> {
    topic: &'a str,
    body: &'a [u8],
    id: Option<&'a str>,
    key: Option<&'a str>,
}

/// Hand one record to librdkafka, waiting while its queue is full; `opaque` (the run, the send
/// time) comes back with its delivery report.
async fn send_threaded(
    p: &ThreadedProducer<TallyCtx>,
    RawRecord {
        topic,
        body,
        id,
        key,
    }: RawRecord<'_>,
    opaque: (u64, Instant),
) -> Result<(), String> {
    loop {
        let mut rec =
            BaseRecord::<str, [u8], _>::with_opaque_to(topic, Box::new(Some(opaque))).payload(body);
        if let Some(key) = key {
            rec = rec.key(key);
        }
        if let Some(id) = id {
            rec = rec.headers(OwnedHeaders::new().insert(Header {
                key: eventbus_kafka::ID_HEADER,
                value: Some(id.as_bytes()),
            }));
        }
        match p.send(rec) {
            Ok(()) => return Ok(()),
            // librdkafka's queue is full: wait and hand the record over again.
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err((e, _)) => return Err(format!("raw produce failed: {e}")),
        }
    }
}

async fn drive_raw(p: &FutureProducer, s: Scenario, topics: &[String], t0: Instant) -> Published {
    let mut tasks = Vec::new();
    for w in 0..s.publishers {
        let (p, topics) = (p.clone(), topics.to_vec());
        tasks.push(tokio::spawn(async move {
            let n = share(&s, w);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let acker = crate::drive::spawn_acker(rx);
            for i in 0..n {
                let body = payload(s.payload, w as u32, i as u64, t0);
                let topic = &topics[i % topics.len()];
                let key = crate::drive::key(&s, w, i);
                let sent = Instant::now();
                loop {
                    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(&body[..]);
                    if let Some(key) = &key {
                        record = record.key(key.as_str());
                    }
                    match p.send_result(record) {
                        Ok(f) => {
                            let outcome = async move {
                                crate::drive::raw_outcome(match f.await {
                                    Ok(Ok(_)) => Ok(()),
                                    Ok(Err((e, _))) => Err(e.to_string()),
                                    Err(_) => Err("delivery future cancelled".into()),
                                })
                            };
                            tx.send((sent, outcome)).expect("acker alive");
                            break;
                        }
                        // librdkafka's queue is full: a careful user waits and retries.
                        Err((_e, _)) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            }
            drop(tx);
            acker.await.expect("acker")
        }));
    }
    Published::merge(tasks, t0).await
}

/// A plain consumer on every topic from the beginning, counting distinct ids.
fn consume(
    bootstrap: String,
    topics: Vec<String>,
    expected: u64,
    t0: Instant,
    done: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Received> {
    tokio::task::spawn_blocking(move || {
        let r = Received::empty();
        let consumer: BaseConsumer = match ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "bench-verify")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
        {
            Ok(c) => c,
            Err(_) => return r,
        };
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            let _ = tpl.add_partition_offset(t, 0, Offset::Beginning);
        }
        if consumer.assign(&tpl).is_err() {
            return r;
        }
        let mut seen = Seen::new(expected, t0);
        let mut give_up: Option<Instant> = None;
        while !seen.complete() {
            if give_up.is_none() && *done.borrow() {
                give_up = Some(Instant::now() + Duration::from_secs(60));
            }
            if give_up.is_some_and(|g| Instant::now() > g) {
                break;
            }
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            use rdkafka::Message as _;
            seen.saw(m.payload().unwrap_or_default());
        }
        seen.into_received()
    })
}
