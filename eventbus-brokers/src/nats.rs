//! nats-server with JetStream: one server ([`NatsServer`]) or a cluster of them
//! ([`NatsCluster`]), each a [`TestBroker`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::broker::{Protocol, TestBroker, only_node};
use crate::install::nats_server_path;
use crate::process::{
    Proc, free_port, http_get, other, panic_in_log, require, signal, wait_until_listening,
};

/// Options for [`NatsServer`].
#[derive(Clone, Debug, Default)]
pub struct NatsOptions {
    /// Extra command-line arguments (e.g. `--user`, `--pass`, `-c FILE`), after the ones always
    /// passed: `-a 127.0.0.1 -p PORT -m HTTP_PORT -js -sd DIR` (a config file must not set
    /// `https`: nats-server refuses HTTP and HTTPS monitoring together).
    pub args: Vec<String>,
    /// Port to use (default: a free one).
    pub port: Option<u16>,
    /// Monitoring (HTTP) port (default: a free one).
    pub http_port: Option<u16>,
}

/// A nats-server child process with JetStream on, a fresh store dir, a random client port and
/// a random monitoring (HTTP) port.
#[derive(Debug)]
pub struct NatsServer {
    proc: Proc,
    port: u16,
    http: u16,
    opts: NatsOptions,
    store: tempfile::TempDir,
    log: PathBuf,
}

impl NatsServer {
    /// Start with default options.
    pub fn start() -> io::Result<NatsServer> {
        Self::start_with(NatsOptions::default())
    }

