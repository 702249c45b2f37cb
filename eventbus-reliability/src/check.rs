//! The ledger of publish outcomes, the load driver that fills it, the drain that reads back what
//! the broker holds, and the checker that compares the two.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use eventbus_core::{ErrorKind, Outcome, Publisher, SubscribeSpec, Subscriber};
use parking_lot::Mutex;
use serde::Serialize;

use crate::record::{self, Key, Read};

/// Final class of one message's publish outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Class {
    /// Acked by the broker.
    Acked,
    /// Definitely not stored.
    Failed,
    /// May or may not be stored.
    Unknown,
    /// `publish` itself refused the message (window full with `OnFull::Error`, closed, ...).
    Refused,
}

impl Class {
    /// The class of an outcome.
    pub fn of(o: &Outcome) -> Class {
        match o {
            Outcome::Acked(_) => Class::Acked,
            Outcome::Failed(_) => Class::Failed,
            Outcome::Unknown(_) => Class::Unknown,
        }
    }
}

/// Messages admitted and not yet resolved, as seen by the caller, with the peak. Counted by the
/// harness itself (after `publish` returns, until its ack resolves), independent of the engine's
/// own bookkeeping.
#[derive(Debug, Default)]
pub struct Gauge {
    now: AtomicI64,
    peak: AtomicI64,
}

impl Gauge {
    /// One more admitted message.
    pub fn up(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    /// One admitted message resolved.
    pub fn down(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    /// Highest number of unresolved messages seen.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst).max(0) as u64
    }
}

/// One message's record.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Outcome of the latest attempt.
    pub class: Class,
    /// Outcome of the first attempt.
    pub first: Class,
    /// Error kind of the latest non-acked outcome.
    pub kind: Option<ErrorKind>,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    /// When the first attempt was admitted.
    pub admitted: Instant,
    /// When the latest attempt resolved.
    pub resolved: Instant,
}

/// Every message's record, shared by the producer tasks.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    inner: Arc<Mutex<HashMap<Key, Entry>>>,
    /// The first few distinct reasons given for failed (definitely not stored) outcomes.
    reasons: Arc<Mutex<Vec<String>>>,
}

/// Distinct failure reasons kept per ledger.
const MAX_REASONS: usize = 4;

impl Ledger {
    /// Record an attempt's outcome (see [`Ledger::record`]), keeping the reason of a failure.
    pub fn record_outcome(&self, key: Key, admitted: Instant, o: &Outcome) {
        if let Outcome::Failed(e) = o {
            let text = e.to_string();
            let mut r = self.reasons.lock();
            if r.len() < MAX_REASONS && !r.contains(&text) {
                r.push(text);
            }
        }
        self.record(key, admitted, Class::of(o), o.error().map(|e| e.kind()));
    }

    /// The first distinct reasons given for failed outcomes.
    pub fn failure_reasons(&self) -> Vec<String> {
        self.reasons.lock().clone()
    }

    /// Record the outcome of one attempt of `key`, admitted at `admitted`.
    pub fn record(&self, key: Key, admitted: Instant, class: Class, kind: Option<ErrorKind>) {
        let now = Instant::now();
        let mut m = self.inner.lock();
        m.entry(key)
            .and_modify(|e| {
                e.class = class;
                e.kind = kind;
                e.attempts += 1;
                e.resolved = now;
            })
            .or_insert(Entry {
                class,
                first: class,
                kind,
                attempts: 1,
                admitted,
                resolved: now,
            });
    }

    /// A copy of all records.
    pub fn entries(&self) -> HashMap<Key, Entry> {
        self.inner.lock().clone()
    }

