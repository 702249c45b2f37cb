//! Exactly-once consume-transform-produce in Kafka transactions.
//!
//! A [`TxnProcessor`] reads its input topics in a consumer group, hands each record to a handler
//! that returns the messages to produce, and commits, per batch, the outputs **and** the input
//! offsets in one Kafka transaction (`send_offsets_to_transaction` with the consumer's group
//! metadata, KIP-447). Consumers that read the outputs with `isolation.level=read_committed`
//! (librdkafka's default, and every eventbus subscriber's) see each batch's outputs once or not
//! at all, whatever happens to the processor.
//!
//! - **A failed commit** (a broker error, a rebalance during the batch) aborts the transaction
//!   and rewinds every partition of the batch to its committed offset; the batch is read and
//!   handled again.
//! - **A handler error** commits the batch's handled prefix, rewinds the rest and retries the
//!   failed record after a back-off. A [`HandlerError::permanent`] error, or
//!   [`TxnSpec::max_attempts`] failures of one record, moves the record to the
//!   [`TxnSpec::dead_letter`] topic **inside** the transaction (the same headers as the
//!   subscriber's dead letters); without a dead-letter topic [`TxnProcessor::run`] returns the
//!   error, so a poison record stops the processor instead of being skipped.
//! - **A zombie cannot write**: a second processor with the same transactional id fences the
//!   first (its open transaction is aborted by the broker and its next commit fails with
//!   [`ErrorKind::Fenced`]). Give each processor instance a stable id of its own (`orders-0`,
//!   `orders-1`, ... or the pod name); the group spreads the partitions over the instances.
//!
//! The handler's effects outside Kafka are not part of the transaction: for a database, use the
//! inbox of `eventbus-outbox` instead.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::handler::HandlerError;
use eventbus_core::{Error, ErrorKind, Message, Position, Topic, dead_letter, validate};
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::error::{err, other};

/// What a [`TxnProcessor`] reads, how it batches and what it does with records that fail.
#[derive(Clone, Debug)]
pub struct TxnSpec {
    group: String,
    topics: Vec<String>,
    transactional_id: String,
    max_batch: usize,
    linger: Duration,
    max_attempts: u32,
    dead_letter: Option<Topic>,
    transaction_timeout: Duration,
}

impl TxnSpec {
    /// Read `topics` as consumer group `group`, producing under `transactional_id`: stable for
    /// one instance across restarts (a restarted instance fences its former self) and distinct
    /// between instances running at the same time (they would fence each other).
    pub fn new<T: Into<String>>(
        group: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
        transactional_id: impl Into<String>,
    ) -> Self {
        TxnSpec {
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            transactional_id: transactional_id.into(),
            max_batch: 500,
            linger: Duration::from_millis(20),
            max_attempts: 5,
            dead_letter: None,
            transaction_timeout: Duration::from_secs(60),
        }
    }

    /// Most records per transaction (default 500). Larger batches amortize the commit (two
    /// round trips to the transaction coordinator); a failed commit re-handles the whole batch.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// How long a batch waits for more records after its first (default 20 ms).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Handler failures of one record before it counts as permanent (default 5).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Move records whose handler failed permanently to `topic`, in the batch's transaction.
    pub fn dead_letter(mut self, topic: impl Into<Topic>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }

    /// The broker aborts a transaction left open longer than this (default 60 s): what a
    /// processor that died mid-batch holds back from `read_committed` readers of its outputs
    /// until it restarts (a restart with the same id aborts it at once).
    pub fn transaction_timeout(mut self, d: Duration) -> Self {
        self.transaction_timeout = d;
        self
    }

