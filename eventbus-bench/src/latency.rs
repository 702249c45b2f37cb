//! The latency rows of the main run, and `--latency-study` (the same cells, longer):
//! publish -> ack and publish -> handler latency at fixed offered rates, the SDK's default
//! against the raw clients with ids, on a local nats-server (file stream) and a tansu broker
//! (memory engine: [`KAFKA_STORAGE`]).
//!
//! One task offers messages on a fixed schedule (message `i` is due at `start + i / rate`; the
//! timer's 1 ms step sends the ones due in one tick together, the same for every path). A
//! latency runs from the instant `publish` is called (the SDK) or the record is handed to the
//! client (raw) to the exact event: the ack future resolving, or the handler receiving the
//! message (its send instant travels in the payload). A consumer reads the run's subject or
//! topic throughout, so every run is also checked against the broker: every message acked and
//! read back, once.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{BrokerKind, TansuStorage};
use eventbus_core::{
    Backend as _, Message, Outcome, Publisher, SubscribeSpec, Subscriber, Subscription, TopicSpec,
};
use eventbus_fixture::{Fixture, Select};
use eventbus_kafka::{KafkaBackend, KafkaConfig};
use eventbus_nats::{NatsBackend, NatsConfig, StreamSpec};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};

use crate::Args;
use crate::drive::{decode, hist, payload};
use crate::report::LatencySection as Section;

/// The offered rates, messages per second.
const RATES: [u64; 3] = [1_000, 10_000, 50_000];
/// tansu's engine for the Kafka rows, and what the table calls it. Its SQLite engine falls
/// behind at 10,000 msg/s on one partition here (acks seconds late, SDK and raw alike).
const KAFKA_STORAGE: TansuStorage = TansuStorage::Memory;
const KAFKA_ENGINE: &str = "memory engine";
/// The payload, as in the seed's scenarios.
const PAYLOAD: usize = 108;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendName {
    Nats,
    Kafka,
}

impl BackendName {
    fn label(self) -> &'static str {
        match self {
            BackendName::Nats => "nats",
            BackendName::Kafka => "kafka",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The SDK with its default configuration (ids on).
    Sdk,
    /// The bare client with the same ids (NATS `Nats-Msg-Id`, Kafka the `eventbus-id` header).
    Raw,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Sdk => "sdk",
            Path::Raw => "raw-dedup",
        }
    }
}

/// What one run (or several, merged) measured.
struct Lat {
    ack: Histogram<u64>,
    handler: Histogram<u64>,
    offered: u64,
    acked: u64,
    received: u64,
    /// The offered messages over the time it took to offer them.
    achieved: f64,
}

impl Lat {
    fn empty() -> Lat {
        Lat {
            ack: hist(),
            handler: hist(),
            offered: 0,
            acked: 0,
            received: 0,
            achieved: 0.0,
        }
    }

    fn add(&mut self, o: &Lat) {
        self.ack.add(&o.ack).expect("same bounds");
        self.handler.add(&o.handler).expect("same bounds");
        self.offered += o.offered;
        self.acked += o.acked;
        self.received += o.received;
        self.achieved = if self.achieved == 0.0 {
            o.achieved
        } else {
            self.achieved.min(o.achieved)
        };
    }
}

/// How one path publishes: admission now, the ack as a future to time.
enum Sender {
    SdkNats(Batcher<eventbus_nats::NatsSink>),
    SdkKafka(Batcher<eventbus_kafka::KafkaSink>),
    RawNats(Box<async_nats::jetstream::Context>),
    RawKafka(FutureProducer),
}