    /// Keys whose latest outcome is `class`.
    pub fn keys(&self, class: Class) -> Vec<Key> {
        let mut v: Vec<Key> = self
            .inner
            .lock()
            .iter()
            .filter(|(_, e)| e.class == class)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Longest time from admission to resolution of a first attempt.
    pub fn max_resolve(&self) -> Duration {
        self.inner
            .lock()
            .values()
            .filter(|e| e.attempts == 1)
            .map(|e| e.resolved - e.admitted)
            .max()
            .unwrap_or_default()
    }

    /// Earliest resolution at or after `t` with a class other than Acked (time to detect a fault).
    pub fn first_non_ack_after(&self, t: Instant) -> Option<Duration> {
        self.inner
            .lock()
            .values()
            .filter(|e| e.first != Class::Acked && e.resolved >= t)
            .map(|e| e.resolved - t)
            .min()
    }

    /// Earliest ack of a message admitted at or after `t` (time to recover from a fault).
    pub fn first_ack_admitted_after(&self, t: Instant) -> Option<Duration> {
        self.inner
            .lock()
            .values()
            .filter(|e| e.class == Class::Acked && e.admitted >= t)
            .map(|e| e.resolved - t)
            .min()
    }
}

/// The load: `producers` concurrent tasks, each publishing `per` messages to its topic.
#[derive(Clone, Debug)]
pub struct Load {
    /// Run tag, the prefix of every message id.
    pub run: String,
    /// Topic of producer `i` is `topics[i % topics.len()]`.
    pub topics: Vec<String>,
    /// Concurrent producers.
    pub producers: u32,
    /// Messages per producer.
    pub per: u64,
    /// Payload bytes.
    pub payload: usize,
    /// Sleep `pause` after every `every` messages (spreads the load over the fault script).
    pub pace: Option<(u64, Duration)>,
    /// Stop publishing at this time even if `per` is not reached.
    pub stop_at: Option<Instant>,
}

/// Run `load` through `p`, recording every outcome in `ledger`. Returns when every admitted
/// message has resolved.
pub async fn publish<P>(p: &P, load: &Load, ledger: &Ledger, gauge: &Arc<Gauge>)
where
    P: Publisher + Clone + Send + Sync + 'static,
{
    let mut tasks = Vec::new();
    for producer in 0..load.producers {
        let (p, load, ledger, gauge) = (p.clone(), load.clone(), ledger.clone(), Arc::clone(gauge));
        tasks.push(tokio::spawn(async move {
            let topic = load.topics[producer as usize % load.topics.len()].clone();
            // Acks are awaited on a second task, in order, so publishing never waits on them.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let waiter = {
                let (ledger, gauge) = (ledger.clone(), Arc::clone(&gauge));
                tokio::spawn(async move {
                    while let Some((key, at, ack)) = rx.recv().await {
                        let ack: eventbus_core::PendingAck = ack;
                        let o = ack.await;
                        gauge.down();
                        ledger.record_outcome(key, at, &o);
                    }
                })
            };
            for seq in 0..load.per {
                if load.stop_at.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                let m = record::message(&load.run, &topic, producer, seq, load.payload);
                let at = Instant::now();
                match p.publish(m).await {
                    Ok(ack) => {
                        gauge.up();
                        let _ = tx.send(((producer, seq), at, ack));
                    }
                    Err(e) => ledger.record((producer, seq), at, Class::Refused, Some(e.kind())),
                }
                if let Some((every, pause)) = load.pace
                    && seq % every == every - 1
                {
                    tokio::time::sleep(pause).await;
                }
            }
            drop(tx);
            let _ = waiter.await;
        }));
    }
    for t in tasks {
        t.await.expect("producer task");
    }
}

/// Publish every message whose latest outcome is Unknown again, with the same id, up to
/// `attempts` times each. Returns how many were retried.
pub async fn retry_unknown<P: Publisher>(
    p: &P,
    load: &Load,
    ledger: &Ledger,
    attempts: u32,
) -> usize {
    let mut retried = HashSet::new();
    for _ in 0..attempts {
        let keys = ledger.keys(Class::Unknown);
        if keys.is_empty() {
            break;
        }
        let mut acks = Vec::new();
        for (producer, seq) in keys {
            retried.insert((producer, seq));
            let topic = &load.topics[producer as usize % load.topics.len()];
            let m = record::message(&load.run, topic, producer, seq, load.payload);
            let at = Instant::now();
            match p.publish(m).await {
                Ok(ack) => acks.push(((producer, seq), at, ack)),
                Err(e) => ledger.record((producer, seq), at, Class::Unknown, Some(e.kind())),
            }
        }
        for (key, at, ack) in acks {
            let o = ack.await;
            ledger.record_outcome(key, at, &o);
        }
    }
    retried.len()
}

