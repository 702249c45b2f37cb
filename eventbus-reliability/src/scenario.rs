//! The fault scenarios, each generic over a [`Target`]. Every scenario publishes test messages,
//! applies its fault, heals it, retries unknown outcomes with the same ids, drains the broker
//! with a fresh consumer and checks the ledger against what it read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher, OnFull};
use eventbus_core::{Outcome, Publisher, SubscribeSpec, Subscriber};
use rand::Rng;
use serde::Serialize;

use crate::check::{self, Class, Figures, Gauge, Ledger, Load};
use crate::raw::InFlight;
use crate::record;
use crate::target::Target;

/// One scenario's result on one backend.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Backend name.
    pub backend: String,
    /// The checker's figures.
    pub figures: Figures,
    /// Time from the fault to the first non-acked outcome.
    pub detect_ms: Option<u64>,
    /// Time from healing to the first ack of a message admitted after it.
    pub recover_ms: Option<u64>,
    /// Longest admission-to-outcome time of a first attempt.
    pub max_resolve_ms: u64,
    /// Highest number of admitted, unresolved messages, sampled from the engine every
    /// millisecond (the caller's own count, which lags by however long it takes to observe an
    /// ack, is in the notes).
    pub peak_in_flight: u64,
    /// The configured ACK window (messages).
    pub window: u64,
    /// Peak RSS growth during the fault, bytes (where measured).
    pub rss_growth_bytes: Option<u64>,
    /// What a group subscription kept open through the fault saw (consumer rows only).
    pub consumer: Option<ConsumerFigures>,
    /// Anything else worth reading.
    pub notes: Vec<String>,
    /// Assertions that failed; empty = pass.
    pub failures: Vec<String>,
    /// Wall time of the scenario.
    pub secs: f64,
}

impl Row {
    fn new(scenario: &str, backend: &str) -> Row {
        Row {
            scenario: scenario.into(),
            backend: backend.into(),
            ..Row::default()
        }
    }

