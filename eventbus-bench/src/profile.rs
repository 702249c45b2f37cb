//! `--profile`: `perf record` of this process over each timed run, folded into a flame graph
//! (inferno) beside the run's other output, so a microsecond per message can be traced to
//! the code that spends it.
//!
//! The sampler attaches to the bench process (every thread: the SDK or raw client, the
//! verifying consumer when it reads along) when a run's clock is about to start and stops just
//! after the run's figures are filled in. Its own cost (~1-3% at 499 Hz with
//! DWARF stacks) lands in the run's figures: profiled runs are for finding where time goes,
//! not for the tables.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Where profiles go; unset without `--profile`.
static DIR: OnceLock<PathBuf> = OnceLock::new();
/// Runs profiled so far (numbers the files in run order).
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Sampling rate: odd, so it does not beat with the runtime's 1 ms timers.
const HZ: &str = "499";

/// Turn profiling on for every timed run, into `dir`. Fails when `perf` cannot run here.
pub(crate) fn enable(dir: &Path) -> Result<(), String> {
    let out = Command::new("perf")
        .arg("--version")
        .output()
        .map_err(|e| format!("--profile needs `perf` (Debian: linux-perf) on PATH: {e}"))?;
    if !out.status.success() {
        return Err("--profile: `perf --version` failed".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("--profile: {}: {e}", dir.display()))?;
    let _ = DIR.set(dir.to_owned());
    Ok(())
}

/// A run's name in file names and titles: backend, storage, scenario, measure, mode, repetition.
pub(crate) fn run_name(rec: &crate::report::Record, measure: crate::mode::Measure) -> String {
    format!(
        "{}-{}-{}-{measure}-{}-rep{}",
        rec.backend, rec.storage, rec.scenario, rec.mode, rec.rep
    )
}

/// Run `run` (one timed run, its figures filled in inside) under a profiler named `name` when
/// `--profile` is on, and say where its flame graph went.
pub(crate) async fn profiled<T>(name: String, run: impl Future<Output = T>) -> T {
    let profiler = Profiler::start(&name).await;
    let out = run.await;
    if let Some(p) = profiler {
        match p.stop().await {
            Ok(svg) => println!("profile of {name}: {}", svg.display()),
            Err(e) => eprintln!("--profile: {name}: {e}"),
        }
    }
    out
}

/// A `perf record` attached to this process for one run.
pub(crate) struct Profiler {
    perf: Child,
    data: PathBuf,
    svg: PathBuf,
    title: String,
}

impl Profiler {
    /// Start sampling this process for the run named `name` (backend, storage, scenario,
    /// measure, mode, repetition); `None` without `--profile` or when perf does not start
    /// (said on stderr: the run goes on unprofiled).
    async fn start(name: &str) -> Option<Profiler> {
        let dir = DIR.get()?;
        let stem: String = format!("{:02}-{name}", SEQ.fetch_add(1, Ordering::Relaxed))
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let data = dir.join(format!("{stem}.perf.data"));
        let perf = Command::new("perf")
            .args([
                "record",
                "--quiet",
                "-F",
                HZ,
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(std::process::id().to_string())
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        let perf = match perf {
            Ok(p) => p,
            Err(e) => {
                eprintln!("--profile: perf record did not start: {e}");
                return None;
            }
        };
        // perf opens its events on every thread of the process before it samples; the clock
        // must not start before that.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some(Profiler {
            perf,
            svg: dir.join(format!("{stem}.svg")),
            data,
            title: format!("eventbus-bench: {name}"),
        })
    }

    /// Stop sampling and write the flame graph; its path, or why there is none.
    async fn stop(self) -> Result<PathBuf, String> {
        tokio::task::spawn_blocking(move || self.finish())
            .await
            .map_err(|e| format!("--profile: {e}"))?
    }

    fn finish(mut self) -> Result<PathBuf, String> {
        // SIGINT makes perf flush its buffers and write the file's header before it exits.
        let _ = Command::new("kill")
            .args(["-INT", &self.perf.id().to_string()])
            .status();
        let status = self.perf.wait().map_err(|e| format!("perf record: {e}"))?;
        if !self.data.exists() {
            return Err(format!("perf record wrote nothing ({status})"));
        }
        let script = Command::new("perf")
            .arg("script")
            .arg("-i")
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("perf script: {e}"))?;
        if !script.status.success() {
            return Err(format!(
                "perf script failed ({}) on {}",
                script.status,
                self.data.display()
            ));
        }
        let mut folded = Vec::new();
        use inferno::collapse::Collapse;
        inferno::collapse::perf::Folder::from(inferno::collapse::perf::Options::default())
            .collapse(&script.stdout[..], &mut folded)
            .map_err(|e| format!("folding perf's stacks: {e}"))?;
        if folded.is_empty() {
            return Err(format!(
                "perf recorded no samples ({}); is perf_event_paranoid above 1?",
                self.data.display()
            ));
        }
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = self.title.clone();
        let file =
            std::fs::File::create(&self.svg).map_err(|e| format!("{}: {e}", self.svg.display()))?;
        inferno::flamegraph::from_reader(&mut opts, &folded[..], std::io::BufWriter::new(file))
            .map_err(|e| format!("drawing the flame graph: {e}"))?;
        Ok(self.svg)
    }
}
