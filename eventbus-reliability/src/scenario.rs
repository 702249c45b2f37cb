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
mod inbox;
mod outbox;
mod security;
pub use consumer::{ConsumerFigures, Fault, Reader, consume_blackhole, consume_kill};
pub use inbox::{INBOX_COMMAND, InboxFault, Store, consumer_process, inbox_kill};
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

/// NATS cluster only: the stream's leader steps down through the JetStream API twice while 5
/// producers publish (ack deadline 5 s). A planned election must not reach the caller: every
/// first outcome acked (no failed, no unknown), nothing lost, no duplicate.
#[cfg(feature = "nats")]
pub async fn stepdown(t: &mut crate::target::nats_cluster::NatsCluster3, size: Size) -> Row {
    let mut row = Row::new("stepdown", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(5));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "stepdown", 5, cfg).await);
    let mut row = stepdown_with(t, &p, (run, topics, filter), size, row).await;
    row.require(
        row.figures.first_failed == 0 && row.figures.first_unknown == 0,
        format!(
            "a step-down reached the caller: {} failed, {} unknown first outcomes",
            row.figures.first_failed, row.figures.first_unknown
        ),
    );
    row.require(row.figures.duplicates == 0, "duplicates stored");
    row
}

/// [`stepdown`] through any publisher `p`, without its assertions on what the caller saw.
#[cfg(feature = "nats")]
pub async fn stepdown_with<P>(
    t: &mut crate::target::nats_cluster::NatsCluster3,
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
        let mut events = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let before = t.wait_for_leader(None, Duration::from_secs(5)).await;
            let at = Instant::now();
            let r = t.step_down().await;
            let after = t.wait_for_leader(before, Duration::from_secs(10)).await;
            events.push((at, before, after, r, at.elapsed()));
        }
        events
    };
    let (events, ledger) = under_load(p, &load, &mut row, script).await;
    let node = |n: &Option<usize>| n.map_or("none".to_owned(), |n| format!("n{n}"));
    for (_, before, after, r, took) in &events {
        if let Err(e) = r {
            row.failures.push(e.clone());
        }
        row.notes.push(format!(
            "leader {} stepped down, new leader {} seen after {} ms",
            node(before),
            node(after),
            ms(*took)
        ));
        row.require(after.is_some(), "no new leader within 10 s");
    }
    fault_times(&mut row, &ledger, events.iter().map(|(at, ..)| *at));
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
}

/// A row of the raw client (`backend`, no SDK) under `scenario`: topics provisioned on `t`,
/// the window the SDK's default. `Err` is the row, failed.
async fn raw_setup<T: Target>(
    t: &T,
    scenario: &str,
    backend: &str,
) -> Result<(Row, (String, Vec<String>, String)), Row> {
    let mut row = Row::new(scenario, backend);
    row.window = BatchConfig::default().max_in_flight as u64;
    let run = run_id(&format!("raw-{scenario}"));
    match t.provision(&run, 5).await {
        Ok((topics, filter)) => Ok((row, (run, topics, filter))),
        Err(e) => {
            row.failures.push(format!("provision: {e}"));
            Err(row)
        }
    }
}

/// The raw async-nats client (no SDK) under `scenario` (`kill-restart`, `stepdown`,
/// `kill-connected`, `rolling-restart` or `partition`) on the NATS cluster, with the SDK's
/// window and wire timeout: what a caller sees without the SDK.
/// Only safety is asserted; the caller-visible figures are the comparison.
#[cfg(feature = "nats")]
pub async fn raw_nats(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    scenario: crate::plan::Scenario,
    size: Size,
) -> Row {
    use crate::plan::Scenario;
    let name = scenario.name();
    let (mut row, provisioned) = match raw_setup(t, &name, "nats-cluster raw").await {
        Ok(v) => v,
        Err(row) => return row,
    };
    let config = t.sink_config();
    let p = match crate::raw::RawNats::connect(&config.url, config.ack_timeout, row.window as usize)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            row.failures.push(e);
            return row;
        }
    };
    let mut row = match scenario {
        Scenario::Stepdown => stepdown_with(t, &p, provisioned, size, row).await,
        Scenario::RollingRestart => rolling_restart_with(t, &p, provisioned, size, row).await,
        Scenario::Partition => partition_with(t, &p, provisioned, size, row).await,
        Scenario::KillConnected => {
            t.aim(crate::target::nats_cluster::Aim::ClientNode);
            kill_restart_with(t, &p, provisioned, size, row).await
        }
        _ => kill_restart_with(t, &p, provisioned, size, row).await,
    };
    if let Some(v) = t.last_victim() {
        row.notes.push(format!("the faults hit node n{v}"));
    }
    row
}