    fn check(&self) -> Result<(), Error> {
        if self.group.is_empty() || self.transactional_id.is_empty() {
            return Err(err(
                ErrorKind::Config,
                "group and transactional id must not be empty",
            ));
        }
        if self.topics.is_empty() {
            return Err(err(ErrorKind::Config, "no input topic"));
        }
        for t in &self.topics {
            validate::topic(t, &crate::TOPIC_RULES)?;
        }
        if let Some(t) = &self.dead_letter {
            validate::topic(t.as_str(), &crate::TOPIC_RULES)?;
        }
        Ok(())
    }
}

/// Counts of a [`TxnProcessor`]'s work, returned by [`TxnProcessor::run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TxnStats {
    /// Transactions committed.
    pub committed: u64,
    /// Transactions aborted (their outputs never became visible).
    pub aborted: u64,
    /// Input records committed as handled.
    pub consumed: u64,
    /// Output messages committed.
    pub produced: u64,
    /// Input records moved to the dead-letter topic.
    pub dead_lettered: u64,
}

/// Remembers the partitions revoked since the current batch began to be read: a batch that
/// holds one is never committed (its next owner reads it from the committed offset), and only
/// the others are rewound.
#[derive(Default)]
struct Ctx {
    revoked: parking_lot::Mutex<Revoked>,
}

#[derive(Default)]
struct Revoked {
    partitions: std::collections::HashSet<(String, i32)>,
    /// A rebalance error: the assignment is unknown.
    all: bool,
}

impl Revoked {
    fn touches(&self, tp: &(String, i32)) -> bool {
        self.all || self.partitions.contains(tp)
    }
}

impl ClientContext for Ctx {
    fn error(&self, e: KafkaError, reason: &str) {
        tracing::warn!(error = %e, reason, "librdkafka error (transactional processor)");
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        let mut revoked = self.revoked.lock();
        match r {
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    revoked
                        .partitions
                        .insert((e.topic().to_owned(), e.partition()));
                }
            }
            Rebalance::Error(_) => revoked.all = true,
            Rebalance::Assign(_) => {}
        }
    }
}

/// One record read for the current batch.
struct Read {
    topic: String,
    partition: i32,
    offset: i64,
    message: Message,
}

/// The transaction state of one batch: per partition, its first offset in the batch and the
/// offset after its handled prefix.
#[derive(Default)]
struct Progress {
    first: BTreeMap<(String, i32), i64>,
    next: BTreeMap<(String, i32), i64>,
    produced: u64,
    consumed: u64,
    dead_lettered: u64,
    /// The delivery reports of the outputs sent in the transaction.
    deliveries: Vec<DeliveryFuture>,
}

/// How a batch ended.
enum Ended {
    /// Every record handled.
    Done,
    /// A record failed transiently: commit the prefix, rewind the rest, back off.
    Retry,
}

/// A consume-transform-produce loop whose outputs and input offsets commit in one Kafka
/// transaction per batch. Made by [`KafkaBackend::transactional`](crate::KafkaBackend).
///
/// ```no_run
/// # async fn demo(
/// #     kafka: eventbus_kafka::KafkaBackend,
/// #     stop: tokio::sync::oneshot::Receiver<()>,
/// # ) -> Result<(), eventbus_core::Error> {
/// use eventbus_core::Message;
/// use eventbus_kafka::TxnSpec;
///
/// let processor = kafka
///     .transactional(TxnSpec::new("enricher", ["orders"], "enricher-0"))
///     .await?;
/// let stats = processor
///     .run(
///         |order: Message| async move {
///             let total = order.payload().len(); // the transformation
///             Ok(vec![Message::new("order-totals", total.to_string())])
///         },
///         async {
///             let _ = stop.await; // a shutdown signal
///         },
///     )
///     .await?;
/// println!("{} records in {} transactions", stats.consumed, stats.committed);
/// # Ok(()) }
/// ```
pub struct TxnProcessor {
    consumer: Arc<StreamConsumer<Ctx>>,
    producer: Arc<FutureProducer>,
    spec: TxnSpec,
    stats: TxnStats,
    /// The counts after each commit or abort, for [`TxnProcessor::progress`].
    progress: tokio::sync::watch::Sender<TxnStats>,
    /// The record whose handler failed last, and how many times in a row.
    failing: Option<((String, i32, i64), u32)>,
}

