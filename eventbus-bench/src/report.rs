//! Records, medians, and the tables / JSON / CSV written after a run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::Args;
use crate::drive::Run;
use crate::mode::{Backend, Storage};

/// What `latest.json` holds: the machine and broker description, and one record per run.
#[derive(Serialize, Deserialize)]
pub(crate) struct Saved {
    pub machine: String,
    pub records: Vec<Record>,
    /// The latency rows, when the run measured them.
    #[serde(default)]
    pub latency: Option<LatencySection>,
}

/// What one latency measurement gives the report: how it was run, its table (each SDK row
/// beside its goal) and the chart's points. Saved with the main run's records, so
/// `--from-json` renders it again.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct LatencySection {
    /// What was measured and how, one paragraph.
    pub method: String,
    /// The Markdown table.
    pub table: String,
    /// Per path and rate: publish -> ack p99, p99.9, publish -> handler p99, p99.9 (us).
    pub points: Vec<crate::chart::RatePoint>,
    /// Every run acked and read back every message.
    pub ok: bool,
}

impl LatencySection {
    /// The chart of [`LatencySection::points`] as SVG.
    pub(crate) fn svg(&self) -> String {
        crate::chart::rates_svg(&self.points)
    }
}

impl Saved {
    /// Parse `latest.json`; files from before the machine line was saved (a bare array of
    /// records) take it from the `latest.md` beside them.
    pub(crate) fn parse(text: &str, path: &std::path::Path) -> Result<Saved, serde_json::Error> {
        match serde_json::from_str::<Saved>(text) {
            Ok(s) => Ok(s),
            Err(e) => {
                let records: Vec<Record> = serde_json::from_str(text).map_err(|_| e)?;
                let machine = std::fs::read_to_string(path.with_file_name("latest.md"))
                    .ok()
                    .and_then(|m| m.lines().next().map(str::to_owned))
                    .unwrap_or_else(|| "machine not recorded".into());
                Ok(Saved {
                    machine,
                    records,
                    latency: None,
                })
            }
        }
    }
}

/// One (scenario, backend, mode, storage, repetition[, raw window]) run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub scenario: String,
    pub backend: String,
    pub mode: String,
    /// `publish` (no consumer while publishing), `e2e` (a consumer reads meanwhile) or
    /// `drain` (reading a backlog).
    #[serde(default = "e2e")]
    pub measure: String,
    pub storage: String,
    pub rep: usize,
    pub messages: usize,
    pub payload_bytes: usize,
    pub topics: usize,
    pub publishers: usize,
    /// ACK window (SDK) or async-nats max_ack_inflight (raw).
    pub window: usize,
    /// SDK engine linger in milliseconds (sweep runs; 0 otherwise).
    #[serde(default)]
    pub linger_ms: u64,
    /// Time to connect and warm the producer (Kafka: idempotent producer id), before the clock.
    pub connect_ms: f64,
    pub publish_secs: f64,
    pub publish_msgs_per_sec: f64,
    pub publish_mb_per_sec: f64,
    /// `None` when not every message reached the subscriber.
    pub e2e_msgs_per_sec: Option<f64>,
    /// Drain runs: the backlog's messages over the time from subscribing to the last distinct
    /// message; `None` when not all of it arrived.
    #[serde(default)]
    pub drain_msgs_per_sec: Option<f64>,
    pub ack_p50_us: u64,
    pub ack_p99_us: u64,
    pub ack_p999_us: u64,
    pub e2e_p50_us: u64,
    pub e2e_p99_us: u64,
    pub peak_rss_bytes: u64,
    pub cpu_secs: f64,
    pub broker_cpu_secs: f64,
    pub acked: u64,
    pub failed: u64,
    pub unknown: u64,
    pub first_error: Option<String>,
    pub stored: u64,
    pub received_distinct: u64,
    pub received_duplicates: u64,
    pub verified: bool,
    pub verify_method: String,
    pub verify_note: String,
    pub topic_or_stream: String,
    /// Wall time of the whole run in seconds: setup, publishing, the consumer's drain,
    /// verification and teardown (what the run cost the bench, not a throughput figure).
    #[serde(default)]
    pub wall_secs: f64,
    /// A raw baseline's window/linger probe at reduced size (`RAW_PROBE_MESSAGES`): it only
    /// chooses the setting the full-size runs use, and is left out of tables and charts.
    #[serde(default)]
    pub probe: bool,
    /// NATS SDK runs: messages the sink sent again (after ack silence, "no responders" or a
    /// 503, or cut off from a fast batch); each copy is dropped by its id. 0 elsewhere.
    #[serde(default)]
    pub resent: u64,
}