/// rdkafka's `FutureProducer` (no SDK) through `kill-restart` on the tansu cluster, its
/// `message.timeout.ms` the SDK row's ack deadline. Only safety is asserted.
#[cfg(feature = "kafka")]
pub async fn raw_kafka(t: &mut crate::target::kafka_cluster::TansuCluster3, size: Size) -> Row {
    let (mut row, provisioned) = match raw_setup(t, "kill-restart", "kafka-cluster raw").await {
        Ok(v) => v,
        Err(row) => return row,
    };
    match crate::raw::RawKafka::connect(&t.bootstrap(), t.kill_deadline()) {
        Ok(p) => {
            let mut row = kill_restart_with(t, &p, provisioned, size, row).await;
            row.notes.push(t.kill_note());
            row
        }
        Err(e) => {
            row.failures.push(e);
            row
        }
    }
}

/// NATS cluster only: every node restarted in turn, as an operator rolls an upgrade (SIGTERM,
/// start on the same store, wait until every node reports healthy, then the next), while 5
/// producers publish a paced load of about 15 s (ack deadline 10 s). Nothing may reach the
/// caller as failed; nothing is lost or duplicated.
#[cfg(feature = "nats")]
pub async fn rolling_restart(t: &mut crate::target::nats_cluster::NatsCluster3, size: Size) -> Row {
    let mut row = Row::new("rolling-restart", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(10));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "rolling", 5, cfg).await);
    let mut row = rolling_restart_with(t, &p, (run, topics, filter), size, row).await;
    require_no_failed(&mut row, "a rolling restart");
    row
}

/// [`rolling_restart`] through any publisher `p`, without its assertions on what the caller
/// saw.
#[cfg(feature = "nats")]
pub async fn rolling_restart_with<P>(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    p: &P,
    (run, topics, filter): (String, Vec<String>, String),
    size: Size,
    mut row: Row,
) -> Row
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let load = spread_load(run, topics, if size.quick { 1_200 } else { 6_000 }, 600);
    let script = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        let downs = blocking(|| t.rolling_restart()).await;
        (downs, start.elapsed())
    };
    let ((downs, took), ledger) = under_load(p, &load, &mut row, script).await;
    match downs {
        Ok(downs) => {
            row.notes
                .push(format!("3 nodes restarted in turn in {} ms", ms(took)));
            fault_times(&mut row, &ledger, downs.into_iter());
        }
        Err(e) => row.failures.push(e),
    }
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
}

/// NATS cluster only (started with route proxies): the node that leads the stream is cut off
/// from the other two (its route proxies hold every byte, no RST) for 10 s (5 s quick) while
/// 5 producers publish a paced load of about 12.5 s (ack deadline 20 s), then the partition
/// heals. The majority elects a new leader once its raft election timeout (4-9 s) passes; a
/// client attached to the cut-off node cannot reach it until the partition heals. Safety is
/// asserted; what the caller saw is reported.
#[cfg(feature = "nats")]
pub async fn partition(t: &mut crate::target::nats_cluster::NatsCluster3, size: Size) -> Row {
    let mut row = Row::new("partition", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(20));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "partition", 5, cfg).await);
    let mut row = partition_with(t, &p, (run, topics, filter), size, row).await;
    row.require(row.figures.duplicates == 0, "duplicates stored");
    row
}

/// [`partition`] through any publisher `p`, without its assertion on duplicates.
#[cfg(feature = "nats")]
pub async fn partition_with<P>(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    p: &P,
    (run, topics, filter): (String, Vec<String>, String),
    size: Size,
    mut row: Row,
) -> Row
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let hold = Duration::from_secs(if size.quick { 5 } else { 10 });
    let load = spread_load(run, topics, if size.quick { 500 } else { 2_500 }, 500);
    let client_node = t.client_node();
    let script = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let victim = t.choose_victim();
        let at = Instant::now();
        let cut = t.partition(victim);
        let elected = t.wait_for_leader(Some(victim), hold).await;
        tokio::time::sleep(hold.saturating_sub(at.elapsed())).await;
        t.heal(victim);
        (victim, at, cut, elected)
    };
    let ((victim, at, cut, elected), ledger) = under_load(p, &load, &mut row, script).await;
    row.require(cut, "the cluster has no route proxies to cut");
    let node = |n: Option<usize>| n.map_or("none".to_owned(), |n| format!("n{n}"));
    row.notes.push(format!(
        "stream leader n{victim} cut off for {} s; the client was attached to {}; new leader during the partition: {}",
        hold.as_secs(),
        node(client_node),
        node(elected)
    ));
    fault_times(&mut row, &ledger, std::iter::once(at));
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
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

