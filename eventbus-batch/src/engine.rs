//! The batching engine.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use eventbus_core::spi::AckSender;
use eventbus_core::{
    BatchSink, CloseReport, Error, ErrorKind, Message, Outcome, PendingAck, Publisher,
};
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{BatchConfig, OnFull};
use crate::metrics::{EngineMetrics, Trigger};

/// A batching [`Publisher`] over any [`BatchSink`].
///
/// Cloning is cheap; clones share one engine. The engine keeps running while any clone is alive
/// and, after the last one is dropped, still sends and resolves everything already admitted.
/// [`Publisher::close`] is the way to wait for that.
///
/// Must be created inside a Tokio runtime (it spawns one flusher task).
pub struct Batcher<S: BatchSink> {
    inner: Arc<Inner<S>>,
    _handle: Arc<HandleGuard<S>>,
}

impl<S: BatchSink> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Batcher {
            inner: Arc::clone(&self.inner),
            _handle: Arc::clone(&self._handle),
        }
    }
}

impl<S: BatchSink> std::fmt::Debug for Batcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("backend", &self.inner.sink.name())
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// A snapshot of the engine's window use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowStats {
    /// Messages admitted and not yet resolved.
    pub in_flight: usize,
    /// Bytes admitted and not yet resolved.
    pub in_flight_bytes: usize,
    /// Messages admitted and waiting for their batch to be sent.
    pub queued: usize,
    /// Batches sent and not yet resolved.
    pub batches_in_flight: usize,
}

/// What a [`BacklogWatch`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BacklogEvent {
    /// The backlog reached the threshold.
    Above(WindowStats),
    /// The backlog fell below the threshold again.
    Below(WindowStats),
}

/// A running [`Batcher::watch_backlog`]; stops when dropped.
#[derive(Debug)]
pub struct BacklogWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BacklogWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct HandleGuard<S: BatchSink> {
    inner: Arc<Inner<S>>,
}

impl<S: BatchSink> Drop for HandleGuard<S> {
    fn drop(&mut self) {
        // The last user handle is gone: flush what is queued, then let the flusher exit.
        self.inner.acc.lock().draining = true;
        self.inner.wake.notify_one();
    }
}

struct Entry {
    msg: Message,
    tx: AckSender,
    bytes: u32,
    /// Wall-clock admission time (std, not tokio: read once per message, it must be cheap).
    admitted: std::time::Instant,
}

#[derive(Default)]
struct Acc {
    items: Vec<Entry>,
    bytes: usize,
    /// Sequence number of `items[0]`; sequence numbers are given at admission.
    front_seq: u64,
    /// When `items[0]` was admitted, on the (pausable) Tokio clock: the linger start.
    first_at: Option<Instant>,
    next_seq: u64,
    /// `flush()`/`close()` asked for everything queued to go now.
    force: bool,
    /// A publisher found the ACK window full: send what is queued now instead of lingering.
    window_full: bool,
    /// No more admissions (closed); flusher exits when empty.
    closed: bool,
    /// All handles dropped: flush everything, then exit.
    draining: bool,
}

struct InflightBatch {
    count: usize,
    abort: Option<AbortHandle>,
}

struct Inner<S: BatchSink> {
    sink: S,
    cfg: BatchConfig,
    window_msgs: Semaphore,
    window_bytes: Semaphore,
    batch_slots: Arc<Semaphore>,
    acc: Mutex<Acc>,
    wake: Notify,
    /// Batches in flight, by the sequence number of their first message.
    inflight: Mutex<BTreeMap<u64, InflightBatch>>,
    progress: Notify,
    closed: AtomicBool,
    unresolved_at_close: AtomicU64,
    metrics: EngineMetrics,
}

