//! [`TestBroker`]: one interface over every broker the project runs, so that the conformance
//! suite, the fault scenarios and the bench start, fault and count any of them the same way.

use std::fmt;
use std::io;

use crate::{
    NatsCluster, NatsServer, Tansu, TansuCluster, TansuStorage, http_get, other, panic_in_log,
};

/// The client protocol a broker speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// NATS with JetStream: clients take [`TestBroker::address`] as a seed-URL list.
    Nats,
    /// The Kafka protocol: clients take [`TestBroker::address`] as `bootstrap.servers`.
    Kafka,
}

/// A broker to start: one process or a cluster of them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerKind {
    /// One nats-server, JetStream on file storage.
    Nats,
    /// `nodes` nats-server nodes routed to each other (3 for R3 streams).
    NatsCluster {
        /// Nodes.
        nodes: usize,
    },
    /// One tansu broker on `storage`.
    Tansu(TansuStorage),
    /// `nodes` stateless tansu brokers over one SQLite file.
    TansuCluster {
        /// Brokers.
        nodes: usize,
    },
}

impl BrokerKind {
    /// Start it: processes on loopback, random ports, killed when the value is dropped. A
    /// cluster returns once it serves (NATS: a JetStream meta leader every node knows).
    pub fn start(&self) -> io::Result<Box<dyn TestBroker>> {
        Ok(match self {
            BrokerKind::Nats => Box::new(NatsServer::start()?),
            BrokerKind::NatsCluster { nodes } => Box::new(NatsCluster::start(*nodes)?),
            BrokerKind::Tansu(storage) => Box::new(Tansu::start(storage.clone())?),
            BrokerKind::TansuCluster { nodes } => Box::new(TansuCluster::start(*nodes)?),
        })
    }
}

/// A running broker the project started: its address, its processes to fault, and what it
/// stores, read from the broker itself rather than through the SDK under test.
///
/// Node indexes run from 0 to [`TestBroker::nodes`] - 1; a single broker is node 0. A node
/// index out of that range panics.
///
/// ```no_run
/// use eventbus_brokers::{BrokerKind, Protocol};
/// let mut broker = BrokerKind::NatsCluster { nodes: 3 }.start()?;
/// assert_eq!(broker.protocol(), Protocol::Nats);
/// let seeds = broker.address(); // nats://127.0.0.1:P1,nats://127.0.0.1:P2,...
/// broker.kill(1);
/// broker.restart(1)?;
/// # let _ = seeds; Ok::<(), std::io::Error>(())
/// ```
pub trait TestBroker: fmt::Debug + Send + Sync {
    /// What runs, for reports: `nats-server 2.15.1`, `3-node NATS cluster`, ...
    fn describe(&self) -> String;
    /// The protocol clients speak to it.
    fn protocol(&self) -> Protocol;
    /// What a client is given: comma-separated NATS URLs or Kafka `host:port`s, every node.
    fn address(&self) -> String;
    /// How many broker processes it runs.
    fn nodes(&self) -> usize;
    /// The client port of node `node`.
    fn port(&self, node: usize) -> u16;
    /// The monitoring (HTTP) port of node `node`, where the broker has one (nats-server:
    /// `/jsz`, `/connz`).
    fn monitor_port(&self, node: usize) -> Option<u16> {
        let _ = node;
        None
    }
    /// The process id of node `node` (`None` while it is down).
    fn pid(&self, node: usize) -> Option<u32>;
    /// SIGKILL node `node`; its store survives.
    fn kill(&mut self, node: usize);
    /// Start node `node` again on the same port and store.
    fn restart(&mut self, node: usize) -> io::Result<()>;
    /// SIGSTOP node `node`.
    fn pause(&self, node: usize) -> io::Result<()>;
    /// SIGCONT node `node`.
    fn resume(&self, node: usize) -> io::Result<()>;
    /// The first panic in any node's log: the broker crashed (its bug, told apart from ours).
    fn panic(&self) -> Option<String>;
    /// How many messages the broker holds in `name` (a NATS stream; a Kafka topic, all
    /// partitions), as the broker reports it: NATS through its monitoring endpoint (on a
    /// cluster, the stream leader's), Kafka through the topic's watermarks (feature `kafka`;
    /// tansu's memory engine reports wrong watermarks, so count those by reading back).
    /// Blocking (HTTP or librdkafka round trips, seconds at worst): from async code, call it
    /// in `spawn_blocking`.
    fn stored(&self, name: &str) -> io::Result<u64>;
    /// Leave every process running after this value is dropped (stores kept); their pids.
    fn detach(self: Box<Self>) -> Vec<Option<u32>>;
}

/// Node `http`'s `/jsz` with account and stream details.
fn jsz(http: u16) -> io::Result<serde_json::Value> {
    let (status, body) = http_get(http, "/jsz?accounts=true&streams=true")?;
    if status != 200 {
        return Err(other(format!("/jsz answered {status}")));
    }
    serde_json::from_str(&body).map_err(|e| other(format!("/jsz: {e}")))
}