impl std::fmt::Debug for TxnProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnProcessor")
            .field("spec", &self.spec)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// How long a transaction call may block before it counts as a timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Run a blocking librdkafka call off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Whether `code` says another instance took over the transactional id.
fn is_fenced(code: Option<C>) -> bool {
    matches!(
        code,
        Some(C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch | C::FencedInstanceId)
    )
}

/// The producer failed for good (librdkafka's fatal error `code`).
fn fatal(what: &'static str, code: C) -> Error {
    if is_fenced(Some(code)) {
        return err(
            ErrorKind::Fenced,
            format!("{what}: another instance with this transactional id took over"),
        )
        .permanent();
    }
    err(
        ErrorKind::Other,
        format!("{what}: the producer failed fatally ({code:?})"),
    )
    .permanent()
}

/// A transaction call's error, typed, and whether aborting and going again can help.
fn txn_error(what: &'static str, e: KafkaError) -> (Error, bool) {
    let (is_fatal, abortable) = match &e {
        KafkaError::Transaction(t) => (t.is_fatal(), t.txn_requires_abort()),
        _ => (false, true),
    };
    let code = e.rdkafka_error_code();
    if code == Some(C::UnsupportedFeature) {
        let e = err(
            ErrorKind::Rejected,
            format!("{what}: the broker does not implement Kafka transactions (KIP-98)"),
        );
        return (e.permanent(), false);
    }
    if is_fenced(code) || (is_fatal && code.is_some()) {
        return (fatal(what, code.unwrap_or(C::Fatal)), false);
    }
    // The code in the text: transaction failures are told apart by it.
    let base = other(what, e.clone());
    let mut error = err(
        base.kind(),
        format!(
            "{what} ({})",
            code.map_or_else(|| "no code".to_owned(), |c| format!("{c:?}"))
        ),
    )
    .with_source(e);
    if base.is_retryable() {
        error = error.temporary();
    }
    (error, abortable && !is_fatal)
}

