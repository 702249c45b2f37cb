//! Runs `facade-probe` (the workspace's `facade-probe/` directory), a program that depends on the
//! `eventbus` facade alone, with its own `Cargo.toml` outside the workspace: cargo unifies
//! features across a workspace, so only a program built on its own shows what a user's build
//! of the facade can do. `cargo xtask reliability` builds it and names it in
//! [`PROBE_VAR`]; without that variable every check that needs it fails.

use std::process::Command;

/// The variable naming the built `facade-probe` executable.
pub const PROBE_VAR: &str = "EVENTBUS_FACADE_PROBE";

/// What one run of the probe printed, and whether it exited 0.
#[derive(Debug)]
pub struct ProbeRun {
    /// Exit status 0.
    pub ok: bool,
    /// stdout and stderr, joined.
    pub output: String,
}

impl ProbeRun {
    /// `Ok` with what it printed when it exited 0, `Err` with what it printed otherwise.
    pub fn into_result(self) -> Result<String, String> {
        if self.ok {
            Ok(self.output)
        } else {
            Err(self.output)
        }
    }
}

/// The probe, with a service's environment: only the `EVENTBUS_*` settings the caller adds
/// (the facade refuses variables that name no setting, such as this tooling's own).
fn command() -> Result<Command, String> {
    let bin = std::env::var_os(PROBE_VAR).ok_or_else(|| {
        format!(
            "{PROBE_VAR} is not set (`cargo xtask reliability` builds facade-probe and sets it)"
        )
    })?;
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EVENTBUS_") {
            c.env_remove(k);
        }
    }
    Ok(c)
}

/// Run `c` to its end: what it printed, and whether it exited 0.
async fn output(mut c: Command) -> Result<ProbeRun, String> {
    let out = tokio::task::spawn_blocking(move || c.output())
        .await
        .map_err(|e| format!("facade-probe: {e}"))?
        .map_err(|e| format!("could not run facade-probe: {e}"))?;
    let mut output = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        output.push_str(err.trim());
    }
    Ok(ProbeRun {
        ok: out.status.success(),
        output,
    })
}

/// Run the probe on Kafka at `addr` with the `EVENTBUS_KAFKA_*` settings `vars`, publishing to
/// `topic`. `Err` when it could not be started at all.
pub async fn probe(addr: &str, vars: &[(&str, String)], topic: &str) -> Result<ProbeRun, String> {
    let mut c = command()?;
    c.arg(topic)
        .env("EVENTBUS_BACKEND", "kafka")
        .env("EVENTBUS_KAFKA_BROKERS", addr)
        .env("EVENTBUS_KAFKA_CONNECT_TIMEOUT", "3000");
    for (k, v) in vars {
        c.env(k, v);
    }
    output(c).await
}

/// Run the probe; `Ok` with its line when it published, acked and read back, `Err` otherwise.
pub async fn run(addr: &str, vars: &[(&str, String)], topic: &str) -> Result<String, String> {
    probe(addr, vars, topic).await?.into_result()
}

/// Run the probe's outbox on the PostgreSQL at `url` (`facade-probe --outbox`), relaying to
/// the memory backend: `Ok` with its line when the connection was encrypted and a relay
/// published what one transaction enqueued, `Err` with what it printed otherwise.
pub async fn outbox(url: &str) -> Result<String, String> {
    let mut c = command()?;
    c.args(["--outbox", url]).env("EVENTBUS_BACKEND", "memory");
    output(c).await?.into_result()
}
