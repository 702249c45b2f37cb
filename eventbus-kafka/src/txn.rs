//! Exactly-once consume-transform-produce in Kafka transactions.
//!
//! A [`TxnProcessor`] reads its input topics in a consumer group, hands each record to a handler
//! that returns the messages to produce, and commits, per batch, the outputs **and** the input
//! offsets in one Kafka transaction (`send_offsets_to_transaction` with the consumer's group
//! metadata, KIP-447). Consumers that read the outputs with `isolation.level=read_committed`
//! (librdkafka's default, and every eventbus subscriber's) see each batch's outputs once or not
//! at all, whatever happens to the processor.
//!
//! - **A transaction that cannot commit** (a broker error, an output the broker refused, a
//!   rebalance during the batch) is aborted, the batch's partitions are rewound to their
//!   committed offsets, and the batch is read and handled again after a back-off.
//! - **A handler error** commits the batch's handled prefix, rewinds the rest and retries the
//!   failed record after a back-off. A [`HandlerError::permanent`] error, an output that can
//!   never be sent (an invalid topic, too large), or [`TxnSpec::max_attempts`] failures of one
//!   record (its handler, or the broker refusing its outputs) moves the record to the
//!   [`TxnSpec::dead_letter`] topic **inside** the transaction (the subscriber's dead-letter
//!   headers), without any of its outputs. Without a dead-letter topic [`TxnProcessor::run`]
//!   aborts the batch and returns the error: a poison record stops the processor instead of
//!   being skipped.
//! - **A zombie cannot write**: a second processor with the same transactional id fences the
//!   first (its open transaction is aborted by the broker and its next call fails with
//!   [`ErrorKind::Fenced`]). Give each processor instance a stable id of its own (`orders-0`,
//!   `orders-1`, ... or the pod name); the group spreads the partitions over the instances.
//! - **Long batches commit early**: once a batch has run for half the transaction timeout, its
//!   handled prefix commits and the rest is read again, so a slow handler never lets the broker
//!   time the transaction out (which would fence the processor).
//!
//! The handler's effects outside Kafka are not part of the transaction: for a database, use the
//! inbox of `eventbus-outbox` instead.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::handler::HandlerError;
use eventbus_core::{Error, ErrorKind, Message, Outcome, Position, Topic, dead_letter, validate};
use rdkafka::consumer::{
    Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer,
};
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
/// holds one is never committed (its next owner reads it from the committed offset).
#[derive(Default)]
struct Ctx {
    revoked: parking_lot::Mutex<std::collections::HashSet<(String, i32)>>,
}

impl ClientContext for Ctx {
    fn error(&self, e: KafkaError, reason: &str) {
        tracing::warn!(error = %e, reason, "librdkafka error (transactional processor)");
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            let mut revoked = self.revoked.lock();
            for e in tpl.elements() {
                revoked.insert((e.topic().to_owned(), e.partition()));
            }
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

impl Read {
    fn key(&self) -> (String, i32, i64) {
        (self.topic.clone(), self.partition, self.offset)
    }
}

/// The transaction state of one batch: per partition, its first offset in the batch and the
/// offset after its handled prefix; the delivery report of each output, by record index.
#[derive(Default)]
struct Progress {
    first: BTreeMap<(String, i32), i64>,
    next: BTreeMap<(String, i32), i64>,
    produced: u64,
    consumed: u64,
    dead_lettered: u64,
    deliveries: Vec<(usize, DeliveryFuture)>,
}

/// How a batch's handling ended.
enum Ended {
    /// Every record handled.
    Done,
    /// The batch ran for half the transaction timeout: commit the prefix, read the rest again.
    Early,
    /// A record failed transiently: commit the prefix, rewind the rest, back off.
    Retry,
    /// The transaction cannot commit (librdkafka refused an output for the batch's sake):
    /// abort, rewind, back off.
    Abort,
}

/// What a transaction call's failure means for the processor.
enum Failure {
    /// Nothing can go on: fenced, fatal, or the broker lacks transactions.
    Stop(Error),
    /// The transaction must be aborted; the batch can be handled again.
    Abort(Error),
    /// The call may succeed if made again.
    Again(Error),
}

/// The record whose handling failed last, how many times in a row, and why.
struct Failing {
    key: (String, i32, i64),
    attempts: u32,
    reason: String,
}

/// The librdkafka clients; dropped off the async workers (closing them blocks).
struct Clients {
    consumer: Arc<StreamConsumer<Ctx>>,
    producer: Arc<FutureProducer>,
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
    /// `None` once closed.
    clients: Option<Clients>,
    spec: TxnSpec,
    /// Largest output accepted (librdkafka's `message.max.bytes` less record overhead).
    max_output_bytes: usize,
    stats: TxnStats,
    /// The counts after each commit or abort, for [`TxnProcessor::progress`].
    progress: tokio::sync::watch::Sender<TxnStats>,
    failing: Option<Failing>,
}

impl std::fmt::Debug for TxnProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnProcessor")
            .field("spec", &self.spec)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for TxnProcessor {
    /// A processor dropped without finishing `run` (its future cancelled, or never run) closes
    /// its clients on a blocking thread: leaving the group waits for the coordinator.
    fn drop(&mut self) {
        if let Some(c) = self.clients.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || drop(c))),
                Err(_) => drop(c),
            }
        }
    }
}

