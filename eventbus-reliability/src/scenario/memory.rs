//! Memory rows: what a stalled broker and a slow consumer cost the process.

use super::*;

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
    let sub = match t.subscriber().subscribe(spec).await {
        Ok(s) => s,
        Err(e) => {
            row.failures.push(format!("subscribe: {e}"));
            return row;
        }
    };
    let SlowRead {
        reads,
        growth,
        left_at_end_of_slow,
    } = read_slowly(sub, &mut row, acked, slow, base).await;
    row.figures = check::check(&ledger, &reads, 0);
    row.rss_growth_bytes = growth;
    let backlog_bytes = (acked * PAYLOAD) as u64;
    row.notes
        .push(format!("{acked} acked ({} MiB)", backlog_bytes >> 20));
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

/// What [`read_slowly`] read, and what the slow phase left.
struct SlowRead {
    reads: Vec<record::Read>,
    /// Peak RSS growth over `base` at the end of the slow phase (`None`: it never ended).
    growth: Option<u64>,
    /// Acked messages not yet read when the slow phase ended.
    left_at_end_of_slow: usize,
}

/// Read until all `acked` messages are seen: one per 2 ms for `slow` from the first delivery,
/// then as fast as they come, and close `sub`; the RSS growth over `base` is taken when the
/// slow phase ends.
async fn read_slowly(
    mut sub: eventbus_core::Subscription,
    row: &mut Row,
    acked: usize,
    slow: Duration,
    base: u64,
) -> SlowRead {
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
    row.notes.push(format!(
        "{left_at_end_of_slow} of {acked} still in the broker after the slow phase; all read \
         in {} ms",
        ms(drained)
    ));
    SlowRead {
        reads,
        growth,
        left_at_end_of_slow,
    }
}
