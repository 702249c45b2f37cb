//! `cargo xtask examples`: run every example of the `eventbus` crate against real brokers
//! (a fresh nats-server and a fresh tansu), once per backend, and check what each one shows.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use eventbus_brokers as brokers;

use crate::{Result, cargo};

/// Example name -> the executable cargo built.
type Bins = HashMap<String, PathBuf>;

/// Examples that run to completion and exit 0 when their own checks pass.
const TO_COMPLETION: [&str; 5] = [
    "publish_backpressure",
    "ordered_consumer",
    "envelopes",
    "retry_dead_letter",
    "outbox",
];

/// Build the examples, start the brokers, run each example on each backend.
pub(crate) fn examples() -> Result {
    let bins = build_examples()?;
    let nats = brokers::NatsServer::start().map_err(|e| format!("nats-server: {e}"))?;
    let tansu =
        brokers::Tansu::start(brokers::TansuStorage::Sqlite).map_err(|e| format!("tansu: {e}"))?;
    let backends = [
        ("nats", "EVENTBUS_NATS_URL", nats.url()),
        ("kafka", "EVENTBUS_KAFKA_BROKERS", tansu.bootstrap()),
    ];
    for (backend, var, address) in &backends {
        let env = [("EVENTBUS_BACKEND", *backend), (*var, address.as_str())];
        for name in TO_COMPLETION {
            to_completion(&bins, name, backend, &env)?;
        }
        graceful_shutdown(&bins, backend, &env)?;
        health_http(&bins, backend, &env)?;
    }
    // NATS in, Kafka out.
    let both: Vec<(&str, &str)> = backends.iter().map(|(_, v, a)| (*v, a.as_str())).collect();
    to_completion(&bins, "pipeline", "nats and kafka", &both)
}

/// Run example `name` until it exits; it must exit 0.
fn to_completion(bins: &Bins, name: &str, backend: &str, env: &[(&str, &str)]) -> Result {
    let started = Instant::now();
    let mut child = spawn(bins, name, env)?;
    let out = Lines::of(&mut child);
    let status = wait(&mut child, Duration::from_secs(180))?;
    let text = out.rest(Duration::from_secs(5));
    if !status {
        return Err(format!("example {name} on {backend} failed:\n{text}"));
    }
    eprintln!(
        "==> example {name} on {backend}: ok in {:.1?}\n{}",
        started.elapsed(),
        indent(&text)
    );
    Ok(())
}

/// Start it, wait until it publishes, SIGINT it: it must exit 0 with every publish acked.
fn graceful_shutdown(bins: &Bins, backend: &str, env: &[(&str, &str)]) -> Result {
    let mut child = spawn(bins, "graceful_shutdown", env)?;
    let out = Lines::of(&mut child);
    let mut text = out.until("press Ctrl-C", Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(1500));
    interrupt(&child)?;
    let ok = wait(&mut child, Duration::from_secs(30))?;
    text.push_str(&out.rest(Duration::from_secs(5)));
    if !ok || !text.contains("failed 0, unknown 0") {
        return Err(format!(
            "example graceful_shutdown on {backend} failed:\n{text}"
        ));
    }
    eprintln!(
        "==> example graceful_shutdown on {backend}: ok\n{}",
        indent(&text)
    );
    Ok(())
}