/// How long a transaction call may block before it counts as a timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest back-off after a failed batch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Run a blocking librdkafka call off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The offsets to commit with the transaction: the next record of every partition read.
fn next_offsets(progress: &Progress) -> Result<TopicPartitionList, Error> {
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), next) in &progress.next {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(|e| other("offsets", e))?;
    }
    Ok(offsets)
}

/// Send the consumer's offsets into the transaction and commit it (blocking: run it through
/// [`blocking`]).
fn commit_offsets(
    p: &FutureProducer,
    offsets: &TopicPartitionList,
    group: &ConsumerGroupMetadata,
) -> Result<(), Failure> {
    // A report resolves its future a moment before librdkafka forgets the message; a commit
    // in that moment would poll for 100 ms (see `outputs_delivered`). Wait it out here.
    let settled = Instant::now() + Duration::from_secs(1);
    while p.in_flight_count() > 0 && Instant::now() < settled {
        std::thread::sleep(Duration::from_micros(200));
    }
    if let Err(e) = p.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT) {
        // Any failure here leaves the transaction open: abort it.
        return Err(match failure("send offsets to the transaction", e) {
            Failure::Again(e) => Failure::Abort(e),
            f => f,
        });
    }
    // A retriable failure leaves the commit in progress: only a commit may follow.
    retried("commit transaction", || p.commit_transaction(CALL_TIMEOUT))
}

/// `call` (a transaction step), made again up to 3 times while librdkafka says a retry can
/// finish it.
fn retried(
    what: &'static str,
    mut call: impl FnMut() -> rdkafka::error::KafkaResult<()>,
) -> Result<(), Failure> {
    let mut tries = 0;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(e) => match failure(what, e) {
                Failure::Again(_) if tries < 3 => tries += 1,
                f => return Err(f),
            },
        }
    }
}

/// The producer failed for good (librdkafka's fatal error `code`).
fn fatal(what: &'static str, code: C) -> Error {
    // librdkafka reports PRODUCER_FENCED and INVALID_PRODUCER_EPOCH from the coordinator as
    // `__FENCED`; a transaction the broker timed out bumps the epoch and ends the same way.
    if matches!(
        code,
        C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch
    ) {
        return err(
            ErrorKind::Fenced,
            format!(
                "{what}: fenced (another instance with this transactional id took over, or the \
                 broker timed the transaction out)"
            ),
        )
        .permanent();
    }
    err(
        ErrorKind::Other,
        format!("{what}: the producer failed fatally ({code:?})"),
    )
    .permanent()
}

/// Classify a transaction call's error.
fn failure(what: &'static str, e: KafkaError) -> Failure {
    let code = e.rdkafka_error_code();
    if code == Some(C::UnsupportedFeature) {
        return Failure::Stop(
            err(
                ErrorKind::Rejected,
                format!("{what}: the broker does not implement Kafka transactions (KIP-98)"),
            )
            .permanent(),
        );
    }
    let (is_fatal, needs_abort, retriable) = match &e {
        KafkaError::Transaction(t) => (t.is_fatal(), t.txn_requires_abort(), t.is_retriable()),
        // rust-rdkafka's flush before a commit timed out: the commit can be made again.
        KafkaError::Flush(_) => (false, false, true),
        _ => (false, false, false),
    };
    if is_fatal || matches!(code, Some(C::Fenced)) {
        return Failure::Stop(fatal(what, code.unwrap_or(C::Fatal)));
    }
    // The code in the text: transaction failures are told apart by it.
    let base = other(what, e.clone());
    let error = err(
        base.kind(),
        format!(
            "{what} ({})",
            code.map_or_else(|| "no code".to_owned(), |c| format!("{c:?}"))
        ),
    )
    .with_source(e);
    if needs_abort {
        Failure::Abort(error)
    } else if retriable {
        Failure::Again(error.temporary())
    } else {
        Failure::Stop(error)
    }
}