impl<S: BatchSink> Inner<S> {
    fn stats(&self) -> WindowStats {
        WindowStats {
            in_flight: self.cfg.max_in_flight - self.window_msgs.available_permits(),
            in_flight_bytes: self.cfg.max_in_flight_bytes - self.window_bytes.available_permits(),
            queued: self.acc.lock().items.len(),
            batches_in_flight: self.inflight.lock().len(),
        }
    }
}

impl<S: BatchSink> Batcher<S> {
    /// Start an engine over `sink`. Fails with [`ErrorKind::Config`] on an invalid config.
    pub fn new(sink: S, config: BatchConfig) -> Result<Self, Error> {
        let cfg = config
            .resolve(&sink.limits())
            .map_err(|e| e.with_backend(sink.name()))?;
        let metrics = EngineMetrics::new(sink.name());
        let inner = Arc::new(Inner {
            window_msgs: Semaphore::new(cfg.max_in_flight),
            window_bytes: Semaphore::new(cfg.max_in_flight_bytes),
            batch_slots: Arc::new(Semaphore::new(cfg.max_in_flight_batches)),
            acc: Mutex::new(Acc::default()),
            wake: Notify::new(),
            inflight: Mutex::new(BTreeMap::new()),
            progress: Notify::new(),
            closed: AtomicBool::new(false),
            unresolved_at_close: AtomicU64::new(0),
            metrics,
            sink,
            cfg,
        });
        tokio::spawn(flusher(Arc::clone(&inner)));
        Ok(Batcher {
            _handle: Arc::new(HandleGuard {
                inner: Arc::clone(&inner),
            }),
            inner,
        })
    }

    /// The effective configuration (after clamping to the backend's limits).
    pub fn config(&self) -> &BatchConfig {
        &self.inner.cfg
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.inner.sink
    }

    /// Current window use.
    pub fn stats(&self) -> WindowStats {
        self.inner.stats()
    }

    /// Watch the publisher's backlog (messages admitted and not yet resolved): every `every`,
    /// compare [`WindowStats::in_flight`] with `threshold` and call `on_event` when it crosses
    /// it either way (the first reading at or above it counts as a crossing). Use it to shed
    /// load or alert before [`OnFull`](crate::OnFull) makes `publish` wait or fail. The watch
    /// does not keep the engine alive; it stops when dropped or when the engine is gone.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use eventbus_batch::{BacklogEvent, BatchConfig, Batcher};
    /// let bus = eventbus_memory::MemoryBroker::new();
    /// let publisher = Batcher::new(eventbus_memory::MemorySink::new(&bus), BatchConfig::default()).unwrap();
    /// let _watch = publisher.watch_backlog(Duration::from_millis(100), 5_000, |e| match e {
    ///     BacklogEvent::Above(s) => eprintln!("publisher backlog high: {} in flight", s.in_flight),
    ///     BacklogEvent::Below(s) => eprintln!("publisher backlog back to {}", s.in_flight),
    ///     _ => {}
    /// });
    /// # }
    /// ```
    pub fn watch_backlog<F>(
        &self,
        every: Duration,
        threshold: usize,
        mut on_event: F,
    ) -> BacklogWatch
    where
        F: FnMut(BacklogEvent) + Send + 'static,
    {
        let weak = Arc::downgrade(&self.inner);
        let every = every.max(Duration::from_millis(1));
        let task = tokio::spawn(async move {
            let mut crossing = eventbus_core::ops::Crossing::default();
            loop {
                let Some(inner) = weak.upgrade() else { break };
                let stats = inner.stats();
                drop(inner);
                match crossing.update(stats.in_flight >= threshold) {
                    Some(true) => on_event(BacklogEvent::Above(stats)),
                    Some(false) => on_event(BacklogEvent::Below(stats)),
                    None => {}
                }
                tokio::time::sleep(every).await;
            }
        });
        BacklogWatch { task }
    }