impl TxnProcessor {
    pub(crate) async fn start(config: &crate::KafkaConfig, spec: TxnSpec) -> Result<Self, Error> {
        spec.check()?;
        let mut cc = config.consumer_config(&spec.group, true);
        cc.set("isolation.level", "read_committed");
        let consumer: StreamConsumer<Ctx> = cc
            .create_with_context(Ctx::default())
            .map_err(|e| other("transactional consumer", e))?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| other("subscribe", e))?;
        let mut pc = config.producer_config();
        // The batch is the unit of batching here: its outputs are sent as they come and waited
        // for before the commit, so a longer linger only delays every commit.
        pc.set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set("transactional.id", &spec.transactional_id)
            .set(
                "transaction.timeout.ms",
                spec.transaction_timeout.as_millis().to_string(),
            );
        let producer: FutureProducer = pc
            .create()
            .map_err(|e| other("transactional producer", e))?;
        let producer = Arc::new(producer);
        let p = Arc::clone(&producer);
        blocking(move || p.init_transactions(CALL_TIMEOUT))
            .await
            .map_err(|e| txn_error("init transactions", e).0)?;
        Ok(TxnProcessor {
            consumer: Arc::new(consumer),
            producer,
            spec,
            stats: TxnStats::default(),
            progress: tokio::sync::watch::Sender::new(TxnStats::default()),
            failing: None,
        })
    }

    /// The counts so far, updated as each transaction commits or aborts: wait on it to know
    /// when given input has been committed, or export it as metrics.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<TxnStats> {
        self.progress.subscribe()
    }

    /// Consume, call `handler` for each record and commit its outputs with the input offsets,
    /// one transaction per batch, until `stop` resolves (the batch being handled is finished
    /// and committed first; records read for a batch not yet started are left for the next
    /// owner) or an error no retry can fix: fenced by a newer instance, a record that failed
    /// permanently without a dead-letter topic, or a fatal producer error.
    pub async fn run<H, F>(
        mut self,
        mut handler: H,
        stop: impl Future<Output = ()>,
    ) -> Result<TxnStats, Error>
    where
        H: FnMut(Message) -> F,
        F: Future<Output = Result<Vec<Message>, HandlerError>>,
    {
        let mut stop = std::pin::pin!(stop);
        let mut backoff = Duration::from_millis(100);
        loop {
            *self.consumer.context().revoked.lock() = Revoked::default();
            let batch = tokio::select! {
                biased;
                _ = &mut stop => break,
                b = self.collect() => b?,
            };
            let p = Arc::clone(&self.producer);
            blocking(move || p.begin_transaction())
                .await
                .map_err(|e| txn_error("begin transaction", e).0)?;
            let mut progress = Progress::default();
            for r in &batch {
                progress
                    .first
                    .entry((r.topic.clone(), r.partition))
                    .or_insert(r.offset);
            }
            let ended = match self.handle(&batch, &mut handler, &mut progress).await {
                Ok(ended) => ended,
                Err(e) => {
                    self.abort().await?;
                    return Err(e);
                }
            };
            let committed = self.commit(&mut progress).await?;
            if committed && matches!(ended, Ended::Done) {
                backoff = Duration::from_millis(100);
                continue;
            }
            // Read again what was not committed: the failed record and what followed it, or
            // the whole batch after an abort.
            let keep = if committed {
                progress.next.clone()
            } else {
                BTreeMap::new()
            };
            self.rewind(&progress.first, &keep).await?;
            if matches!(ended, Ended::Retry) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        let TxnProcessor {
            consumer,
            producer,
            stats,
            ..
        } = self;
        // Closing leaves the group (a blocking call): off the async workers.
        blocking(move || drop((consumer, producer))).await;
        Ok(stats)
    }

    /// The next batch: wait for one record, then take more for up to `linger`.
    async fn collect(&self) -> Result<Vec<Read>, Error> {
        let mut batch = Vec::new();
        let mut deadline = None;
        while batch.len() < self.spec.max_batch {
            let next = match deadline {
                None => self.consumer.recv().await,
                Some(d) => match tokio::time::timeout_at(d, self.consumer.recv()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            match next {
                Ok(m) => {
                    use rdkafka::Message as _;
                    batch.push(Read {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        message: crate::headers::decode(&m),
                    });
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.spec.linger);
                }
                Err(e) => {
                    let e = other("transactional consumer", e);
                    if matches!(e.kind(), ErrorKind::Auth | ErrorKind::Rejected) {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "transient consumer error");
                }
            }
        }
        Ok(batch)
    }

    /// Hand the batch's records to the handler in order and queue their outputs in the open
    /// transaction. `Err` only for what must stop the processor.
    async fn handle<H, F>(
        &mut self,
        batch: &[Read],
        handler: &mut H,
        progress: &mut Progress,
    ) -> Result<Ended, Error>
    where
        H: FnMut(Message) -> F,
        F: Future<Output = Result<Vec<Message>, HandlerError>>,
    {
        let mut scratch = String::new();
        for r in batch {
            let tp = (r.topic.clone(), r.partition);
            let failure = match handler(r.message.clone()).await {
                Ok(outputs) => match self
                    .send_all(&outputs, &mut scratch, &mut progress.deliveries)
                    .await
                {
                    Ok(()) => {
                        progress.produced += outputs.len() as u64;
                        None
                    }
                    // An output the broker can never take: the record fails permanently.
                    Err(e) if !e.is_retryable() => {
                        Some(HandlerError::permanent(format!("output refused: {e}")))
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => Some(e),
            };
            if let Some(e) = failure {
                let key = (r.topic.clone(), r.partition, r.offset);
                let attempts = match &mut self.failing {
                    Some((k, n)) if *k == key => {
                        *n += 1;
                        *n
                    }
                    f => {
                        *f = Some((key, 1));
                        1
                    }
                };
                if !e.is_permanent() && attempts < self.spec.max_attempts {
                    tracing::debug!(topic = %r.topic, partition = r.partition, offset = r.offset, attempts, error = %e, "handler failed; retrying");
                    return Ok(Ended::Retry);
                }
                self.dead_letter(r, attempts, &e, &mut scratch, &mut progress.deliveries)
                    .await?;
                progress.dead_lettered += 1;
            }
            self.failing = None;
            progress.next.insert(tp, r.offset + 1);
            progress.consumed += 1;
        }
        Ok(Ended::Done)
    }

    async fn dead_letter(
        &self,
        r: &Read,
        attempts: u32,
        e: &HandlerError,
        scratch: &mut String,
        deliveries: &mut Vec<DeliveryFuture>,
    ) -> Result<(), Error> {
        let Some(to) = &self.spec.dead_letter else {
            return Err(err(
                ErrorKind::Rejected,
                format!(
                    "handler failed permanently on {}/{} offset {} and no dead-letter topic is set: {e}",
                    r.topic, r.partition, r.offset
                ),
            )
            .permanent());
        };
        let position = Position::Partition {
            partition: r.partition,
            offset: r.offset,
        };
        let letter = dead_letter::message(&r.message, to, &position, attempts, &e.to_string());
        metrics::counter!("eventbus_kafka_txn_dead_lettered_total").increment(1);
        self.send_all(std::slice::from_ref(&letter), scratch, deliveries)
            .await
    }

    /// Queue `outputs` in the open transaction; librdkafka delivers them before the commit.
    async fn send_all(
        &self,
        outputs: &[Message],
        scratch: &mut String,
        deliveries: &mut Vec<DeliveryFuture>,
    ) -> Result<(), Error> {
        for m in outputs {
            validate::topic(m.topic().as_str(), &crate::TOPIC_RULES)?;
            m.headers().validate()?;
            let headers = crate::headers::encode(m.id(), m.headers(), true, scratch);
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(m.topic().as_str()).payload(m.payload().as_ref());
            if let Some(k) = m.key() {
                record = record.key(k.as_ref());
            }
            if let Some(h) = headers {
                record = record.headers(h);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((e, r)) if e.rdkafka_error_code() == Some(C::QueueFull) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        // A fenced or otherwise fatally failed producer refuses every send:
                        // that stops the processor, it is not the output's fault.
                        if let Some((code, _)) = self.producer.client().fatal_error() {
                            return Err(fatal("send", code));
                        }
                        return Err(match crate::error::enqueue(e) {
                            eventbus_core::Outcome::Failed(e) => e,
                            _ => err(ErrorKind::Other, "output refused"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Commit the handled prefix with its offsets; abort when there is none or the partitions
    /// were revoked since the batch was read. `Ok(true)` when committed.
    async fn commit(&mut self, progress: &mut Progress) -> Result<bool, Error> {
        let revoked = {
            let r = self.consumer.context().revoked.lock();
            progress.first.keys().any(|tp| r.touches(tp))
        };
        if progress.next.is_empty() || revoked {
            self.abort().await?;
            return Ok(false);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &progress.next {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| other("offsets", e))?;
        }
        let Some(group) = self.consumer.group_metadata() else {
            self.abort().await?;
            return Ok(false);
        };
        // Wait for the outputs' delivery reports here, asynchronously: librdkafka's commit
        // flushes first, and rust-rdkafka's flush waits in steps of up to 100 ms while another
        // thread serves the reports (~100 ms per transaction). A failed delivery fails the
        // commit below.
        let deliveries = std::mem::take(&mut progress.deliveries);
        let reports = async {
            for d in deliveries {
                let _ = d.await;
            }
        };
        let _ = tokio::time::timeout(CALL_TIMEOUT, reports).await;
        let p = Arc::clone(&self.producer);
        let result = blocking(move || {
            // A report resolves its future a moment before librdkafka forgets the message; a
            // commit in that moment would poll for 100 ms (see above). Wait it out here.
            let settled = std::time::Instant::now() + CALL_TIMEOUT;
            while p.in_flight_count() > 0 && std::time::Instant::now() < settled {
                std::thread::sleep(Duration::from_micros(100));
            }
            p.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)?;
            // A retriable failure (a timeout) leaves the commit in progress: ask again.
            let mut tries = 0;
            loop {
                match p.commit_transaction(CALL_TIMEOUT) {
                    Err(KafkaError::Transaction(t)) if t.is_retriable() && tries < 3 => tries += 1,
                    r => return r,
                }
            }
        })
        .await;
        match result {
            Ok(()) => {
                self.stats.committed += 1;
                self.stats.consumed += progress.consumed;
                self.stats.produced += progress.produced;
                self.stats.dead_lettered += progress.dead_lettered;
                metrics::counter!("eventbus_kafka_txn_committed_total").increment(1);
                metrics::counter!("eventbus_kafka_txn_consumed_total").increment(progress.consumed);
                self.progress.send_replace(self.stats);
                Ok(true)
            }
            Err(e) => {
                let (error, abortable) = txn_error("commit transaction", e);
                if !abortable {
                    return Err(error);
                }
                tracing::warn!(error = %error, "transaction aborted; the batch is read again");
                self.abort().await?;
                Ok(false)
            }
        }
    }

    async fn abort(&mut self) -> Result<(), Error> {
        let p = Arc::clone(&self.producer);
        blocking(move || p.abort_transaction(CALL_TIMEOUT))
            .await
            .map_err(|e| txn_error("abort transaction", e).0)?;
        self.stats.aborted += 1;
        metrics::counter!("eventbus_kafka_txn_aborted_total").increment(1);
        self.progress.send_replace(self.stats);
        Ok(())
    }

    /// Seek each partition of the batch back to what was committed: the offset after its
    /// committed prefix (`keep`), else its first offset in the batch. After a revocation, the
    /// partitions still (or again) assigned go to the offsets the group has committed instead:
    /// their position may have moved in between. A failed rewind stops the processor: it would
    /// skip records otherwise.
    async fn rewind(
        &self,
        first: &BTreeMap<(String, i32), i64>,
        keep: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), Error> {
        let revoked = {
            let r = self.consumer.context().revoked.lock();
            first.keys().any(|tp| r.touches(tp))
        };
        let mut to = TopicPartitionList::new();
        for (tp, offset) in first {
            let offset = keep.get(tp).copied().unwrap_or(*offset);
            to.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))
                .map_err(|e| other("rewind", e))?;
        }
        let c = Arc::clone(&self.consumer);
        blocking(move || {
            if revoked {
                let assigned = c.assignment()?;
                let mut ask = TopicPartitionList::new();
                for e in to.elements() {
                    if assigned.find_partition(e.topic(), e.partition()).is_some() {
                        ask.add_partition(e.topic(), e.partition());
                    }
                }
                to = TopicPartitionList::new();
                if ask.count() > 0 {
                    for e in c.committed_offsets(ask, CALL_TIMEOUT)?.elements() {
                        let at = match e.offset() {
                            Offset::Offset(o) => Offset::Offset(o),
                            _ => Offset::Beginning,
                        };
                        to.add_partition_offset(e.topic(), e.partition(), at)?;
                    }
                }
            }
            if to.count() > 0 {
                for e in c.seek_partitions(to, CALL_TIMEOUT)?.elements() {
                    e.error()?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| other("rewind to the committed offsets", e))
    }
}