/// Records saved before publish-only runs existed were all end-to-end.
fn e2e() -> String {
    "e2e".into()
}

impl Record {
    pub(crate) fn new(run: &Run) -> Record {
        let s = run.s;
        Record {
            scenario: s.name.into(),
            backend: run.backend.to_string(),
            mode: run.mode.to_string(),
            measure: run.measure.to_string(),
            storage: if run.backend == Backend::Memory {
                Storage::Memory.to_string()
            } else {
                run.storage.to_string()
            },
            rep: run.rep,
            messages: s.messages,
            payload_bytes: s.payload,
            topics: s.topics,
            publishers: s.publishers,
            window: 0,
            linger_ms: 0,
            connect_ms: 0.0,
            publish_secs: 0.0,
            publish_msgs_per_sec: 0.0,
            publish_mb_per_sec: 0.0,
            e2e_msgs_per_sec: None,
            drain_msgs_per_sec: None,
            ack_p50_us: 0,
            ack_p99_us: 0,
            ack_p999_us: 0,
            e2e_p50_us: 0,
            e2e_p99_us: 0,
            peak_rss_bytes: 0,
            cpu_secs: 0.0,
            broker_cpu_secs: 0.0,
            acked: 0,
            failed: 0,
            unknown: 0,
            first_error: None,
            stored: 0,
            received_distinct: 0,
            received_duplicates: 0,
            verified: false,
            verify_method: String::new(),
            verify_note: String::new(),
            topic_or_stream: String::new(),
            wall_secs: 0.0,
            probe: false,
            resent: 0,
        }
    }
}

/// The seed's measured NATS and Kafka figures (msg/s), for reference.
fn seed(scenario: &str) -> Option<(f64, f64)> {
    match scenario {
        "low" => Some((398.27, 495.25)),
        "medium" => Some((737.90, 1618.76)),
        "high" => Some((726.92, 4366.43)),
        "extreme" => Some((828.55, 7996.03)),
        _ => None,
    }
}

#[derive(Clone, Copy, Default)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    rss: u64,
    ack_p99: u64,
    e2e: Option<f64>,
    window: usize,
    messages: usize,
    verified: bool,
    /// Median CPU of the bench process per message (user + system), in microseconds.
    cpu_us: f64,
    /// Median CPU of the broker process per message, in microseconds; 0 when the bench did
    /// not start the broker (or it is in-process).
    broker_us: f64,
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn stat(rs: &[&Record]) -> Stat {
    let mut v: Vec<f64> = rs.iter().map(|r| r.rate()).collect();
    v.sort_by(f64::total_cmp);
    let mut e: Vec<f64> = rs.iter().filter_map(|r| r.e2e_msgs_per_sec).collect();
    e.sort_by(f64::total_cmp);
    let mut p99: Vec<u64> = rs.iter().map(|r| r.ack_p99_us).collect();
    p99.sort();
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
        rss: rs.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0),
        ack_p99: p99[p99.len() / 2],
        e2e: (e.len() == rs.len()).then(|| e[e.len() / 2]),
        window: rs[0].window,
        messages: rs[0].messages,
        verified: rs.iter().all(|r| r.verified),
        cpu_us: median(rs.iter().map(|r| per_message(r.cpu_secs, r)).collect()),
        broker_us: median(
            rs.iter()
                .map(|r| per_message(r.broker_cpu_secs, r))
                .collect(),
        ),
    }
}

/// CPU seconds of a run, per message, in microseconds.
fn per_message(secs: f64, r: &Record) -> f64 {
    secs * 1e6 / r.messages.max(1) as f64
}

impl Record {
    /// The run's figure: messages per second published, or drained for a drain.
    pub(crate) fn rate(&self) -> f64 {
        if self.measure == "drain" {
            self.drain_msgs_per_sec.unwrap_or(0.0)
        } else {
            self.publish_msgs_per_sec
        }
    }
}

