//! The brokers under test: a real broker process, optionally behind a [`FaultProxy`], and the
//! backend's sink and subscriber connected through it.

use std::time::Duration;

use eventbus_brokers::{Protocol, TestBroker};
use eventbus_core::{Backend as _, BatchSink, Capabilities, Error, Subscriber};

use crate::proxy::FaultProxy;

/// One backend on one real broker (a process or a cluster of them).
///
/// The process faults (`kill`, `restart`, `pause`, `resume`) act through the target's
/// [`TestBroker`] on the node [`Target::fault_node`] picks; a target with its own policy (every
/// node, a retried restart) overrides them.
pub trait Target: Send + Sync {
    /// The publishing sink.
    type Sink: BatchSink;
    /// The subscriber.
    type Sub: Subscriber;
    /// `"nats"` or `"kafka"`.
    fn name(&self) -> &'static str;
    /// Create `n` topics for run `run` and return them with a subscription filter matching all
    /// of them (`drain` reads the filter).
    fn provision(
        &self,
        run: &str,
        n: usize,
    ) -> impl Future<Output = Result<(Vec<String>, String), Error>> + Send;
    /// A new sink (its own connection, through the proxy when there is one).
    fn sink(&self) -> impl Future<Output = Result<Self::Sink, Error>> + Send;
    /// A subscriber.
    fn subscriber(&self) -> Self::Sub;
    /// The subscriber of the live consumer rows: through the proxy when there is one, so a
    /// blackhole of the proxy reaches it. Default [`Target::subscriber`].
    fn live_subscriber(&self) -> impl Future<Output = Result<Self::Sub, Error>> + Send {
        let sub = self.subscriber();
        async move { Ok(sub) }
    }
    /// The raw client's consumer (no SDK) of run `run`'s messages matching `filter`, in a
    /// consumer group of its own, connected as [`Target::live_subscriber`] is.
    fn raw_reads(
        &self,
        run: &str,
        filter: &str,
    ) -> impl Future<Output = Result<crate::raw::Reads, String>> + Send;
    /// How many messages the broker says it holds for run `run`, when it can tell.
    fn stored(&self, run: &str) -> impl Future<Output = Option<u64>> + Send;
    /// The proxy in front of the broker, if started with one.
    fn proxy(&self) -> Option<&FaultProxy>;
    /// The broker processes.
    fn broker(&self) -> &dyn TestBroker;
    /// The broker processes, to fault them.
    fn broker_mut(&mut self) -> &mut dyn TestBroker;
    /// Pick the node the next process fault hits, and remember it for
    /// [`Target::last_fault_node`]. Default node 0.
    fn fault_node(&self) -> usize {
        0
    }
    /// The node the last process fault hit (`restart` and `resume` act on it). Default node 0.
    fn last_fault_node(&self) -> usize {
        0
    }
    /// `kill -9` the node [`Target::fault_node`] picks; its store survives.
    fn kill(&mut self) {
        let node = self.fault_node();
        self.broker_mut().kill(node);
    }
    /// Start the node last hit again on the same port and store.
    fn restart(&mut self) -> std::io::Result<()> {
        let node = self.last_fault_node();
        self.broker_mut().restart(node)
    }
    /// SIGSTOP the node [`Target::fault_node`] picks.
    fn pause(&self) -> std::io::Result<()> {
        self.broker().pause(self.fault_node())
    }
    /// SIGCONT the node last hit.
    fn resume(&self) -> std::io::Result<()> {
        self.broker().resume(self.last_fault_node())
    }
    /// The first panic in the broker's log, if it crashed (a broker bug, told apart from ours).
    fn broker_panic(&self) -> Option<String> {
        self.broker().panic()
    }
    /// The ack deadline of the kill-restart row: a restart, or a cluster's election, should
    /// fit in it. Default 5 s.
    fn kill_deadline(&self) -> Duration {
        Duration::from_secs(5)
    }
    /// The `EVENTBUS_*` variables a service built on the `eventbus` facade sets to reach this
    /// broker directly (`BusConfig::load`): the backend and its addresses.
    fn bus_env(&self) -> Vec<(&'static str, String)> {
        let address = self.broker().address();
        match self.broker().protocol() {
            Protocol::Nats => vec![
                ("EVENTBUS_BACKEND", "nats".into()),
                ("EVENTBUS_NATS_URL", address),
            ],
            Protocol::Kafka => vec![
                ("EVENTBUS_BACKEND", "kafka".into()),
                ("EVENTBUS_KAFKA_BROKERS", address),
            ],
        }
    }
    /// What the backend can do, as it reports it ([`eventbus_core::Backend::capabilities`]).
    fn capabilities(&self) -> Capabilities;
    /// The broker drops a copy published again with the same message id (NATS's duplicate
    /// window, [`Capabilities::broker_dedup`]); without it (Kafka) a consumer's
    /// de-duplication layer does.
    fn drops_copies(&self) -> bool {
        self.capabilities().broker_dedup
    }
    /// A consumer group keeps serving after members were SIGKILLed in quick succession.
    /// tansu 0.6.0's does not: a leader that leaves while the group rebalances is never
    /// cleared, and every later join of that group loops (see `eventbus_conformance::Quirks::
    /// rejoin_after_churn`); a row that kills consumers then starts each one in a new group.
    fn group_survives_churn(&self) -> bool {
        self.broker().protocol() == Protocol::Nats
    }
}

