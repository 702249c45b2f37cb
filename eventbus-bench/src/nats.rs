//! NATS side of the bench: the servers, SDK and raw async-nats publishers, JetStream and core
//! ceilings, and the drain through the SDK's subscriber or async-nats's pull consumer.

use std::time::{Duration, Instant};

use eventbus_batch::Batcher;
use eventbus_brokers::{BrokerKind, Protocol};
use eventbus_core::{
    Backend as _, Bytes, Publisher, SubscribeSpec, Subscriber, Subscription, Topic,
};
use eventbus_fixture::{Fixture, Select};
use tokio::sync::mpsc;

use crate::drive::{
    Attempt, Env, Published, Received, Run, Seen, Target, backlog, drive_sdk, joined, key, payload,
    raw_outcome, read_back, receive, share, spawn_acker, timed, timed_drain,
};
use crate::mode::{Measure, Mode, Storage};
use crate::report::Record;
use crate::{Args, Scenario};

/// Windows tried for the raw client; the best is the baseline.
const RAW_WINDOWS: [usize; 3] = [1_024, 4_096, 16_384];

pub(crate) struct NatsEnv {
    /// The server or cluster the bench started, or an external one (`--nats-url`), and a bus
    /// connected to it (dropped before the server).
    fixture: Fixture,
}

impl NatsEnv {
    /// Start `kind` and connect, or connect to the external `url`.
    pub(crate) async fn start(kind: BrokerKind, url: Option<&str>) -> Result<NatsEnv, String> {
        let select = match url {
            Some(u) => Select::External(Protocol::Nats, u.to_owned()),
            None => Select::Broker(kind),
        };
        let fixture = Fixture::start(select, &[])
            .await
            .map_err(|e| format!("NATS: {e}"))?;
        Ok(NatsEnv { fixture })
    }

    /// The connected backend.
    fn backend(&self) -> &eventbus_nats::NatsBackend {
        self.fixture.bus().backend().expect("a NATS bus")
    }

    /// The server's URL (every node of a cluster).
    fn url(&self) -> &str {
        self.fixture.address().expect("a NATS server")
    }

    /// How many messages the server has counted in on `client`'s connection (`/connz`).
    async fn messages_in(&self, client: &async_nats::Client) -> Result<u64, String> {
        let info = client.server_info();
        let http = self
            .fixture
            .broker()
            .and_then(|b| {
                (0..b.nodes())
                    .find(|&i| b.port(i) == info.port)
                    .and_then(|i| b.monitor_port(i))
            })
            .ok_or("no monitoring endpoint for this server (external?)")?;
        let path = format!("/connz?cid={}", info.client_id);
        let (status, body) =
            tokio::task::spawn_blocking(move || eventbus_brokers::http_get(http, &path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("connz: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("connz ({status}): {e}"))?;
        v["connections"][0]["in_msgs"]
            .as_u64()
            .ok_or_else(|| format!("connz ({status}) names no connection {}", info.client_id))
    }

    /// The process whose CPU the bench reports (node 0 of a cluster).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.fixture.broker().and_then(|b| b.pid(0))
    }

    pub(crate) fn describe(&self) -> String {
        let version = self.backend().server_version();
        match self.fixture.broker() {
            Some(b) => format!(
                "{} at {}, started by the bench (reports {version})",
                b.describe(),
                self.url()
            ),
            None => format!("nats-server {version} at {} (external)", self.url()),
        }
    }
}

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
    let js = async_nats::jetstream::ContextBuilder::new()
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
                let id = dedup.then(|| format!("{w}-{i}"));
                let ack = send_raw_keyed(&js, subject, body, id, key(&s, w, i)).await;
                tx.send((sent, ack)).expect("acker alive");
            }
            drop(tx);
            acker.await.expect("acker task")
        }));
    }
    Published::merge(tasks, t0).await
}

