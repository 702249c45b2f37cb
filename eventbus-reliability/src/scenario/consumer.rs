//! Consumers through faults: one group subscription stays open while the producers publish and
//! the broker side is faulted, so what a live consumer sees is measured, not only what a fresh
//! one reads back afterwards.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{SubscribeSpec, Subscriber, Subscription};
use futures_util::StreamExt;
use serde::Serialize;

use super::{Row, Size, blocking, ms, settle, setup, spread_load, under_load};
use crate::check::Class;
use crate::record::{self, Read};
use crate::target::Target;

/// How soon after a single broker's restart the live consumer must deliver again: NATS.
const RESUME_WITHIN_MS: u64 = 2_000;

/// The same for a Kafka client. librdkafka retries a lost broker on a back-off that the SDK
/// caps at 2 s (`reconnect.backoff.max.ms`) and jitters by up to +50%, so its next try can
/// come 3 s after the last, and the fetch comes on top. On tansu, SDK and raw rdkafka alike
/// resumed 0.3-0.8 s after the restart in most runs and 1.9-2.9 s in about one in seven
/// (2026-12-08; no client error logged after the broker was back).
const KAFKA_RESUME_WITHIN_MS: u64 = 3_500;

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
    /// When the longest pause began, from the fault (negative: before it).
    pub pause_from_ms: i64,
    /// From the moment the broker side could serve again (the restart returned) to the live
    /// consumer's next delivery.
    pub resume_ms: Option<u64>,
}

/// Which client the live consumer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// The SDK's group subscription.
    Sdk,
    /// The raw client with no SDK ([`crate::raw::nats_reads`], [`crate::raw::kafka_reads`]).
    Raw,
}

/// What the live consumer reads from.
enum Source {
    Sdk(Subscription),
    Raw(crate::raw::Reads),
}

impl Source {
    async fn open<T: Target>(
        t: &T,
        reader: Reader,
        run: &str,
        filter: &str,
    ) -> Result<Self, String> {
        match reader {
            Reader::Sdk => {
                let sub = t
                    .live_subscriber()
                    .await
                    .map_err(|e| format!("live subscriber: {e}"))?;
                let s = sub
                    .subscribe(SubscribeSpec::new(filter).group("live").prefetch(256))
                    .await
                    .map_err(|e| format!("live subscribe: {e}"))?;
                Ok(Source::Sdk(s))
            }
            Reader::Raw => Ok(Source::Raw(t.raw_reads(run, filter).await?)),
        }
    }

    /// The next delivery, logged when it arrives and then acked; `Some(Err)` for an error the
    /// client reported, `None` when the stream ended.
    async fn next(&mut self, log: &Log) -> Option<Result<(), String>> {
        match self {
            Source::Sdk(s) => match s.next().await? {
                Ok(d) => {
                    if let Some(r) = record::read_delivery(&d) {
                        log.lock().push((r, Instant::now()));
                    }
                    let _ = d.ack().await;
                    Some(Ok(()))
                }
                Err(e) => Some(Err(e.to_string())),
            },
            Source::Raw(r) => Some(r.next().await?.map(|read| {
                if let Some(read) = read {
                    log.lock().push((read, Instant::now()));
                }
            })),
        }
    }

    async fn close(self) {
        if let Source::Sdk(s) = self {
            s.close().await;
        }
    }
}

type Log = Arc<parking_lot::Mutex<Vec<(Read, Instant)>>>;