    async fn admit(&self, bytes: u32) -> Result<(), Error> {
        let i = &self.inner;
        let closed = |_: tokio::sync::AcquireError| {
            Error::closed("publisher is closed").with_backend(i.sink.name())
        };
        let overloaded = || {
            i.metrics.overloaded.increment(1);
            Error::new(ErrorKind::Overloaded, "ACK window full").with_backend(i.sink.name())
        };
        match i.cfg.on_full {
            OnFull::Error => {
                let m = i.window_msgs.try_acquire().map_err(|e| match e {
                    tokio::sync::TryAcquireError::Closed => {
                        Error::closed("publisher is closed").with_backend(i.sink.name())
                    }
                    tokio::sync::TryAcquireError::NoPermits => overloaded(),
                })?;
                let b = i
                    .window_bytes
                    .try_acquire_many(bytes)
                    .map_err(|e| match e {
                        tokio::sync::TryAcquireError::Closed => {
                            Error::closed("publisher is closed").with_backend(i.sink.name())
                        }
                        tokio::sync::TryAcquireError::NoPermits => overloaded(),
                    })?;
                m.forget();
                b.forget();
            }
            OnFull::Wait => {
                let m = match i.window_msgs.try_acquire() {
                    Ok(m) => m,
                    Err(_) => {
                        self.window_is_full();
                        i.window_msgs.acquire().await.map_err(closed)?
                    }
                };
                let b = match i.window_bytes.try_acquire_many(bytes) {
                    Ok(b) => b,
                    Err(_) => {
                        self.window_is_full();
                        i.window_bytes.acquire_many(bytes).await.map_err(closed)?
                    }
                };
                m.forget();
                b.forget();
            }
            OnFull::WaitFor(limit) => {
                if i.window_msgs.available_permits() == 0
                    || i.window_bytes.available_permits() < bytes as usize
                {
                    self.window_is_full();
                }
                let got = tokio::time::timeout(limit, async {
                    let m = i.window_msgs.acquire().await.map_err(closed)?;
                    let b = i.window_bytes.acquire_many(bytes).await.map_err(closed)?;
                    Ok::<_, Error>((m, b))
                })
                .await
                .map_err(|_| overloaded())??;
                got.0.forget();
                got.1.forget();
            }
        }
        Ok(())
    }

    /// Tell the flusher that admissions are blocked: lingering can only add latency now.
    fn window_is_full(&self) {
        let queued = {
            let mut acc = self.inner.acc.lock();
            acc.window_full = true;
            !acc.items.is_empty()
        };
        if queued {
            self.inner.wake.notify_one();
        }
    }

    fn release(&self, bytes: u32) {
        self.inner.window_msgs.add_permits(1);
        self.inner.window_bytes.add_permits(bytes as usize);
    }

    async fn publish_inner(&self, msg: Message) -> Result<PendingAck, Error> {
        let i = &self.inner;
        if i.closed.load(Ordering::Acquire) {
            return Err(Error::closed("publisher is closed").with_backend(i.sink.name()));
        }
        if let Err(e) = i.sink.validate(&msg) {
            i.metrics.invalid.increment(1);
            return Err(e.with_backend(i.sink.name()));
        }
        let bytes = msg.encoded_len().min(i.cfg.max_in_flight_bytes) as u32;
        self.admit(bytes).await?;
        // From here on nothing awaits: the message is either queued or its permits released.
        let (tx, pending) = PendingAck::channel();
        let entry = Entry {
            msg,
            tx,
            bytes,
            admitted: std::time::Instant::now(),
        };
        let wake = {
            let mut acc = i.acc.lock();
            if acc.closed {
                drop(acc);
                self.release(bytes);
                return Err(Error::closed("publisher is closed").with_backend(i.sink.name()));
            }
            let was_empty = acc.items.is_empty();
            if was_empty {
                acc.front_seq = acc.next_seq;
                acc.first_at = (!i.cfg.linger.is_zero()).then(Instant::now);
            }
            acc.next_seq += 1;
            acc.bytes += bytes as usize;
            acc.items.push(entry);
            was_empty
                || acc.items.len() == i.cfg.max_messages
                || (acc.bytes >= i.cfg.max_bytes && acc.bytes - (bytes as usize) < i.cfg.max_bytes)
        };
        if wake {
            i.wake.notify_one();
        }
        Ok(pending)
    }