/// Publish one message through `js`, with `id` as its `Nats-Msg-Id` and the key (`--keys`) in
/// the header the SDK carries it in, so a keyed SDK run is compared with a raw client writing
/// the same bytes: its ack, as an outcome to await. A message not sent fails the run's
/// verification; the bench goes on.
pub(crate) async fn send_raw_keyed(
    js: &async_nats::jetstream::Context,
    subject: String,
    body: Bytes,
    id: Option<String>,
    key: Option<String>,
) -> impl Future<Output = eventbus_core::Outcome> + Send + 'static {
    use async_nats::jetstream::message::PublishMessage;
    use futures_util::future::Either;
    let sent = match (id, key) {
        (None, None) => js.publish(subject, body).await,
        (id, key) => {
            let mut message = PublishMessage::build().payload(body);
            if let Some(id) = id {
                message = message.message_id(id);
            }
            if let Some(key) = key {
                message = message.header(eventbus_nats::KEY_HEADER, key.as_str());
            }
            js.send_publish(subject, message).await
        }
    };
    match sent {
        Ok(ack) => {
            Either::Left(
                async move { raw_outcome(ack.await.map(|_| ()).map_err(|e| e.to_string())) },
            )
        }
        Err(e) => Either::Right(std::future::ready(raw_outcome(Err(e.to_string())))),
    }
}

/// One NATS run on its own stream.
struct NatsRun<'a> {
    env: &'a NatsEnv,
    run: Run,
    stream: String,
    prefix: String,
}

/// How a NATS run publishes, set up before the clock starts.
enum NatsPublisher {
    /// Through the SDK; `naive` awaits each ack before the next publish.
    Sdk {
        batcher: Batcher<eventbus_nats::NatsSink>,
        naive: bool,
    },
    /// async-nats's JetStream context, `window` publishes in flight, `ids` as in [`Mode::Raw`].
    Raw { window: usize, ids: bool },
    /// [`ceiling_jetstream`].
    CeilingJetStream,
    /// [`ceiling_core`], on a connection of its own: the server's count of messages in on
    /// that connection is exactly what the run sent.
    CeilingCore(async_nats::Client),
}