pub(crate) fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Scenario order in tables.
const ORDER: [&str; 7] = [
    "low",
    "medium",
    "high",
    "extreme",
    "sustained",
    "sustained-1k",
    "backlog",
];

/// Measure order in tables.
const MEASURES: [&str; 3] = ["publish", "e2e", "drain"];

/// Per mode, the best window's statistics.
type Modes = BTreeMap<String, Stat>;
/// `(backend, storage) -> (scenario, measure) -> modes`.
type Table = BTreeMap<(String, String), BTreeMap<(String, String), Modes>>;

fn table(records: &[Record]) -> Table {
    // (backend, storage, scenario, measure, mode, window) -> records
    type Key = (String, String, String, String, String, usize);
    let mut groups: BTreeMap<Key, Vec<&Record>> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.probe) {
        groups
            .entry((
                r.backend.clone(),
                r.storage.clone(),
                r.scenario.clone(),
                r.measure.clone(),
                r.mode.clone(),
                r.window,
            ))
            .or_default()
            .push(r);
    }
    // A raw baseline run at several windows counts at its best median.
    let mut table = Table::new();
    for ((b, st, sc, me, m, _w), rs) in &groups {
        let s = stat(rs);
        let slot = table
            .entry((b.clone(), st.clone()))
            .or_default()
            .entry((sc.clone(), me.clone()))
            .or_default();
        match slot.get(m) {
            Some(prev) if prev.median >= s.median => {}
            _ => {
                slot.insert(m.clone(), s);
            }
        }
    }
    table
}

/// One column of a publish table: its header and its cell for a row's modes.
type Column = (&'static str, Box<dyn Fn(&str, &Modes) -> String>);

fn cell(s: Option<&Stat>) -> String {
    s.map_or("-".to_owned(), |s| fmt_rate(s.median))
}

fn ratio(a: Option<&Stat>, b: Option<&Stat>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}x", a.median / b.median),
        _ => "-".into(),
    }
}

fn spread(s: Option<&Stat>) -> String {
    s.map_or("-".into(), |s| {
        format!(
            "{} ({}-{})",
            fmt_rate(s.median),
            fmt_rate(s.min),
            fmt_rate(s.max)
        )
    })
}

/// The publish table's columns; a column no row fills is left out.
fn columns() -> Vec<Column> {
    vec![
        ("msgs", Box::new(|_, m| messages(m))),
        ("naive msg/s", Box::new(|_, m| naive(m))),
        spread_of("sdk msg/s (min-max)", "sdk"),
        spread_of("sdk no ids", "sdk-nodedup"),
        cell_of("sdk async", "sdk-async"),
        cell_of("sdk atomic", "sdk-atomic"),
        ("raw no ids (window)", Box::new(|_, m| raw_window(m))),
        spread_of("raw with ids", "raw-dedup"),
        ratio_of("sdk/raw, with ids", "sdk", "raw-dedup"),
        ratio_of("sdk/raw, no ids", "sdk-nodedup", "raw"),
        ratio_of("sdk/naive", "sdk", "naive"),
        cell_of("JetStream ceiling (ack per 1,000)", "ceiling-js"),
        cell_of("core NATS ceiling", "ceiling-core"),
        ratio_of(
            "sdk no ids / JetStream ceiling",
            "sdk-nodedup",
            "ceiling-js",
        ),
        ("sdk e2e msg/s", Box::new(sdk_e2e)),
        ("sdk ack p99", Box::new(|_, m| sdk_ack_p99(m))),
        ("sdk peak RSS", Box::new(|_, m| sdk_rss(m))),
    ]
}

/// A column of `mode`'s median rate.
fn cell_of(head: &'static str, mode: &'static str) -> Column {
    (head, Box::new(move |_, m| cell(m.get(mode))))
}

/// A column of `mode`'s median rate with its min and max.
fn spread_of(head: &'static str, mode: &'static str) -> Column {
    (head, Box::new(move |_, m| spread(m.get(mode))))
}

/// A column of mode `a`'s median rate over mode `b`'s.
fn ratio_of(head: &'static str, a: &'static str, b: &'static str) -> Column {
    (head, Box::new(move |_, m| ratio(m.get(a), m.get(b))))
}