    /// Resolves once every message with a sequence number below `target` has an outcome.
    async fn resolved_below(&self, target: u64) {
        let i = &self.inner;
        loop {
            let notified = i.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if i.low_watermark() >= target {
                return;
            }
            notified.await;
        }
    }

    fn request_flush(&self) -> u64 {
        let target = {
            let mut acc = self.inner.acc.lock();
            acc.force = true;
            acc.next_seq
        };
        self.inner.wake.notify_one();
        target
    }

    async fn flush_inner(&self) -> Result<(), Error> {
        let target = self.request_flush();
        self.resolved_below(target).await;
        Ok(())
    }

    async fn close_inner(&self, deadline: Duration) -> Result<CloseReport, Error> {
        let i = &self.inner;
        let first = !i.closed.swap(true, Ordering::AcqRel);
        let target = {
            let mut acc = i.acc.lock();
            acc.closed = true;
            acc.force = true;
            acc.next_seq
        };
        // Wake publishers waiting for window room: they get `Closed`.
        i.window_msgs.close();
        i.window_bytes.close();
        i.wake.notify_one();
        let until = Instant::now() + deadline;
        if tokio::time::timeout_at(until, self.resolved_below(target))
            .await
            .is_err()
        {
            let mut unresolved = 0u64;
            // Never sent: definitely not stored.
            let leftovers = std::mem::take(&mut i.acc.lock().items);
            for e in leftovers {
                unresolved += 1;
                e.tx.send(Outcome::Failed(
                    Error::closed("publisher closed before the message was sent")
                        .with_backend(i.sink.name()),
                ));
                self.release(e.bytes);
            }
            // Sent, outcome unknown: abort; each batch's guard resolves its messages as unknown.
            for b in i.inflight.lock().values() {
                unresolved += b.count as u64;
                if let Some(a) = &b.abort {
                    a.abort();
                }
            }
            i.unresolved_at_close
                .fetch_add(unresolved, Ordering::Relaxed);
            i.progress.notify_waiters();
            tracing::warn!(
                backend = i.sink.name(),
                unresolved,
                "close deadline passed with messages unresolved"
            );
        }
        // `closed.swap` above makes exactly one close call the first: the sink closes once.
        if first {
            let _ = tokio::time::timeout_at(until, i.sink.close()).await;
        }
        Ok(CloseReport::new(
            i.unresolved_at_close.load(Ordering::Relaxed),
        ))
    }
}

impl<S: BatchSink> Inner<S> {
    /// The lowest sequence number without an outcome (or `next_seq` when all are resolved).
    fn low_watermark(&self) -> u64 {
        let acc = self.acc.lock();
        let mut low = if acc.items.is_empty() {
            acc.next_seq
        } else {
            acc.front_seq
        };
        if let Some((&first, _)) = self.inflight.lock().iter().next() {
            low = low.min(first);
        }
        low
    }
}

impl<S: BatchSink> Publisher for Batcher<S> {
    fn publish(&self, msg: Message) -> impl Future<Output = Result<PendingAck, Error>> + Send {
        let span = tracing::trace_span!(
            "eventbus.publish",
            backend = self.inner.sink.name(),
            id = %msg.id(),
            topic = %msg.topic()
        );
        tracing::Instrument::instrument(self.publish_inner(msg), span)
    }

    fn flush(&self) -> impl Future<Output = Result<(), Error>> + Send {
        self.flush_inner()
    }

    fn close(&self, deadline: Duration) -> impl Future<Output = Result<CloseReport, Error>> + Send {
        self.close_inner(deadline)
    }
}