    /// Record `what` as a failed assertion unless `ok`.
    pub fn require(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    /// A check that either worked (`Ok`, what it saw) or did not: a note or a failure, both
    /// prefixed with `what`.
    fn outcome(&mut self, what: &str, result: Result<String, String>) {
        match result {
            Ok(saw) => self.notes.push(format!("{what}: {saw}")),
            Err(e) => self.failures.push(format!("{what}: {e}")),
        }
    }

    /// The invariants every scenario keeps: nothing acked is lost, nothing failed is stored,
    /// nothing corrupt is delivered.
    fn require_safety(&mut self) {
        let f = self.figures.clone();
        self.require(f.lost == 0, format!("lost {} acked messages", f.lost));
        self.require(
            f.failed_but_stored == 0,
            format!("{} failed messages were stored", f.failed_but_stored),
        );
        self.require(f.corrupt == 0, format!("{} corrupt deliveries", f.corrupt));
        // The raw clients beside the SDK are measured, not held to the SDK's promise.
        if !self.backend.ends_with("-raw") {
            self.require(
                f.key_reorders == 0,
                format!(
                    "{} messages stored behind a later one of their key",
                    f.key_reorders
                ),
            );
        }
        self.require(
            self.peak_in_flight <= self.window,
            format!(
                "peak in flight {} above the window {}",
                self.peak_in_flight, self.window
            ),
        );
    }

    /// Passed every assertion.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Sizes: quick (CI) or full.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// CI-sized.
    pub quick: bool,
}

fn run_id(name: &str) -> String {
    let n: u32 = rand::rng().random();
    format!("{name}-{n:08x}")
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

async fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// Samples the engine's own window use every millisecond; the peak is read when it stops.
struct Sampler {
    peak: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start<P: InFlight + Clone + Send + 'static>(p: &P) -> Sampler {
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (p, pk) = (p.clone(), Arc::clone(&peak));
        let task = tokio::spawn(async move {
            loop {
                pk.fetch_max(p.in_flight(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        Sampler { peak, task }
    }

    /// Stop sampling; record the engine's peak and the caller's view in `row`.
    fn finish(self, row: &mut Row, gauge: &Gauge) {
        self.task.abort();
        row.peak_in_flight = self.peak.load(std::sync::atomic::Ordering::Relaxed) as u64;
        row.notes.push(format!(
            "caller's view of the peak in flight (publish returned, ack not yet observed): {}",
            gauge.peak()
        ));
    }
}

/// Publish `load` through `p` while `script` applies the fault. Returns the script's output and
/// the ledger, and records the peak in flight in `row`.
async fn under_load<P, R>(
    p: &P,
    load: &Load,
    row: &mut Row,
    script: impl Future<Output = R>,
) -> (R, Ledger)
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let (ledger, gauge) = (Ledger::default(), Arc::new(Gauge::default()));
    let sampler = Sampler::start(p);
    let (out, ()) = tokio::join!(script, check::publish(p, load, &ledger, &gauge));
    sampler.finish(row, &gauge);
    (out, ledger)
}

/// After the fault: retry unknowns (same ids), drain with a fresh consumer, check, close, and
/// assert the invariants every scenario keeps.
async fn settle<T: Target, P: Publisher>(
    t: &T,
    p: &P,
    load: &Load,
    filter: &str,
    ledger: &Ledger,
    row: &mut Row,
) {
    let retried = check::retry_unknown(p, load, ledger, 3).await;
    let expect = t.stored(&load.run).await.map(|n| n as usize);
    match check::drain(
        &t.subscriber(),
        filter,
        expect,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    {
        Ok(reads) => row.figures = check::check(ledger, &reads, retried),
        // Debug carries the error's kind, retry hint and source (never payloads or secrets).
        Err(e) => row.failures.push(format!("drain failed: {e:?}")),
    }
    if let Some(panic) = t.broker_panic() {
        row.failures.push(format!("the broker crashed: {panic}"));
    }
    if let Some(n) = expect {
        row.notes.push(format!("broker holds {n}"));
    }
    let reasons = ledger.failure_reasons();
    if !reasons.is_empty() {
        row.notes.push(format!(
            "failed (not stored) because: {}",
            reasons.join(" | ")
        ));
    }
    row.max_resolve_ms = ms(ledger.max_resolve());
    let _ = p.close(Duration::from_secs(5)).await;
    row.require_safety();
}

/// Provision `topics` topics for a new run tagged `name` and start an engine with `cfg`;
/// `row.window` becomes the engine's effective window.
async fn setup<T: Target>(
    t: &T,
    row: &mut Row,
    name: &str,
    topics: usize,
    cfg: BatchConfig,
) -> Result<(String, Vec<String>, String, Batcher<T::Sink>), String> {
    let run = run_id(name);
    let (topics, filter) = t
        .provision(&run, topics)
        .await
        .map_err(|e| format!("provision: {e}"))?;
    let sink = t.sink().await.map_err(|e| format!("sink: {e}"))?;
    let p = Batcher::new(sink, cfg).map_err(|e| format!("batcher: {e}"))?;
    row.window = p.config().max_in_flight as u64;
    Ok((run, topics, filter, p))
}

macro_rules! try_setup {
    ($row:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $row.failures.push(e);
                return $row;
            }
        }
    };
}

mod consumer;
#[cfg(feature = "nats")]
pub use consumer::consume_partition;
mod cluster;
mod inbox;
mod lifecycle;
mod memory;
mod outbox;
mod security;
#[cfg(feature = "kafka")]
pub use cluster::raw_kafka;
#[cfg(feature = "nats")]
pub use cluster::{
    partition, partition_with, raw_nats, rolling_restart, rolling_restart_with, stepdown,
    stepdown_with,
};
pub use consumer::{ConsumerFigures, Fault, Reader, consume_blackhole, consume_kill};
pub use inbox::{INBOX_COMMAND, InboxFault, Store, consumer_process, inbox_kill};
pub use lifecycle::{absent, cancel, shutdown};
pub use memory::{slow_consumer, stall_memory};
pub use outbox::{RELAY_COMMAND, outbox, outbox_broker, outbox_db_pause, relay_process};
pub use security::security;

/// Broker killed (-9) and restarted twice on the same store while 5 producers publish
/// (10,000 messages full, 2,000 quick), ack deadline [`Target::kill_deadline`]. Unknown
/// outcomes are retried with the same id.
pub async fn kill_restart<T: Target>(t: &mut T, size: Size) -> Row {
    let mut row = Row::new("kill-restart", t.name());
    let cfg = BatchConfig::default().ack_timeout(t.kill_deadline());
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "kill", 5, cfg).await);
    kill_restart_with(t, &p, (run, topics, filter), size, row).await
}

/// [`kill_restart`] through any publisher `p` (the raw client's rows), on topics already
/// provisioned: `(run, topics, filter)`.
pub async fn kill_restart_with<T: Target, P>(
    t: &mut T,
    p: &P,
    (run, topics, filter): (String, Vec<String>, String),
    size: Size,
    mut row: Row,
) -> Row
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let load = paced_load(run, topics, size);
    let script = async {
        let mut restarts = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            t.kill();
            let down = Instant::now();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = blocking(|| t.restart()).await;
            restarts.push((down, r.map_err(|e| e.to_string())));
        }
        restarts
    };
    let (restarts, ledger) = under_load(p, &load, &mut row, script).await;
    for (_, r) in &restarts {
        if let Err(e) = r {
            row.failures.push(format!("restart failed: {e}"));
        }
    }
    fault_times(&mut row, &ledger, restarts.iter().map(|(down, _)| *down));
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
}

