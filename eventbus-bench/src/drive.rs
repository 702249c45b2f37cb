//! Running one (scenario, backend, mode, storage) and verifying it against the broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::{
    Backend as _, BatchSink, Bytes, Message, Outcome, Publisher, SubscribeSpec, Subscriber,
    Subscription, Topic,
};
use eventbus_memory::MemoryBroker;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::mode::{Backend, Measure, Mode, Storage};
#[cfg(feature = "nats")]
use crate::nats::NatsEnv;
use crate::report::Record;
use crate::{Args, Scenario, sys};
#[cfg(feature = "nats")]
use eventbus_brokers::BrokerKind;

pub(crate) struct Env {
    #[cfg(feature = "nats")]
    nats: Option<NatsEnv>,
    /// The `replicated` storage class: a 3-node cluster (or the external server).
    #[cfg(feature = "nats")]
    nats_cluster: Option<NatsEnv>,
    #[cfg(feature = "kafka")]
    kafka: Option<crate::kafka::KafkaEnv>,
    next_run: AtomicU64,
}

/// What the publishers saw.
pub(crate) struct Published {
    pub(crate) acked: u64,
    failed: u64,
    unknown: u64,
    pub(crate) first_error: Option<String>,
    ack_latency: Histogram<u64>,
    /// From the first publish to the last ack (the exact event).
    elapsed: Duration,
}

/// What the subscriber saw.
pub(crate) struct Received {
    pub(crate) distinct: u64,
    pub(crate) duplicates: u64,
    pub(crate) e2e_latency: Histogram<u64>,
    /// From the first publish to the last distinct delivery; `None` if not all arrived.
    pub(crate) elapsed: Option<Duration>,
    /// From the same start to the first delivery (a drain is timed from there: joining a
    /// consumer group is a fixed cost, not a rate).
    pub(crate) first: Option<Duration>,
}

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// 108-byte (or larger) payload: publisher id, sequence, send time since t0, filler.
pub(crate) fn payload(size: usize, publisher: u32, seq: u64, t0: Instant) -> Bytes {
    let mut v = vec![b'x'; size.max(20)];
    v[0..4].copy_from_slice(&publisher.to_le_bytes());
    v[4..12].copy_from_slice(&seq.to_le_bytes());
    v[12..20].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
    Bytes::from(v)
}

pub(crate) fn decode(p: &[u8]) -> Option<(u64, u64)> {
    if p.len() < 20 {
        return None;
    }
    let publisher = u32::from_le_bytes(p[0..4].try_into().ok()?) as u64;
    let seq = u64::from_le_bytes(p[4..12].try_into().ok()?);
    let sent = u64::from_le_bytes(p[12..20].try_into().ok()?);
    Some(((publisher << 40) | seq, sent))
}

/// The key of publisher `w`'s `i`-th message under `--keys` (round robin over `s.keys` keys
/// per publisher), the same for the SDK and the raw baselines; `None` without `--keys`.
pub(crate) fn key(s: &Scenario, w: usize, i: usize) -> Option<String> {
    (s.keys > 0).then(|| format!("p{w}-k{}", i % s.keys))
}

pub(crate) fn share(s: &Scenario, w: usize) -> usize {
    s.messages / s.publishers + usize::from(w < s.messages % s.publishers)
}