fn rss_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Stalled broker under full publish rate: 1 KiB messages for 20 s (5 s quick) against a
/// paused broker with an 8 MiB window budget and `OnFull::WaitFor(100 ms)`: the window fills,
/// `publish` then fails with `Overloaded`, and RSS grows by the budget plus a constant only.
pub async fn stall_memory<T: Target>(t: &mut T, size: Size) -> Row {
    /// Allowed RSS growth beyond the window's byte budget (client buffers, ledger, allocator).
    const SLACK: u64 = 48 << 20;
    let mut row = Row::new("stall-memory", t.name());
    let budget: usize = 8 << 20;
    let cfg = BatchConfig::default()
        .ack_timeout(Duration::from_secs(120))
        .max_in_flight(1_000_000)
        .max_in_flight_bytes(budget)
        .on_full(OnFull::WaitFor(Duration::from_millis(100)));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "stall", 5, cfg).await);
    // Shorter than the SDK's 30 s Kafka message timeout with a margin: a 30 s stall let the
    // oldest messages time out just as the broker resumed, librdkafka bumped the idempotent
    // epoch and tansu 0.6.0 panicked (lite.rs:503; seen once in a full run). The window fills
    // within a second of the pause either way.
    let stall = if size.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(20)
    };
    if let Err(e) = t.pause() {
        row.failures.push(format!("pause: {e}"));
        return row;
    }
    let base = rss_bytes("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let load = Load {
        run,
        topics,
        producers: 5,
        per: u64::MAX,
        payload: 1024,
        pace: None,
        stop_at: Some(Instant::now() + stall),
    };
    let script = async {
        tokio::time::sleep(stall).await;
        let growth = rss_bytes("VmHWM:").saturating_sub(base);
        let stats = p.stats();
        let _ = t.resume();
        (growth, stats)
    };
    let ((growth, stats), ledger) = under_load(&p, &load, &mut row, script).await;
    row.rss_growth_bytes = Some(growth);
    let refused = ledger.keys(Class::Refused).len();
    row.notes.push(format!(
        "window bytes at the end of the stall {} of {budget}; {refused} publishes refused (Overloaded)",
        stats.in_flight_bytes
    ));
    settle(t, &p, &load, &filter, &ledger, &mut row).await;
    row.require(refused > 0, "the window never filled");
    // A stalled broker delays publishes; it is no reason to fail any (before the fix, NATS
    // fast mode failed the first batch per subject when its stream lookup timed out).
    let failed = row.figures.failed;
    row.require(
        failed == 0,
        format!("{failed} publishes failed across the stall"),
    );
    row.require(
        growth <= budget as u64 + SLACK,
        format!(
            "RSS grew {} MiB, budget {} MiB + {} MiB",
            growth >> 20,
            budget >> 20,
            SLACK >> 20
        ),
    );
    row
}

