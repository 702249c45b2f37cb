//! Running one (scenario, backend, mode, storage) and verifying it against the broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::{
    BatchSink, Bytes, Message, Outcome, Publisher, SubscribeSpec, Subscriber, Subscription, Topic,
};
use eventbus_memory::MemoryBroker;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use crate::mode::{Measure, Mode};
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
                let m = Message::new(
                    &topics[i % topics.len()],
                    payload(s.payload, w as u32, i as u64, t0),
                );
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
    pub(crate) async fn start(
        args: &Args,
        need_nats: bool,
        need_kafka: bool,
        storages: &[&str],
    ) -> Result<Env, String> {
        #[cfg(feature = "nats")]
        let single = storages.iter().any(|st| *st != "replicated");
        #[cfg(feature = "nats")]
        let nats = if need_nats && single {
            Some(NatsEnv::start(BrokerKind::Nats, args.nats_url.as_deref()).await?)
        } else {
            None
        };
        #[cfg(feature = "nats")]
        let nats_cluster = if need_nats && storages.contains(&"replicated") {
            let kind = BrokerKind::NatsCluster { nodes: 3 };
            Some(NatsEnv::start(kind, args.nats_url.as_deref()).await?)
        } else {
            None
        };
        #[cfg(not(feature = "nats"))]
        let _ = (args, need_nats);
        #[cfg(feature = "kafka")]
        let kafka = if need_kafka {
            Some(crate::kafka::KafkaEnv::start(args, storages).await?)
        } else {
            None
        };
        #[cfg(not(feature = "kafka"))]
        let _ = (need_kafka, storages);
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
    pub(crate) async fn run_or_fail(&self, args: &Args, run: Run<'_>, what: &str) -> Vec<Record> {
        match self.run_one(args, run).await {
            Ok(recs) => recs,
            Err(e) => {
                let mut r = Record::new(&run);
                r.verify_note = format!("{what} failed: {e}");
                vec![r]
            }
        }
    }

    pub(crate) async fn run_one(&self, args: &Args, run: Run<'_>) -> Result<Vec<Record>, String> {
        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
        let rec = Record::new(&run);
        match run.backend {
            "memory" => run_memory(args, run, id, rec).await,
            #[cfg(feature = "kafka")]
            "kafka" => match &self.kafka {
                Some(k) => k.run(run, id, Self::sdk_config(args), rec).await,
                None => Err("Kafka not started".into()),
            },
            #[cfg(feature = "nats")]
            "nats" => {
                let n = if run.storage == "replicated" {
                    self.nats_cluster.as_ref()
                } else {
                    self.nats.as_ref()
                };
                n.ok_or("NATS not started")?.run(args, run, id, rec).await
            }
            other => Err(format!("backend {other} is not built into this bench")),
        }
    }
}

/// One run's coordinates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run<'a> {
    pub(crate) s: Scenario,
    pub(crate) backend: &'a str,
    pub(crate) mode: Mode,
    pub(crate) measure: Measure,
    pub(crate) storage: &'a str,
    pub(crate) rep: usize,
    /// The raw baseline's chosen window (NATS) or linger (Kafka); `None` probes every candidate.
    pub(crate) setting: Option<usize>,
}

/// The in-process backend: the engine and subscriber with no broker below.
async fn run_memory(
    args: &Args,
    run: Run<'_>,
    id: u64,
    mut rec: Record,
) -> Result<Vec<Record>, String> {
    let s = run.s;
    let started = Instant::now();
    let prefix = format!("bench.r{id}");
    let topics: Vec<Topic> = (0..s.topics)
        .map(|t| Topic::new(format!("{prefix}.t{t}")))
        .collect();
    let broker = MemoryBroker::new();
    let cfg = Env::sdk_config(args);
    rec.window = cfg.max_in_flight;
    let p = Batcher::new(broker.sink(), cfg).map_err(|e| e.to_string())?;
    let subscribe = || async {
        let mut subs = Vec::new();
        for t in &topics {
            subs.push(
                broker
                    .subscriber()
                    .subscribe(SubscribeSpec::new(t).group("bench").prefetch(1024))
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok::<_, String>(subs)
    };
    let receive_all = |subs: Vec<Subscription>, t0, done: tokio::sync::watch::Receiver<bool>| {
        let per_topic = (s.messages / s.topics) as u64;
        subs.into_iter()
            .enumerate()
            .map(|(i, sub)| {
                let extra = u64::from(i < s.messages % s.topics);
                receive(sub, per_topic + extra, t0, done.clone())
            })
            .collect::<Vec<_>>()
    };
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let during = match run.measure {
        Measure::EndToEnd => Some(subscribe().await?),
        _ => None,
    };
    let meter = sys::Meter::start(None);
    let t0 = meter.t0;
    let rxs = during.map(|subs| receive_all(subs, t0, done_rx.clone()));
    let published = drive_sdk(&p, s, &topics, run.mode == Mode::Naive, t0).await;
    let _ = done_tx.send(true);
    let received = merged(rxs.unwrap_or_default()).await?;
    rec.fill(&published, &received, &meter, run.measure);
    if run.measure == Measure::Publish {
        // Read back once the clock (and the meter) has stopped.
        let back = merged(receive_all(subscribe().await?, t0, done_rx)).await?;
        rec.read_back(&back);
    }
    let stored: u64 = topics.iter().map(|t| broker.topic_len(t) as u64).sum();
    rec.topic_or_stream = format!("{prefix}.*");
    rec.verify(stored, true, "in-memory topic logs");
    let _ = p.close(Duration::from_secs(10)).await;
    rec.wall_secs = started.elapsed().as_secs_f64();
    Ok(vec![rec])
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