/// Start it, query every endpoint and check the answers, SIGINT it: it must exit 0.
fn health_http(bins: &Bins, backend: &str, env: &[(&str, &str)]) -> Result {
    let port = brokers::free_port().map_err(|e| e.to_string())?;
    let addr = format!("127.0.0.1:{port}");
    let mut env = env.to_vec();
    env.push(("EXAMPLE_HTTP_ADDR", &addr));
    let mut child = spawn(bins, "health_http", &env)?;
    let out = Lines::of(&mut child);
    let mut text = out.until("serving", Duration::from_secs(60))?;
    let mut checks = Vec::new();
    let check = |path: &str, status: &str, needle: &str| -> Result<String> {
        let reply = http_get(&addr, path)?;
        if !reply.starts_with(&format!("HTTP/1.1 {status}")) || !reply.contains(needle) {
            return Err(format!(
                "GET {path}: expected {status} with {needle:?}, got:\n{reply}"
            ));
        }
        Ok(format!("GET {path}: {status}"))
    };
    let result = (|| {
        checks.push(check("/healthz", "200", " up ")?);
        // A readiness probe is retried (as an orchestrator would): the first heartbeat on a
        // fresh broker can take longer than its timeout while consumer groups settle.
        let mut ready = check("/readyz", "200", "heartbeat round trip");
        for _ in 0..4 {
            if ready.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            ready = check("/readyz", "200", "heartbeat round trip");
        }
        checks.push(ready?);
        // Give the traffic a moment so publish outcomes are on record.
        std::thread::sleep(Duration::from_millis(1500));
        checks.push(check("/lag", "200", "\"pending\":")?);
        checks.push(check(
            "/metrics",
            "200",
            "eventbus_publish_outcomes_total{backend=",
        )?);
        checks.push(check("/nope", "404", "try")?);
        Ok::<(), String>(())
    })();
    interrupt(&child)?;
    let ok = wait(&mut child, Duration::from_secs(30))?;
    text.push_str(&out.rest(Duration::from_secs(5)));
    result.map_err(|e| format!("example health_http on {backend}: {e}\n{text}"))?;
    if !ok {
        return Err(format!("example health_http on {backend} failed:\n{text}"));
    }
    eprintln!(
        "==> example health_http on {backend}: ok ({})\n{}",
        checks.join(", "),
        indent(&text)
    );
    Ok(())
}

/// Build every example and return where cargo put each executable, by name: cargo's own
/// report, so a `CARGO_TARGET_DIR` or a `build.target-dir` setting is honoured.
fn build_examples() -> Result<Bins> {
    let mut build = cargo();
    build
        .args(["build", "-p", "eventbus", "--examples", "--all-features"])
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped());
    eprintln!("==> {build:?}");
    let out = build
        .output()
        .map_err(|e| format!("could not run {build:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{build:?} failed: {}", out.status));
    }
    let mut bins = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_example = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "example"));
        if let (true, Some(name), Some(exe)) = (
            is_example,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            bins.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(bins)
}

fn spawn(bins: &Bins, name: &str, env: &[(&str, &str)]) -> Result<Child> {
    let bin = bins
        .get(name)
        .ok_or_else(|| format!("cargo built no example named {name}"))?;
    let mut c = Command::new(bin);
    // Only the variables the example is meant to see: xtask's own EVENTBUS_* settings (broker
    // paths) are not bus config and the bus config refuses unknown EVENTBUS_* variables.
    for (k, _) in std::env::vars() {
        if k.starts_with("EVENTBUS_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn()
        .map_err(|e| format!("could not start {}: {e}", bin.display()))
}

/// The child's stdout and stderr lines, as they come.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn of(child: &mut Child) -> Lines {
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let pump = |r: Box<dyn Read + Send>, tx: mpsc::Sender<String>| {
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(|l| l.ok()) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        };
        pump(Box::new(out), tx.clone());
        pump(Box::new(err), tx);
        Lines(rx)
    }

    /// Lines up to and including the first that contains `marker`.
    fn until(&self, marker: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        let mut text = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                    if line.contains(marker) {
                        return Ok(text);
                    }
                }
                Err(_) => return Err(format!("no line with {marker:?} in {within:?}:\n{text}")),
            }
        }
    }

    /// What is left once the child has exited (its pipes close).
    fn rest(&self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut text = String::new();
        while let Ok(line) = self
            .0
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

/// Wait for the child to exit; kill it after `within`. Returns whether it exited 0.
fn wait(child: &mut Child, within: Duration) -> Result<bool> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("example did not exit within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn interrupt(child: &Child) -> Result {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .map_err(|e| format!("kill -INT: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("kill -INT failed".into())
    }
}

/// A bare HTTP/1.1 GET; returns the whole reply.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("GET {path}: {e}"))?;
    Ok(reply)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
}