    /// Start with `opts`.
    pub fn start_with(opts: NatsOptions) -> io::Result<NatsServer> {
        let bin = nats_server_path();
        require(&bin, "nats-server", "EVENTBUS_NATS_SERVER")?;
        let store = tempfile::Builder::new()
            .prefix("eventbus-nats-")
            .tempdir()?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let http = match opts.http_port {
            Some(p) => p,
            None => free_port()?,
        };
        let log = store.path().join("nats-server.log");
        let mut s = NatsServer {
            proc: Proc { child: None },
            port,
            http,
            opts,
            store,
            log,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = Command::new(nats_server_path());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-m",
            &self.http.to_string(),
            "-js",
            "-sd",
        ])
        .arg(self.store.path().join("js"))
        .args(&self.opts.args);
        // The log is appended to across restarts: only what this start writes counts.
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        self.proc = Proc::spawn(&mut cmd, &self.log)?;
        let (proc, log) = (&mut self.proc, &self.log);
        let until = Instant::now() + Duration::from_secs(15);
        wait_until_listening(self.port, Duration::from_secs(15), || {
            proc.alive("nats-server", log)
        })
        .and_then(|()| {
            // Something accepted connections on the port, but it may be another process that
            // holds it: the server itself says when it listens and is ready.
            loop {
                proc.alive("nats-server", log)?;
                let text = std::fs::read(log).unwrap_or_default();
                let ours = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
                if ours.contains("Server is ready") {
                    return Ok(());
                }
                if Instant::now() > until {
                    return Err(other("nats-server did not log \"Server is ready\" in 15 s"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .map_err(|e| other(format!("{e}; nats-server log: {}", self.log.display())))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring (HTTP) port: `/healthz`, `/jsz`, `/connz`.
    pub fn http_port(&self) -> u16 {
        self.http
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Leave the server running after this value is dropped (for `cargo xtask brokers up`);
    /// returns its pid. The store directory is kept.
    pub fn detach(mut self) -> Option<u32> {
        self.proc.detach(&mut self.store)
    }

    /// `kill -9` the server (its store survives).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start it again on the same port and store.
    pub fn restart(&mut self) -> io::Result<()> {
        self.proc.kill();
        self.spawn()
    }

    /// Shut the server down as an operator would (SIGTERM: it closes its connections and, in a
    /// cluster, hands over the leadership it holds), waiting up to `within` before `kill -9`.
    pub fn stop(&mut self, within: Duration) {
        self.proc.terminate(within);
    }

    /// SIGSTOP.
    pub fn pause(&self) -> io::Result<()> {
        signal(self.pid().ok_or_else(|| other("not running"))?, "STOP")
    }

    /// SIGCONT.
    pub fn resume(&self) -> io::Result<()> {
        signal(self.pid().ok_or_else(|| other("not running"))?, "CONT")
    }
}

/// Ports that [`NatsCluster::start`] gives one node.
#[derive(Clone, Copy, Debug)]
struct NodePorts {
    client: u16,
    route: u16,
    http: u16,
}

/// The ports of a NATS cluster, chosen before it starts so that a caller can put proxies
/// between its nodes ([`NatsCluster::start_planned`]).
#[derive(Clone, Debug)]
pub struct NatsClusterPlan {
    ports: Vec<NodePorts>,
}

impl NatsClusterPlan {
    /// Free ports for `n` nodes.
    pub fn new(n: usize) -> io::Result<NatsClusterPlan> {
        let ports = (0..n)
            .map(|_| {
                Ok(NodePorts {
                    client: free_port()?,
                    route: free_port()?,
                    http: free_port()?,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(NatsClusterPlan { ports })
    }

    /// The port node `i` listens on for routes.
    pub fn route_port(&self, i: usize) -> u16 {
        self.ports[i].route
    }

    /// Nodes planned.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// No nodes planned.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

/// A NATS cluster on loopback: `n` nats-server nodes with JetStream on (a store each), routes
/// to each other, and an HTTP monitoring port each. Every node is a [`NatsServer`], so a test
/// can kill, pause or restart any of them.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `n` nodes (3 for R3 streams) and wait until JetStream has a meta leader that
    /// every node knows.
    pub fn start(n: usize) -> io::Result<NatsCluster> {
        Self::start_planned(&NatsClusterPlan::new(n)?, |_, _| None)
    }

    /// Start the nodes of `plan`, node `i` reaching node `j`'s routes through port
    /// `via(i, j)` where that is `Some` (a proxy the caller started in front of
    /// [`NatsClusterPlan::route_port`]), directly otherwise. With any route through a proxy,
    /// no node advertises its own route address, so gossip cannot route around the proxies.
    pub fn start_planned(
        plan: &NatsClusterPlan,
        via: impl Fn(usize, usize) -> Option<u16>,
    ) -> io::Result<NatsCluster> {
        let ports = &plan.ports;
        let n = ports.len();
        let proxied = (0..n).any(|i| (0..n).any(|j| i != j && via(i, j).is_some()));
        let mut nodes = Vec::with_capacity(n);
        for (i, p) in ports.iter().enumerate() {
            let routes = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let port = via(i, j).unwrap_or(ports[j].route);
                    format!("nats-route://127.0.0.1:{port}")
                })
                .collect::<Vec<_>>()
                .join(",");
            let mut args = vec![
                "--server_name".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "eventbus".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", p.route),
                "--routes".into(),
                routes,
            ];
            if proxied {
                // Port 1: nothing listens there, so a route learnt by gossip fails at once and
                // only the configured (proxied) routes connect.
                args.extend(["--cluster_advertise".into(), "127.0.0.1:1".into()]);
            }
            nodes.push(NatsServer::start_with(NatsOptions {
                args,
                port: Some(p.client),
                http_port: Some(p.http),
            })?);
        }
        let cluster = NatsCluster { nodes };
        cluster.wait_ready(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Wait until every running node answers `/healthz` with 200 and reports a JetStream meta
    /// leader.
    pub fn wait_ready(&self, within: Duration) -> io::Result<()> {
        let until = Instant::now() + within;
        loop {
            let mut waiting = None;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.pid().is_none() {
                    continue;
                }
                let health = http_get(node.http_port(), "/healthz");
                let jsz = http_get(node.http_port(), "/jsz");
                let ready = matches!(&health, Ok((200, _)))
                    && matches!(&jsz, Ok((200, body)) if body.contains("\"leader\""));
                if !ready {
                    waiting = Some(format!("node n{i}: /healthz {health:?}"));
                    break;
                }
            }
            let Some(why) = waiting else { return Ok(()) };
            if Instant::now() > until {
                return Err(other(format!(
                    "NATS cluster not ready after {within:?}: {why}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's client URL, comma separated: the seed list a client is given.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `i`, to kill, pause or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// The monitoring (HTTP) port of node `i`.
    pub fn http_port(&self, i: usize) -> u16 {
        self.nodes[i].http_port()
    }

    /// Leave every node running after this value is dropped; returns their pids.
    pub fn detach(self) -> Vec<Option<u32>> {
        self.nodes.into_iter().map(NatsServer::detach).collect()
    }
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