/// Publish through the SDK. `naive`: await each ack before the next publish.
pub(crate) async fn drive_sdk<S: BatchSink>(
    p: &Batcher<S>,
    s: Scenario,
    topics: &[Topic],
    naive: bool,
    t0: Instant,
) -> Published {
    let mut tasks = Vec::new();
    for w in 0..s.publishers {
        let (p, topics) = (p.clone(), topics.to_vec());
        tasks.push(tokio::spawn(async move {
            let n = share(&s, w);
            let (tx, rx) = mpsc::unbounded_channel::<(Instant, eventbus_core::PendingAck)>();
            let acker = spawn_acker(rx);
            for i in 0..n {
                let mut m = Message::new(
                    &topics[i % topics.len()],
                    payload(s.payload, w as u32, i as u64, t0),
                );
                if let Some(k) = key(&s, w, i) {
                    m = m.with_key(k);
                }
                let sent = Instant::now();
                match p.publish(m).await {
                    Ok(ack) if naive => {
                        let o = ack.await;
                        tx.send((sent, eventbus_core::PendingAck::ready(o)))
                            .expect("acker alive");
                    }
                    Ok(ack) => tx.send((sent, ack)).expect("acker alive"),
                    Err(e) => tx
                        .send((sent, eventbus_core::PendingAck::ready(Outcome::Failed(e))))
                        .expect("acker alive"),
                }
            }
            drop(tx);
            acker.await.expect("acker task")
        }));
    }
    Published::merge(tasks, t0).await
}

/// Spawn the task that awaits one publisher's acks in publish order, timing each from its
/// publish, and returns the tally with the time of the last ack.
pub(crate) fn spawn_acker<F>(
    mut rx: mpsc::UnboundedReceiver<(Instant, F)>,
) -> tokio::task::JoinHandle<(Published, Instant)>
where
    F: std::future::Future<Output = Outcome> + Send + 'static,
{
    tokio::spawn(async move {
        let mut r = Published::empty();
        let mut last = Instant::now();
        while let Some((sent, ack)) = rx.recv().await {
            let o = ack.await;
            last = Instant::now();
            r.record(o, last - sent);
        }
        (r, last)
    })
}

/// A raw client's result as an outcome (the position is not needed by the bench).
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) fn raw_outcome(r: Result<(), String>) -> Outcome {
    use eventbus_core::{Ack, Error, ErrorKind, Position};
    match r {
        Ok(()) => Outcome::Acked(Ack {
            position: Position::Offset(0),
        }),
        Err(e) => Outcome::Unknown(Error::new(ErrorKind::Other, e)),
    }
}

impl Published {
    pub(crate) fn empty() -> Self {
        Published {
            acked: 0,
            failed: 0,
            unknown: 0,
            first_error: None,
            ack_latency: hist(),
            elapsed: Duration::ZERO,
        }
    }

    /// Set the elapsed time from `t0` to the last ack, `last`.
    #[cfg(any(feature = "nats", feature = "kafka"))]
    pub(crate) fn finish(mut self, t0: Instant, last: Instant) -> Self {
        self.elapsed = last.saturating_duration_since(t0);
        self
    }

    pub(crate) fn record(&mut self, o: Outcome, latency: Duration) {
        match &o {
            Outcome::Acked(_) => self.acked += 1,
            Outcome::Failed(_) => self.failed += 1,
            Outcome::Unknown(_) => self.unknown += 1,
        }
        if let (None, Some(e)) = (&self.first_error, o.error()) {
            self.first_error = Some(e.to_string());
        }
        let _ = self.ack_latency.record((latency.as_micros() as u64).max(1));
    }

    pub(crate) async fn merge(
        tasks: Vec<tokio::task::JoinHandle<(Published, Instant)>>,
        t0: Instant,
    ) -> Published {
        let mut all = Published::empty();
        let mut last = t0;
        for t in tasks {
            let (r, l) = t.await.expect("publisher task");
            all.acked += r.acked;
            all.failed += r.failed;
            all.unknown += r.unknown;
            if all.first_error.is_none() {
                all.first_error = r.first_error;
            }
            all.ack_latency.add(&r.ack_latency).expect("same bounds");
            last = last.max(l);
        }
        all.elapsed = last - t0;
        all
    }
}