/// Messages per run of the row (the SDK's, else raw's).
fn messages(m: &Modes) -> String {
    m.get("sdk")
        .or(m.get("raw"))
        .map_or("-".into(), |s| s.messages.to_string())
}

/// Naive's median rate, and its message count when capped below the SDK's.
fn naive(m: &Modes) -> String {
    match (m.get("naive"), m.get("sdk")) {
        (Some(n), Some(s)) if n.messages != s.messages => {
            format!("{} (of {})", fmt_rate(n.median), n.messages)
        }
        (n, _) => cell(n),
    }
}

/// Raw's median rate and the window (NATS) or linger (Kafka) it ran at.
fn raw_window(m: &Modes) -> String {
    m.get("raw").map_or("-".into(), |s| {
        format!("{} (w={})", fmt_rate(s.median), s.window)
    })
}

/// The SDK's end-to-end rate, on `e2e` rows only.
fn sdk_e2e(measure: &str, m: &Modes) -> String {
    if measure == "e2e" {
        m.get("sdk")
            .and_then(|s| s.e2e)
            .map_or("-".into(), fmt_rate)
    } else {
        "-".into()
    }
}

/// The SDK's median ACK latency p99.
fn sdk_ack_p99(m: &Modes) -> String {
    m.get("sdk").map_or("-".into(), |s| {
        format!("{:.1} ms", s.ack_p99 as f64 / 1000.0)
    })
}

/// The SDK's peak RSS over the repetitions.
fn sdk_rss(m: &Modes) -> String {
    m.get("sdk")
        .map_or("-".into(), |s| format!("{} MiB", s.rss / (1 << 20)))
}

/// What a (backend, storage) section is measured on.
fn section(args: &Args, backend: &str, storage: &str) -> &'static str {
    let external = match backend {
        "nats" => args.nats_url.is_some(),
        "kafka" => args.kafka_brokers.is_some(),
        _ => false,
    };
    match (backend, storage) {
        // What the bench knows of a broker it did not start is what the broker reported, on
        // the machine line; the storage class is only the label the run was given.
        _ if external => "external broker (what it reported is on the machine line)",
        ("nats", "durable") => "NATS JetStream, file storage (durable)",
        ("nats", "memory") => "NATS JetStream, memory storage (not durable)",
        ("kafka", "durable") => "tansu SQLite engine (durable), Kafka protocol via librdkafka",
        ("kafka", "memory") => "tansu memory engine (not durable), Kafka protocol via librdkafka",
        ("nats", "replicated") => {
            "NATS JetStream, 3-node cluster, R3 file streams (replicated, durable)"
        }
        ("kafka", "replicated") => {
            "3 stateless tansu brokers over one SQLite file (shared storage, no replication of its own), Kafka protocol via librdkafka"
        }
        ("memory", _) => "in-process memory backend (no broker; engine + subscriber overhead only)",
        _ => "",
    }
}

/// The Markdown tables of a run: per backend and storage class, publishing (publish-only and
/// end-to-end rows), then the receive side, then the seed's NATS-vs-Kafka layout.
fn tables(args: &Args, machine: &str, table: &Table) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{machine}\n");
    let _ = writeln!(
        md,
        "Rows: `publish` = no consumer while publishing, verified afterwards (NATS and tansu's \
         memory engine: the broker's count and every message read back; tansu SQLite: high \
         watermarks); `e2e` = a consumer reads every message while the publishers run, on the \
         same machine (its rate is \"sdk e2e msg/s\"; the other columns are publish rates). \
         Medians of the repetitions; ratios are within this run.\n"
    );
    let cols = columns();
    for ((backend, storage), rows) in table {
        publish_table(&mut md, args, (backend, storage), rows, &cols);
    }
    drains(&mut md, table);
    costs(&mut md, table);
    seed_layout(&mut md, table);
    md
}