/// 5 producers x 400 (quick) or 2,000 messages of 100 B, paced to about 2.5 s of publishing
/// whatever the size: the load the kill and step-down faults run under.
fn paced_load(run: String, topics: Vec<String>, size: Size) -> Load {
    spread_load(run, topics, if size.quick { 400 } else { 2_000 }, 100)
}

/// 5 producers x `per` messages of 100 B, each pausing 25 ms `steps` times: about
/// `steps` x 25 ms of publishing.
fn spread_load(run: String, topics: Vec<String>, per: u64, steps: u64) -> Load {
    Load {
        run,
        topics,
        producers: 5,
        per,
        payload: 100,
        pace: Some(((per / steps).max(1), Duration::from_millis(25))),
        stop_at: None,
    }
}

/// Detect time (fault -> first non-acked outcome, the longest over `faults`) and recovery time
/// (last fault -> first ack of a message admitted after it).
fn fault_times(row: &mut Row, ledger: &Ledger, faults: impl Iterator<Item = Instant>) {
    let mut last = None;
    for at in faults {
        if let Some(d) = ledger.first_non_ack_after(at) {
            row.detect_ms = Some(row.detect_ms.map_or(ms(d), |x| x.max(ms(d))));
        }
        last = Some(at);
    }
    if let Some(at) = last
        && let Some(d) = ledger.first_ack_admitted_after(at)
    {
        row.recover_ms = Some(ms(d));
    }
}

/// On NATS with ids a fault that is only an election must not reach the caller as failed, and
/// the stream de-duplicates every resend.
pub fn require_no_failed(row: &mut Row, fault: &str) {
    row.require(
        row.figures.first_failed == 0,
        format!(
            "{fault} reached the caller: {} failed first outcomes",
            row.figures.first_failed
        ),
    );
    row.require(row.figures.duplicates == 0, "duplicates stored");
}

/// The shared shape of [`pause`] and [`blackhole`]: a steady load (5 producers x 600 messages,
/// paced to outlast the fault) with a 1 s ack deadline and a 2,000-message window; `fault` runs
/// 800 ms in and `heal` `hold` later. Records time to detect and to recover and asserts that
/// every first attempt resolved by its deadline (+1 s for in-order ack collection) and that
/// publishing recovered. Returns the ledger, or `None` if the run could not be set up.
async fn steady_fault<T: Target>(
    t: &T,
    row: &mut Row,
    tag: &str,
    hold: Duration,
    fault: impl FnOnce() -> std::io::Result<()>,
    heal: impl FnOnce() -> std::io::Result<()>,
) -> Option<Ledger> {
    let deadline = Duration::from_secs(1);
    let cfg = BatchConfig::default()
        .ack_timeout(deadline)
        .max_in_flight(2_000);
    let (run, topics, filter, p) = match setup(t, row, tag, 5, cfg).await {
        Ok(v) => v,
        Err(e) => {
            row.failures.push(e);
            return None;
        }
    };
    let load = Load {
        run,
        topics,
        producers: 5,
        per: 600,
        payload: 100,
        pace: Some((10, Duration::from_millis(20 + ms(hold) / 60))),
        stop_at: None,
    };
    let script = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let r1 = fault();
        let at = Instant::now();
        tokio::time::sleep(hold).await;
        let r2 = heal();
        (at, Instant::now(), r1.and(r2))
    };
    let ((faulted, healed, r), ledger) = under_load(&p, &load, row, script).await;
    if let Err(e) = r {
        row.failures.push(format!("fault / heal: {e}"));
    }
    row.detect_ms = ledger.first_non_ack_after(faulted).map(ms);
    row.recover_ms = ledger.first_ack_admitted_after(healed).map(ms);
    settle(t, &p, &load, &filter, &ledger, row).await;
    row.require(
        row.max_resolve_ms <= ms(deadline) + 1_000,
        format!(
            "an ack took {} ms (deadline {} ms)",
            row.max_resolve_ms,
            ms(deadline)
        ),
    );
    row.require(row.recover_ms.is_some(), "publishing did not recover");
    Some(ledger)
}