/// Why a send refused an output that passed [`TxnProcessor::check_outputs`].
enum SendFailed {
    Stop(Error),
    Abort,
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
        let clients = Clients {
            consumer: Arc::new(consumer),
            producer: Arc::new(producer),
        };
        let p = Arc::clone(&clients.producer);
        let init = blocking(move || p.init_transactions(CALL_TIMEOUT)).await;
        if let Err(e) = init {
            let error = match failure("init transactions", e) {
                Failure::Stop(e) | Failure::Abort(e) | Failure::Again(e) => e,
            };
            blocking(move || drop(clients)).await;
            return Err(error);
        }
        Ok(TxnProcessor {
            clients: Some(clients),
            max_output_bytes: config
                .max_message_bytes
                .saturating_sub(crate::headers::OVERHEAD),
            spec,
            stats: TxnStats::default(),
            progress: tokio::sync::watch::Sender::new(TxnStats::default()),
            failing: None,
        })
    }

    fn clients(&self) -> &Clients {
        self.clients.as_ref().expect("open until run ends")
    }

    /// The counts so far, updated as each transaction commits or aborts: wait on it to know
    /// when given input has been committed, or export it as metrics.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<TxnStats> {
        self.progress.subscribe()
    }

    /// Consume, call `handler` for each record and commit its outputs with the input offsets,
    /// one transaction per batch, until `stop` resolves (the batch being handled is finished
    /// and committed first; records read for a batch not yet started are left for the next
    /// owner) or an error no retry can fix: fenced, a record that failed permanently without a
    /// dead-letter topic, a fatal producer error, a broker without transactions. The clients
    /// are closed (the group left) before it returns.
    pub async fn run<H, F>(
        mut self,
        mut handler: H,
        stop: impl Future<Output = ()>,
    ) -> Result<TxnStats, Error>
    where
        H: FnMut(Message) -> F,
        F: Future<Output = Result<Vec<Message>, HandlerError>>,
    {
        let result = self.run_batches(&mut handler, stop).await;
        if let Some(c) = self.clients.take() {
            blocking(move || drop(c)).await;
        }
        result.map(|()| self.stats)
    }

    async fn run_batches<H, F>(
        &mut self,
        handler: &mut H,
        stop: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        H: FnMut(Message) -> F,
        F: Future<Output = Result<Vec<Message>, HandlerError>>,
    {
        let mut stop = std::pin::pin!(stop);
        let mut backoff = Duration::from_millis(100);
        loop {
            self.clients().consumer.context().revoked.lock().clear();
            let batch = tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                b = self.collect() => b?,
            };
            let p = Arc::clone(&self.clients().producer);
            if let Err(e) = blocking(move || p.begin_transaction()).await {
                return Err(match failure("begin transaction", e) {
                    Failure::Stop(e) | Failure::Abort(e) | Failure::Again(e) => e,
                });
            }
            let mut progress = Progress::default();
            for r in &batch {
                progress
                    .first
                    .entry((r.topic.clone(), r.partition))
                    .or_insert(r.offset);
            }
            let ended = match self.handle(&batch, handler, &mut progress).await {
                Ok(ended) => ended,
                Err(e) => {
                    self.abort().await?;
                    return Err(e);
                }
            };
            let committed = match ended {
                Ended::Abort => {
                    self.abort().await?;
                    false
                }
                _ => self.commit(&batch, &mut progress).await?,
            };
            if committed && matches!(ended, Ended::Done) {
                backoff = Duration::from_millis(100);
                continue;
            }
            // Read again what was not committed: the rest of the batch after its committed
            // prefix, or all of it after an abort.
            let keep = if committed {
                std::mem::take(&mut progress.next)
            } else {
                BTreeMap::new()
            };
            self.rewind(&progress.first, &keep).await?;
            if committed && matches!(ended, Ended::Early) {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = &mut stop => return Ok(()),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The next batch: wait for one record, then take more for up to `linger`.
    async fn collect(&self) -> Result<Vec<Read>, Error> {
        let consumer = &self.clients().consumer;
        let mut batch = Vec::new();
        let mut deadline = None;
        while batch.len() < self.spec.max_batch {
            let next = match deadline {
                None => consumer.recv().await,
                Some(d) => match tokio::time::timeout_at(d, consumer.recv()).await {
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

    /// Note a failure of record `key`; its attempts in a row so far.
    fn note_failure(&mut self, key: (String, i32, i64), reason: String) -> u32 {
        match &mut self.failing {
            Some(f) if f.key == key => {
                f.attempts += 1;
                f.reason = reason;
                f.attempts
            }
            f => {
                *f = Some(Failing {
                    key,
                    attempts: 1,
                    reason,
                });
                1
            }
        }
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
        let started = Instant::now();
        let mut scratch = String::new();
        for (i, r) in batch.iter().enumerate() {
            if i > 0 && started.elapsed() > self.spec.transaction_timeout / 2 {
                return Ok(Ended::Early);
            }
            let key = r.key();
            // A record whose outputs the broker refused `max_attempts` times is not handed to
            // the handler again: it would make the same outputs.
            let exhausted = self
                .failing
                .as_ref()
                .filter(|f| f.key == key && f.attempts >= self.spec.max_attempts)
                .map(|f| HandlerError::permanent(f.reason.clone()));
            let failure = match exhausted {
                Some(e) => Some(e),
                None => match handler(r.message.clone()).await {
                    Ok(outputs) => match self.check_outputs(&outputs) {
                        Err(e) => Some(HandlerError::permanent(format!("output refused: {e}"))),
                        Ok(()) => {
                            match self
                                .send_all(&outputs, i, &mut scratch, &mut progress.deliveries)
                                .await
                            {
                                Ok(()) => {}
                                Err(SendFailed::Stop(e)) => return Err(e),
                                Err(SendFailed::Abort) => return Ok(Ended::Abort),
                            }
                            progress.produced += outputs.len() as u64;
                            None
                        }
                    },
                    Err(e) => Some(e),
                },
            };
            if let Some(e) = failure {
                let attempts = self.note_failure(key.clone(), e.to_string());
                if !e.is_permanent() && attempts < self.spec.max_attempts {
                    tracing::debug!(topic = %r.topic, partition = r.partition, offset = r.offset, attempts, error = %e, "handler failed; retrying");
                    return Ok(Ended::Retry);
                }
                match self
                    .dead_letter(r, i, attempts, &e, &mut scratch, &mut progress.deliveries)
                    .await?
                {
                    Ok(()) => progress.dead_lettered += 1,
                    Err(SendFailed::Stop(e)) => return Err(e),
                    Err(SendFailed::Abort) => return Ok(Ended::Abort),
                }
            }
            if self.failing.as_ref().is_some_and(|f| f.key == key) {
                self.failing = None;
            }
            progress
                .next
                .insert((r.topic.clone(), r.partition), r.offset + 1);
            progress.consumed += 1;
        }
        Ok(Ended::Done)
    }

    /// Whether every output can be sent at all (topic name, headers, size): checked before
    /// any is queued, so a record never commits with part of its outputs.
    fn check_outputs(&self, outputs: &[Message]) -> Result<(), Error> {
        for m in outputs {
            validate::topic(m.topic().as_str(), &crate::TOPIC_RULES)?;
            m.headers().validate()?;
            if m.encoded_len() > self.max_output_bytes {
                return Err(err(
                    ErrorKind::TooLarge,
                    format!(
                        "an output of {} bytes is over the {} allowed",
                        m.encoded_len(),
                        self.max_output_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Move record `r` (index `i`) to the dead-letter topic in the open transaction. The outer
    /// `Err` stops the processor (no dead-letter topic, or a letter that cannot be sent).
    async fn dead_letter(
        &self,
        r: &Read,
        i: usize,
        attempts: u32,
        e: &HandlerError,
        scratch: &mut String,
        deliveries: &mut Vec<(usize, DeliveryFuture)>,
    ) -> Result<Result<(), SendFailed>, Error> {
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
        self.check_outputs(std::slice::from_ref(&letter))
            .map_err(|e| err(e.kind(), format!("dead letter refused: {e}")).permanent())?;
        Ok(self
            .send_all(std::slice::from_ref(&letter), i, scratch, deliveries)
            .await)
    }

    /// Queue `outputs` of record `i` in the open transaction; librdkafka delivers them before
    /// the commit. They passed [`TxnProcessor::check_outputs`]: a refusal here is the
    /// transaction's (a failed delivery before it, a fenced producer), not the record's.
    async fn send_all(
        &self,
        outputs: &[Message],
        i: usize,
        scratch: &mut String,
        deliveries: &mut Vec<(usize, DeliveryFuture)>,
    ) -> Result<(), SendFailed> {
        let producer = &self.clients().producer;
        for m in outputs {
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
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((i, delivery));
                        break;
                    }
                    Err((e, r)) if e.rdkafka_error_code() == Some(C::QueueFull) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        if let Some((code, _)) = producer.client().fatal_error() {
                            return Err(SendFailed::Stop(fatal("send", code)));
                        }
                        tracing::warn!(error = %e, "output refused; the transaction is aborted");
                        return Err(SendFailed::Abort);
                    }
                }
            }
        }
        Ok(())
    }

    /// Commit the handled prefix with its offsets; abort when there is none, the partitions
    /// were revoked since the batch was read, or an output was not delivered. `Ok(true)` when
    /// committed.
    async fn commit(&mut self, batch: &[Read], progress: &mut Progress) -> Result<bool, Error> {
        let revoked = {
            let r = self.clients().consumer.context().revoked.lock();
            progress.first.keys().any(|tp| r.contains(tp))
        };
        if progress.next.is_empty() || revoked || !self.outputs_delivered(batch, progress).await? {
            self.abort().await?;
            return Ok(false);
        }
        let Some(group) = self.clients().consumer.group_metadata() else {
            self.abort().await?;
            return Ok(false);
        };
        let offsets = next_offsets(progress)?;
        let p = Arc::clone(&self.clients().producer);
        match blocking(move || commit_offsets(&p, &offsets, &group)).await {
            Ok(()) => {
                self.committed(progress);
                Ok(true)
            }
            Err(Failure::Abort(e)) => {
                tracing::warn!(error = %e, "transaction aborted; the batch is read again");
                self.abort().await?;
                Ok(false)
            }
            Err(Failure::Stop(e) | Failure::Again(e)) => Err(e),
        }
    }

    /// Wait for the outputs' delivery reports here, asynchronously: librdkafka's commit
    /// flushes first, and rust-rdkafka's flush waits in steps of up to 100 ms while another
    /// thread serves the reports (~100 ms per transaction). `false`: an output was refused or
    /// not delivered in time, and the transaction must be aborted; a refusal that cannot pass
    /// on a retry counts against its record.
    async fn outputs_delivered(
        &mut self,
        batch: &[Read],
        progress: &mut Progress,
    ) -> Result<bool, Error> {
        let deliveries = std::mem::take(&mut progress.deliveries);
        let reports = async {
            for (i, d) in deliveries {
                match d.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Some((i, Some(e))),
                    Err(_) => return Some((i, None)),
                }
            }
            None
        };
        let Ok(undelivered) = tokio::time::timeout(CALL_TIMEOUT, reports).await else {
            tracing::warn!("outputs not delivered in time; the transaction is aborted");
            return Ok(false);
        };
        let Some((i, e)) = undelivered else {
            return Ok(true);
        };
        if let Some((code, _)) = self.clients().producer.client().fatal_error() {
            return Err(fatal("deliver", code));
        }
        if let Some(Outcome::Failed(refused)) = e.as_ref().map(crate::error::delivery)
            && !refused.is_retryable()
        {
            let reason = format!("output refused by the broker: {refused}");
            self.note_failure(batch[i].key(), reason);
        }
        tracing::warn!("an output was not delivered; the transaction is aborted");
        Ok(false)
    }

    /// Count a committed transaction in the stats and metrics, and tell the watchers.
    fn committed(&mut self, progress: &Progress) {
        self.stats.committed += 1;
        self.stats.consumed += progress.consumed;
        self.stats.produced += progress.produced;
        self.stats.dead_lettered += progress.dead_lettered;
        metrics::counter!("eventbus_kafka_txn_committed_total").increment(1);
        metrics::counter!("eventbus_kafka_txn_consumed_total").increment(progress.consumed);
        metrics::counter!("eventbus_kafka_txn_dead_lettered_total")
            .increment(progress.dead_lettered);
        self.progress.send_replace(self.stats);
    }

    /// Abort the open transaction (again while librdkafka says a retry can finish it).
    async fn abort(&mut self) -> Result<(), Error> {
        let p = Arc::clone(&self.clients().producer);
        blocking(move || retried("abort transaction", || p.abort_transaction(CALL_TIMEOUT)))
            .await
            .map_err(|f| match f {
                Failure::Stop(e) | Failure::Abort(e) | Failure::Again(e) => e,
            })?;
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
            let r = self.clients().consumer.context().revoked.lock();
            first.keys().any(|tp| r.contains(tp))
        };
        let mut to = TopicPartitionList::new();
        for (tp, offset) in first {
            let offset = keep.get(tp).copied().unwrap_or(*offset);
            to.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))
                .map_err(|e| other("rewind", e))?;
        }
        let c = Arc::clone(&self.clients().consumer);
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