/// CPU per message of the bench process and of the broker, and peak RSS: the SDK beside the
/// raw client with ids (publish, end to end) or the raw consumer (drain), against #31's goals.
fn costs(md: &mut String, table: &Table) {
    let mut lines = Vec::new();
    for ((backend, storage), rows) in table {
        for sc in ORDER {
            for me in MEASURES {
                let Some(m) = rows.get(&(sc.to_owned(), me.to_owned())) else {
                    continue;
                };
                let (sdk, raw) = if me == "drain" {
                    (m.get("drain-sdk"), m.get("drain-raw"))
                } else {
                    (m.get("sdk"), m.get("raw-dedup"))
                };
                let (Some(sdk), Some(raw)) = (sdk, raw) else {
                    continue;
                };
                // Below 10,000 messages a 10 ms tick is 1 us/msg or more: too coarse.
                if sdk.messages < 10_000 {
                    continue;
                }
                let us = |x: f64| format!("{x:.1}");
                let versus = |a: f64, b: f64, goal: f64| {
                    if b <= 0.0 {
                        return "-".to_owned();
                    }
                    let r = a / b;
                    // CPU seconds are differences of 10 ms ticks: 3 ticks against 4 may
                    // come out a hair above 0.75.
                    let met = r <= goal + 1e-9;
                    format!("{r:.2}x{}", if met { "" } else { " (**over**)" })
                };
                let mib = |s: &Stat| s.rss as f64 / f64::from(1 << 20);
                lines.push(format!(
                    "| {backend} / {storage} | {sc} | {me} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} |",
                    us(sdk.cpu_us),
                    us(raw.cpu_us),
                    versus(sdk.cpu_us, raw.cpu_us, 0.75),
                    if sdk.broker_us > 0.0 { us(sdk.broker_us) } else { "-".into() },
                    if raw.broker_us > 0.0 { us(raw.broker_us) } else { "-".into() },
                    versus(sdk.broker_us, raw.broker_us, 1.0),
                    mib(sdk),
                    mib(raw),
                ));
            }
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### Cost per message: CPU and memory, SDK beside the raw client\n\n\
         Client: user + system CPU of the bench process over the run, per message (from \
         /proc, 10 ms ticks: at 20,000 messages one tick is 0.5 us/msg). Broker: the same for \
         the broker process the bench started. Raw: the client with ids (publish, end to end; \
         its best window) or the raw consumer (drain). Goals: the SDK's client CPU <= 0.75x \
         raw's, broker CPU <= 1.00x raw's. Peak RSS is the whole bench process's.\n\n\
         | backend / storage | scenario | measure | client us/msg sdk | raw | sdk/raw (goal <= 0.75x) | broker us/msg sdk | raw | sdk/raw (goal <= 1.00x) | peak RSS MiB sdk / raw |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for l in lines {
        let _ = writeln!(md, "{l}");
    }
    let _ = writeln!(md);
}

/// One (backend, storage) section's publish table: a row per (scenario, measure) published,
/// a column per [`columns`] entry some row fills. Nothing for a section of drains only.
fn publish_table(
    md: &mut String,
    args: &Args,
    (backend, storage): (&str, &str),
    rows: &BTreeMap<(String, String), Modes>,
    cols: &[Column],
) {
    let ordered: Vec<(&str, &str, &Modes)> = ORDER
        .iter()
        .flat_map(|sc| MEASURES.iter().map(move |me| (*sc, *me)))
        .filter(|(_, me)| *me != "drain")
        .filter_map(|(sc, me)| {
            rows.get(&(sc.to_owned(), me.to_owned()))
                .map(|m| (sc, me, m))
        })
        .collect();
    if ordered.is_empty() {
        return;
    }
    let used: Vec<&Column> = cols
        .iter()
        .filter(|(_, f)| ordered.iter().any(|(_, me, m)| f(me, m) != "-"))
        .collect();
    let _ = writeln!(
        md,
        "### {backend} / {storage}: {}\n",
        section(args, backend, storage)
    );
    let mut head = String::from("| scenario | measure |");
    let mut rule = String::from("|---|---|");
    for (h, _) in &used {
        let _ = write!(head, " {h} |");
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{head} seed NATS msg/s | seed Kafka msg/s | verified |");
    let _ = writeln!(md, "{rule}---|---|---|");
    for (sc, me, m) in ordered {
        let (sn, sk) = seed(sc).map_or(("-".into(), "-".into()), |(n, k)| {
            (format!("{n:.0}"), format!("{k:.0}"))
        });
        let mut line = format!("| {sc} | {me} |");
        for (_, f) in &used {
            let _ = write!(line, " {} |", f(me, m));
        }
        let ok = m.values().all(|s| s.verified);
        let _ = writeln!(
            md,
            "{line} {sn} | {sk} | {} |",
            if ok { "yes" } else { "**NO**" }
        );
    }
    let _ = writeln!(md);
}

/// The receive side: a backlog drained in a consumer group, every message acked.
fn drains(md: &mut String, table: &Table) {
    let rows: Vec<(&(String, String), &Modes)> = table
        .iter()
        .filter_map(|(k, v)| {
            v.get(&("backlog".to_owned(), "drain".to_owned()))
                .map(|m| (k, m))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### Receive side: draining a backlog in a consumer group, every message acked\n"
    );
    let _ = writeln!(
        md,
        "| backend / storage | backlog msgs | sdk msg/s (min-max) | raw client msg/s (min-max) | sdk/raw | raw at client defaults msg/s (min-max) | sdk/defaults | peak RSS MiB sdk / raw / defaults | verified |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for ((b, st), m) in rows {
        let (sdk, raw) = (m.get("drain-sdk"), m.get("drain-raw"));
        let defaults = m.get("drain-raw-defaults");
        let rss = |s: Option<&Stat>| {
            s.map_or("-".into(), |s| {
                format!("{:.0}", s.rss as f64 / f64::from(1 << 20))
            })
        };
        let _ = writeln!(
            md,
            "| {b} / {st} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} |",
            sdk.or(raw).map_or(0, |s| s.messages),
            spread(sdk),
            spread(raw),
            ratio(sdk, raw),
            spread(defaults),
            ratio(sdk, defaults),
            rss(sdk),
            rss(raw),
            rss(defaults),
            if m.values().all(|s| s.verified) {
                "yes"
            } else {
                "**NO**"
            }
        );
    }
    let _ = writeln!(
        md,
        "\nNATS: the SDK's subscriber vs async-nats's pull consumer (1,024 per pull, each \
         message acked). Kafka (tansu memory engine, one topic of 4 partitions): the SDK's \
         subscriber vs rdkafka's consumer storing each offset after processing and committing \
         in the background, with the SDK's bounded read-ahead (4 MiB) and, as `defaults`, with \
         librdkafka's own (64 MiB queued, 50 MiB per fetch). Peak RSS is the whole bench \
         process's during the drain.\n"
    );
}

/// The seed's layout, once per storage class: Kafka vs NATS, SDK and raw side by side,
/// publish-only where it was measured.
fn seed_layout(md: &mut String, table: &Table) {
    for storage in ["durable", "memory", "replicated"] {
        let (Some(k), Some(n)) = (
            table.get(&("kafka".to_owned(), storage.to_owned())),
            table.get(&("nats".to_owned(), storage.to_owned())),
        ) else {
            continue;
        };
        let what = match storage {
            "durable" => "durable: NATS file storage vs tansu SQLite",
            "replicated" => {
                "replicated: a 3-node NATS cluster (R3) vs 3 tansu brokers over one SQLite file"
            }
            _ => "memory: NATS memory storage vs tansu memory engine (neither survives a restart)",
        };
        let _ = writeln!(md, "### Seed layout, {what}\n");
        let _ = writeln!(
            md,
            "| scenario | measure | Kafka sdk msg/s | Kafka raw msg/s | NATS sdk msg/s | NATS sdk no ids | NATS raw msg/s | NATS/Kafka (sdk) | NATS/Kafka (raw) | seed NATS/Kafka |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
        for name in ORDER {
            let row = ["publish", "e2e"].into_iter().find_map(|me| {
                let key = (name.to_owned(), me.to_owned());
                Some((me, k.get(&key)?, n.get(&key)?))
            });
            let Some((me, km, nm)) = row else {
                continue;
            };
            let seed_ratio =
                seed(name).map_or("-".to_owned(), |(sn, sk)| format!("{:.2}", sn / sk));
            let ratio = |a: Option<&Stat>, b: Option<&Stat>| ratio(a, b).replace('x', "");
            let _ = writeln!(
                md,
                "| {name} | {me} | {} | {} | {} | {} | {} | {} | {} | {seed_ratio} |",
                cell(km.get("sdk")),
                cell(km.get("raw")),
                cell(nm.get("sdk")),
                cell(nm.get("sdk-nodedup")),
                cell(nm.get("raw")),
                ratio(nm.get("sdk"), km.get("sdk")),
                ratio(nm.get("raw"), km.get("raw")),
            );
        }
        let _ = writeln!(md);
    }
}

/// Write the tables of `records` (and the latency rows, when measured) with the charts, the
/// JSON and the CSV to `--out` (and the README's block with `--readme`); `print` them too.
pub(crate) fn write(
    args: &Args,
    machine: &str,
    records: &[Record],
    latency: Option<&LatencySection>,
    print: bool,
) -> Result<(), String> {
    let table = table(records);
    let mut md = tables(args, machine, &table);
    if let Some(l) = latency {
        latency_tables(&mut md, l);
    }
    if print {
        println!("\n{md}");
    }
    let series = chart_series(&table);
    let present: Vec<&str> = ORDER
        .into_iter()
        .filter(|o| series.keys().any(|(_, s, _)| s == o))
        .collect();
    let chart = crate::chart::svg(
        &series,
        &present,
        "eventbus: publish throughput by scenario, backend and mode",
    );
    let latency_svg = latency.map(LatencySection::svg);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let saved = Saved {
        machine: machine.to_owned(),
        records: records.to_vec(),
        latency: latency.cloned(),
    };
    let json = serde_json::to_string_pretty(&saved).map_err(|e| e.to_string())?;
    std::fs::write(args.out.join("latest.json"), json).map_err(|e| e.to_string())?;
    std::fs::write(args.out.join("latest.md"), &md).map_err(|e| e.to_string())?;
    write_svg(&args.out, "throughput", &chart)?;
    if let Some(svg) = &latency_svg {
        write_svg(&args.out, LATENCY_CHART, svg)?;
    }
    if let Some(readme) = &args.readme {
        // Beside the README, the charts are in docs/bench/.
        let md = md.replace(
            &format!("]({LATENCY_CHART}.svg)"),
            &format!("](docs/bench/{LATENCY_CHART}.svg)"),
        );
        update_readme(readme, &md, &chart, latency_svg.as_deref())?;
    }
    std::fs::write(args.out.join("latest.csv"), csv(records)).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {0}/latest.json, {0}/latest.csv, {0}/latest.md, {0}/throughput.{{svg,png}}{1}",
        args.out.display(),
        if latency.is_some() {
            format!(", {}/{LATENCY_CHART}.{{svg,png}}", args.out.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The latency chart's file name (without extension), in `--out` and beside the README.
const LATENCY_CHART: &str = "latency-run";

/// `<dir>/<name>.svg` and its `.png`.
pub(crate) fn write_svg(dir: &std::path::Path, name: &str, svg: &str) -> Result<(), String> {
    let png = crate::chart::png(svg)?;
    for (path, bytes) in [
        (dir.join(format!("{name}.png")), png.as_slice()),
        (dir.join(format!("{name}.svg")), svg.as_bytes()),
    ] {
        std::fs::write(&path, bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The latency rows: how they were run, the chart, the table with the goals.
fn latency_tables(md: &mut String, l: &LatencySection) {
    let _ = writeln!(
        md,
        "### Latency at fixed offered rates\n\n![latency at fixed rates]({LATENCY_CHART}.svg)\n\n\
         Latency rows: {}\n\n{}",
        l.method, l.table
    );
    if !l.ok {
        let _ = writeln!(
            md,
            "**Incomplete**: a latency run lost or failed messages.\n"
        );
    }
}

/// The chart's bars: per storage class, scenario and `backend mode`, the median publish rate
/// (publish-only where measured, else end-to-end; drains are not publish rates).
fn chart_series(table: &Table) -> crate::chart::Series {
    let mut series = crate::chart::Series::new();
    for ((backend, storage), rows) in table {
        for ((sc, me), modes) in rows {
            let publish = rows.contains_key(&(sc.clone(), "publish".to_owned()));
            if me == "drain" || (me == "e2e" && publish) {
                continue;
            }
            for (mode, st) in modes {
                series.insert(
                    (storage.clone(), sc.clone(), format!("{backend} {mode}")),
                    st.median,
                );
            }
        }
    }
    series
}

/// `latest.csv`: one line per record.
fn csv(records: &[Record]) -> String {
    let mut csv = String::from(
        "scenario,backend,mode,measure,storage,rep,window,messages,payload_bytes,publish_msgs_per_sec,publish_mb_per_sec,e2e_msgs_per_sec,drain_msgs_per_sec,ack_p50_us,ack_p99_us,ack_p999_us,e2e_p50_us,e2e_p99_us,peak_rss_bytes,cpu_secs,broker_cpu_secs,acked,stored,received_distinct,verified,topic_or_stream\n",
    );
    for r in records {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{:.1},{:.3},{},{},{},{},{},{},{},{},{:.3},{:.3},{},{},{},{},{}",
            r.scenario,
            r.backend,
            r.mode,
            r.measure,
            r.storage,
            r.rep,
            r.window,
            r.messages,
            r.payload_bytes,
            r.publish_msgs_per_sec,
            r.publish_mb_per_sec,
            r.e2e_msgs_per_sec
                .map_or(String::new(), |x| format!("{x:.1}")),
            r.drain_msgs_per_sec
                .map_or(String::new(), |x| format!("{x:.1}")),
            r.ack_p50_us,
            r.ack_p99_us,
            r.ack_p999_us,
            r.e2e_p50_us,
            r.e2e_p99_us,
            r.peak_rss_bytes,
            r.cpu_secs,
            r.broker_cpu_secs,
            r.acked,
            r.stored,
            r.received_distinct,
            r.verified,
            r.topic_or_stream
        );
    }
    csv
}

/// Replace the block between `<!-- bench:begin -->` and `<!-- bench:end -->` in `readme` with
/// the latest tables, and write the charts to `docs/bench/` beside it.
fn update_readme(
    readme: &std::path::Path,
    md: &str,
    chart: &str,
    latency: Option<&str>,
) -> Result<(), String> {
    let text =
        std::fs::read_to_string(readme).map_err(|e| format!("read {}: {e}", readme.display()))?;
    let (begin, end) = ("<!-- bench:begin -->", "<!-- bench:end -->");
    let (Some(a), Some(b)) = (text.find(begin), text.find(end)) else {
        return Err(format!(
            "{} has no {begin} ... {end} block",
            readme.display()
        ));
    };
    let dir = readme
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("docs")
        .join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    write_svg(&dir, "throughput", chart)?;
    if let Some(svg) = latency {
        write_svg(&dir, LATENCY_CHART, svg)?;
    }
    let block =
        format!("{begin}\n\n![publish throughput](docs/bench/throughput.svg)\n\n{md}\n{end}");
    let new = format!("{}{block}{}", &text[..a], &text[b + end.len()..]);
    std::fs::write(readme, new).map_err(|e| e.to_string())?;
    eprintln!(
        "updated {} and the charts in {}",
        readme.display(),
        dir.display()
    );
    Ok(())
}

/// The `--sweep` report: one row per (backend, storage, window, linger), a Markdown table, the
/// JSON records and a latency-vs-throughput chart (`sweep.svg`).
pub(crate) fn write_sweep(args: &Args, machine: &str, records: &[Record]) -> Result<(), String> {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "machine: {machine}\n");
    let _ = writeln!(
        md,
        "| backend | storage | window | linger ms | msgs | publish msg/s | ack p50 | ack p99 | verified |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<&Record> = records.iter().collect();
    rows.sort_by(|a, b| {
        (&a.backend, &a.storage, a.window, a.linger_ms).cmp(&(
            &b.backend,
            &b.storage,
            b.window,
            b.linger_ms,
        ))
    });
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {} |",
            r.backend,
            r.storage,
            r.window,
            r.linger_ms,
            r.messages,
            fmt_rate(r.publish_msgs_per_sec),
            r.ack_p50_us as f64 / 1000.0,
            r.ack_p99_us as f64 / 1000.0,
            if r.verified { "yes" } else { "**NO**" },
        );
    }
    println!("\n{md}");
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let put = |name: &str, text: String| {
        let path = args.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))
    };
    put("sweep.md", md)?;
    let doc = Saved {
        machine: machine.to_owned(),
        records: records.to_vec(),
        latency: None,
    };
    put(
        "sweep.json",
        serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
    )?;
    write_svg(&args.out, "sweep", &crate::chart::latency_svg(records))?;
    eprintln!(
        "wrote {0}/sweep.json, {0}/sweep.md, {0}/sweep.svg, {0}/sweep.png",
        args.out.display()
    );
    Ok(())
}