impl Sender {
    async fn send(&self, topic: &str, body: eventbus_core::Bytes) -> BoxFuture<'static, Outcome> {
        use futures_util::FutureExt;
        let sdk = |r: Result<eventbus_core::PendingAck, eventbus_core::Error>| match r {
            Ok(ack) => ack.boxed(),
            Err(e) => std::future::ready(Outcome::Failed(e)).boxed(),
        };
        match self {
            Sender::SdkNats(b) => sdk(b.publish(Message::new(topic, body)).await),
            Sender::SdkKafka(b) => sdk(b.publish(Message::new(topic, body)).await),
            Sender::RawNats(js) => {
                let id = eventbus_core::MessageId::generate().to_string();
                crate::nats::send_raw_keyed(js, topic.to_owned(), body, Some(id), None)
                    .await
                    .boxed()
            }
            Sender::RawKafka(p) => {
                let id = eventbus_core::MessageId::generate().to_string();
                loop {
                    let rec = FutureRecord::<(), [u8]>::to(topic)
                        .payload(&body[..])
                        .headers(OwnedHeaders::new().insert(Header {
                            key: eventbus_kafka::ID_HEADER,
                            value: Some(id.as_bytes()),
                        }));
                    match p.send_result(rec) {
                        Ok(f) => {
                            break async move {
                                crate::drive::raw_outcome(match f.await {
                                    Ok(Ok(_)) => Ok(()),
                                    Ok(Err((e, _))) => Err(e.to_string()),
                                    Err(_) => Err("delivery future cancelled".into()),
                                })
                            }
                            .boxed();
                        }
                        // librdkafka's queue is full: wait and hand the record over again.
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            }
        }
    }

    async fn close(&self) {
        match self {
            Sender::SdkNats(b) => {
                let _ = b.close(Duration::from_secs(10)).await;
            }
            Sender::SdkKafka(b) => {
                let _ = b.close(Duration::from_secs(10)).await;
            }
            Sender::RawNats(_) => {}
            Sender::RawKafka(p) => {
                use rdkafka::producer::Producer as _;
                let _ = p.flush(Duration::from_secs(10));
            }
        }
    }
}

/// What the handler side saw: the latency of each first delivery, the warm-up's arrival.
struct Collector {
    t0: Instant,
    state: Mutex<(Histogram<u64>, HashSet<u64>)>,
    warm: watch::Sender<bool>,
}

impl Collector {
    fn new(t0: Instant) -> Arc<Collector> {
        Arc::new(Collector {
            t0,
            state: Mutex::new((hist(), HashSet::new())),
            warm: watch::channel(false).0,
        })
    }

    /// A delivery arrived now: time it from the send instant its payload carries.
    fn saw(&self, p: &[u8]) {
        let now = self.t0.elapsed().as_nanos() as u64;
        match decode(p) {
            None => {
                self.warm.send_replace(true);
            }
            Some((id, sent)) => {
                let mut st = self.state.lock();
                if st.1.insert(id) {
                    let _ = st.0.record((now.saturating_sub(sent) / 1_000).max(1));
                }
            }
        }
    }

    fn received(&self) -> u64 {
        self.state.lock().1.len() as u64
    }
}

/// The broker of one backend and how each path publishes and reads there. The backend is
/// declared before the broker, so the client closes before the broker stops.
#[allow(clippy::large_enum_variant)] // one per backend, for the whole study
enum Rig {
    Nats {
        backend: NatsBackend,
        _broker: Fixture,
    },
    Kafka {
        backend: KafkaBackend,
        bootstrap: String,
        _broker: Fixture,
    },
}

/// Start `kind` (no bus: each rig connects with its own settings) and return its address.
async fn broker(kind: BrokerKind) -> Result<(Fixture, String), String> {
    let fixture = Fixture::start_broker(Select::Broker(kind), &[]).await?;
    let address = fixture.address().expect("a broker").to_owned();
    Ok((fixture, address))
}

impl Rig {
    async fn start(which: BackendName) -> Result<Rig, String> {
        match which {
            BackendName::Nats => {
                let (fixture, url) = broker(BrokerKind::Nats).await?;
                let backend = NatsBackend::connect(NatsConfig::new(url))
                    .await
                    .map_err(|e| format!("connect NATS: {e}"))?;
                backend
                    .ensure_stream(&StreamSpec::new("LATENCY", ["lat.>"]))
                    .await
                    .map_err(|e| format!("stream: {e}"))?;
                Ok(Rig::Nats {
                    backend,
                    _broker: fixture,
                })
            }
            BackendName::Kafka => {
                let (fixture, bootstrap) = broker(BrokerKind::Tansu(KAFKA_STORAGE)).await?;
                let backend = KafkaBackend::connect(
                    KafkaConfig::new(bootstrap.clone()).option("fetch.wait.max.ms", "10"),
                )
                .await
                .map_err(|e| format!("connect Kafka: {e}"))?;
                Ok(Rig::Kafka {
                    backend,
                    bootstrap,
                    _broker: fixture,
                })
            }
        }
    }