/// Receive until `expected` distinct messages arrived, acking each; give up `grace` after
/// `publish_done` fires.
pub(crate) fn receive(
    mut sub: Subscription,
    expected: u64,
    t0: Instant,
    mut publish_done: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Received> {
    tokio::spawn(async move {
        let mut seen = Seen::new(expected, t0);
        let grace = Duration::from_secs(15);
        // Reading back what is already published: the grace runs from the start.
        let mut deadline = (*publish_done.borrow()).then(|| tokio::time::Instant::now() + grace);
        while !seen.complete() {
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, sub.next()).await.ok().flatten(),
                    None => tokio::select! {
                        d = sub.next() => d,
                        _ = publish_done.changed() => { deadline = Some(tokio::time::Instant::now() + grace); Some(Err(eventbus_core::Error::closed("tick"))) }
                    },
                }
            };
            match next.await {
                None => break,
                Some(Err(_)) => continue,
                Some(Ok(d)) => {
                    // Once publishing is done, give up only after `grace` without a delivery: a
                    // consumer of a replicated stream may still be far behind, but it moves.
                    if deadline.is_some() {
                        deadline = Some(tokio::time::Instant::now() + grace);
                    }
                    seen.saw(d.message().payload());
                    let _ = d.ack().await;
                }
            }
        }
        sub.close().await;
        seen.into_received()
    })
}

/// Read back what is already published (the grace runs from the start), acking each message.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) async fn read_back(
    sub: Subscription,
    expected: u64,
    t0: Instant,
) -> Result<Received, String> {
    let (_published, done) = tokio::sync::watch::channel(true);
    receive(sub, expected, t0, done)
        .await
        .map_err(|e| e.to_string())
}

/// Wait for several readers and add up what they saw.
async fn merged(readers: Vec<tokio::task::JoinHandle<Received>>) -> Result<Received, String> {
    let mut parts = Vec::new();
    for r in readers {
        parts.push(r.await.map_err(|e| e.to_string())?);
    }
    Ok(Received::merge(parts))
}

impl Env {
    /// Start (or connect to) the brokers `backends` need for the `storages` classes.
    pub(crate) async fn start(
        args: &Args,
        backends: &[Backend],
        storages: &[Storage],
    ) -> Result<Env, String> {
        #[cfg(feature = "nats")]
        let need_nats = backends.contains(&Backend::Nats);
        #[cfg(feature = "nats")]
        let single = storages.iter().any(|st| *st != Storage::Replicated);
        #[cfg(feature = "nats")]
        let nats = if need_nats && single {
            Some(NatsEnv::start(BrokerKind::Nats, args.nats_url.as_deref()).await?)
        } else {
            None
        };
        #[cfg(feature = "nats")]
        let nats_cluster = if need_nats && storages.contains(&Storage::Replicated) {
            let kind = BrokerKind::NatsCluster { nodes: 3 };
            Some(NatsEnv::start(kind, args.nats_url.as_deref()).await?)
        } else {
            None
        };
        #[cfg(feature = "kafka")]
        let kafka = if backends.contains(&Backend::Kafka) {
            Some(crate::kafka::KafkaEnv::start(args, storages).await?)
        } else {
            None
        };
        #[cfg(not(all(feature = "nats", feature = "kafka")))]
        let _ = (args, backends, storages);
        Ok(Env {
            #[cfg(feature = "nats")]
            nats,
            #[cfg(feature = "nats")]
            nats_cluster,
            #[cfg(feature = "kafka")]
            kafka,
            next_run: AtomicU64::new(0),
        })
    }