impl NatsRun<'_> {
    fn topics(&self) -> Vec<Topic> {
        (0..self.run.s.topics)
            .map(|i| Topic::new(format!("{}.t{i}", self.prefix)))
            .collect()
    }

    fn filter(&self) -> String {
        format!("{}.>", self.prefix)
    }

    async fn create_stream(&self) -> Result<(), String> {
        use crate::mode::Publish;
        use eventbus_nats::{StorageKind, StreamSpec};
        let (atomic, asynch) = match self.run.mode {
            Mode::Sdk { publish, .. } => (publish == Publish::Atomic, publish == Publish::Async),
            _ => (false, false),
        };
        let kind = if self.run.storage == Storage::Memory {
            StorageKind::Memory
        } else {
            StorageKind::File
        };
        self.env
            .backend()
            .ensure_stream(
                &StreamSpec::new(&self.stream, [self.filter()])
                    .storage(kind)
                    .replicas(if self.run.storage == Storage::Replicated {
                        3
                    } else {
                        1
                    })
                    .allow_atomic(atomic)
                    .allow_batched(!asynch),
            )
            .await
            .map_err(|e| format!("create stream: {e}"))
    }

    async fn subscribe(&self, group: &str) -> Result<Subscription, String> {
        self.env
            .backend()
            .subscriber()
            .subscribe(
                SubscribeSpec::new(self.filter())
                    .group(group)
                    .prefetch(1024),
            )
            .await
            .map_err(|e| format!("subscribe: {e}"))
    }

    async fn stored(&self) -> Result<u64, String> {
        Ok(self
            .env
            .backend()
            .stream_state(&self.stream)
            .await
            .map_err(|e| format!("stream state: {e}"))?
            .messages)
    }

    /// Publish the scenario through the run's mode. End-to-end, a consumer reads every message
    /// meanwhile; publish-only, it reads them back afterwards.
    async fn publish(&self, args: &Args, window: usize, rec: &mut Record) -> Result<(), String> {
        let (run, s) = (self.run, self.run.s);
        let topics = self.topics();
        let during = match run.measure {
            Measure::EndToEnd => Some(self.subscribe("bench").await?),
            _ => None,
        };
        let cfg = Env::sdk_config(args);
        let publisher = self.publisher(&cfg, window).await?;
        rec.window = if run.mode.probes() {
            window
        } else {
            cfg.max_in_flight
        };
        let expected = s.messages as u64;
        let consumer = during.map(|sub| move |t0, done| joined(receive(sub, expected, t0, done)));
        let publish = async |t0| Ok(self.drive(&publisher, &topics, t0).await);
        let timed = timed(rec, run.measure, self.env.pid(), consumer, publish).await?;
        match publisher {
            NatsPublisher::Sdk { batcher, .. } => {
                let _ = batcher.close(Duration::from_secs(10)).await;
                rec.resent = batcher.sink().resent();
            }
            NatsPublisher::CeilingCore(own) => return self.verify_core(&own, rec).await,
            _ => {}
        }
        self.verify_stream(timed.t0, rec).await
    }

    /// The run's publisher, connected (and the SDK's sink ready) before the clock starts.
    async fn publisher(
        &self,
        cfg: &eventbus_batch::BatchConfig,
        window: usize,
    ) -> Result<NatsPublisher, String> {
        let mode = self.run.mode;
        if let Some(o) = nats_sink_options(mode) {
            let sink = self
                .env
                .backend()
                .sink_with(o)
                .await
                .map_err(|e| e.to_string())?;
            let batcher = Batcher::new(sink, cfg.clone()).map_err(|e| e.to_string())?;
            let naive = mode == Mode::Naive;
            return Ok(NatsPublisher::Sdk { batcher, naive });
        }
        match mode {
            Mode::Raw { ids } => Ok(NatsPublisher::Raw { window, ids }),
            Mode::CeilingJetStream => Ok(NatsPublisher::CeilingJetStream),
            Mode::CeilingCore => async_nats::ConnectOptions::new()
                .name("eventbus-bench-ceiling")
                .connect(self.env.url())
                .await
                .map(NatsPublisher::CeilingCore)
                .map_err(|e| format!("connect: {e}")),
            m => Err(format!("mode {m} does not run on NATS")),
        }
    }

    /// Publish the scenario through `publisher`, the clock started at `t0`.
    async fn drive(&self, publisher: &NatsPublisher, topics: &[Topic], t0: Instant) -> Published {
        let (s, client) = (self.run.s, self.env.backend().client());
        match publisher {
            NatsPublisher::Sdk { batcher, naive } => {
                drive_sdk(batcher, s, topics, *naive, t0).await
            }
            NatsPublisher::Raw { window, ids } => {
                drive_raw_nats(client, *window, *ids, s, topics, t0).await
            }
            NatsPublisher::CeilingJetStream => ceiling_jetstream(client, s, topics, t0).await,
            NatsPublisher::CeilingCore(own) => {
                let core: Vec<Topic> = (0..s.topics)
                    .map(|i| Topic::new(format!("core.{}.t{i}", self.prefix)))
                    .collect();
                ceiling_core(own, s, &core, t0).await
            }
        }
    }

    /// Verify a core ceiling run by the server's count of messages in on its connection.
    async fn verify_core(&self, own: &async_nats::Client, rec: &mut Record) -> Result<(), String> {
        rec.topic_or_stream = format!("core.{}.*", self.prefix);
        // Less the round trip's own request.
        let counted = self.env.messages_in(own).await?.saturating_sub(1);
        rec.verify(
            counted,
            false,
            "the server's in_msgs count for the run's connection (/connz)",
        );
        Ok(())
    }

    /// Verify a run by its stream's state and the distinct ids a consumer read: the one beside
    /// the publishers (end-to-end), or one reading everything back once the clock has stopped.
    async fn verify_stream(&self, t0: Instant, rec: &mut Record) -> Result<(), String> {
        let stored = self.stored().await?;
        rec.topic_or_stream = self.stream.clone();
        if self.run.measure == Measure::EndToEnd {
            rec.verify(
                stored,
                true,
                "JetStream stream state + distinct ids consumed",
            );
        } else {
            let sub = self.subscribe("verify").await?;
            rec.read_back(&read_back(sub, stored, t0).await?);
            rec.verify(
                stored,
                true,
                "JetStream stream state, then distinct ids read back",
            );
        }
        Ok(())
    }

    /// Publish a backlog (untimed, the SDK without ids), then time reading all of it in a
    /// consumer group, acking every message, through the SDK or async-nats's pull consumer.
    async fn drain(&self, rec: &mut Record) -> Result<(), String> {
        let s = self.run.s;
        backlog(
            self.env
                .backend()
                .sink_with(eventbus_nats::SinkOptions::default().dedup(false))
                .await
                .map_err(|e| e.to_string())?,
            s,
            &self.topics(),
        )
        .await?;
        let stored = self.stored().await?;
        let read = async |t0| match self.run.mode {
            Mode::DrainSdk => read_back(self.subscribe("drain").await?, stored, t0).await,
            _ => self.drain_raw(stored, t0).await,
        };
        timed_drain(rec, self.env.pid(), s.messages as u64, read).await?;
        rec.topic_or_stream = self.stream.clone();
        rec.verify(
            stored,
            true,
            "JetStream stream state + distinct ids drained",
        );
        Ok(())
    }

    /// async-nats's pull consumer (a durable in the same shape as the SDK's group consumer),
    /// 1,024 messages per pull like the SDK's prefetch, each message acked.
    async fn drain_raw(&self, expected: u64, t0: Instant) -> Result<Received, String> {
        use async_nats::jetstream::consumer::{AckPolicy, pull};
        use futures_util::StreamExt;
        let stream = self
            .env
            .backend()
            .jetstream()
            .get_stream(&self.stream)
            .await
            .map_err(|e| format!("get stream: {e}"))?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("drain".into()),
                ack_policy: AckPolicy::Explicit,
                filter_subject: self.filter(),
                // The SDK's group consumer at prefetch 1,024 (eventbus-nats subscriber.rs).
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 8 * 1024,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create consumer: {e}"))?;
        let mut msgs = consumer
            .stream()
            .max_messages_per_batch(1024)
            .messages()
            .await
            .map_err(|e| format!("consume: {e}"))?;
        let mut seen = Seen::new(expected, t0);
        while !seen.complete() {
            let next = tokio::time::timeout(Duration::from_secs(15), msgs.next()).await;
            let Ok(Some(m)) = next else { break };
            let m = m.map_err(|e| format!("pull: {e}"))?;
            seen.saw(&m.payload);
            m.ack().await.map_err(|e| format!("ack: {e}"))?;
        }
        Ok(seen.into_received())
    }
}

