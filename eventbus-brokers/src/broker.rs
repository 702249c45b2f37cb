//! [`TestBroker`]: one interface over every broker the project runs, so that the conformance
//! suite, the fault scenarios and the bench start, fault and count any of them the same way.

use std::fmt;
use std::io;

use crate::{NatsCluster, NatsServer, Tansu, TansuCluster, TansuStorage};

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

pub(crate) fn only_node(node: usize) {
    assert_eq!(node, 0, "a single broker has only node 0");
}