    /// A fresh subject or topic for run `n`.
    async fn topic(&self, n: usize) -> Result<String, String> {
        match self {
            Rig::Nats { .. } => Ok(format!("lat.r{n}")),
            Rig::Kafka { backend, .. } => {
                let t = format!("lat-r{n}");
                backend
                    .ensure_topic(&TopicSpec::new(&t))
                    .await
                    .map_err(|e| format!("topic: {e}"))?;
                Ok(t)
            }
        }
    }

    async fn sender(&self, path: Path) -> Result<Sender, String> {
        let cfg = BatchConfig::default();
        Ok(match (self, path) {
            (Rig::Nats { backend, .. }, Path::Sdk) => {
                let sink = backend.sink().await.map_err(|e| e.to_string())?;
                Sender::SdkNats(Batcher::new(sink, cfg).map_err(|e| e.to_string())?)
            }
            (Rig::Kafka { backend, .. }, Path::Sdk) => {
                let sink = backend.sink().await.map_err(|e| e.to_string())?;
                Sender::SdkKafka(Batcher::new(sink, cfg).map_err(|e| e.to_string())?)
            }
            (Rig::Nats { backend, .. }, Path::Raw) => Sender::RawNats(Box::new(
                async_nats::jetstream::ContextBuilder::new()
                    .max_ack_inflight(4_096)
                    .backpressure_on_inflight(true)
                    .timeout(Duration::from_secs(10))
                    .build(backend.client().clone()),
            )),
            (Rig::Kafka { bootstrap, .. }, Path::Raw) => {
                // librdkafka's defaults but idempotent with acks=all, as the SDK's producer;
                // its linger (5 ms) is librdkafka's default and the SDK's.
                let p: FutureProducer = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    .set("linger.ms", "5")
                    .create()
                    .map_err(|e| format!("raw producer: {e}"))?;
                Sender::RawKafka(p)
            }
        })
    }