    pub(crate) fn describe(&self) -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024 / 1024);
        #[allow(unused_mut)]
        let mut s = format!("machine: {cores} cores ({cpu}), {mem_gib} GiB RAM");
        #[cfg(feature = "nats")]
        for (n, label) in [(&self.nats, ""), (&self.nats_cluster, " (replicated)")] {
            if let Some(n) = n {
                s.push_str(&format!("; {}{label}", n.describe()));
            }
        }
        #[cfg(feature = "kafka")]
        if let Some(k) = &self.kafka {
            s.push_str("; ");
            s.push_str(&k.describe());
        }
        s
    }

    pub(crate) async fn stop(self) {
        #[cfg(feature = "kafka")]
        if let Some(k) = &self.kafka {
            k.stop().await;
        }
        #[cfg(feature = "nats")]
        drop((self.nats, self.nats_cluster));
    }

    pub(crate) fn sdk_config(args: &Args) -> BatchConfig {
        let mut c = BatchConfig::default();
        if let Some(w) = args.window {
            c = c.max_in_flight(w);
        }
        if let Some(l) = args.linger {
            c = c.linger(Duration::from_millis(l));
        }
        if let Some(b) = args.batches {
            c = c.max_in_flight_batches(b);
        }
        c
    }

    /// [`Env::run_one`], with an error turned into one unverified record saying `what` failed:
    /// one run's error fails that run (loudly), not the whole bench.
    pub(crate) async fn run_or_fail(&self, args: &Args, run: Run, what: &str) -> Vec<Record> {
        match self.run_one(args, run).await {
            Ok(recs) => recs,
            Err(e) => {
                let mut r = Record::new(&run);
                r.verify_note = format!("{what} failed: {e}");
                vec![r]
            }
        }
    }

    /// Run `run` on its backend: every candidate setting of a probing raw mode, or once.
    pub(crate) async fn run_one(&self, args: &Args, run: Run) -> Result<Vec<Record>, String> {
        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
        match run.backend {
            Backend::Memory => each_setting(&InProcess, args, run, id).await,
            #[cfg(feature = "kafka")]
            Backend::Kafka => {
                let k = self.kafka.as_ref().ok_or("Kafka not started")?;
                each_setting(k, args, run, id).await
            }
            #[cfg(feature = "nats")]
            Backend::Nats => {
                let n = if run.storage == Storage::Replicated {
                    self.nats_cluster.as_ref()
                } else {
                    self.nats.as_ref()
                };
                each_setting(n.ok_or("NATS not started")?, args, run, id).await
            }
            #[allow(unreachable_patterns)] // every backend is built in with the default features
            other => Err(format!("backend {other} is not built into this bench")),
        }
    }
}

/// One run's coordinates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub(crate) s: Scenario,
    pub(crate) backend: Backend,
    pub(crate) mode: Mode,
    pub(crate) measure: Measure,
    pub(crate) storage: Storage,
    pub(crate) rep: usize,
    /// The raw baseline's chosen window (NATS) or linger (Kafka); `None` probes every candidate.
    pub(crate) setting: Option<usize>,
}

/// One attempt of a run: at one of its candidate settings.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(any(feature = "nats", feature = "kafka")), allow(dead_code))]
pub(crate) struct Attempt {
    /// The run's number, unique in this bench: it names the run's streams and topics.
    pub(crate) id: u64,
    /// Which of the run's candidate settings this is (0 for a run with one).
    pub(crate) index: usize,
    /// The raw baseline's window (NATS) or linger in ms (Kafka); 0 for every other mode.
    pub(crate) setting: usize,
}

/// A backend's part of the one run lifecycle ([`each_setting`]): set up, time, verify and
/// tear down one attempt of a run.
pub(crate) trait Target {
    /// The settings a raw baseline probes: ACK windows (NATS) or lingers in ms (Kafka).
    const CANDIDATES: &'static [usize];

    /// Run `run` once at `at.setting`, filling `rec` (all but its wall time).
    async fn once(
        &self,
        args: &Args,
        run: Run,
        at: Attempt,
        rec: &mut Record,
    ) -> Result<(), String>;
}

/// The settings `run` is tried at: a raw baseline's chosen one, or every candidate while none
/// is chosen; 0 for every other mode.
fn settings(run: Run, candidates: &[usize]) -> Vec<usize> {
    if run.mode.probes() && !candidates.is_empty() {
        run.setting.map_or(candidates.to_vec(), |s| vec![s])
    } else {
        vec![0]
    }
}