/// Takes batches off the accumulator and dispatches them, in admission order.
async fn flusher<S: BatchSink>(inner: Arc<Inner<S>>) {
    let cfg = &inner.cfg;
    loop {
        // Limit batches in flight; while we wait here, the next batch keeps filling.
        let slot = match Arc::clone(&inner.batch_slots).acquire_owned().await {
            Ok(s) => s,
            Err(_) => return,
        };
        // Wait until a batch is due.
        let (batch, bytes, first_seq, trigger) = loop {
            let deadline = {
                let mut acc = inner.acc.lock();
                if acc.items.is_empty() {
                    acc.force = false;
                    acc.window_full = false;
                    if acc.closed || acc.draining {
                        // Nothing queued and no handle left that could queue more.
                        return;
                    }
                    None
                } else {
                    let first = acc.first_at.unwrap_or_else(Instant::now);
                    let full_count = acc.items.len() >= cfg.max_messages;
                    let full_bytes = acc.bytes >= cfg.max_bytes;
                    let due = first + cfg.linger;
                    let now = Instant::now();
                    let trigger = if full_count {
                        Some(Trigger::Count)
                    } else if full_bytes {
                        Some(Trigger::Bytes)
                    } else if acc.force || acc.closed || acc.draining {
                        Some(Trigger::Flush)
                    } else if cfg.linger.is_zero() {
                        Some(Trigger::Immediate)
                    } else if acc.window_full {
                        acc.window_full = false;
                        Some(Trigger::Window)
                    } else if due <= now {
                        Some(Trigger::Linger)
                    } else {
                        None
                    };
                    match trigger {
                        Some(t) => {
                            let (b, bytes, seq) =
                                take_batch(&mut acc, cfg.max_messages, cfg.max_bytes);
                            // Registered under the accumulator lock, so `low_watermark` never
                            // sees these messages as resolved.
                            inner.inflight.lock().insert(
                                seq,
                                InflightBatch {
                                    count: b.len(),
                                    abort: None,
                                },
                            );
                            break (b, bytes, seq, t);
                        }
                        None => Some(due),
                    }
                }
            };
            match deadline {
                Some(d) => {
                    tokio::select! {
                        _ = inner.wake.notified() => {}
                        _ = tokio::time::sleep_until(d) => {}
                    }
                }
                None => inner.wake.notified().await,
            }
        };
        dispatch(&inner, batch, bytes, first_seq, trigger, slot);
    }
}

fn take_batch(acc: &mut Acc, max_messages: usize, max_bytes: usize) -> (Vec<Entry>, usize, u64) {
    let mut n = 0;
    let mut bytes = 0usize;
    for e in &acc.items {
        if n == max_messages || (n > 0 && bytes + e.bytes as usize > max_bytes) {
            break;
        }
        n += 1;
        bytes += e.bytes as usize;
    }
    let first_seq = acc.front_seq;
    let batch: Vec<Entry> = if n == acc.items.len() {
        std::mem::take(&mut acc.items)
    } else {
        acc.items.drain(..n).collect()
    };
    acc.front_seq += n as u64;
    acc.bytes -= bytes;
    (batch, bytes, first_seq)
}

/// Resolves a batch's messages exactly once, releases its window permits and batch slot, even
/// when the batch task is aborted or panics.
struct BatchGuard<S: BatchSink> {
    inner: Arc<Inner<S>>,
    txs: Vec<(AckSender, std::time::Instant)>,
    count: usize,
    released: bool,
    bytes: usize,
    first_seq: u64,
    _slot: OwnedSemaphorePermit,
}

impl<S: BatchSink> BatchGuard<S> {
    /// Return the batch's window slots. Done before the outcomes are delivered, so a caller
    /// that has awaited an ack never sees that message's slot still taken.
    fn release_window(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        self.inner.window_msgs.add_permits(self.count);
        self.inner.window_bytes.add_permits(self.bytes);
        self.inner.metrics.in_flight.decrement(self.count as f64);
    }