    /// Start the path's consumer of `topic`, feeding `c`; the handle stops it.
    async fn consume(
        &self,
        path: Path,
        topic: &str,
        n: usize,
        c: Arc<Collector>,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        match (self, path) {
            (Rig::Nats { backend, .. }, Path::Sdk) => {
                sdk_consumer(backend.subscriber(), topic, n, c).await
            }
            (Rig::Kafka { backend, .. }, Path::Sdk) => {
                sdk_consumer(backend.subscriber(), topic, n, c).await
            }
            (Rig::Nats { backend, .. }, Path::Raw) => {
                use async_nats::jetstream::consumer::{AckPolicy, pull};
                let stream = backend
                    .jetstream()
                    .get_stream("LATENCY")
                    .await
                    .map_err(|e| format!("get stream: {e}"))?;
                let consumer = stream
                    .create_consumer(pull::Config {
                        durable_name: Some(format!("lat{n}")),
                        ack_policy: AckPolicy::Explicit,
                        filter_subject: topic.to_owned(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("create consumer: {e}"))?;
                let mut msgs = consumer
                    .messages()
                    .await
                    .map_err(|e| format!("consume: {e}"))?;
                Ok(tokio::spawn(async move {
                    while let Some(Ok(m)) = msgs.next().await {
                        c.saw(&m.payload);
                        let _ = m.ack().await;
                    }
                }))
            }
            (Rig::Kafka { bootstrap, .. }, Path::Raw) => {
                use rdkafka::Message as _;
                // librdkafka's consumer defaults, reading the topic from its start in a group.
                let consumer: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .set("group.id", format!("lat{n}"))
                    .set("auto.offset.reset", "earliest")
                    .set("fetch.wait.max.ms", "10")
                    .create()
                    .map_err(|e| format!("raw consumer: {e}"))?;
                consumer
                    .subscribe(&[topic])
                    .map_err(|e| format!("subscribe: {e}"))?;
                Ok(tokio::spawn(async move {
                    while let Ok(m) = consumer.recv().await {
                        c.saw(m.payload().unwrap_or_default());
                    }
                }))
            }
        }
    }
}

/// The SDK's consumer of `topic` in group `lat{n}`, feeding `c`, each delivery acked.
async fn sdk_consumer(
    subscriber: impl Subscriber,
    topic: &str,
    n: usize,
    c: Arc<Collector>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut sub: Subscription = subscriber
        .subscribe(SubscribeSpec::new(topic).group(format!("lat{n}")))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    Ok(tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let Ok(d) = d else { continue };
            c.saw(d.message().payload());
            let _ = d.ack().await;
        }
    }))
}

/// What a run times: the acks with nothing reading (the consumer reads the run back after),
/// or the handler with a consumer reading along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clock {
    Ack,
    Handler,
}

/// One run: `rate` messages per second for `secs` through `path`, timed by `clock`.
async fn run(
    rig: &Rig,
    path: Path,
    clock: Clock,
    rate: u64,
    secs: f64,
    n: usize,
) -> Result<Lat, String> {
    let topic = rig.topic(n).await?;
    let t0 = Instant::now();
    let collector = Collector::new(t0);
    let sender = rig.sender(path).await?;
    // Warm up: the client connected and, reading along, the consumer assigned and fetching (a
    // consumer that joined after the warm-up message, Kafka's group join, gets another one).
    let mut consumer = None;
    if clock == Clock::Handler {
        consumer = Some(rig.consume(path, &topic, n, Arc::clone(&collector)).await?);
    }
    warm_up(&sender, &topic, &collector, consumer.is_some()).await?;

    let total = (rate as f64 * secs) as u64;
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, BoxFuture<'static, Outcome>)>();
    let acks = tokio::spawn(time_acks(rx));
    let start = tokio::time::Instant::now();
    let step = Duration::from_secs_f64(1.0 / rate as f64);
    let mut last = Instant::now();
    for i in 0..total {
        let due = start + step * i as u32;
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let body = payload(PAYLOAD, 0, i, t0);
        last = Instant::now();
        let ack = sender.send(&topic, body).await;
        tx.send((last, ack)).expect("ack timer alive");
    }
    let offering = last.duration_since(start.into_std());
    drop(tx);
    let (ack, acked) = acks.await.map_err(|e| e.to_string())?;
    if consumer.is_none() {
        // Read the run back from the broker: the check, not a clock.
        consumer = Some(rig.consume(path, &topic, n, Arc::clone(&collector)).await?);
    }
    let wait_until = Instant::now() + Duration::from_secs(30);
    while collector.received() < total && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(c) = consumer {
        c.abort();
    }
    sender.close().await;
    let handler = collector.state.lock().0.clone();
    Ok(Lat {
        ack,
        handler,
        offered: total,
        acked,
        received: collector.received(),
        achieved: total as f64 / offering.as_secs_f64().max(1e-9),
    })
}