/// The run lifecycle every backend shares: one record per setting tried, each timed from its
/// setup to its teardown. An attempt's error fails the whole run.
async fn each_setting<T: Target>(
    target: &T,
    args: &Args,
    run: Run,
    id: u64,
) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for (index, setting) in settings(run, T::CANDIDATES).into_iter().enumerate() {
        let started = Instant::now();
        let mut rec = Record::new(&run);
        let at = Attempt { id, index, setting };
        target.once(args, run, at, &mut rec).await?;
        rec.wall_secs = started.elapsed().as_secs_f64();
        out.push(rec);
    }
    Ok(out)
}

/// What the timed phase of a publishing run leaves for its verification.
pub(crate) struct Timed {
    /// The clock's start.
    pub(crate) t0: Instant,
    /// What the consumer beside the publishers saw; `None` when none ran.
    // Kafka verifies by it; NATS and memory by the counts it left in the record.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) received: Option<Received>,
    /// Publishing is done (it has fired): a reader given it counts its grace from its start.
    pub(crate) done: watch::Receiver<bool>,
}

/// The timed phase every publishing run shares: start the meter (and the clock), start
/// `consumer` beside the publishers when given, `publish`; the clock stops at the last ack
/// (`publish`'s own measure), and the record is filled once the consumer has all it will get.
pub(crate) async fn timed<C, F>(
    rec: &mut Record,
    measure: Measure,
    broker_pid: Option<u32>,
    consumer: Option<C>,
    publish: impl AsyncFnOnce(Instant) -> Result<Published, String>,
) -> Result<Timed, String>
where
    C: FnOnce(Instant, watch::Receiver<bool>) -> F,
    F: Future<Output = Result<Received, String>>,
{
    let name = crate::profile::run_name(rec, measure);
    crate::profile::profiled(name, async move {
        let (done_tx, done) = watch::channel(false);
        let meter = sys::Meter::start(broker_pid);
        let t0 = meter.t0;
        let during = consumer.map(|c| c(t0, done.clone()));
        // Done before `?`: a consumer must hear it even when the publish failed, or it reads on.
        let published = publish(t0).await;
        let _ = done_tx.send(true);
        let published = published?;
        let received = match during {
            Some(r) => Some(r.await?),
            None => None,
        };
        match &received {
            Some(r) => rec.fill(&published, r, &meter, measure),
            None => rec.fill(&published, &Received::empty(), &meter, measure),
        }
        Ok(Timed { t0, received, done })
    })
    .await
}

/// The timed phase every drain shares: start the meter (and the clock), `read` the backlog
/// (`acked` messages, every one acked before the clock started), fill the record.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) async fn timed_drain(
    rec: &mut Record,
    broker_pid: Option<u32>,
    acked: u64,
    read: impl AsyncFnOnce(Instant) -> Result<Received, String>,
) -> Result<Received, String> {
    let name = crate::profile::run_name(rec, Measure::Drain);
    crate::profile::profiled(name, async move {
        let meter = sys::Meter::start(broker_pid);
        let received = read(meter.t0).await?;
        rec.fill(&Published::empty(), &received, &meter, Measure::Drain);
        rec.acked = acked;
        rec.window = 1024; // the consumers' prefetch
        Ok(received)
    })
    .await
}

/// What a reader task saw, its panic as an error.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) async fn joined(reader: JoinHandle<Received>) -> Result<Received, String> {
    reader.await.map_err(|e| e.to_string())
}

/// The in-process backend: the engine and subscriber with no broker below.
struct InProcess;

impl Target for InProcess {
    const CANDIDATES: &'static [usize] = &[];

