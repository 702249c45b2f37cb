//! Broker child processes and the plumbing around them: ports, readiness, logs, signals.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let status = cmd
        .status()
        .map_err(|e| other(format!("{what}: could not start: {e}")))?;
    if !status.success() {
        return Err(other(format!("{what}: failed with {status}")));
    }
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
pub(crate) fn wait_until_listening(
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
pub(crate) fn log_tail(log: &Path, n: usize) -> String {
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

pub(crate) fn strip_ansi(line: &str) -> String {
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

pub(crate) fn require(bin: &Path, name: &str, env: &str) -> io::Result<()> {
    if bin.exists() {
        Ok(())
    } else {
        Err(other(format!(
            "{name} not found at {}: run `cargo xtask test` or `cargo xtask brokers up` (they install it), or set {env}",
            bin.display()
        )))
    }
}

pub(crate) fn signal(pid: u32, sig: &str) -> io::Result<()> {
    run(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
        "kill",
    )
}

/// A running broker child process, killed on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) child: Option<Child>,
}

impl Proc {
    pub(crate) fn spawn(cmd: &mut Command, log: &Path) -> io::Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        Ok(Proc { child: Some(child) })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Error if the child has exited.
    pub(crate) fn alive(&mut self, name: &str, log: &Path) -> io::Result<()> {
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
    pub(crate) fn detach(&mut self, dir: &mut tempfile::TempDir) -> Option<u32> {
        let pid = self.pid();
        // Dropping a `Child` neither kills nor waits for it.
        drop(self.child.take());
        let kept = std::mem::replace(dir, tempfile::tempdir().ok()?);
        let _ = kept.keep();
        pid
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `within` for the exit (SIGKILL after that).
    pub(crate) fn terminate(&mut self, within: Duration) {
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
