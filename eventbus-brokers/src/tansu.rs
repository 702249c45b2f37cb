//! tansu, the Kafka-compatible broker: one process ([`Tansu`]) or several over one SQLite file
//! ([`TansuCluster`]), each a [`TestBroker`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::broker::{Protocol, TestBroker, only_node};
use crate::install::tansu_path;
use crate::process::{
    Proc, free_port, log_tail, other, panic_in_log, require, signal, wait_until_listening,
};

/// Tansu storage engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TansuStorage {
    /// `memory://tansu/`: fast, keeps nothing across a restart.
    Memory,
    /// `sqlite://FILE`: durable.
    Sqlite,
}

/// A tansu (Kafka-protocol broker) child process on a random port.
#[derive(Debug)]
pub struct Tansu {
    proc: Proc,
    port: u16,
    storage: TansuStorage,
    /// Port advertised to clients in metadata (differs from `port` behind a proxy).
    advertised: u16,
    /// Extra `tansu broker` arguments, e.g. `--authentication`.
    args: Vec<String>,
    /// The directory of a SQLite file shared with other brokers (see [`TansuCluster`]).
    shared_dir: Option<PathBuf>,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Tansu {
    /// Start tansu with `storage`.
    pub fn start(storage: TansuStorage) -> io::Result<Tansu> {
        Self::start_advertising(storage, None)
    }

    /// Start tansu with `storage`, telling clients (in metadata) to connect to loopback port
    /// `advertised` instead of its own: put a proxy there and every client connection, not only
    /// the bootstrap one, goes through it.
    pub fn start_advertising(storage: TansuStorage, advertised: Option<u16>) -> io::Result<Tansu> {
        Self::start_on(storage, advertised, None)
    }

    /// Start tansu in a directory of its own (its log), on `shared_dir`'s SQLite file when
    /// given (see [`TansuCluster`]).
    fn start_on(
        storage: TansuStorage,
        advertised: Option<u16>,
        shared_dir: Option<PathBuf>,
    ) -> io::Result<Tansu> {
        let bin = tansu_path();
        require(&bin, "tansu", "EVENTBUS_TANSU")?;
        let dir = tempfile::Builder::new()
            .prefix("eventbus-tansu-")
            .tempdir()?;
        let log = dir.path().join("tansu.log");
        let port = free_port()?;
        let mut t = Tansu {
            proc: Proc { child: None },
            port,
            advertised: advertised.unwrap_or(port),
            args: Vec::new(),
            shared_dir,
            storage,
            dir,
            log,
        };
        t.spawn()?;
        Ok(t)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        // tansu resolves a SQLite path against its working directory (even an absolute one).
        let (engine, workdir) = match (&self.shared_dir, &self.storage) {
            (Some(shared), _) => ("sqlite://cluster.db", shared.as_path()),
            (None, TansuStorage::Memory) => ("memory://tansu/", self.dir.path()),
            (None, TansuStorage::Sqlite) => ("sqlite://tansu.db", self.dir.path()),
        };
        let mut cmd = Command::new(tansu_path());
        cmd.current_dir(workdir)
            .arg("broker")
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                engine,
            ])
            .args(&self.args)
            .env("RUST_LOG", "warn");
        self.proc = Proc::spawn(&mut cmd, &self.log)?;
        let (proc, log) = (&mut self.proc, &self.log);
        wait_until_listening(self.port, Duration::from_secs(30), || {
            proc.alive("tansu", log)
        })
        .map_err(|e| {
            other(format!(
                "{e}; tansu log ({}) ends: {}",
                self.log.display(),
                log_tail(&self.log, 5)
            ))
        })
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The storage engine.
    pub fn storage(&self) -> &TansuStorage {
        &self.storage
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Leave the broker running after this value is dropped; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.proc.detach(&mut self.dir)
    }

    /// `kill -9` the broker.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start it again on the same port (and, for SQLite, the same file).
    pub fn restart(&mut self) -> io::Result<()> {
        self.proc.kill();
        self.spawn()
    }

    /// Restart with these extra `tansu broker` arguments (e.g. `--authentication`, which makes
    /// every client authenticate with SASL; PLAIN or SCRAM).
    pub fn restart_with(&mut self, args: Vec<String>) -> io::Result<()> {
        self.args = args;
        self.restart()
    }

    /// Store SCRAM-SHA-256 and SCRAM-SHA-512 credentials for `user` in the broker, through `tansu user create`
    /// (which must connect without authentication: do it before [`Tansu::restart_with`]
    /// `--authentication`, on SQLite storage so the credentials survive the restart).
    pub fn create_user(&self, user: &str, password: &str) -> io::Result<()> {
        // Credentials for both SCRAM mechanisms, so clients may use either.
        for mechanism in ["scram256", "scram512"] {
            let out = Command::new(tansu_path())
                .args(["user", "create", "--mechanism", mechanism, "--broker"])
                .arg(format!("tcp://127.0.0.1:{}", self.port))
                .args([user, password])
                .output()?;
            if !out.status.success() {
                // The password is not in tansu's output; the status is enough.
                return Err(other(format!(
                    "tansu user create --mechanism {mechanism} {user} failed: {}",
                    out.status
                )));
            }
        }
        Ok(())
    }

    /// The port tansu listens on (the advertised one may differ, see
    /// [`Tansu::start_advertising`]).
    pub fn port(&self) -> u16 {
        self.port
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

/// Several tansu brokers over one SQLite file: tansu's brokers are stateless, so any of them
/// serves any partition. Each broker is a [`Tansu`], so a test can kill, pause or restart it.
#[derive(Debug)]
pub struct TansuCluster {
    brokers: Vec<Tansu>,
    dir: tempfile::TempDir,
}

impl TansuCluster {
    /// Start `n` brokers sharing one SQLite database.
    pub fn start(n: usize) -> io::Result<TansuCluster> {
        let dir = tempfile::Builder::new()
            .prefix("eventbus-tansu-cluster-")
            .tempdir()?;
        let brokers = (0..n)
            .map(|_| Tansu::start_on(TansuStorage::Sqlite, None, Some(dir.path().to_path_buf())))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(TansuCluster { brokers, dir })
    }

    /// Every broker's address, comma separated, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.brokers
            .iter()
            .map(Tansu::bootstrap)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The brokers.
    pub fn brokers(&self) -> &[Tansu] {
        &self.brokers
    }

    /// Broker `i`, to kill, pause or restart it.
    pub fn broker_mut(&mut self, i: usize) -> &mut Tansu {
        &mut self.brokers[i]
    }

    /// The shared SQLite file.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("cluster.db")
    }

    /// Leave every broker running after this value is dropped (the database is kept);
    /// returns their pids.
    pub fn detach(mut self) -> Vec<Option<u32>> {
        let kept = std::mem::replace(
            &mut self.dir,
            match tempfile::tempdir() {
                Ok(d) => d,
                Err(_) => return Vec::new(),
            },
        );
        let _ = kept.keep();
        std::mem::take(&mut self.brokers)
            .into_iter()
            .map(Tansu::detach)
            .collect()
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