/// Messages per publisher between the JetStream ceiling's acked publishes.
const CEILING_CHUNK: usize = 1_000;

/// JetStream's ingest limit: core publishes into the stream's subjects with no reply subject
/// (nothing acks them), except every [`CEILING_CHUNK`]th message of each publisher and its
/// last, sent as JetStream publishes and awaited. The server handles one connection's messages
/// to a stream in order, so such an ack arrives after every earlier message was stored (or
/// refused): the last one is the exact event the clock stops on, and the chunk keeps the
/// stream's ingest queue below the size at which the server refuses (error 10167) what
/// nothing acks. Verified by the stream's count.
async fn ceiling_jetstream(
    client: &async_nats::Client,
    s: Scenario,
    topics: &[Topic],
    t0: Instant,
) -> Published {
    let js = async_nats::jetstream::new(client.clone());
    let mut tasks = Vec::new();
    for w in 0..s.publishers {
        let (client, js, topics) = (client.clone(), js.clone(), topics.to_vec());
        tasks.push(tokio::spawn(async move {
            let n = share(&s, w);
            let mut p = Published::empty();
            let mut last = t0;
            for i in 0..n {
                let subject = topics[i % topics.len()].as_str().to_owned();
                let body = payload(s.payload, w as u32, i as u64, t0);
                if (i + 1) % CEILING_CHUNK != 0 && i + 1 != n {
                    let _ = client.publish(subject, body).await;
                    continue;
                }
                let sent = Instant::now();
                let outcome = match js.publish(subject, body).await {
                    Ok(ack) => raw_outcome(ack.await.map(|_| ()).map_err(|e| e.to_string())),
                    Err(e) => raw_outcome(Err(e.to_string())),
                };
                last = Instant::now();
                let acked = outcome.is_acked();
                p.record(outcome, last - sent);
                if acked {
                    // The ack vouches for the unacked messages of its chunk; the stream's count
                    // is what verifies them.
                    p.acked += (i % CEILING_CHUNK) as u64;
                }
            }
            (p, last)
        }));
    }
    Published::merge(tasks, t0).await
}

