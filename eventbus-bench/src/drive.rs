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

use crate::report::Record;
use crate::{Args, Scenario, sys};

/// Windows tried for the raw client; the best is the baseline.
#[cfg(feature = "nats")]
const RAW_WINDOWS: [usize; 3] = [1_024, 4_096, 16_384];

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

#[cfg(feature = "nats")]
struct NatsEnv {
    server: Option<eventbus_brokers::NatsServer>,
    cluster: Option<eventbus_brokers::NatsCluster>,
    url: String,
    backend: eventbus_nats::NatsBackend,
}

#[cfg(feature = "nats")]
impl NatsEnv {
    async fn connect(
        server: Option<eventbus_brokers::NatsServer>,
        cluster: Option<eventbus_brokers::NatsCluster>,
        url: String,
    ) -> Result<NatsEnv, String> {
        let backend =
            eventbus_nats::NatsBackend::connect(eventbus_nats::NatsConfig::new(url.clone()))
                .await
                .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
        Ok(NatsEnv {
            server,
            cluster,
            url,
            backend,
        })
    }

    /// The process whose CPU the bench reports (node 0 of a cluster).
    fn pid(&self) -> Option<u32> {
        match (&self.server, &self.cluster) {
            (Some(s), _) => s.pid(),
            (None, Some(c)) => c
                .nodes()
                .first()
                .and_then(eventbus_brokers::NatsServer::pid),
            (None, None) => None,
        }
    }

    fn describe(&self) -> String {
        let how = match (&self.server, &self.cluster) {
            (Some(_), _) => "started by the bench",
            (None, Some(_)) => "3-node cluster started by the bench",
            (None, None) => "external",
        };
        format!(
            "nats-server {} at {} ({how})",
            self.backend.server_version(),
            self.url
        )
    }
}