/// The stream named `stream` anywhere in a `/jsz` answer.
fn find_stream<'a>(v: &'a serde_json::Value, stream: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("name").and_then(|n| n.as_str()) == Some(stream) && map.contains_key("state")
            {
                return Some(v);
            }
            map.values().find_map(|v| find_stream(v, stream))
        }
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_stream(v, stream)),
        _ => None,
    }
}

/// `state.messages` of `stream` in a `/jsz` answer.
fn stream_messages(v: &serde_json::Value, stream: &str) -> Option<u64> {
    find_stream(v, stream)?
        .get("state")?
        .get("messages")?
        .as_u64()
}

/// `cluster.leader` of `stream` in a `/jsz` answer (a server name).
fn stream_leader(v: &serde_json::Value, stream: &str) -> Option<String> {
    Some(
        find_stream(v, stream)?
            .get("cluster")?
            .get("leader")?
            .as_str()?
            .to_owned(),
    )
}

fn only_node(node: usize) {
    assert_eq!(node, 0, "a single broker has only node 0");
}

impl TestBroker for NatsServer {
    fn describe(&self) -> String {
        format!("nats-server {}", crate::NATS_VERSION)
    }
    fn protocol(&self) -> Protocol {
        Protocol::Nats
    }
    fn address(&self) -> String {
        self.url()
    }
    fn nodes(&self) -> usize {
        1
    }
    fn port(&self, node: usize) -> u16 {
        only_node(node);
        NatsServer::port(self)
    }
    fn monitor_port(&self, node: usize) -> Option<u16> {
        only_node(node);
        Some(self.http_port())
    }
    fn pid(&self, node: usize) -> Option<u32> {
        only_node(node);
        NatsServer::pid(self)
    }
    fn kill(&mut self, node: usize) {
        only_node(node);
        NatsServer::kill(self);
    }
    fn restart(&mut self, node: usize) -> io::Result<()> {
        only_node(node);
        NatsServer::restart(self)
    }
    fn pause(&self, node: usize) -> io::Result<()> {
        only_node(node);
        NatsServer::pause(self)
    }
    fn resume(&self, node: usize) -> io::Result<()> {
        only_node(node);
        NatsServer::resume(self)
    }
    fn panic(&self) -> Option<String> {
        panic_in_log(self.log_path())
    }
    fn stored(&self, name: &str) -> io::Result<u64> {
        stream_messages(&jsz(self.http_port())?, name)
            .ok_or_else(|| other(format!("nats-server reports no stream named {name}")))
    }
    fn detach(self: Box<Self>) -> Vec<Option<u32>> {
        vec![NatsServer::detach(*self)]
    }
}

impl NatsCluster {
    /// The node that leads stream `stream`, as the first running node other than `skip` that
    /// names one reports it (a node cut off from the others may still believe it leads).
    pub fn stream_leader(&self, stream: &str, skip: Option<usize>) -> Option<usize> {
        let nodes = NatsCluster::nodes(self);
        let name = (0..nodes.len())
            .filter(|&i| Some(i) != skip && nodes[i].pid().is_some())
            .find_map(|i| stream_leader(&jsz(nodes[i].http_port()).ok()?, stream))?;
        // `NatsCluster` names node `i` `n{i}`.
        name.strip_prefix('n')?
            .parse()
            .ok()
            .filter(|&i: &usize| i < nodes.len())
    }
}

impl TestBroker for NatsCluster {
    fn describe(&self) -> String {
        format!(
            "{}-node NATS cluster (nats-server {})",
            self.nodes().len(),
            crate::NATS_VERSION
        )
    }
    fn protocol(&self) -> Protocol {
        Protocol::Nats
    }
    fn address(&self) -> String {
        self.urls()
    }
    fn nodes(&self) -> usize {
        NatsCluster::nodes(self).len()
    }
    fn port(&self, node: usize) -> u16 {
        NatsCluster::nodes(self)[node].port()
    }
    fn monitor_port(&self, node: usize) -> Option<u16> {
        Some(NatsCluster::nodes(self)[node].http_port())
    }
    fn pid(&self, node: usize) -> Option<u32> {
        NatsCluster::nodes(self)[node].pid()
    }
    fn kill(&mut self, node: usize) {
        self.node_mut(node).kill();
    }
    fn restart(&mut self, node: usize) -> io::Result<()> {
        self.node_mut(node).restart()
    }
    fn pause(&self, node: usize) -> io::Result<()> {
        NatsCluster::nodes(self)[node].pause()
    }
    fn resume(&self, node: usize) -> io::Result<()> {
        NatsCluster::nodes(self)[node].resume()
    }
    fn panic(&self) -> Option<String> {
        NatsCluster::nodes(self)
            .iter()
            .find_map(|n| panic_in_log(n.log_path()))
    }
    /// The stream leader's count (a follower may trail it, or not yet have applied a purge).
    fn stored(&self, name: &str) -> io::Result<u64> {
        let leader = self
            .stream_leader(name, None)
            .ok_or_else(|| other(format!("no running node names a leader of stream {name}")))?;
        stream_messages(&jsz(NatsCluster::nodes(self)[leader].http_port())?, name)
            .ok_or_else(|| other(format!("leader n{leader} reports no stream named {name}")))
    }
    fn detach(self: Box<Self>) -> Vec<Option<u32>> {
        NatsCluster::detach(*self)
    }
}

