//! Lifecycle rows: shutdown with messages in flight, cancelled publishes, a broker that is not there.

use super::*;

/// Graceful shutdown with 5,000 messages in flight: `close(5 s)` returns within its deadline
/// and every message is acked or reported unresolved; then the same against a paused broker
/// with `close(1 s)`: nothing reported failed may reach the broker after it resumes.
pub async fn shutdown<T: Target>(t: &mut T, _size: Size) -> Row {
    let mut row = Row::new("shutdown", t.name());
    let ledger = Ledger::default();
    let mut runs = Vec::new();
    for (paused, deadline) in [
        (false, Duration::from_secs(5)),
        (true, Duration::from_secs(1)),
    ] {
        match close_in_flight(t, &mut row, &ledger, paused, deadline).await {
            Some(run) => runs.push(run),
            None => return row,
        }
    }
    // Drain both runs and check them together (ids are distinct per run).
    let mut reads = Vec::new();
    for (load, filter) in &runs {
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

/// One half of [`shutdown`]: 5,000 messages published with nothing awaited, then
/// `close(deadline)` (the broker paused first if `paused`), every outcome in `ledger`. The run
/// and its filter, to drain; `None` if it could not be set up (the failure is in `row`).
async fn close_in_flight<T: Target>(
    t: &mut T,
    row: &mut Row,
    ledger: &Ledger,
    paused: bool,
    deadline: Duration,
) -> Option<(Load, String)> {
    let cfg = BatchConfig::default()
        .max_in_flight(10_000)
        .ack_timeout(Duration::from_secs(30));
    let name = if paused { "shutp" } else { "shut" };
    let (run, topics, filter, p) = match setup(t, row, name, 1, cfg).await {
        Ok(x) => x,
        Err(e) => {
            row.failures.push(e);
            return None;
        }
    };
    if paused && let Err(e) = t.pause() {
        row.failures.push(format!("pause: {e}"));
        return None;
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
    let (took, acked, other, unresolved) =
        publish_then_close(&p, &load, u32::from(paused), deadline, ledger).await;
    row.notes.push(format!(
        "{}: close({} ms) took {} ms, {acked} acked, {other} not acked, {unresolved} unresolved",
        if paused {
            "paused broker"
        } else {
            "live broker"
        },
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
    Some((load, filter))
}

/// Publish `load`'s messages as `producer` with nothing awaited, then `close(deadline)`:
/// how long the close took, the outcomes acked and not, and how many it reported unresolved.
/// Every outcome goes in `ledger`.
async fn publish_then_close<P: Publisher>(
    p: &P,
    load: &Load,
    producer: u32,
    deadline: Duration,
    ledger: &Ledger,
) -> (Duration, u64, u64, u64) {
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
    (took, acked, other, unresolved)
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
            cancelling_producer(&p, &run, &topic, producer, per, &gauge).await
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
    let full = window_admits(&p, &run, &topics[0], WINDOW).await;
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

/// One producer of [`cancel`]: `per` messages to `topic`, 30% of the publishes cut short by
/// a timeout of 0..300 us and 30% of the acks dropped unawaited; the others awaited (counted
/// in `gauge` while they wait). Publishes dropped, acks dropped, acks awaited.
async fn cancelling_producer<S: eventbus_core::BatchSink>(
    p: &Batcher<S>,
    run: &str,
    topic: &str,
    producer: u32,
    per: u64,
    gauge: &Arc<Gauge>,
) -> (u64, u64, u64) {
    let (mut dropped_publish, mut dropped_ack, mut resolved) = (0u64, 0u64, 0u64);
    let mut waits = Vec::new();
    for seq in 0..per {
        let m = crate::record::message(run, topic, producer, seq, 100);
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
            let g = Arc::clone(gauge);
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
}

/// Whether `window` publishes are admitted within 5 s without awaiting any ack (the whole
/// window is free); their acks are awaited afterwards.
async fn window_admits<S: eventbus_core::BatchSink>(
    p: &Batcher<S>,
    run: &str,
    topic: &str,
    window: usize,
) -> bool {
    let mut held = Vec::new();
    let full = tokio::time::timeout(Duration::from_secs(5), async {
        for seq in 0..window as u64 {
            match p
                .publish(crate::record::message(run, topic, 9, seq, 100))
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
    full
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