#[cfg(feature = "nats")]
fn loopback(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// One broker (nats-server on file storage, or tansu), with a fault proxy in front when the row
/// needs one, and the facade's bus connected to it from `EVENTBUS_*` variables
/// ([`eventbus_fixture::Fixture`]), with the defaults a user gets (NATS: the wire's ack_timeout
/// is 2 s; Kafka: the 30 s message timeout, longer than every fault here).
pub mod single {
    use super::*;
    use eventbus::{Bus, BusSubscriber};
    use eventbus_brokers::BrokerKind;
    use eventbus_core::backend::BoxSink;
    use eventbus_fixture::{Fixture, Select};

    /// The broker, its proxy, and a bus for provisioning, counting and subscribers.
    ///
    /// NATS: sinks get connections of their own (through the proxy when there is one), and
    /// so does the live subscriber; the bus goes straight to the server. Kafka: tansu
    /// advertises the proxy's port, so every connection goes through the proxy, and the bus
    /// serves everything. No other client is connected: a fault row counts the proxy's
    /// connections. (A Kafka sink timing out sooner than a blackhole makes librdkafka bump the
    /// idempotent producer's epoch (KIP-360), and tansu 0.6.0 then panics in its idempotence
    /// check ("more or less than one row", storage/src/lite.rs:503): a broker bug, shown by
    /// `broker_panic` if it happens.)
    #[derive(Debug)]
    pub struct Single {
        // Dropped first: the client closes before the broker goes away.
        direct: Bus,
        fixture: Fixture,
    }

    fn connect_error(e: String) -> Error {
        Error::new(eventbus_core::ErrorKind::Connect, e)
    }

    impl Single {
        /// Start `kind` (a single broker), a proxy in front if `proxied`, and connect.
        pub async fn start(kind: BrokerKind, proxied: bool) -> Result<Single, String> {
            let select = if proxied {
                Select::Proxied(kind)
            } else {
                Select::Broker(kind)
            };
            let fixture = Fixture::start_broker(select, &[]).await?;
            let direct = fixture.connect_direct().await?;
            Ok(Single { direct, fixture })
        }

        fn protocol(&self) -> Protocol {
            self.fixture.protocol().expect("a broker")
        }

        #[cfg(feature = "nats")]
        fn nats(&self) -> &eventbus_nats::NatsBackend {
            self.direct.backend().expect("a NATS bus")
        }

        #[cfg(feature = "kafka")]
        fn kafka(&self) -> &eventbus_kafka::KafkaBackend {
            self.direct.backend().expect("a Kafka bus")
        }
    }

    impl Target for Single {
        type Sink = BoxSink;
        type Sub = BusSubscriber;
        fn name(&self) -> &'static str {
            self.direct.backend_name()
        }
        fn capabilities(&self) -> Capabilities {
            self.direct.capabilities()
        }
        #[cfg_attr(not(feature = "nats"), allow(unused_variables))]
        async fn provision(&self, run: &str, n: usize) -> Result<(Vec<String>, String), Error> {
            match self.protocol() {
                #[cfg(feature = "nats")]
                Protocol::Nats => super::nats::provision(self.nats(), run, n, 1).await,
                #[cfg(feature = "kafka")]
                Protocol::Kafka => super::kafka::provision(self.kafka(), run).await,
                #[allow(unreachable_patterns)]
                other => Err(connect_error(format!("{other:?} not built"))),
            }
        }
        async fn sink(&self) -> Result<BoxSink, Error> {
            let bus = if self.protocol() == Protocol::Nats {
                &self.fixture.connect_again().await.map_err(connect_error)?
            } else {
                &self.direct
            };
            eventbus_core::Backend::sink(bus).await
        }
        fn subscriber(&self) -> BusSubscriber {
            self.direct.subscriber()
        }
        async fn live_subscriber(&self) -> Result<BusSubscriber, Error> {
            if self.fixture.proxy().is_some() && self.protocol() == Protocol::Nats {
                let own = self.fixture.connect_again().await.map_err(connect_error)?;
                Ok(own.subscriber())
            } else {
                Ok(self.direct.subscriber())
            }
        }
        #[cfg_attr(not(feature = "nats"), allow(unused_variables))]
        async fn raw_reads(&self, run: &str, filter: &str) -> Result<crate::raw::Reads, String> {
            let address = self.fixture.address().expect("a broker");
            match self.protocol() {
                #[cfg(feature = "nats")]
                Protocol::Nats => {
                    let servers = eventbus_nats::NatsConfig::new(address)
                        .servers()
                        .map_err(|e| e.to_string())?;
                    crate::raw::nats_reads(servers, &super::nats::stream_name(run), filter).await
                }
                #[cfg(feature = "kafka")]
                Protocol::Kafka => crate::raw::kafka_reads(address, filter),
                #[allow(unreachable_patterns)]
                other => Err(format!("{other:?} not built")),
            }
        }
        async fn stored(&self, run: &str) -> Option<u64> {
            match self.protocol() {
                #[cfg(feature = "nats")]
                Protocol::Nats => super::nats::stored(self.nats(), run).await,
                #[cfg(feature = "kafka")]
                Protocol::Kafka => super::kafka::stored(self.kafka(), run).await,
                #[allow(unreachable_patterns)]
                _ => None,
            }
        }
        fn proxy(&self) -> Option<&FaultProxy> {
            self.fixture.proxy()
        }
        fn broker(&self) -> &dyn TestBroker {
            self.fixture.broker().expect("a broker")
        }
        fn broker_mut(&mut self) -> &mut dyn TestBroker {
            self.fixture.broker_mut().expect("a broker")
        }
    }
}