/// Read everything on `filter` with a fresh, group-less subscription: stop once `expect` test
/// records arrived (the broker's own count, duplicates included, if known), or after `quiet`
/// without a delivery, or `limit`.
pub async fn drain<S: Subscriber>(
    sub: &S,
    filter: &str,
    expect: Option<usize>,
    quiet: Duration,
    limit: Duration,
) -> Result<Vec<Read>, eventbus_core::Error> {
    drain_with(sub, filter, expect, quiet, limit, None).await
}

/// [`drain`], through the consumer's de-duplication layer when `dedup` is given
/// ([`eventbus_core::Subscription::dedup`]): what a consumer of a broker without
/// de-duplication (Kafka) sees. `expect` then counts what is handed over, not what is stored.
pub async fn drain_with<S: Subscriber>(
    sub: &S,
    filter: &str,
    expect: Option<usize>,
    quiet: Duration,
    limit: Duration,
    dedup: Option<eventbus_core::DedupConfig>,
) -> Result<Vec<Read>, eventbus_core::Error> {
    let start = Instant::now();
    // A cluster that has just lost and regained nodes may time out a first lookup: a
    // retryable error is tried again, as a service would.
    let mut s = loop {
        match sub
            .subscribe(
                SubscribeSpec::new(filter)
                    .prefetch(1024)
                    .ack_wait(Duration::from_secs(60)),
            )
            .await
        {
            Ok(s) => break s,
            Err(e) if e.is_retryable() && start.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    };
    if let Some(cfg) = dedup {
        s = s.dedup(cfg);
    }
    let mut reads = Vec::new();
    // The first delivery may take a while (consumer creation, partition assignment).
    let mut wait = quiet.max(Duration::from_secs(15));
    while start.elapsed() < limit {
        // The broker's count includes stored duplicates (Kafka has no de-duplication), so
        // compare it with every read, not only distinct ones.
        if expect.is_some_and(|n| reads.len() >= n) {
            break;
        }
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(wait.min(left), s.next()).await {
            Ok(Some(Ok(d))) => {
                if let Some(r) = record::read_delivery(&d) {
                    reads.push(r);
                }
                d.ack().await?;
                wait = quiet;
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => break,
            // Quiet: done, unless the broker said it holds more. Then keep reading until the
            // limit (a consumer can stall for many seconds after its broker was paused).
            Err(_) if expect.is_none_or(|n| reads.len() >= n) => break,
            Err(_) => wait = quiet.max(Duration::from_secs(20)),
        }
    }
    s.close().await;
    Ok(reads)
}

/// What the checker found. `lost` and `failed_but_stored` must be 0.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    /// Messages attempted.
    pub sent: u64,
    /// Latest outcome Acked.
    pub acked: u64,
    /// Latest outcome Failed.
    pub failed: u64,
    /// Latest outcome Unknown (after retries).
    pub unknown: u64,
    /// Refused by `publish` (never admitted).
    pub refused: u64,
    /// Messages whose first outcome was Unknown and were published again with the same id.
    pub retried: u64,
    /// What the caller saw first: messages whose first outcome was Failed.
    pub first_failed: u64,
    /// What the caller saw first: messages whose first outcome was Unknown.
    pub first_unknown: u64,
    /// Distinct test messages read back.
    pub stored: u64,
    /// Acked but never read back. Must be 0.
    pub lost: u64,
    /// Failed or refused, yet read back. Must be 0.
    pub failed_but_stored: u64,
    /// Reads beyond the first of a message.
    pub duplicates: u64,
    /// Messages stored after a later one of the same producer (in stored order where the reader
    /// reports positions, else in the order read). A producer's keys spread over Kafka
    /// partitions and NATS lanes, so this counts interleaving, not damage.
    pub reorders: u64,
    /// Messages stored after a later one with the same key ([`crate::record::key_of`]): what a
    /// per-key handler would see out of order, on every backend. Must be 0 for the SDK.
    pub key_reorders: u64,
    /// Reads whose payload did not match its hash. Must be 0.
    pub corrupt: u64,
}

/// Compare the ledger with what was read back.
pub fn check(ledger: &Ledger, reads: &[Read], retried: usize) -> Figures {
    let entries = ledger.entries();
    let mut f = Figures {
        sent: entries.len() as u64,
        retried: retried as u64,
        ..Figures::default()
    };
    for e in entries.values() {
        match e.first {
            Class::Failed => f.first_failed += 1,
            Class::Unknown => f.first_unknown += 1,
            Class::Acked | Class::Refused => {}
        }
        match e.class {
            Class::Acked => f.acked += 1,
            Class::Failed => f.failed += 1,
            Class::Unknown => f.unknown += 1,
            Class::Refused => f.refused += 1,
        }
    }
    let mut seen = HashSet::new();
    let mut high: HashMap<u32, u64> = HashMap::new();
    let mut key_high: HashMap<(u32, u64), u64> = HashMap::new();
    // In stored order where the reader reported positions, else in the order read.
    let mut ordered: Vec<&Read> = reads.iter().collect();
    ordered.sort_by_key(|r| r.stored_at);
    for r in ordered {
        if !r.intact {
            f.corrupt += 1;
        }
        if !seen.insert(r.key) {
            f.duplicates += 1;
            continue;
        }
        let h = high.entry(r.key.0).or_insert(0);
        if r.key.1 < *h {
            f.reorders += 1;
        }
        *h = (*h).max(r.key.1);
        let h = key_high.entry(crate::record::key_of(r.key)).or_insert(0);
        if r.key.1 < *h {
            f.key_reorders += 1;
        }
        *h = (*h).max(r.key.1);
    }
    f.stored = seen.len() as u64;
    for (k, e) in &entries {
        let stored = seen.contains(k);
        match e.class {
            Class::Acked if !stored => f.lost += 1,
            Class::Failed | Class::Refused if stored => f.failed_but_stored += 1,
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(class: Class) -> Entry {
        let now = Instant::now();
        Entry {
            class,
            first: class,
            kind: None,
            attempts: 1,
            admitted: now,
            resolved: now,
        }
    }

    #[test]
    fn checker_counts_each_kind_of_damage() {
        let ledger = Ledger::default();
        {
            let mut m = ledger.inner.lock();
            m.insert((0, 0), entry(Class::Acked));
            m.insert((0, 1), entry(Class::Acked)); // never read: lost
            m.insert((0, 2), entry(Class::Failed)); // read: failed but stored
            m.insert((0, 3), entry(Class::Acked));
            m.insert((1, 0), entry(Class::Unknown));
        }
        let r = |p, s, intact| Read {
            key: (p, s),
            intact,
            stored_at: None,
        };
        let reads = [
            r(0, 0, true),
            r(0, 3, true),
            r(0, 2, true),  // after 3: a reorder
            r(0, 0, true),  // duplicate
            r(1, 0, false), // corrupt
            r(1, 64 + 1, true),
            r(1, 1, true), // after 65, the same key: a reorder of both kinds
        ];
        let f = check(&ledger, &reads, 1);
        assert_eq!((f.sent, f.acked, f.failed, f.unknown), (5, 3, 1, 1));
        assert_eq!(f.lost, 1);
        assert_eq!(f.failed_but_stored, 1);
        assert_eq!(f.duplicates, 1);
        // (0, 2) after (0, 3): another key of the same producer; (1, 1) after (1, 65): the same key.
        assert_eq!(f.reorders, 2);
        assert_eq!(f.key_reorders, 1);
        assert_eq!(f.corrupt, 1);
        assert_eq!(f.stored, 6);
    }

    #[test]
    fn order_is_judged_by_where_messages_are_stored() {
        let r = |s, at| Read {
            key: (0, s),
            intact: true,
            stored_at: Some((0, at)),
        };
        // Stored in order; the reader got message 1 late (a redelivery): not a reorder.
        let late = check(&Ledger::default(), &[r(0, 1), r(2, 3), r(1, 2)], 0);
        assert_eq!((late.reorders, late.key_reorders), (0, 0));
        // Message 1 stored after message 65 (the same key): a reorder, however it was read.
        let stored = check(&Ledger::default(), &[r(1, 9), r(65, 5)], 0);
        assert_eq!((stored.reorders, stored.key_reorders), (1, 1));
    }
}