/// Send warm-up messages until one is acked and, when a consumer is `reading` along, seen by it
/// (a consumer that joined after the first, such as Kafka's group join, gets another).
async fn warm_up(
    sender: &Sender,
    topic: &str,
    collector: &Collector,
    reading: bool,
) -> Result<(), String> {
    let mut warm = collector.warm.subscribe();
    let ready = async {
        loop {
            let ack = sender
                .send(topic, eventbus_core::Bytes::from_static(b"warm"))
                .await;
            if let Some(e) = ack.await.error() {
                return Err(format!("warm-up: {e}"));
            }
            if !reading
                || tokio::time::timeout(Duration::from_millis(500), warm.wait_for(|w| *w))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .map_err(|_| "warm-up: the consumer saw nothing in 60 s".to_string())?
}

/// Await the acks in the order they resolve, each timed when its future completes.
async fn time_acks(
    mut rx: mpsc::UnboundedReceiver<(Instant, BoxFuture<'static, Outcome>)>,
) -> (Histogram<u64>, u64) {
    let mut h = hist();
    let mut acked = 0;
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            m = rx.recv(), if open => match m {
                Some((sent, ack)) => pending.push(async move {
                    let o = ack.await;
                    (sent, Instant::now(), o)
                }),
                None => open = false,
            },
            Some((sent, at, o)) = pending.next(), if !pending.is_empty() => {
                if o.is_acked() {
                    acked += 1;
                    let _ = h.record((at.duration_since(sent).as_micros() as u64).max(1));
                }
            }
            else => break,
        }
    }
    (h, acked)
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn cells(h: &Histogram<u64>) -> String {
    format!(
        "{} / {} / {}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999))
    )
}

/// The goal at `rate`, judged on merged histograms: at 1,000/s the SDK's p99 within 1 ms of
/// raw's; above, its p99 and p99.9 at or below raw's. Says by how much either way.
fn verdict(rate: u64, sdk: &Histogram<u64>, raw: &Histogram<u64>) -> String {
    let q = |h: &Histogram<u64>, q| h.value_at_quantile(q);
    let ratio = |p| q(sdk, p) as f64 / q(raw, p).max(1) as f64;
    let met = if rate <= 1_000 {
        q(sdk, 0.99) <= q(raw, 0.99) + 1_000
    } else {
        q(sdk, 0.99) <= q(raw, 0.99) && q(sdk, 0.999) <= q(raw, 0.999)
    };
    format!(
        "{} (p99 {:.2}x, p99.9 {:.2}x raw)",
        if met { "met" } else { "**not met**" },
        ratio(0.99),
        ratio(0.999)
    )
}

/// How long and how often each (path, rate, clock) runs: for the longer of `secs` and the time
/// `samples` messages take at the rate, `reps` times.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Size {
    secs: f64,
    samples: u64,
    reps: usize,
}

impl Size {
    /// The study's cells, and `--full`'s: 4 s per run, twice.
    const LONG: Size = Size {
        secs: 4.0,
        samples: 0,
        reps: 2,
    };

    /// Seconds of one run at `rate`.
    fn secs(self, rate: u64) -> f64 {
        self.secs.max(self.samples as f64 / rate.max(1) as f64)
    }

    /// The standalone study: 4 s per run, twice (2 s, once, with `--quick`); `--reps` wins.
    fn study(args: &Args) -> Size {
        let size = if args.quick {
            Size {
                secs: 2.0,
                samples: 0,
                reps: 1,
            }
        } else {
            Size::LONG
        };
        Size {
            reps: args.reps.unwrap_or(size.reps),
            ..size
        }
    }

    /// The latency rows of the main run: once per (path, rate, clock), 1 s or 2,000 messages
    /// (1,000 with `--quick`), so the default run stays within minutes; `--full` runs them as
    /// the study does.
    pub(crate) fn run(args: &Args) -> Size {
        if args.full {
            Size::LONG
        } else {
            Size {
                secs: 1.0,
                samples: if args.quick { 1_000 } else { 2_000 },
                reps: 1,
            }
        }
    }

    fn describe(self) -> String {
        let each = if self.samples == 0 {
            format!("{} s per run", self.secs)
        } else {
            // Digits grouped by three, as the rest of the report writes counts.
            let digits = self.samples.to_string();
            let mut samples = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i).is_multiple_of(3) {
                    samples.push(',');
                }
                samples.push(c);
            }
            format!(
                "{} s or {samples} messages per run, whichever is longer",
                self.secs
            )
        };
        format!("{each}, {} run(s) per path, rate and clock", self.reps)
    }
}