/// NATS JetStream: the stream of a run, shared by the single-server and cluster targets.
#[cfg(feature = "nats")]
pub mod nats {
    use super::*;
    use eventbus_nats::{NatsBackend, NatsConfig, NatsSink, StreamSpec};

    pub(super) fn stream_name(run: &str) -> String {
        format!("REL_{}", run.replace('-', "_"))
    }

    /// One stream of `replicas` for run `run` covering `n` subjects.
    pub(super) async fn provision(
        direct: &NatsBackend,
        run: &str,
        n: usize,
        replicas: usize,
    ) -> Result<(Vec<String>, String), Error> {
        let filter = format!("rel.{run}.>");
        direct
            .ensure_stream(&StreamSpec::new(stream_name(run), [filter.clone()]).replicas(replicas))
            .await?;
        Ok(((0..n).map(|i| format!("rel.{run}.t{i}")).collect(), filter))
    }

    /// A sink on a connection of its own.
    pub(super) async fn sink(config: &NatsConfig) -> Result<NatsSink, Error> {
        NatsBackend::connect(config.clone()).await?.sink().await
    }

    /// Messages in run `run`'s stream.
    pub(super) async fn stored(direct: &NatsBackend, run: &str) -> Option<u64> {
        direct
            .stream_state(&stream_name(run))
            .await
            .ok()
            .map(|s| s.messages)
    }
}