/// The live consumer: reading and acking in a task of its own.
struct Live {
    seen: Log,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Live {
    async fn start<T: Target>(
        t: &T,
        reader: Reader,
        run: &str,
        filter: &str,
    ) -> Result<Live, String> {
        let mut source = Source::open(t, reader, run, filter).await?;
        let seen: Log = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    d = source.next(&log) => match d {
                        Some(Ok(())) => {}
                        // A fault shows as errors on the stream; the subscription goes on.
                        Some(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                        None => break,
                    },
                }
            }
            source.close().await;
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

/// When the fault began and when the broker side could serve the live consumer again.
pub struct Fault {
    /// The fault began.
    pub down: Instant,
    /// The broker side could serve the live consumer again (restart returned, blackhole
    /// lifted, new leader elected on the consumer's side of a partition).
    pub serving: Instant,
    /// What happened, for the row's notes.
    pub note: String,
    /// The fault or its repair went wrong.
    pub failure: Option<String>,
}

/// The shape every consumer row shares: 5 producers publish a paced load (2,000 each, 600
/// quick) while the live consumer (`reader`) reads in group `live`, and `fault` runs; then
/// unknown outcomes are retried, the run is drained and checked, and the live consumer is given
/// 60 s to catch up with everything acked. Asserts missing 0 and a resume; on a single broker
/// also a resume within [`RESUME_WITHIN_MS`] of the broker serving again.
async fn consume_through<T: Target>(
    t: &mut T,
    scenario: &str,
    reader: Reader,
    size: Size,
    fault: impl AsyncFnOnce(&mut T) -> Fault,
) -> Row {
    let mut row = Row::new(scenario, t.name());
    if reader == Reader::Raw {
        row.backend = format!("{}-raw", t.name());
    }
    let cfg = eventbus_batch::BatchConfig::default().ack_timeout(t.kill_deadline());
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "consume", 5, cfg).await);
    let live = try_setup!(row, Live::start(t, reader, &run, &filter).await);
    let per = if size.quick { 600 } else { 2_000 };
    let load = spread_load(run, topics, per, 160);
    let (f, ledger) = under_load(&p, &load, &mut row, fault(t)).await;
    let load_end = Instant::now();
    if let Some(e) = f.failure {
        row.failures.push(e);
    }
    settle(t, &p, &load, &filter, &ledger, &mut row).await;
    // Let the live consumer catch up with everything acked (retries of unknowns included).
    let acked: HashSet<record::Key> = ledger.keys(Class::Acked).into_iter().collect();
    // 60 s: a NATS cluster's live consumer stalled up to 26 s after its node's kill.
    let until = Instant::now() + Duration::from_secs(60);
    while !acked.is_subset(&live.distinct()) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = live.stop().await;
    let c = figures(&seen, &acked, (f.down, f.serving, load_end));
    row.notes.push(f.note);
    row.notes.push(format!(
        "live consumer ({}): {} deliveries, {} missing, {} duplicates, longest pause {} ms (from {} ms after the fault), delivered again {} ms after the broker side could serve",
        if reader == Reader::Raw { "raw client" } else { "SDK" },
        seen.len(),
        c.missing,
        c.duplicates,
        c.longest_pause_ms,
        c.pause_from_ms,
        opt_ms(c.resume_ms),
    ));
    row.require(
        c.missing == 0,
        format!("the live consumer never got {} acked messages", c.missing),
    );
    row.require(
        c.resume_ms.is_some(),
        "the live consumer delivered nothing after the fault",
    );
    // A single broker serves again once restarted or reachable; a cluster only after the
    // elections the fault caused (the stream's and the consumer's), which the figure includes
    // (reported, not asserted).
    if t.broker().nodes() == 1 && reader == Reader::Sdk {
        let goal = match t.broker().protocol() {
            eventbus_brokers::Protocol::Kafka => KAFKA_RESUME_WITHIN_MS,
            _ => RESUME_WITHIN_MS,
        };
        row.require(
            c.resume_ms.is_some_and(|m| m <= goal),
            format!(
                "deliveries resumed {} ms after the broker side could serve (goal {goal} ms)",
                opt_ms(c.resume_ms)
            ),
        );
    }
    row.recover_ms = c.resume_ms;
    row.consumer = Some(c);
    row
}