/// Core NATS's limit: publishes with no stream and no subscriber, then one request on the same
/// connection (JetStream's account info): the server answers it only after reading every
/// message before it, the exact event the clock stops on.
async fn ceiling_core(
    client: &async_nats::Client,
    s: Scenario,
    topics: &[Topic],
    t0: Instant,
) -> Published {
    let mut tasks = Vec::new();
    for w in 0..s.publishers {
        let (client, topics) = (client.clone(), topics.to_vec());
        tasks.push(tokio::spawn(async move {
            for i in 0..share(&s, w) {
                let subject = topics[i % topics.len()].as_str().to_owned();
                let _ = client
                    .publish(subject, payload(s.payload, w as u32, i as u64, t0))
                    .await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut p = Published::empty();
    match client.request("$JS.API.INFO", Bytes::new()).await {
        Ok(_) => p.acked = s.messages as u64,
        Err(e) => p.first_error = Some(format!("round trip: {e}")),
    }
    p.finish(t0, Instant::now())
}

/// The NATS sink a mode publishes through (`None`: not the SDK).
pub(crate) fn nats_sink_options(mode: Mode) -> Option<eventbus_nats::SinkOptions> {
    use crate::mode::Publish;
    use eventbus_nats::{PublishMode, SinkOptions};
    let (publish, ids) = match mode {
        Mode::Naive => (Publish::Default, true),
        Mode::Sdk { publish, ids } => (publish, ids),
        _ => return None,
    };
    let o = SinkOptions::default().dedup(ids);
    Some(match publish {
        Publish::Default => o,
        Publish::Async => o.mode(PublishMode::Async),
        Publish::Fast => o.mode(PublishMode::Fast),
        Publish::Atomic => o.mode(PublishMode::Atomic),
    })
}

impl Target for NatsEnv {
    const CANDIDATES: &'static [usize] = &RAW_WINDOWS;

    /// Run `run` on its own stream (one per raw window probed), verified against the server.
    async fn once(
        &self,
        args: &Args,
        run: Run,
        at: Attempt,
        rec: &mut Record,
    ) -> Result<(), String> {
        let one = NatsRun {
            env: self,
            run,
            stream: format!("BENCH_R{}_{}", at.id, at.index),
            prefix: format!("bench.r{}w{}", at.id, at.index),
        };
        one.create_stream().await?;
        let result = if run.mode.drain() {
            one.drain(rec).await
        } else {
            one.publish(args, at.setting, rec).await
        };
        let _ = self.backend().delete_stream(&one.stream).await;
        result
    }
}
