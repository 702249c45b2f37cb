//! `--dedup-study`: what JetStream's duplicate window costs the server. With `Nats-Msg-Id` on,
//! nats-server keeps every id it has seen for the stream's `duplicate_window`; at 100k+ msg/s
//! that is millions of live ids. For each window (30 s, 2 min, 10 min) a fresh nats-server and
//! file stream take a sustained publish through the SDK's default sink (ids on, no consumer) for
//! `--study-secs`; the server's RSS is sampled every second and the stream's last sequence must
//! equal the messages acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::{Backend as _, Message, Publisher};
use eventbus_nats::{NatsBackend, NatsConfig, StreamSpec};

use crate::Args;
use crate::drive::payload;

/// Windows measured.
const WINDOWS_S: [u64; 3] = [30, 120, 600];
/// The stream keeps at most this many messages (oldest discarded) so a long run does not fill
/// the disk; the server's id table is not bounded by it.
const KEEP: i64 = 2_000_000;

/// One window's figures.
struct Figures {
    window_s: u64,
    secs: f64,
    acked: u64,
    last_sequence: u64,
    rss_at: Vec<(u64, u64)>,
    peak_rss: u64,
    rate_first_30s: f64,
    rate_last_30s: f64,
}

/// VmRSS of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn one(window_s: u64, secs: u64, bytes: usize) -> Result<Figures, String> {
    let server = eventbus_brokers::NatsServer::start().map_err(|e| format!("nats-server: {e}"))?;
    let pid = server.pid().ok_or("nats-server has no pid")?;
    let backend = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut spec = StreamSpec::new("DEDUP", ["dedup.>"]);
    spec.duplicate_window = Duration::from_secs(window_s);
    spec.max_messages = KEEP;
    backend
        .ensure_stream(&spec)
        .await
        .map_err(|e| format!("stream: {e}"))?;
    let p = Batcher::new(
        backend.sink().await.map_err(|e| e.to_string())?,
        BatchConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    let acked = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..5u32 {
        let (p, acked) = (p.clone(), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            let topic = format!("dedup.t{w}");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let counter = tokio::spawn(async move {
                while let Some(ack) = rx.recv().await {
                    let ack: eventbus_core::PendingAck = ack;
                    if ack.await.is_acked() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            let mut seq = 0u64;
            while Instant::now() < until {
                let m = Message::new(topic.as_str(), payload(bytes, w, seq, t0));
                seq += 1;
                if let Ok(ack) = p.publish(m).await {
                    let _ = tx.send(ack);
                }
            }
            drop(tx);
            let _ = counter.await;
        }));
    }
    let (mut rss_at, mut peak, mut samples) = (Vec::new(), 0u64, Vec::new());
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (s, r) = (t0.elapsed().as_secs(), rss(pid));
        peak = peak.max(r);
        samples.push((s, acked.load(Ordering::Relaxed)));
        if [30, 60, 120, 180, 300, 600].contains(&s) {
            rss_at.push((s, r));
        }
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    let _ = p.close(Duration::from_secs(30)).await;
    let secs_run = t0.elapsed().as_secs_f64();
    rss_at.push((secs_run as u64, rss(pid)));
    let state = backend
        .stream_state("DEDUP")
        .await
        .map_err(|e| format!("stream state: {e}"))?;
    let at = |s: u64| samples.iter().find(|(t, _)| *t >= s).map_or(0, |(_, n)| *n);
    let last = samples.last().map_or(0, |(_, n)| *n);
    let end = samples.last().map_or(0, |(t, _)| *t);
    Ok(Figures {
        window_s,
        secs: secs_run,
        acked: acked.load(Ordering::Relaxed),
        last_sequence: state.last_sequence,
        rss_at,
        peak_rss: peak,
        rate_first_30s: at(30) as f64 / 30.0,
        rate_last_30s: (last - at(end.saturating_sub(30))) as f64 / 30.0,
    })
}

/// Run the study and write `dedup-window.md` into `args.out`.
pub(crate) async fn study(args: &Args) -> Result<bool, String> {
    let secs = args.study_secs.max(35);
    let mut rows = Vec::new();
    for w in WINDOWS_S {
        eprintln!("duplicate window {w} s: publishing for {secs} s ...");
        rows.push(one(w, secs, 108).await?);
    }
    let mib = |b: u64| b as f64 / 1_048_576.0;
    let mut md = format!(
        "Sustained publish through the SDK's default NATS sink (fast-ingest, `Nats-Msg-Id` on), \
         5 publishers, 108 B, no consumer, {secs} s per window, a fresh nats-server 2.15 and \
         file stream each (the stream keeps the last {KEEP} messages; the id table is not \
         bounded by that).\n\n| duplicate window | acked | msg/s first 30 s | msg/s last 30 s | \
         server RSS over time | server peak RSS | stream last sequence = acked |\n\
         |---|---|---|---|---|---|---|\n"
    );
    let mut ok = true;
    for r in &rows {
        let verified = r.last_sequence == r.acked;
        ok &= verified;
        md.push_str(&format!(
            "| {} s | {} in {:.0} s | {:.0}k | {:.0}k | {} | {:.0} MiB | {} |\n",
            r.window_s,
            r.acked,
            r.secs,
            r.rate_first_30s / 1e3,
            r.rate_last_30s / 1e3,
            r.rss_at
                .iter()
                .map(|(s, b)| format!("{s} s: {:.0} MiB", mib(*b)))
                .collect::<Vec<_>>()
                .join(", "),
            mib(r.peak_rss),
            if verified {
                "yes".to_owned()
            } else {
                format!("**NO** ({} vs {})", r.last_sequence, r.acked)
            },
        ));
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let path = args.out.join("dedup-window.md");
    std::fs::write(&path, &md).map_err(|e| format!("write {}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(ok)
}