/// The broker side killed (-9) and restarted once while the live consumer reads: nothing acked
/// may be missing from what it delivered, and deliveries must resume soon after the restart.
/// Single node: the broker; a NATS cluster: the stream's leader (or as aimed); a Kafka
/// cluster: the broker the client uses.
pub async fn consume_kill<T: Target>(t: &mut T, size: Size, reader: Reader) -> Row {
    consume_through(t, "consume-kill", reader, size, async |t: &mut T| {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        t.kill();
        let down = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = blocking(|| t.restart()).await;
        let serving = Instant::now();
        Fault {
            down,
            serving,
            note: format!(
                "node n{} down {} ms",
                t.last_fault_node(),
                ms(serving - down)
            ),
            failure: r.err().map(|e| format!("restart failed: {e}")),
        }
    })
    .await
}

/// Every connection through the proxy (the live consumer's and the producers') blackholed:
/// nothing forwarded, nothing closed, for 3 s (quick) / 10 s; then the connections are reset and
/// the proxy passes again. Needs a target started with a proxy.
pub async fn consume_blackhole<T: Target>(t: &mut T, size: Size, reader: Reader) -> Row {
    use crate::proxy::Mode;
    if t.proxy().is_none() {
        let mut row = Row::new("consume-blackhole", t.name());
        row.failures.push("no proxy".into());
        return row;
    }
    let hold = Duration::from_secs(if size.quick { 3 } else { 10 });
    consume_through(t, "consume-blackhole", reader, size, async |t: &mut T| {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let proxy = t.proxy().expect("checked above");
        proxy.set(Mode::Hold);
        let down = Instant::now();
        tokio::time::sleep(hold).await;
        proxy.reset();
        proxy.set(Mode::Pass);
        Fault {
            down,
            serving: Instant::now(),
            note: format!("blackholed {} ms, then every connection reset", ms(hold)),
            failure: None,
        }
    })
    .await
}

/// NATS cluster (route proxies): the stream's leader cut off from the other two for 10 s (5 s
/// quick) while the live consumer reads. The broker side can serve again once the majority has
/// elected a new leader, if the live consumer is attached to the majority; else when the
/// partition heals.
#[cfg(feature = "nats")]
pub async fn consume_partition(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    size: Size,
    reader: Reader,
) -> Row {
    let hold = Duration::from_secs(if size.quick { 5 } else { 10 });
    consume_through(t, "consume-partition", reader, size, async |t: &mut _| {
        let t: &mut crate::target::nats_cluster::NatsCluster3 = t;
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let victim = t.choose_victim();
        let consumer_node = t.subscriber_node();
        let down = Instant::now();
        let cut = t.partition(victim);
        let elected = t.wait_for_leader(Some(victim), hold).await;
        let elected_at = Instant::now();
        tokio::time::sleep(hold.saturating_sub(down.elapsed())).await;
        t.heal(victim);
        let healed = Instant::now();
        let majority_side = consumer_node.is_some_and(|n| n != victim) && elected.is_some();
        let node = |n: Option<usize>| n.map_or("none".to_owned(), |n| format!("n{n}"));
        Fault {
            down,
            serving: if majority_side {
                elected_at
            } else {
                healed
            },
            note: format!(
                "stream leader n{victim} cut off for {} s; the live consumer was attached to {}; new leader {} after {} ms; resume measured from the {}",
                hold.as_secs(),
                node(consumer_node),
                node(elected),
                ms(elected_at - down),
                if majority_side { "election" } else { "heal" },
            ),
            failure: (!cut).then(|| "the cluster has no route proxies to cut".to_owned()),
        }
    })
    .await
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
    let (longest_pause, pause_from) = times
        .windows(2)
        .filter(|w| w[0] < load_end || w[0] <= down)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or((Duration::ZERO, down));
    ConsumerFigures {
        missing: acked.difference(&distinct).count() as u64,
        duplicates: (seen.len() - distinct.len()) as u64,
        longest_pause_ms: ms(longest_pause),
        pause_from_ms: if pause_from >= down {
            ms(pause_from - down) as i64
        } else {
            -(ms(down - pause_from) as i64)
        },
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
            stored_at: None,
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
        assert_eq!(
            c.pause_from_ms, -50,
            "the pause began 50 ms before the fault"
        );
        assert_eq!(c.resume_ms, Some(2_100));
    }
}