    async fn once(
        &self,
        args: &Args,
        run: Run,
        at: Attempt,
        rec: &mut Record,
    ) -> Result<(), String> {
        let s = run.s;
        let prefix = format!("bench.r{}", at.id);
        let topics: Vec<Topic> = (0..s.topics)
            .map(|t| Topic::new(format!("{prefix}.t{t}")))
            .collect();
        let broker = MemoryBroker::new();
        let cfg = Env::sdk_config(args);
        rec.window = cfg.max_in_flight;
        let p = Batcher::new(broker.sink().await.map_err(|e| e.to_string())?, cfg)
            .map_err(|e| e.to_string())?;
        let during = match run.measure {
            Measure::EndToEnd => Some(subscribe_each(&broker, &topics).await?),
            _ => None,
        };
        let consumer = during.map(|subs| move |t0, done| merged(receive_each(subs, s, t0, done)));
        let naive = run.mode == Mode::Naive;
        let publish = async |t0| Ok(drive_sdk(&p, s, &topics, naive, t0).await);
        let timed = timed(rec, run.measure, None, consumer, publish).await?;
        if run.measure == Measure::Publish {
            // Read back once the clock (and the meter) has stopped.
            let subs = subscribe_each(&broker, &topics).await?;
            rec.read_back(&merged(receive_each(subs, s, timed.t0, timed.done)).await?);
        }
        let stored: u64 = topics.iter().map(|t| broker.topic_len(t) as u64).sum();
        rec.topic_or_stream = format!("{prefix}.*");
        rec.verify(stored, true, "in-memory topic logs");
        let _ = p.close(Duration::from_secs(10)).await;
        Ok(())
    }
}