/// Kafka protocol: the topic of a run, shared by the single-broker and cluster targets.
#[cfg(feature = "kafka")]
pub mod kafka {
    use super::*;
    pub use eventbus_brokers::TansuStorage;
    use eventbus_kafka::KafkaBackend;

    /// Partitions per topic.
    pub const PARTITIONS: u32 = 4;

    /// One topic for run `run`; producers are told apart by key (-> partition) and headers.
    pub(super) async fn provision(
        backend: &KafkaBackend,
        run: &str,
    ) -> Result<(Vec<String>, String), Error> {
        let topic = format!("rel-{run}");
        backend
            .ensure_topic(&eventbus_core::TopicSpec::new(&topic).partitions(PARTITIONS))
            .await?;
        Ok((vec![topic.clone()], topic))
    }

    /// Records in run `run`'s topic, by its watermarks.
    pub(super) async fn stored(backend: &KafkaBackend, run: &str) -> Option<u64> {
        let w = backend.watermarks(&format!("rel-{run}")).await.ok()?;
        Some(w.iter().map(|(_, lo, hi)| (hi - lo).max(0) as u64).sum())
    }
}

/// NATS JetStream on a 3-node cluster with R3 file streams, the client given every node as a
/// seed. The process faults act on the node chosen by [`nats_cluster::Aim`]: by default the
/// one that leads the stream of the last provisioned run (read from the nodes' monitoring
/// endpoints when the fault starts); `restart` and `resume` act on the node the last fault hit.
#[cfg(feature = "nats")]
pub mod nats_cluster {
    use super::*;
    use eventbus_brokers::{NatsCluster, NatsClusterPlan};
    use eventbus_nats::{NatsBackend, NatsConfig, NatsSink, NatsSubscriber};
    use parking_lot::Mutex;

    /// The cluster, a direct connection for provisioning and counting, and the sink's config.
    #[derive(Debug)]
    pub struct NatsCluster3 {
        cluster: NatsCluster,
        direct: NatsBackend,
        config: NatsConfig,
        stream: Mutex<Option<String>>,
        victim: Mutex<Option<usize>>,
        aim: Mutex<Aim>,
        /// With [`NatsCluster3::start_with_route_proxies`]: the proxy node `i` dials to reach
        /// node `j`'s routes, as `((i, j), proxy)`.
        routes: Vec<((usize, usize), FaultProxy)>,
    }

    /// The connection name of every sink the target makes (found again through `/connz`).
    pub const SINK_CONNECTION: &str = "eventbus-reliability-sink";
    /// The connection name of the raw client ([`crate::raw::RawNats`]).
    pub const RAW_CONNECTION: &str = "eventbus-reliability-raw";
    /// The connection name of the target's own client, which subscribers use.
    pub const DIRECT_CONNECTION: &str = "eventbus-reliability-direct";