/// What the publishers saw.
pub(crate) struct Published {
    acked: u64,
    failed: u64,
    unknown: u64,
    first_error: Option<String>,
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

#[cfg(feature = "nats")]
/// Raw async-nats: `jetstream::Context` publishes pipelined up to `window`; with `dedup`, each
/// carries a `Nats-Msg-Id` like the SDK's default (the like-for-like baseline for `sdk`).
async fn drive_raw_nats(
    client: &async_nats::Client,
    window: usize,
    dedup: bool,
    s: Scenario,
    topics: &[Topic],
    t0: Instant,
) -> Published {
    use async_nats::jetstream;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .timeout(Duration::from_secs(10))
        .build(client.clone());
    let mut tasks = Vec::new();
    for w in 0..s.publishers {
        let (js, subjects) = (
            js.clone(),
            topics
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect::<Vec<_>>(),
        );
        tasks.push(tokio::spawn(async move {
            let n = share(&s, w);
            let (tx, rx) = mpsc::unbounded_channel();
            let acker = spawn_acker(rx);
            for i in 0..n {
                let sent = Instant::now();
                let subject = subjects[i % subjects.len()].clone();
                let body = payload(s.payload, w as u32, i as u64, t0);
                let sent_ack = if dedup {
                    js.send_publish(
                        subject,
                        jetstream::message::PublishMessage::build()
                            .payload(body)
                            .message_id(format!("{w}-{i}")),
                    )
                    .await
                } else {
                    js.publish(subject, body).await
                };
                match sent_ack {
                    Ok(ack) => tx
                        .send((sent, async move {
                            raw_outcome(ack.await.map(|_| ()).map_err(|e| e.to_string()))
                        }))
                        .expect("acker alive"),
                    Err(e) => panic!("raw publish failed: {e}"),
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
fn receive(
    mut sub: Subscription,
    expected: u64,
    t0: Instant,
    mut publish_done: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Received> {
    tokio::spawn(async move {
        let mut seen = HashSet::with_capacity(expected as usize);
        let mut r = Received::empty();
        let grace = Duration::from_secs(15);
        let mut deadline: Option<tokio::time::Instant> = None;
        while r.distinct < expected {
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
                    let now = t0.elapsed();
                    if let Some((id, sent)) = decode(d.message().payload()) {
                        if seen.insert(id) {
                            r.distinct += 1;
                            let _ = r.e2e_latency.record(
                                ((now.as_nanos() as u64).saturating_sub(sent) / 1_000).max(1),
                            );
                            if r.distinct == expected {
                                r.elapsed = Some(now);
                            }
                        } else {
                            r.duplicates += 1;
                        }
                    }
                    let _ = d.ack().await;
                }
            }
        }
        sub.close().await;
        r
    })
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
            Some(match &args.nats_url {
                Some(u) => NatsEnv::connect(None, None, u.clone()).await?,
                None => {
                    let s = eventbus_brokers::NatsServer::start()
                        .map_err(|e| format!("cannot start nats-server: {e}"))?;
                    let u = s.url();
                    NatsEnv::connect(Some(s), None, u).await?
                }
            })
        } else {
            None
        };
        #[cfg(feature = "nats")]
        let nats_cluster = if need_nats && storages.contains(&"replicated") {
            Some(match &args.nats_url {
                Some(u) => NatsEnv::connect(None, None, u.clone()).await?,
                None => {
                    let c = eventbus_brokers::NatsCluster::start(3)
                        .map_err(|e| format!("cannot start the NATS cluster: {e}"))?;
                    let u = c.urls();
                    NatsEnv::connect(None, Some(c), u).await?
                }
            })
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
        #[cfg(feature = "nats")]
        drop((self.nats, self.nats_cluster));
    }

    fn sdk_config(args: &Args) -> BatchConfig {
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_or_fail(
        &self,
        args: &Args,
        s: Scenario,
        backend: &str,
        mode: &str,
        storage: &str,
        rep: usize,
        raw_setting: Option<usize>,
        what: &str,
    ) -> Vec<Record> {
        match self
            .run_one(args, s, backend, mode, storage, rep, raw_setting)
            .await
        {
            Ok(recs) => recs,
            Err(e) => {
                let mut r = Record::new(s, backend, mode, storage, rep);
                r.verify_note = format!("{what} failed: {e}");
                vec![r]
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_one(
        &self,
        args: &Args,
        s: Scenario,
        backend: &str,
        mode: &str,
        storage: &str,
        rep: usize,
        raw_setting: Option<usize>,
    ) -> Result<Vec<Record>, String> {
        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("bench.r{id}");
        let topics: Vec<Topic> = (0..s.topics)
            .map(|t| Topic::new(format!("{prefix}.t{t}")))
            .collect();
        let mut rec = Record::new(s, backend, mode, storage, rep);
        match backend {
            "memory" => {
                let started = Instant::now();
                let broker = MemoryBroker::new();
                let cfg = Self::sdk_config(args);
                rec.window = cfg.max_in_flight;
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
                let p = Batcher::new(broker.sink(), cfg).map_err(|e| e.to_string())?;
                let (done_tx, done_rx) = tokio::sync::watch::channel(false);
                let meter = sys::Meter::start(None);
                let t0 = meter.t0;
                let per_topic = (s.messages / s.topics) as u64;
                let rxs: Vec<_> = subs
                    .into_iter()
                    .enumerate()
                    .map(|(i, sub)| {
                        let extra = u64::from(i < s.messages % s.topics);
                        receive(sub, per_topic + extra, t0, done_rx.clone())
                    })
                    .collect();
                let published = drive_sdk(&p, s, &topics, mode == "naive", t0).await;
                let _ = done_tx.send(true);
                let mut received = Vec::new();
                for r in rxs {
                    received.push(r.await.map_err(|e| e.to_string())?);
                }
                let received = Received::merge(received);
                rec.fill(&published, &received, &meter);
                let stored: u64 = topics.iter().map(|t| broker.topic_len(t) as u64).sum();
                rec.topic_or_stream = format!("{prefix}.*");
                rec.verify(stored, true, "in-memory topic logs");
                let _ = p.close(Duration::from_secs(10)).await;
                rec.wall_secs = started.elapsed().as_secs_f64();
                Ok(vec![rec])
            }
            #[cfg(feature = "kafka")]
            "kafka" => match &self.kafka {
                Some(k) => {
                    k.run(
                        s,
                        mode,
                        storage,
                        id,
                        Self::sdk_config(args),
                        rec,
                        raw_setting,
                    )
                    .await
                }
                None => Err("Kafka not started".into()),
            },
            #[cfg(feature = "nats")]
            "nats" => {
                self.run_nats(
                    args,
                    s,
                    mode,
                    storage,
                    id,
                    &prefix,
                    &topics,
                    rec,
                    raw_setting,
                )
                .await
            }
            other => Err(format!("backend {other} is not built into this bench")),
        }
    }

    #[cfg(feature = "nats")]
    #[allow(clippy::too_many_arguments)]
    async fn run_nats(
        &self,
        args: &Args,
        s: Scenario,
        mode: &str,
        storage: &str,
        id: u64,
        prefix: &str,
        topics: &[Topic],
        template: Record,
        raw_window: Option<usize>,
    ) -> Result<Vec<Record>, String> {
        use eventbus_nats::{StorageKind, StreamSpec};
        let n = if storage == "replicated" {
            self.nats_cluster.as_ref()
        } else {
            self.nats.as_ref()
        }
        .ok_or("NATS not started")?;
        let windows: Vec<usize> = if mode.starts_with("raw") {
            raw_window.map_or(RAW_WINDOWS.to_vec(), |w| vec![w])
        } else {
            vec![0]
        };
        let mut out = Vec::new();
        for (wi, window) in windows.into_iter().enumerate() {
            let started = Instant::now();
            let stream = format!("BENCH_R{id}_{wi}");
            let prefix = format!("{prefix}w{wi}");
            let topics: Vec<Topic> = topics
                .iter()
                .enumerate()
                .map(|(i, _)| Topic::new(format!("{prefix}.t{i}")))
                .collect();
            let kind = if storage == "memory" {
                StorageKind::Memory
            } else {
                StorageKind::File
            };
            n.backend
                .ensure_stream(
                    &StreamSpec::new(&stream, [format!("{prefix}.>")])
                        .storage(kind)
                        .replicas(if storage == "replicated" { 3 } else { 1 })
                        .allow_atomic(mode.contains("atomic"))
                        .allow_batched(!mode.contains("async")),
                )
                .await
                .map_err(|e| format!("create stream: {e}"))?;
            let sub = n
                .backend
                .subscriber()
                .subscribe(
                    SubscribeSpec::new(format!("{prefix}.>"))
                        .group("bench")
                        .prefetch(1024),
                )
                .await
                .map_err(|e| format!("subscribe: {e}"))?;
            let mut rec = template.clone();
            let cfg = Self::sdk_config(args);
            let sink = match nats_sink_options(mode) {
                None => None,
                Some(o) => Some(n.backend.sink_with(o).await.map_err(|e| e.to_string())?),
            };
            let sdk = match sink {
                Some(sink) => Some(Batcher::new(sink, cfg.clone()).map_err(|e| e.to_string())?),
                None => None,
            };
            rec.window = if mode.starts_with("raw") {
                window
            } else {
                cfg.max_in_flight
            };
            let server_pid = n.pid();
            let (done_tx, done_rx) = tokio::sync::watch::channel(false);
            let meter = sys::Meter::start(server_pid);
            let t0 = meter.t0;
            let rx = receive(sub, s.messages as u64, t0, done_rx);
            let published = match &sdk {
                Some(p) => drive_sdk(p, s, &topics, mode == "naive", t0).await,
                None => {
                    let dedup = mode == "raw-dedup";
                    drive_raw_nats(n.backend.client(), window, dedup, s, &topics, t0).await
                }
            };
            let _ = done_tx.send(true);
            let received = rx.await.map_err(|e| e.to_string())?;
            rec.fill(&published, &received, &meter);
            let state = n
                .backend
                .stream_state(&stream)
                .await
                .map_err(|e| format!("stream state: {e}"))?;
            rec.topic_or_stream = stream.clone();
            rec.verify(
                state.messages,
                true,
                "JetStream stream state + distinct ids consumed",
            );
            if let Some(p) = sdk {
                let _ = p.close(Duration::from_secs(10)).await;
            }
            let _ = n.backend.delete_stream(&stream).await;
            rec.wall_secs = started.elapsed().as_secs_f64();
            out.push(rec);
        }
        Ok(out)
    }
}

#[cfg(feature = "nats")]
/// The NATS sink a mode publishes through: `naive` and `sdk` use the defaults, `sdk-<variant>`
/// combines `async` / `fast` / `atomic` (publish mode) with `nodedup` (no `Nats-Msg-Id`), e.g.
/// `sdk-fast-nodedup`; `raw` uses no sink.
pub(crate) fn nats_sink_options(mode: &str) -> Option<eventbus_nats::SinkOptions> {
    use eventbus_nats::{PublishMode, SinkOptions};
    if mode.starts_with("raw") {
        return None;
    }
    let mut o = SinkOptions::default();
    for part in mode.split('-').skip(1) {
        o = match part {
            "async" => o.mode(PublishMode::Async),
            "fast" => o.mode(PublishMode::Fast),
            "atomic" => o.mode(PublishMode::Atomic),
            "nodedup" => o.dedup(false),
            _ => o,
        };
    }
    Some(o)
}

impl Received {
    /// Nothing received (no consumer ran, or none arrived).
    pub(crate) fn empty() -> Received {
        Received {
            distinct: 0,
            duplicates: 0,
            e2e_latency: hist(),
            elapsed: None,
        }
    }

    fn merge(parts: Vec<Received>) -> Received {
        let mut all = Received {
            distinct: 0,
            duplicates: 0,
            e2e_latency: hist(),
            elapsed: Some(Duration::ZERO),
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
    pub(crate) fn fill(&mut self, p: &Published, r: &Received, meter: &sys::Meter) {
        let (peak_rss, cpu, broker_cpu) = meter.stop();
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