/// One subscription per topic of the in-process broker, in group `bench`.
async fn subscribe_each(
    broker: &MemoryBroker,
    topics: &[Topic],
) -> Result<Vec<Subscription>, String> {
    let mut subs = Vec::new();
    for t in topics {
        subs.push(
            broker
                .subscriber()
                .subscribe(SubscribeSpec::new(t).group("bench").prefetch(1024))
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(subs)
}

/// A reader per subscription of [`subscribe_each`], each expecting its topic's share of `s`.
fn receive_each(
    subs: Vec<Subscription>,
    s: Scenario,
    t0: Instant,
    done: watch::Receiver<bool>,
) -> Vec<JoinHandle<Received>> {
    let per_topic = (s.messages / s.topics) as u64;
    subs.into_iter()
        .enumerate()
        .map(|(i, sub)| {
            let extra = u64::from(i < s.messages % s.topics);
            receive(sub, per_topic + extra, t0, done.clone())
        })
        .collect()
}

/// Publish `s` through `sink` without timing it, every message acked, for a drain to read.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) async fn backlog<S: BatchSink>(
    sink: S,
    s: Scenario,
    topics: &[Topic],
) -> Result<(), String> {
    let p = Batcher::new(sink, BatchConfig::default()).map_err(|e| e.to_string())?;
    let published = drive_sdk(&p, s, topics, false, Instant::now()).await;
    let _ = p.close(Duration::from_secs(10)).await;
    if published.acked != s.messages as u64 {
        return Err(format!(
            "backlog: {} of {} acked (first error: {:?})",
            published.acked, s.messages, published.first_error
        ));
    }
    Ok(())
}

/// Distinct ids seen by a drain, timed to the last new one.
pub(crate) struct Seen {
    ids: HashSet<u64>,
    expected: u64,
    t0: Instant,
    r: Received,
}

impl Seen {
    pub(crate) fn new(expected: u64, t0: Instant) -> Seen {
        Seen {
            ids: HashSet::with_capacity(expected as usize),
            expected,
            t0,
            r: Received::empty(),
        }
    }

    pub(crate) fn complete(&self) -> bool {
        self.r.distinct >= self.expected
    }

    pub(crate) fn saw(&mut self, payload: &[u8]) {
        let now = self.t0.elapsed();
        let Some((id, sent)) = decode(payload) else {
            return;
        };
        if self.ids.insert(id) {
            self.r.distinct += 1;
            self.r.first.get_or_insert(now);
            let _ = self
                .r
                .e2e_latency
                .record(((now.as_nanos() as u64).saturating_sub(sent) / 1_000).max(1));
            if self.r.distinct == self.expected {
                self.r.elapsed = Some(now);
            }
        } else {
            self.r.duplicates += 1;
        }
    }

    pub(crate) fn into_received(self) -> Received {
        self.r
    }
}

impl Received {
    /// Nothing received (no consumer ran, or none arrived).
    pub(crate) fn empty() -> Received {
        Received {
            distinct: 0,
            duplicates: 0,
            e2e_latency: hist(),
            elapsed: None,
            first: None,
        }
    }

    fn merge(parts: Vec<Received>) -> Received {
        let mut all = Received {
            distinct: 0,
            duplicates: 0,
            e2e_latency: hist(),
            // Nothing read (no consumer ran) is not "everything read at once".
            elapsed: (!parts.is_empty()).then_some(Duration::ZERO),
            first: None,
        };
        for p in parts {
            all.distinct += p.distinct;
            all.duplicates += p.duplicates;
            all.e2e_latency.add(&p.e2e_latency).expect("same bounds");
            all.elapsed = match (all.elapsed, p.elapsed) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        all
    }
}

impl Record {
    pub(crate) fn fill(&mut self, p: &Published, r: &Received, meter: &sys::Meter, m: Measure) {
        let (peak_rss, cpu, broker_cpu) = meter.stop();
        if m == Measure::Drain {
            // From the first message to the last: the rate at which the backlog is read.
            self.drain_msgs_per_sec = r.elapsed.map(|e| {
                let e = e.saturating_sub(r.first.unwrap_or_default());
                self.messages as f64 / e.as_secs_f64().max(1e-9)
            });
            self.received_distinct = r.distinct;
            self.received_duplicates = r.duplicates;
            self.peak_rss_bytes = peak_rss;
            self.cpu_secs = cpu;
            self.broker_cpu_secs = broker_cpu;
            return;
        }
        self.broker_cpu_secs = broker_cpu;
        let secs = p.elapsed.as_secs_f64().max(1e-9);
        self.acked = p.acked;
        self.failed = p.failed;
        self.unknown = p.unknown;
        self.first_error = p.first_error.clone();
        self.publish_secs = secs;
        self.publish_msgs_per_sec = self.messages as f64 / secs;
        self.publish_mb_per_sec = self.messages as f64 * self.payload_bytes as f64 / secs / 1e6;
        self.ack_p50_us = p.ack_latency.value_at_quantile(0.5);
        self.ack_p99_us = p.ack_latency.value_at_quantile(0.99);
        self.ack_p999_us = p.ack_latency.value_at_quantile(0.999);
        self.received_distinct = r.distinct;
        self.received_duplicates = r.duplicates;
        self.e2e_msgs_per_sec = r
            .elapsed
            .map(|e| self.messages as f64 / e.as_secs_f64().max(1e-9));
        self.e2e_p50_us = r.e2e_latency.value_at_quantile(0.5);
        self.e2e_p99_us = r.e2e_latency.value_at_quantile(0.99);
        self.peak_rss_bytes = peak_rss;
        self.cpu_secs = cpu;
    }

    /// What a reader saw once the clock had stopped (a publish-only run's read-back).
    pub(crate) fn read_back(&mut self, r: &Received) {
        self.received_distinct = r.distinct;
        self.received_duplicates = r.duplicates;
    }

    /// Check the run: everything acked, the broker holds exactly the acked count, and (when a
    /// consumer ran) the consumer saw every acked message once.
    pub(crate) fn verify(&mut self, stored: u64, consumer_ran: bool, how: &str) {
        self.stored = stored;
        self.verify_method = how.to_owned();
        let mut problems = Vec::new();
        if self.acked != self.messages as u64 {
            problems.push(format!(
                "{} of {} acked ({} failed, {} unknown; first error: {:?})",
                self.acked, self.messages, self.failed, self.unknown, self.first_error
            ));
        }
        if stored != self.acked {
            problems.push(format!(
                "broker holds {stored} messages, {} were acked",
                self.acked
            ));
        }
        if consumer_ran && self.received_distinct != self.acked {
            problems.push(format!(
                "subscriber saw {} distinct messages, {} were acked",
                self.received_distinct, self.acked
            ));
        }
        self.verified = problems.is_empty();
        self.verify_note = if self.verified {
            "ok".into()
        } else {
            problems.join("; ")
        };
    }
}