    fn resolve(&mut self, outcomes: Vec<Outcome>) {
        self.release_window();
        let m = &self.inner.metrics;
        let now = std::time::Instant::now();
        let (mut acked, mut failed, mut unknown) = (0u64, 0u64, 0u64);
        for ((tx, admitted), o) in self.txs.drain(..).zip(outcomes) {
            match &o {
                Outcome::Acked(_) => acked += 1,
                Outcome::Failed(_) => failed += 1,
                Outcome::Unknown(_) => unknown += 1,
            }
            m.ack_latency
                .record(now.duration_since(admitted).as_secs_f64());
            tx.send(o);
        }
        m.acked.increment(acked);
        m.failed.increment(failed);
        m.unknown.increment(unknown);
        tracing::debug!(acked, failed, unknown, "eventbus.ack");
    }

    fn resolve_all(&mut self, o: Outcome) {
        let n = self.txs.len();
        self.resolve(std::iter::repeat_n(o, n).collect());
    }
}

impl<S: BatchSink> Drop for BatchGuard<S> {
    fn drop(&mut self) {
        if !self.txs.is_empty() {
            let e = Error::new(
                ErrorKind::Closed,
                "batch cancelled while in flight (publisher closed)",
            )
            .with_backend(self.inner.sink.name());
            self.resolve_all(Outcome::Unknown(e));
        }
        self.release_window();
        // Last: `flush` waiters see the batch done only after its outcomes were delivered.
        self.inner.inflight.lock().remove(&self.first_seq);
        self.inner.progress.notify_waiters();
    }
}

fn dispatch<S: BatchSink>(
    inner: &Arc<Inner<S>>,
    batch: Vec<Entry>,
    bytes: usize,
    first_seq: u64,
    trigger: Trigger,
    slot: OwnedSemaphorePermit,
) {
    let n = batch.len();
    let m = &inner.metrics;
    m.batches(trigger).increment(1);
    m.batch_messages.record(n as f64);
    m.batch_bytes.record(bytes as f64);
    m.in_flight.increment(n as f64);
    // The deadline counts from the first message's admission.
    let deadline = Instant::now()
        + inner
            .cfg
            .ack_timeout
            .saturating_sub(batch[0].admitted.elapsed());
    let mut msgs = Vec::with_capacity(n);
    let mut txs = Vec::with_capacity(n);
    for e in batch {
        msgs.push(e.msg);
        txs.push((e.tx, e.admitted));
    }
    // Called here, in the flusher, so batches reach the sink in admission order.
    let fut = inner.sink.send_batch(msgs);
    let mut guard = BatchGuard {
        inner: Arc::clone(inner),
        txs,
        count: n,
        released: false,
        bytes,
        first_seq,
        _slot: slot,
    };
    let backend = inner.sink.name();
    let span = tracing::debug_span!(
        "eventbus.flush",
        backend,
        messages = n,
        bytes,
        trigger = trigger.label()
    );
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(outcomes) if outcomes.len() == n => guard.resolve(outcomes),
                Ok(outcomes) => {
                    tracing::error!(
                        backend,
                        expected = n,
                        got = outcomes.len(),
                        "sink broke the batch contract"
                    );
                    guard.resolve_all(Outcome::Unknown(
                        Error::new(
                            ErrorKind::Contract,
                            format!("sink returned {} outcomes for {n} messages", outcomes.len()),
                        )
                        .with_backend(backend),
                    ));
                }
                Err(_) => guard.resolve_all(Outcome::Unknown(
                    Error::new(
                        ErrorKind::Timeout,
                        "no ack before the deadline; the message may be stored",
                    )
                    .with_backend(backend),
                )),
            }
        },
        span,
    ));
    if let Some(b) = inner.inflight.lock().get_mut(&first_seq) {
        b.abort = Some(task.abort_handle());
    }
}
