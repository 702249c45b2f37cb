//! The publishing side: librdkafka's idempotent producer, delivery reports routed per batch.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{Ack, BatchSink, Error, Message, Outcome, Position, SinkLimits};
use rdkafka::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::error::{self, BACKEND};

/// Header carrying the eventbus message id.
pub const ID_HEADER: &str = "eventbus-id";

/// Batch ids and message indexes travel in librdkafka's per-message opaque pointer:
/// the low 24 bits are the index, the rest the batch id.
const INDEX_BITS: u32 = 24;
const MAX_BATCH: usize = (1 << INDEX_BITS) - 1;

pub(crate) struct Ctx {
    router: Arc<OutcomeRouter>,
    /// librdkafka reported an error since the last check: the sink then asks librdkafka whether
    /// it is fatal (the error callback does not say).
    errored: Arc<AtomicBool>,
}

impl ClientContext for Ctx {
    fn error(&self, e: rdkafka::error::KafkaError, reason: &str) {
        self.errored.store(true, Ordering::Release);
        tracing::warn!(error = %e, reason, "librdkafka error");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        use rdkafka::Message as _;
        let (batch, index) = ((opaque >> INDEX_BITS) as u64, opaque & MAX_BATCH);
        let outcome = match result {
            Ok(m) => Outcome::Acked(Ack {
                position: Position::Partition {
                    partition: m.partition(),
                    offset: m.offset(),
                },
            }),
            Err((e, _)) => error::delivery(e),
        };
        self.router.settle(batch, index, outcome);
    }
}

/// Publishes batches through librdkafka (idempotent, `acks=all`). The engine hands messages to
/// librdkafka at once and librdkafka batches them per partition (`linger.ms`, `batch.size`);
/// the engine's ACK window bounds what is queued. Wrap it in `eventbus_batch::Batcher`.
#[derive(Clone)]
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<Ctx>>,
    router: Arc<OutcomeRouter>,
    limits: SinkLimits,
    /// Send the `eventbus-id` header.
    id_header: bool,
    errored: Arc<AtomicBool>,
    /// Set once librdkafka reports a fatal error (e.g. the idempotent producer lost its
    /// guarantees): the producer is unusable and every later publish fails with it.
    fatal: Arc<OnceLock<Error>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    pub(crate) fn new(config: &crate::KafkaConfig, id_header: bool) -> Result<Self, Error> {
        let router = Arc::new(OutcomeRouter::new(BACKEND));
        let errored = Arc::new(AtomicBool::new(false));
        let producer: ThreadedProducer<Ctx> = config
            .producer_config()
            .create_with_context(Ctx {
                router: Arc::clone(&router),
                errored: Arc::clone(&errored),
            })
            .map_err(|e| error::other("could not create the Kafka producer", e))?;
        let limits = SinkLimits::none()
            .max_batch_messages(MAX_BATCH)
            .max_message_bytes(
                config
                    .max_message_bytes
                    .saturating_sub(crate::headers::OVERHEAD),
            );
        Ok(KafkaSink {
            producer: Arc::new(producer),
            router,
            limits,
            errored,
            fatal: Arc::new(OnceLock::new()),
            id_header,
        })
    }

    /// Messages queued in librdkafka or awaiting a delivery report.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Wait (blocking a Tokio blocking thread) until librdkafka has delivered or failed
    /// everything it holds, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let p = Arc::clone(&self.producer);
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .map_err(|_| error::err(eventbus_core::ErrorKind::Other, "flush task failed"))?
            .map_err(|e| error::other("flush did not finish in time", e))
    }
}

impl BatchSink for KafkaSink {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> SinkLimits {
        self.limits
    }

    fn validate(&self, msg: &Message) -> Result<(), Error> {
        if self.errored.load(Ordering::Acquire) {
            if let Some(e) = self.fatal.get() {
                return Err(e.clone());
            }
            if let Some((code, reason)) = self.producer.client().fatal_error() {
                tracing::error!(
                    ?code,
                    reason,
                    "Kafka producer fatal error: publishing stopped"
                );
                let e = Error::new(
                    eventbus_core::ErrorKind::Closed,
                    format!(
                        "the Kafka producer hit a fatal error ({code:?}) and stopped; create a new sink"
                    ),
                )
                .with_backend(BACKEND);
                return Err(self.fatal.get_or_init(|| e).clone());
            }
        }
        eventbus_core::validate::message(msg, &crate::TOPIC_RULES, self.limits.max_message_bytes)
    }

    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        let (id, outcomes) = self.router.register(batch.len());
        let mut ids = String::with_capacity(32);
        // Enqueued synchronously, in call order: librdkafka keeps per-partition order.
        for (i, msg) in batch.into_iter().enumerate() {
            let (mid, topic, key, headers, payload) = msg.into_parts();
            let h = crate::headers::encode(&mid, &headers, self.id_header, &mut ids);
            let opaque = ((id as usize) << INDEX_BITS) | i;
            let mut record =
                BaseRecord::with_opaque_to(topic.as_str(), opaque).payload(&payload[..]);
            if let Some(h) = h {
                record = record.headers(h);
            }
            if let Some(k) = &key {
                record = record.key(&k[..]);
            }
            if let Err((e, _)) = self.producer.send(record) {
                self.router.settle(id, i, error::enqueue(e));
            }
        }
        outcomes
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        let sink = self.clone();
        async move {
            // Everything the engine sent has resolved by now; this makes it explicit and keeps
            // rdkafka's drop from purging anything silently.
            if let Err(e) = sink.flush(Duration::from_secs(10)).await {
                tracing::warn!(error = %e, "Kafka producer flush at close did not complete");
            }
        }
    }
}