/// Broker paused (SIGSTOP) longer than the ack deadline (1 s) under a steady load: every ack
/// resolves by its deadline, the window holds, publishing recovers after SIGCONT.
pub async fn pause<T: Target>(t: &mut T, size: Size) -> Row {
    let mut row = Row::new("pause", t.name());
    let stall = if size.quick {
        Duration::from_millis(2_500)
    } else {
        Duration::from_secs(5)
    };
    let t = &*t;
    let Some(ledger) = steady_fault(t, &mut row, "pause", stall, || t.pause(), || t.resume()).await
    else {
        return row;
    };
    let unknown_first = ledger
        .entries()
        .values()
        .filter(|e| e.first == Class::Unknown)
        .count();
    row.notes
        .push(format!("{unknown_first} first outcomes unknown"));
    row.require(unknown_first > 0, "the pause produced no unknown outcome");
    row
}

/// Blackhole through the proxy (nothing forwarded, nothing closed, no RST) for 3 s (quick) /
/// 10 s, then the connections are reset and the proxy passes again: outcomes resolve by the
/// 1 s deadline, the client reconnects without a storm.
pub async fn blackhole<T: Target>(t: &mut T, size: Size) -> Row {
    use crate::proxy::Mode;
    let mut row = Row::new("blackhole", t.name());
    let Some(proxy) = t.proxy() else {
        row.failures.push("no proxy".into());
        return row;
    };
    let hold = if size.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let accepted0 = proxy.accepted();
    let fault = || {
        proxy.set(Mode::Hold);
        Ok(())
    };
    let heal = || {
        proxy.reset();
        proxy.set(Mode::Pass);
        Ok(())
    };
    if steady_fault(&*t, &mut row, "hole", hold, fault, heal)
        .await
        .is_none()
    {
        return row;
    }
    let reconnects = proxy.accepted() - accepted0;
    row.notes.push(format!("{reconnects} new connections"));
    row.require(row.detect_ms.is_some(), "the blackhole was never noticed");
    row.require(reconnects <= 20, format!("reconnect storm: {reconnects}"));
    row
}

/// The wire misbehaves through the proxy: 50 ms delay per chunk, a 256 KB/s bandwidth cap,
/// then a connection cut in the middle of a frame: nothing corrupt is ever delivered, nothing
/// acked is lost.
pub async fn wire<T: Target>(t: &mut T, _size: Size) -> Row {
    let mut row = Row::new("wire", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(5));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "wire", 5, cfg).await);
    let Some(proxy) = t.proxy() else {
        row.failures.push("no proxy".into());
        return row;
    };
    let load = Load {
        run,
        topics,
        producers: 5,
        per: 800,
        payload: 100,
        pace: Some((10, Duration::from_millis(40))),
        stop_at: None,
    };
    let script = async {
        use crate::proxy::Mode;
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.set(Mode::Delay(Duration::from_millis(50)));
        tokio::time::sleep(Duration::from_millis(800)).await;
        proxy.set(Mode::Bandwidth(256 * 1024));
        tokio::time::sleep(Duration::from_millis(800)).await;
        proxy.set(Mode::Pass);
        proxy.cut_after(5_000);
        let cut = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.cut_after(777);
        cut
    };
    let (cut, ledger) = under_load(&p, &load, &mut row, script).await;
    row.recover_ms = ledger.first_ack_admitted_after(cut).map(ms);
    settle(t, &p, &load, &filter, &ledger, &mut row).await;
    row.require(row.figures.acked > 0, "nothing acked");
    row
}