/// `--latency-study`: [`measure`] at the study's size; writes `latency.md` and `latency.svg`
/// (and `.png`) to `--out`. `Ok(false)` if a run lost or failed a message.
pub(crate) async fn study(args: &Args) -> Result<bool, String> {
    let section = measure(args, Size::study(args)).await?;
    let md = format!(
        "# Latency at fixed offered rates\n\nWritten by `cargo xtask bench --latency-study{}` \
         (eventbus-bench, `latency.rs`): {}\n\n{}",
        if args.quick { " --quick" } else { "" },
        section.method,
        section.table
    );
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let path = args.out.join("latency.md");
    std::fs::write(&path, &md).map_err(|e| format!("write {}: {e}", path.display()))?;
    crate::report::write_svg(&args.out, "latency", &section.svg())?;
    println!("{md}");
    Ok(section.ok)
}

/// Latency at every rate (`--rates`, default [`RATES`]) on NATS and Kafka (narrowed by
/// `--backend`), SDK and raw interleaved, each (path, rate, clock) run as `size` says.
pub(crate) async fn measure(args: &Args, size: Size) -> Result<Section, String> {
    let rates = if args.rates.is_empty() {
        RATES.to_vec()
    } else {
        args.rates.clone()
    };
    let backends: Vec<BackendName> = [BackendName::Nats, BackendName::Kafka]
        .into_iter()
        .filter(|b| args.backend.is_empty() || args.backend.iter().any(|n| n == b.label()))
        .collect();
    let method = format!(
        "one task offers 108-byte messages on a fixed schedule, {}, SDK and raw \
         interleaved, histograms merged. Publish -> \
         ack is timed with nothing reading (a consumer reads the run back afterwards, the check); \
         publish -> handler with the path's own consumer reading along. NATS: a local \
         nats-server, file stream, the SDK's default sink (fast-ingest batches, `Nats-Msg-Id`) \
         against async-nats's JetStream context with `Nats-Msg-Id`, the SDK's subscriber \
         against async-nats's pull consumer stream. Kafka: one tansu broker ({KAFKA_ENGINE}), \
         the SDK's default producer against rdkafka's `FutureProducer` with the same \
         `eventbus-id` header, both idempotent with `acks=all` and librdkafka's 5 ms linger; \
         the SDK's subscriber against rdkafka's `StreamConsumer`, both with \
         `fetch.wait.max.ms=10` (tansu holds a fetch for the whole wait). Publish -> ack runs \
         from `publish` to the ack future resolving; publish -> handler to the consumer \
         receiving the message. Goals: at 1,000/s the SDK's p99 within 1 ms of raw's; above, \
         its p99 and p99.9 at or below raw's.",
        size.describe()
    );
    let mut table = String::from(
        "| backend | offered/s | path | achieved/s | acked | read back | publish -> ack p50 / \
         p99 / p99.9 ms | publish -> handler p50 / p99 / p99.9 ms | goal (ack) | goal \
         (handler) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut ok = true;
    let mut n = 0;
    let mut points = Vec::new();
    for which in backends {
        eprintln!("==> latency: starting {}", which.label());
        let rig = Rig::start(which).await?;
        for &rate in &rates {
            let got = measure_rate(&rig, which, rate, size, &mut n).await?;
            ok &= rows(&mut table, &mut points, which, rate, &got);
        }
    }
    Ok(Section {
        method,
        table,
        points,
        ok,
    })
}

/// Every run at `rate` on `rig`: `[sdk ack, sdk handler, raw ack, raw handler]`, merged over
/// the runs `size` says. `n` numbers the runs (their subjects, topics and groups).
async fn measure_rate(
    rig: &Rig,
    which: BackendName,
    rate: u64,
    size: Size,
    n: &mut usize,
) -> Result<[Lat; 4], String> {
    let mut got = [Lat::empty(), Lat::empty(), Lat::empty(), Lat::empty()];
    for rep in 0..size.reps {
        // Alternate which path goes first, so neither always runs on a warmer broker.
        let order = if rep % 2 == 0 {
            [Path::Sdk, Path::Raw]
        } else {
            [Path::Raw, Path::Sdk]
        };
        for clock in [Clock::Ack, Clock::Handler] {
            for path in order {
                *n += 1;
                eprintln!(
                    "==> latency: {} {} at {rate}/s, {clock:?} clock, run {}",
                    which.label(),
                    path.label(),
                    rep + 1
                );
                let lat = run(rig, path, clock, rate, size.secs(rate), *n).await?;
                let h = if clock == Clock::Ack {
                    &lat.ack
                } else {
                    &lat.handler
                };
                eprintln!(
                    "    acked {} read {} of {}; p50 / p99 / p99.9 {} ms",
                    lat.acked,
                    lat.received,
                    lat.offered,
                    cells(h),
                );
                got[2 * usize::from(path == Path::Raw) + usize::from(clock == Clock::Handler)]
                    .add(&lat);
            }
        }
    }
    Ok(got)
}

/// The table's two rows (SDK with its verdicts, raw) and the chart's two points for one rate;
/// whether both paths acked and read back every message.
fn rows(
    table: &mut String,
    points: &mut Vec<crate::chart::RatePoint>,
    which: BackendName,
    rate: u64,
    got: &[Lat; 4],
) -> bool {
    let mut ok = true;
    for (path, ack, handler) in [(Path::Sdk, &got[0], &got[1]), (Path::Raw, &got[2], &got[3])] {
        let complete = [ack, handler]
            .iter()
            .all(|l| l.acked == l.offered && l.received == l.offered);
        ok &= complete;
        let (ack_goal, handler_goal) = match path {
            Path::Sdk => (
                verdict(rate, &got[0].ack, &got[2].ack),
                verdict(rate, &got[1].handler, &got[3].handler),
            ),
            Path::Raw => (String::new(), String::new()),
        };
        let _ = writeln!(
            table,
            "| {} | {rate} | {} | {:.0} | {}{} | {} | {} | {} | {ack_goal} | {handler_goal} |",
            which.label(),
            path.label(),
            ack.achieved.min(handler.achieved),
            ack.acked + handler.acked,
            if complete { "" } else { " **incomplete**" },
            ack.received + handler.received,
            cells(&ack.ack),
            cells(&handler.handler),
        );
        points.push((
            format!("{} {}", which.label(), path.label()),
            rate,
            [
                ack.ack.value_at_quantile(0.99),
                ack.ack.value_at_quantile(0.999),
                handler.handler.value_at_quantile(0.99),
                handler.handler.value_at_quantile(0.999),
            ],
        ));
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::Size;

    #[test]
    fn sizes_describe_their_counts_grouped_by_three() {
        let d = |samples| {
            Size {
                secs: 1.0,
                samples,
                reps: 1,
            }
            .describe()
        };
        assert!(
            d(2_000).starts_with("1 s or 2,000 messages per run"),
            "{}",
            d(2_000)
        );
        assert!(d(500).starts_with("1 s or 500 messages"), "{}", d(500));
        assert!(
            d(1_234_567).contains("1,234,567 messages"),
            "{}",
            d(1_234_567)
        );
        assert!(Size::LONG.describe().starts_with("4 s per run, 2 run(s)"));
    }
}