    /// Which node the process faults hit.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Aim {
        /// The node that leads the last run's stream.
        StreamLeader,
        /// The node the sink's connection is attached to (the client fails over to another
        /// seed).
        ClientNode,
        /// The node the subscribers' connection is attached to.
        SubscriberNode,
    }

    impl NatsCluster3 {
        /// Start three nodes and connect.
        pub async fn start() -> Result<NatsCluster3, String> {
            let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("start NATS cluster: {e}"))?;
            Self::connect(cluster, Vec::new()).await
        }

        /// Start three nodes as `scenario` needs them: with route proxies for `partition`.
        pub async fn start_for(scenario: crate::plan::Scenario) -> Result<NatsCluster3, String> {
            use crate::plan::Scenario;
            if matches!(scenario, Scenario::Partition | Scenario::ConsumePartition) {
                Self::start_with_route_proxies().await
            } else {
                Self::start().await
            }
        }

        /// Start three nodes whose routes to each other all pass through fault proxies (one
        /// per direction of every pair), for [`NatsCluster3::partition`].
        pub async fn start_with_route_proxies() -> Result<NatsCluster3, String> {
            let plan = NatsClusterPlan::new(3).map_err(|e| format!("ports: {e}"))?;
            let mut routes = Vec::new();
            for i in 0..plan.len() {
                for j in (0..plan.len()).filter(|&j| j != i) {
                    let p = FaultProxy::start(loopback(plan.route_port(j)))
                        .await
                        .map_err(|e| format!("route proxy: {e}"))?;
                    routes.push(((i, j), p));
                }
            }
            let via: Vec<((usize, usize), u16)> =
                routes.iter().map(|(k, p)| (*k, p.addr().port())).collect();
            let cluster = tokio::task::spawn_blocking(move || {
                NatsCluster::start_planned(&plan, |i, j| {
                    via.iter().find(|(k, _)| *k == (i, j)).map(|(_, p)| *p)
                })
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("start NATS cluster: {e}"))?;
            Self::connect(cluster, routes).await
        }

        /// Cut node `k` off from the other two: every route proxy to or from it holds its
        /// bytes (no RST; the nodes notice by their own timeouts). Returns `false` when the
        /// cluster has no route proxies.
        pub fn partition(&self, k: usize) -> bool {
            self.set_routes_of(k, crate::proxy::Mode::Hold)
        }

        /// Undo [`NatsCluster3::partition`] of node `k`.
        pub fn heal(&self, k: usize) -> bool {
            self.set_routes_of(k, crate::proxy::Mode::Pass)
        }

        fn set_routes_of(&self, k: usize, mode: crate::proxy::Mode) -> bool {
            for ((i, j), p) in &self.routes {
                if *i == k || *j == k {
                    p.set(mode);
                }
            }
            !self.routes.is_empty()
        }

        async fn connect(
            cluster: NatsCluster,
            routes: Vec<((usize, usize), FaultProxy)>,
        ) -> Result<NatsCluster3, String> {
            // The defaults a user gets (the wire's ack_timeout is 2 s).
            let mut config = NatsConfig::new(cluster.urls());
            config.name = SINK_CONNECTION.into();
            let mut direct = NatsConfig::new(cluster.urls());
            direct.name = DIRECT_CONNECTION.into();
            let direct = NatsBackend::connect(direct)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(NatsCluster3 {
                cluster,
                direct,
                config,
                stream: Mutex::new(None),
                victim: Mutex::new(None),
                aim: Mutex::new(Aim::StreamLeader),
                routes,
            })
        }

        /// Aim the process faults at `aim` from now on.
        pub fn aim(&self, aim: Aim) {
            *self.aim.lock() = aim;
        }

        /// The config sinks connect with (every node a seed).
        pub fn sink_config(&self) -> &NatsConfig {
            &self.config
        }

        /// The node the publishing client (the SDK's sink, or else the raw client) is
        /// attached to.
        pub fn client_node(&self) -> Option<usize> {
            self.node_of_connection(SINK_CONNECTION)
                .or_else(|| self.node_of_connection(RAW_CONNECTION))
        }

        /// The node the live consumer is attached to: the raw consumer's connection if there
        /// is one, else the target's own (which the SDK's subscribers use).
        pub fn subscriber_node(&self) -> Option<usize> {
            self.node_of_connection(crate::raw::RAW_CONSUMER_CONNECTION)
                .or_else(|| self.node_of_connection(DIRECT_CONNECTION))
        }

        /// The node a connection named `name` is attached to, from the nodes' `/connz`.
        pub fn node_of_connection(&self, name: &str) -> Option<usize> {
            (0..self.cluster.nodes().len()).find(|&i| {
                let Ok((200, body)) =
                    eventbus_brokers::http_get(self.cluster.http_port(i), "/connz?limit=1024")
                else {
                    return false;
                };
                serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("connections")?.as_array().cloned())
                    .is_some_and(|conns| {
                        conns
                            .iter()
                            .any(|c| c.get("name").and_then(|n| n.as_str()) == Some(name))
                    })
            })
        }

        /// Restart every node in turn, as an operator rolls an upgrade: SIGTERM (the node hands
        /// over what it leads), start it again on its store, wait until every node reports
        /// healthy (JetStream current), then the next. Returns when each node went down.
        pub fn rolling_restart(&mut self) -> Result<Vec<std::time::Instant>, String> {
            let mut downs = Vec::new();
            for i in 0..self.cluster.nodes().len() {
                downs.push(std::time::Instant::now());
                self.cluster.node_mut(i).stop(Duration::from_secs(10));
                self.cluster
                    .node_mut(i)
                    .restart()
                    .map_err(|e| format!("restart n{i}: {e}"))?;
                self.cluster
                    .wait_ready(Duration::from_secs(30))
                    .map_err(|e| format!("after restarting n{i}: {e}"))?;
            }
            Ok(downs)
        }

        /// The node that leads `stream`, from any node's `/jsz` (`None` while there is none).
        pub fn leader_of(&self, stream: &str) -> Option<usize> {
            self.cluster.stream_leader(stream, None)
        }

        /// The node the next fault hits, as aimed (node 0 if none is known), remembered for
        /// [`Target::restart`] and [`Target::resume`].
        pub fn choose_victim(&self) -> usize {
            let v = match *self.aim.lock() {
                Aim::StreamLeader => {
                    let stream = self.stream.lock().clone();
                    stream.and_then(|s| self.leader_of(&s))
                }
                Aim::ClientNode => self.client_node(),
                Aim::SubscriberNode => self.subscriber_node(),
            }
            .unwrap_or(0);
            *self.victim.lock() = Some(v);
            v
        }

        fn victim(&self) -> usize {
            self.victim.lock().unwrap_or(0)
        }

        /// The node the last process fault hit, if any.
        pub fn last_victim(&self) -> Option<usize> {
            *self.victim.lock()
        }

        /// Ask the leader of the last run's stream to step down (JetStream API); the other
        /// replicas elect a new one.
        pub async fn step_down(&self) -> Result<(), String> {
            let stream = self.stream.lock().clone().ok_or("no stream provisioned")?;
            let reply = self
                .direct
                .client()
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    "".into(),
                )
                .await
                .map_err(|e| format!("step-down request: {e}"))?;
            let text = String::from_utf8_lossy(&reply.payload);
            if text.contains("\"success\":true") {
                Ok(())
            } else {
                Err(format!("step-down refused: {text}"))
            }
        }

        /// The stream's leader, once one other than `not` is elected (as the other nodes see
        /// it), within `within`.
        pub async fn wait_for_leader(&self, not: Option<usize>, within: Duration) -> Option<usize> {
            let stream = self.stream.lock().clone()?;
            let until = std::time::Instant::now() + within;
            loop {
                if let Some(l) = self.cluster.stream_leader(&stream, not)
                    && Some(l) != not
                {
                    return Some(l);
                }
                if std::time::Instant::now() > until {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    impl Target for NatsCluster3 {
        type Sink = NatsSink;
        type Sub = NatsSubscriber;
        fn name(&self) -> &'static str {
            "nats-cluster"
        }
        fn capabilities(&self) -> Capabilities {
            self.direct.capabilities()
        }
        async fn provision(&self, run: &str, n: usize) -> Result<(Vec<String>, String), Error> {
            let provisioned = super::nats::provision(&self.direct, run, n, 3).await?;
            *self.stream.lock() = Some(super::nats::stream_name(run));
            Ok(provisioned)
        }
        async fn sink(&self) -> Result<NatsSink, Error> {
            super::nats::sink(&self.config).await
        }
        fn subscriber(&self) -> NatsSubscriber {
            self.direct.subscriber()
        }
        async fn raw_reads(&self, run: &str, filter: &str) -> Result<crate::raw::Reads, String> {
            let servers = self.config.servers().map_err(|e| e.to_string())?;
            crate::raw::nats_reads(servers, &super::nats::stream_name(run), filter).await
        }
        async fn stored(&self, run: &str) -> Option<u64> {
            super::nats::stored(&self.direct, run).await
        }
        fn proxy(&self) -> Option<&FaultProxy> {
            None
        }
        /// 10 s: a new stream leader takes 4-5 s to be elected after a SIGKILL here (the
        /// raft election timeout), and the SDK must be given the time to reach it.
        fn kill_deadline(&self) -> Duration {
            Duration::from_secs(10)
        }
        fn broker(&self) -> &dyn TestBroker {
            &self.cluster
        }
        fn broker_mut(&mut self) -> &mut dyn TestBroker {
            &mut self.cluster
        }
        fn fault_node(&self) -> usize {
            self.choose_victim()
        }
        fn last_fault_node(&self) -> usize {
            self.victim()
        }
    }
}

/// Kafka protocol on three tansu brokers over one SQLite file, the client given all three. The
/// process faults act on the broker the client is using for `kill` / `restart`, and on every
/// broker for `pause` / `resume`.
#[cfg(feature = "kafka")]
pub mod kafka_cluster {
    use super::*;
    use eventbus_brokers::TansuCluster;
    use eventbus_kafka::{KafkaBackend, KafkaConfig, KafkaSink, KafkaSubscriber};

    /// The brokers and a connected backend.
    #[derive(Debug)]
    pub struct TansuCluster3 {
        brokers: TansuCluster,
        backend: KafkaBackend,
        victim: usize,
    }

    /// Remote ports of this process's established TCP connections, one entry per connection
    /// (Linux: the socket inodes of `/proc/self/fd` matched in `/proc/self/net/tcp{,6}`).
    fn established_remote_ports() -> Vec<u16> {
        let inodes: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect();
        let mut ports = Vec::new();
        for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // remote address is column 2 (`HEXIP:HEXPORT`), state 3 (01 = established),
                // inode 9.
                let (Some(remote), Some(&"01"), Some(inode)) =
                    (cols.get(2), cols.get(3), cols.get(9))
                else {
                    continue;
                };
                if inode.parse().is_ok_and(|i: u64| inodes.contains(&i))
                    && let Some(port) = remote
                        .rsplit(':')
                        .next()
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
        ports
    }

    impl TansuCluster3 {
        /// Start three brokers and connect.
        pub async fn start() -> Result<TansuCluster3, String> {
            let brokers = tokio::task::spawn_blocking(|| TansuCluster::start(3))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("start tansu cluster: {e}"))?;
            let config =
                KafkaConfig::new(brokers.bootstrap()).connect_timeout(Duration::from_secs(10));
            let backend = KafkaBackend::connect(config)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(TansuCluster3 {
                brokers,
                backend,
                victim: 0,
            })
        }

        /// The broker this process holds the most connections to: the one the client is
        /// using. Every tansu broker of the cluster answers metadata naming itself the leader
        /// of every partition, so librdkafka produces to whichever broker it last heard from.
        pub fn broker_in_use(&self) -> usize {
            let per_broker = self.connections();
            (0..per_broker.len())
                // Ties go to the lowest index.
                .max_by_key(|&i| (per_broker[i], usize::MAX - i))
                .unwrap_or(0)
        }

        /// Every broker, comma separated.
        pub fn bootstrap(&self) -> String {
            self.brokers.bootstrap()
        }

        /// Which broker the kill hit, and this process's connections to each broker now.
        pub fn kill_note(&self) -> String {
            format!(
                "killed the broker in use, tansu-{}; connections per broker after the run: {:?}",
                self.victim,
                self.connections()
            )
        }

        /// This process's connections to each broker, now.
        pub fn connections(&self) -> Vec<usize> {
            let ports = established_remote_ports();
            self.brokers
                .brokers()
                .iter()
                .map(|b| ports.iter().filter(|p| **p == b.port()).count())
                .collect()
        }
    }

    /// tansu's start-up panic on a shared SQLite file another broker holds locked (retried by
    /// `restart`).
    fn is_startup_lock(panic: &str) -> bool {
        panic.contains("src/broker.rs:") && panic.contains("database is locked")
    }

    impl Target for TansuCluster3 {
        type Sink = KafkaSink;
        type Sub = KafkaSubscriber;
        fn name(&self) -> &'static str {
            "kafka-cluster"
        }
        fn capabilities(&self) -> Capabilities {
            self.backend.capabilities()
        }
        async fn provision(&self, run: &str, _n: usize) -> Result<(Vec<String>, String), Error> {
            super::kafka::provision(&self.backend, run).await
        }
        async fn sink(&self) -> Result<KafkaSink, Error> {
            self.backend.sink().await
        }
        fn subscriber(&self) -> KafkaSubscriber {
            self.backend.subscriber()
        }
        async fn raw_reads(&self, _run: &str, topic: &str) -> Result<crate::raw::Reads, String> {
            crate::raw::kafka_reads(&self.bootstrap(), topic)
        }
        async fn stored(&self, run: &str) -> Option<u64> {
            super::kafka::stored(&self.backend, run).await
        }
        fn proxy(&self) -> Option<&FaultProxy> {
            None
        }
        fn broker(&self) -> &dyn TestBroker {
            &self.brokers
        }
        fn broker_mut(&mut self) -> &mut dyn TestBroker {
            &mut self.brokers
        }
        /// The broker the client is using ([`TansuCluster3::broker_in_use`]).
        fn kill(&mut self) {
            self.victim = self.broker_in_use();
            self.brokers.broker_mut(self.victim).kill();
        }
        fn last_fault_node(&self) -> usize {
            self.victim
        }
        /// Start the killed broker again. tansu 0.6.0 panics at start-up when the shared
        /// SQLite file is busy with the other brokers' writes ("database is locked",
        /// `tansu-broker/src/broker.rs:137`), so a start that exits is tried again, up to 5
        /// times ([`Target::broker_panic`] leaves exactly that start-up panic out).
        fn restart(&mut self) -> std::io::Result<()> {
            let mut result = self.brokers.broker_mut(self.victim).restart();
            for _ in 1..5 {
                if result.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                result = self.brokers.broker_mut(self.victim).restart();
            }
            result
        }
        /// Every broker: any of them serves every partition.
        fn pause(&self) -> std::io::Result<()> {
            self.brokers.brokers().iter().try_for_each(|b| b.pause())
        }
        fn resume(&self) -> std::io::Result<()> {
            self.brokers.brokers().iter().try_for_each(|b| b.resume())
        }
        fn broker_panic(&self) -> Option<String> {
            self.brokers.brokers().iter().find_map(|b| {
                eventbus_brokers::panics_in_log(b.log_path())
                    .into_iter()
                    .find(|p| !is_startup_lock(p))
            })
        }
    }
}