/// Records in every partition of `topic` by its watermarks, asked of `bootstrap`.
#[cfg(feature = "kafka")]
fn kafka_stored(bootstrap: &str, topic: &str) -> io::Result<u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let timeout = std::time::Duration::from_secs(5);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| other(format!("kafka client: {e}")))?;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| other(format!("metadata of {topic}: {e}")))?;
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .ok_or_else(|| other(format!("the broker knows no topic {topic}")))?;
    let mut total = 0;
    for p in 0..partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p as i32, timeout)
            .map_err(|e| other(format!("watermarks of {topic}/{p}: {e}")))?;
        total += (hi - lo).max(0) as u64;
    }
    Ok(total)
}

#[cfg(not(feature = "kafka"))]
fn kafka_stored(_bootstrap: &str, _topic: &str) -> io::Result<u64> {
    Err(other(
        "counting a Kafka topic needs eventbus-brokers' `kafka` feature",
    ))
}

impl TestBroker for Tansu {
    fn describe(&self) -> String {
        let engine = match self.storage() {
            TansuStorage::Memory => "memory",
            TansuStorage::Sqlite => "SQLite",
        };
        format!("tansu {} ({engine} engine)", crate::TANSU_VERSION)
    }
    fn protocol(&self) -> Protocol {
        Protocol::Kafka
    }
    fn address(&self) -> String {
        self.bootstrap()
    }
    fn nodes(&self) -> usize {
        1
    }
    fn port(&self, node: usize) -> u16 {
        only_node(node);
        Tansu::port(self)
    }
    fn pid(&self, node: usize) -> Option<u32> {
        only_node(node);
        Tansu::pid(self)
    }
    fn kill(&mut self, node: usize) {
        only_node(node);
        Tansu::kill(self);
    }
    fn restart(&mut self, node: usize) -> io::Result<()> {
        only_node(node);
        Tansu::restart(self)
    }
    fn pause(&self, node: usize) -> io::Result<()> {
        only_node(node);
        Tansu::pause(self)
    }
    fn resume(&self, node: usize) -> io::Result<()> {
        only_node(node);
        Tansu::resume(self)
    }
    fn panic(&self) -> Option<String> {
        panic_in_log(self.log_path())
    }
    fn stored(&self, name: &str) -> io::Result<u64> {
        kafka_stored(&self.bootstrap(), name)
    }
    fn detach(self: Box<Self>) -> Vec<Option<u32>> {
        vec![Tansu::detach(*self)]
    }
}

impl TestBroker for TansuCluster {
    fn describe(&self) -> String {
        format!(
            "{} tansu {} brokers over one SQLite file",
            self.brokers().len(),
            crate::TANSU_VERSION
        )
    }
    fn protocol(&self) -> Protocol {
        Protocol::Kafka
    }
    fn address(&self) -> String {
        self.bootstrap()
    }
    fn nodes(&self) -> usize {
        self.brokers().len()
    }
    fn port(&self, node: usize) -> u16 {
        self.brokers()[node].port()
    }
    fn pid(&self, node: usize) -> Option<u32> {
        self.brokers()[node].pid()
    }
    fn kill(&mut self, node: usize) {
        self.broker_mut(node).kill();
    }
    fn restart(&mut self, node: usize) -> io::Result<()> {
        self.broker_mut(node).restart()
    }
    fn pause(&self, node: usize) -> io::Result<()> {
        self.brokers()[node].pause()
    }
    fn resume(&self, node: usize) -> io::Result<()> {
        self.brokers()[node].resume()
    }
    fn panic(&self) -> Option<String> {
        self.brokers()
            .iter()
            .find_map(|b| panic_in_log(b.log_path()))
    }
    fn stored(&self, name: &str) -> io::Result<u64> {
        kafka_stored(&self.bootstrap(), name)
    }
    fn detach(self: Box<Self>) -> Vec<Option<u32>> {
        TansuCluster::detach(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_streams_count_and_leader_in_jsz() {
        let jsz: serde_json::Value = serde_json::from_str(
            r#"{"account_details":[{"stream_detail":[
                {"name":"A","state":{"messages":3}},
                {"name":"B","state":{"messages":7}}]}]}"#,
        )
        .expect("json");
        assert_eq!(stream_messages(&jsz, "B"), Some(7));
        assert_eq!(stream_messages(&jsz, "C"), None);
        let clustered: serde_json::Value = serde_json::from_str(
            r#"{"account_details":[{"stream_detail":[{"name":"R","state":{"messages":9},
                "cluster":{"leader":"n2","replicas":[{"name":"n0"},{"name":"n1"}]}}]}]}"#,
        )
        .expect("json");
        assert_eq!(stream_leader(&clustered, "R").as_deref(), Some("n2"));
        assert_eq!(stream_messages(&clustered, "R"), Some(9));
    }
}