/// Slow consumer: 5 producers publish 40,000 x 1 KiB (20,000 quick) and only then a group
/// member subscribes (prefetch 64) and handles one message per 2 ms for 5 s (3 s quick) while
/// the rest (tens of MiB) waits in the broker. Asserted: the consuming process's RSS grows by
/// at most the prefetch's bytes plus a stated constant during the slow phase (a subscriber that
/// buffered the backlog would grow by the whole backlog), a backlog really was left, and once
/// the member speeds up it reads every acked message: lost 0.
pub async fn slow_consumer<T: Target>(t: &mut T, size: Size) -> Row {
    /// Allowed RSS growth beyond prefetch x payload (client buffers, allocator, the reads).
    const SLACK: u64 = 16 << 20;
    const PREFETCH: usize = 64;
    const PAYLOAD: usize = 1024;
    let mut row = Row::new("slow-consumer", t.name());
    let (run, topics, filter, p) = try_setup!(
        row,
        setup(t, &mut row, "slow", 5, BatchConfig::default()).await
    );
    let (per, slow) = if size.quick {
        (4_000, Duration::from_secs(3))
    } else {
        (8_000, Duration::from_secs(5))
    };
    let load = Load {
        run: run.clone(),
        topics,
        producers: 5,
        per,
        payload: PAYLOAD,
        pace: None,
        stop_at: None,
    };
    let ((), ledger) = under_load(&p, &load, &mut row, async {}).await;
    let _ = p.close(Duration::from_secs(10)).await;
    let acked = ledger.keys(Class::Acked).len();

    let base = rss_bytes("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let spec = SubscribeSpec::new(filter.as_str())
        .group(format!("slow-{run}"))
        .prefetch(PREFETCH)
        .ack_wait(Duration::from_secs(60));
    let mut sub = match t.subscriber().subscribe(spec).await {
        Ok(s) => s,
        Err(e) => {
            row.failures.push(format!("subscribe: {e}"));
            return row;
        }
    };
    let mut reads = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let subscribed = Instant::now();
    // The slow phase starts with the first delivery (joining a group can take seconds).
    let mut first: Option<Instant> = None;
    let mut growth = None;
    let mut left_at_end_of_slow = 0;
    let limit = Duration::from_secs(120);
    while seen.len() < acked && subscribed.elapsed() < limit {
        let slow_phase = first.is_none_or(|f| f.elapsed() < slow);
        if !slow_phase && growth.is_none() {
            growth = Some(rss_bytes("VmHWM:").saturating_sub(base));
            left_at_end_of_slow = acked - seen.len();
        }
        let wait = if first.is_none() { 60 } else { 15 };
        match tokio::time::timeout(Duration::from_secs(wait), sub.next()).await {
            Ok(Some(Ok(d))) => {
                first.get_or_insert_with(Instant::now);
                if let Some(r) = record::read_delivery(&d) {
                    seen.insert(r.key);
                    reads.push(r);
                }
                if slow_phase {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if let Err(e) = d.ack().await {
                    row.failures.push(format!("ack: {e}"));
                    break;
                }
            }
            Ok(Some(Err(e))) => {
                row.failures.push(format!("subscription: {e}"));
                break;
            }
            Ok(None) => break,
            Err(_) => {
                row.failures.push(format!(
                    "no delivery for {wait} s with {} of {acked} read",
                    seen.len()
                ));
                break;
            }
        }
    }
    sub.close().await;
    let drained = subscribed.elapsed();
    if let Some(f) = first {
        row.notes.push(format!(
            "first delivery {} ms after subscribing",
            ms(f - subscribed)
        ));
    }
    row.figures = check::check(&ledger, &reads, 0);
    row.rss_growth_bytes = growth;
    let backlog_bytes = (acked * PAYLOAD) as u64;
    row.notes.push(format!(
        "{acked} acked ({} MiB); {left_at_end_of_slow} still in the broker after the slow phase; \
         all read in {} ms",
        backlog_bytes >> 20,
        ms(drained)
    ));
    row.require_safety();
    row.require(
        acked as u64 == row.figures.sent,
        "not every publish was acked",
    );
    row.require(
        left_at_end_of_slow * 2 >= acked,
        format!("the consumer was not slow: only {left_at_end_of_slow} of {acked} left"),
    );
    let bound = (PREFETCH * PAYLOAD) as u64 + SLACK;
    match growth {
        Some(g) => row.require(
            g <= bound,
            format!(
                "RSS grew {} MiB while the consumer was slow (bound {} MiB: prefetch {PREFETCH} \
                 x {PAYLOAD} B + {} MiB)",
                g >> 20,
                bound >> 20,
                SLACK >> 20
            ),
        ),
        None => row.failures.push("the slow phase never ended".into()),
    }
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

/// Graceful shutdown with 5,000 messages in flight: `close(5 s)` returns within its deadline
/// and every message is acked or reported unresolved; then the same against a paused broker
/// with `close(1 s)`: nothing reported failed may reach the broker after it resumes.
pub async fn shutdown<T: Target>(t: &mut T, _size: Size) -> Row {
    let mut row = Row::new("shutdown", t.name());
    let cfg = BatchConfig::default()
        .max_in_flight(10_000)
        .ack_timeout(Duration::from_secs(30));
    let ledger = Ledger::default();
    let mut loads = Vec::new();
    let mut filters = Vec::new();
    for (paused, deadline) in [
        (false, Duration::from_secs(5)),
        (true, Duration::from_secs(1)),
    ] {
        let (run, topics, filter, p) = try_setup!(
            row,
            setup(
                t,
                &mut row,
                if paused { "shutp" } else { "shut" },
                1,
                cfg.clone()
            )
            .await
        );
        if paused && let Err(e) = t.pause() {
            row.failures.push(format!("pause: {e}"));
            return row;
        }
        let load = Load {
            run,
            topics,
            producers: 1,
            per: 5_000,
            payload: 100,
            pace: None,
            stop_at: None,
        };
        let producer = u32::from(paused);
        let mut acks = Vec::new();
        for seq in 0..load.per {
            let m = crate::record::message(&load.run, &load.topics[0], producer, seq, load.payload);
            let at = Instant::now();
            match p.publish(m).await {
                Ok(a) => acks.push((seq, at, a)),
                Err(e) => ledger.record((producer, seq), at, Class::Refused, Some(e.kind())),
            }
        }
        let t0 = Instant::now();
        let report = p.close(deadline).await;
        let took = t0.elapsed();
        let (mut acked, mut other) = (0u64, 0u64);
        for (seq, at, a) in acks {
            let o: Outcome = a.await;
            if o.is_acked() {
                acked += 1;
            } else {
                other += 1;
            }
            ledger.record(
                (producer, seq),
                at,
                Class::of(&o),
                o.error().map(|e| e.kind()),
            );
        }
        let unresolved = report.as_ref().map(|r| r.unresolved).unwrap_or(0);
        row.notes.push(format!(
            "{}: close({} ms) took {} ms, {acked} acked, {other} not acked, {unresolved} unresolved",
            if paused { "paused broker" } else { "live broker" },
            ms(deadline),
            ms(took)
        ));
        row.require(
            took <= deadline + Duration::from_millis(500),
            format!("close took {} ms, deadline {} ms", ms(took), ms(deadline)),
        );
        row.require(acked + other == 5_000, "not every message resolved");
        if paused {
            let _ = t.resume();
            row.require(
                acked == 0 || other > 0,
                "paused broker yet everything acked",
            );
        } else {
            row.require(
                other == unresolved,
                "non-acked messages not reported unresolved",
            );
        }
        loads.push(load);
        filters.push(filter);
    }
    // Drain both runs and check them together (ids are distinct per run).
    let mut reads = Vec::new();
    for (load, filter) in loads.iter().zip(&filters) {
        let expect = t.stored(&load.run).await.map(|n| n as usize);
        match check::drain(
            &t.subscriber(),
            filter,
            expect,
            Duration::from_secs(3),
            Duration::from_secs(60),
        )
        .await
        {
            Ok(r) => reads.extend(r),
            Err(e) => row.failures.push(format!("drain: {e}")),
        }
    }
    row.figures = check::check(&ledger, &reads, 0);
    row.require_safety();
    row
}

/// Cancellation: publish futures dropped at random points (a timeout of 0..300 µs) and 30 % of
/// pending acks dropped unawaited, with a 256-message window. Afterwards no window slot has
/// leaked (the whole window is admitted again without waiting) and no message resolved twice.
pub async fn cancel<T: Target>(t: &mut T, size: Size) -> Row {
    let mut row = Row::new("cancel", t.name());
    const WINDOW: usize = 256;
    let cfg = BatchConfig::default()
        .max_in_flight(WINDOW)
        .ack_timeout(Duration::from_secs(10));
    let (run, topics, _filter, p) = try_setup!(row, setup(t, &mut row, "cancel", 5, cfg).await);
    let per = if size.quick { 400 } else { 2_000 };
    let gauge = Arc::new(Gauge::default());
    let sampler = Sampler::start(&p);
    let mut tasks = Vec::new();
    for producer in 0..5u32 {
        let (p, run, topic, gauge) = (
            p.clone(),
            run.clone(),
            topics[producer as usize % topics.len()].clone(),
            Arc::clone(&gauge),
        );
        tasks.push(tokio::spawn(async move {
            let (mut dropped_publish, mut dropped_ack, mut resolved) = (0u64, 0u64, 0u64);
            let mut waits = Vec::new();
            for seq in 0..per {
                let m = crate::record::message(&run, &topic, producer, seq, 100);
                let (cut, drop_ack, us) = {
                    let mut r = rand::rng();
                    (
                        r.random_bool(0.3),
                        r.random_bool(0.3),
                        r.random_range(0..300u64),
                    )
                };
                let admitted = if cut {
                    match tokio::time::timeout(Duration::from_micros(us), p.publish(m)).await {
                        Ok(r) => r.ok(),
                        Err(_) => {
                            dropped_publish += 1;
                            None
                        }
                    }
                } else {
                    p.publish(m).await.ok()
                };
                let Some(ack) = admitted else { continue };
                if drop_ack {
                    dropped_ack += 1;
                    drop(ack);
                } else {
                    gauge.up();
                    let g = Arc::clone(&gauge);
                    waits.push(tokio::spawn(async move {
                        let _ = ack.await;
                        g.down();
                    }));
                }
            }
            for w in waits {
                if w.await.is_ok() {
                    resolved += 1;
                }
            }
            (dropped_publish, dropped_ack, resolved)
        }));
    }
    let (mut dp, mut da, mut res) = (0, 0, 0);
    for t in tasks {
        if let Ok((a, b, c)) = t.await {
            dp += a;
            da += b;
            res += c;
        }
    }
    let _ = p.flush().await;
    // Every slot comes back once everything resolved (bounded wait).
    let t0 = Instant::now();
    while p.stats().in_flight > 0 && t0.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leaked = p.stats().in_flight;
    // The whole window is usable: WINDOW publishes admitted without awaiting any ack.
    let mut held = Vec::new();
    let full = tokio::time::timeout(Duration::from_secs(5), async {
        for seq in 0..WINDOW as u64 {
            match p
                .publish(crate::record::message(&run, &topics[0], 9, seq, 100))
                .await
            {
                Ok(a) => held.push(a),
                Err(_) => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    for a in held {
        let _ = a.await;
    }
    sampler.finish(&mut row, &gauge);
    row.notes.push(format!(
        "{dp} publish futures dropped mid-wait, {da} acks dropped unawaited, {res} awaited"
    ));
    let _ = p.close(Duration::from_secs(5)).await;
    row.require(leaked == 0, format!("{leaked} window slots leaked"));
    row.require(full, "the full window could not be admitted again");
    row.require(dp + da > 0, "nothing was cancelled");
    row.require(row.peak_in_flight <= row.window, "peak above the window");
    row
}

/// Broker absent at start: connecting (through a proxy whose upstream is closed, so every
/// attempt is counted) fails with a typed error within the 2 s connect timeout, and nothing
/// keeps reconnecting in the background afterwards.
pub async fn absent(on: crate::plan::Target) -> Row {
    use crate::plan::Target;
    let mut row = Row::new("absent", &on.name());
    let dead = match eventbus_brokers::free_port() {
        Ok(p) => p,
        Err(e) => {
            row.failures.push(format!("port: {e}"));
            return row;
        }
    };
    let proxy = match crate::proxy::FaultProxy::start(([127, 0, 0, 1], dead).into()).await {
        Ok(p) => p,
        Err(e) => {
            row.failures.push(format!("proxy: {e}"));
            return row;
        }
    };
    let timeout = Duration::from_secs(2);
    let addr = proxy.addr();
    let t0 = Instant::now();
    let result: Result<(), eventbus_core::Error> = match on {
        #[cfg(feature = "nats")]
        Target::Nats => eventbus_nats::NatsBackend::connect(
            eventbus_nats::NatsConfig::new(format!("nats://{addr}")).connect_timeout(timeout),
        )
        .await
        .map(drop),
        #[cfg(feature = "kafka")]
        Target::Kafka => eventbus_kafka::KafkaBackend::connect(
            eventbus_kafka::KafkaConfig::new(addr.to_string()).connect_timeout(timeout),
        )
        .await
        .map(drop),
        _ => {
            row.failures
                .push(format!("absent is not run on {}", on.name()));
            return row;
        }
    };
    let took = t0.elapsed();
    row.detect_ms = Some(ms(took));
    let (attempts, later) = proxy.attempts_then_reconnects(Duration::from_secs(2)).await;
    match &result {
        Ok(()) => row.failures.push("connect succeeded with no broker".into()),
        Err(e) => row.notes.push(format!(
            "error kind {:?} (retry {}): {e}; {attempts} connection attempts, {later} after the error",
            e.kind(),
            e.is_retryable()
        )),
    }
    row.require(
        took <= timeout + Duration::from_secs(1),
        format!("connect took {} ms (timeout {} ms)", ms(took), ms(timeout)),
    );
    row.require(later == 0, format!("{later} reconnects after giving up"));
    row
}
