//! Consumers through faults: one group subscription stays open while the producers publish and
//! the broker side is faulted, so what a live consumer sees is measured, not only what a fresh
//! one reads back afterwards.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{SubscribeSpec, Subscriber};
use serde::Serialize;

use super::{Row, Size, blocking, ms, settle, setup, spread_load, under_load};
use crate::check::Class;
use crate::record::{self, Read};
use crate::target::Target;

/// How soon after a single broker's restart the live consumer must deliver again.
const RESUME_WITHIN_MS: u64 = 2_000;

fn opt_ms(v: Option<u64>) -> String {
    v.map_or("never".into(), |m| m.to_string())
}

/// What the live consumer saw.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ConsumerFigures {
    /// Acked by the producer, never delivered to the live consumer. Must be 0.
    pub missing: u64,
    /// Deliveries beyond the first of a message (at-least-once redeliveries).
    pub duplicates: u64,
    /// The longest time between two deliveries while the producers ran, fault included.
    pub longest_pause_ms: u64,
    /// From the moment the broker side could serve again (the restart returned) to the live
    /// consumer's next delivery.
    pub resume_ms: Option<u64>,
}

/// The live consumer: a group subscription reading and acking in a task of its own.
struct Live {
    seen: Arc<parking_lot::Mutex<Vec<(Read, Instant)>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Live {
    async fn start<S: Subscriber>(sub: &S, filter: &str) -> Result<Live, String> {
        let mut s = sub
            .subscribe(SubscribeSpec::new(filter).group("live").prefetch(256))
            .await
            .map_err(|e| format!("live subscribe: {e}"))?;
        let seen: Arc<parking_lot::Mutex<Vec<(Read, Instant)>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    d = s.next() => match d {
                        Some(Ok(d)) => {
                            if let Some(r) = record::read(d.message()) {
                                log.lock().push((r, Instant::now()));
                            }
                            let _ = d.ack().await;
                        }
                        // A fault shows as errors on the stream; the subscription goes on.
                        Some(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                        None => break,
                    },
                }
            }
            s.close().await;
        });
        Ok(Live { seen, stop, task })
    }

    /// Distinct test messages delivered so far.
    fn distinct(&self) -> HashSet<record::Key> {
        self.seen.lock().iter().map(|(r, _)| r.key).collect()
    }

    async fn stop(self) -> Vec<(Read, Instant)> {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let seen = self.seen.lock();
        seen.clone()
    }
}

/// The broker side killed (-9) and restarted once while 5 producers publish (paced) and one
/// group subscription stays open: nothing acked may be missing from what it delivered, and
/// deliveries must resume soon after the restart. Single node: the broker; a NATS cluster: the
/// stream's leader; a Kafka cluster: the broker the client uses.
pub async fn consume_kill<T: Target>(t: &mut T, size: Size) -> Row {
    let mut row = Row::new("consume-kill", t.name());
    let cfg = eventbus_batch::BatchConfig::default().ack_timeout(t.kill_deadline());
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "consume", 5, cfg).await);
    let live = try_setup!(row, Live::start(&t.subscriber(), &filter).await);
    let per = if size.quick { 600 } else { 2_000 };
    let load = spread_load(run, topics, per, 160);
    let script = async {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        t.kill();
        let down = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = blocking(|| t.restart()).await;
        (down, Instant::now(), r.map_err(|e| e.to_string()))
    };
    let ((down, up, restarted), ledger) = under_load(&p, &load, &mut row, script).await;
    let load_end = Instant::now();
    if let Err(e) = restarted {
        row.failures.push(format!("restart failed: {e}"));
    }
    settle(t, &p, &load, &filter, &ledger, &mut row).await;
    // Let the live consumer catch up with everything acked (retries of unknowns included).
    let acked: HashSet<record::Key> = ledger.keys(Class::Acked).into_iter().collect();
    let until = Instant::now() + Duration::from_secs(30);
    while !acked.is_subset(&live.distinct()) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = live.stop().await;
    let c = figures(&seen, &acked, (down, up, load_end));
    row.notes.push(format!(
        "live consumer: {} deliveries, {} missing, {} duplicates, longest pause {} ms, resumed {} ms after the restart (the broker was down {} ms)",
        seen.len(),
        c.missing,
        c.duplicates,
        c.longest_pause_ms,
        opt_ms(c.resume_ms),
        ms(up - down)
    ));
    row.require(
        c.missing == 0,
        format!("the live consumer never got {} acked messages", c.missing),
    );
    row.require(
        c.resume_ms.is_some(),
        "the live consumer delivered nothing after the restart",
    );
    // A single broker serves again once restarted; a cluster only after the election the kill
    // caused, which the figure includes (reported, not asserted).
    if t.broker().nodes() == 1 {
        row.require(
            c.resume_ms.is_some_and(|m| m <= RESUME_WITHIN_MS),
            format!(
                "deliveries resumed {} ms after the restart (goal {RESUME_WITHIN_MS} ms)",
                opt_ms(c.resume_ms)
            ),
        );
    }
    row.recover_ms = c.resume_ms;
    row.consumer = Some(c);
    row
}

/// The live consumer's figures from its deliveries, the acked keys and the fault's times
/// (`down`, `up`, and when the producers stopped).
fn figures(
    seen: &[(Read, Instant)],
    acked: &HashSet<record::Key>,
    (down, up, load_end): (Instant, Instant, Instant),
) -> ConsumerFigures {
    let distinct: HashSet<record::Key> = seen.iter().map(|(r, _)| r.key).collect();
    let mut times: Vec<Instant> = seen.iter().map(|(_, at)| *at).collect();
    times.sort();
    // Gaps while the producers ran, and the one across the fault whatever its end.
    let longest_pause = times
        .windows(2)
        .filter(|w| w[0] < load_end || w[0] <= down)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    ConsumerFigures {
        missing: acked.difference(&distinct).count() as u64,
        duplicates: (seen.len() - distinct.len()) as u64,
        longest_pause_ms: ms(longest_pause),
        resume_ms: times.iter().find(|at| **at >= up).map(|at| ms(*at - up)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_count_missing_duplicates_pause_and_resume() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let r = |seq| Read {
            key: (0, seq),
            intact: true,
        };
        let seen = [
            (r(0), at(0)),
            (r(1), at(100)),
            (r(1), at(2_600)), // redelivered after the fault
            (r(2), at(2_700)),
        ];
        let acked: HashSet<record::Key> = [(0, 0), (0, 1), (0, 2), (0, 3)].into_iter().collect();
        let c = figures(&seen, &acked, (at(150), at(500), at(3_000)));
        assert_eq!(c.missing, 1, "(0, 3) was acked, never delivered");
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.longest_pause_ms, 2_500);
        assert_eq!(c.resume_ms, Some(2_100));
    }
}
