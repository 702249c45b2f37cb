#![doc = include_str!("../README.md")]

mod config;
mod error;
mod headers;
mod rules;
mod sink;
mod subscriber;
mod txn;

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Capabilities, Error, ErrorKind, TopicSpec};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

pub use config::{ENV_VARS, KafkaConfig};
pub use rules::TOPIC_RULES;
pub use sink::{ID_HEADER, KafkaSink};
pub use subscriber::KafkaSubscriber;
pub use txn::{TxnProcessor, TxnSpec, TxnStats};

impl eventbus_core::ops::HealthCheck for KafkaBackend {
    /// Up when the cluster answers a metadata request within `timeout`.
    fn health(
        &self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = eventbus_core::ops::Health> + Send {
        use eventbus_core::ops::Health;
        let client = Arc::clone(&self.probe.0);
        async move {
            let start = std::time::Instant::now();
            let probe = tokio::task::spawn_blocking(move || {
                client
                    .fetch_metadata(None, timeout)
                    .map(|md| md.brokers().len())
            });
            match tokio::time::timeout(timeout + Duration::from_millis(500), probe).await {
                Ok(Ok(Ok(brokers))) => Health::up(
                    error::BACKEND,
                    start.elapsed(),
                    format!("metadata from {brokers} broker(s)"),
                ),
                Ok(Ok(Err(e))) => Health::down(
                    error::BACKEND,
                    start.elapsed(),
                    format!("no metadata: {}", error::other("metadata", e)),
                ),
                _ => Health::down(error::BACKEND, start.elapsed(), "metadata timed out"),
            }
        }
    }
}

impl eventbus_core::Backend for KafkaBackend {
    type Sink = KafkaSink;
    type Subscriber = KafkaSubscriber;
    fn name(&self) -> &'static str {
        error::BACKEND
    }

    /// A publishing sink (one librdkafka producer); wrap it in `eventbus_batch::Batcher`.
    async fn sink(&self) -> Result<KafkaSink, Error> {
        KafkaSink::new(&self.config, true)
    }

    /// A subscriber (one librdkafka consumer and thread per subscription).
    fn subscriber(&self) -> KafkaSubscriber {
        KafkaSubscriber {
            config: self.config.clone(),
            lag_readers: self.lag_readers.clone(),
        }
    }

    /// Topics have partitions, a replication factor and `retention.ms`. The broker keeps every
    /// copy a retried publish sends (the idempotent producer only drops its own in-session
    /// resends): consumers de-duplicate by id.
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_partitions(true)
            .with_replicas(true)
            .with_max_age(true)
    }

    /// [`KafkaBackend::ensure_topics`] with one topic.
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), Error> {
        self.ensure_topics(std::slice::from_ref(spec)).await
    }
}

/// A Kafka-protocol cluster: makes sinks and manages topics.
#[derive(Clone, Debug)]
pub struct KafkaBackend {
    config: KafkaConfig,
    lag_readers: subscriber::LagReaders,
    /// The client `connect` checked the cluster with, kept for health checks and watermarks
    /// (one connection, not one per call).
    probe: Probe,
    /// One admin client for topic management, made on first use and shared by clones.
    admin: Admin,
}

/// The admin client, created on first use and shared: each one is a librdkafka instance with
/// its own thread and broker connection, too much to make per `ensure_topic` call.
#[derive(Clone, Default)]
struct Admin(Arc<parking_lot::Mutex<Option<Arc<AdminClient<DefaultClientContext>>>>>);

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admin")
    }
}

/// An idle librdkafka client for metadata requests.
#[derive(Clone)]
struct Probe(Arc<BaseConsumer<ConnectContext>>);

/// Remembers the first TLS or authentication error librdkafka reports while connecting (it
/// reports them through the error callback; the metadata request only sees a transport failure
/// or a timeout), so `connect` can fail at once with a typed error instead of retrying.
#[derive(Default)]
struct ConnectContext {
    refused: parking_lot::Mutex<Option<rdkafka::types::RDKafkaErrorCode>>,
}

impl rdkafka::ClientContext for ConnectContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as C;
        let code = match error.rdkafka_error_code() {
            Some(c @ (C::SSL | C::Authentication | C::SaslAuthenticationFailed)) => Some(c),
            // A TLS alert from the server (e.g. "certificate required" to a client without
            // one) arrives as a transport failure whose reason names OpenSSL.
            Some(C::BrokerTransportFailure) => refusal_in(reason),
            _ => None,
        };
        match code {
            Some(c) => self.refused(c),
            // The reason names brokers and causes, never secrets.
            None => tracing::debug!(error = %error, reason, "librdkafka error while connecting"),
        }
    }

    /// librdkafka logs every broker failure (facility `FAIL`) next to the error event; the
    /// refusal is typed from whichever is served first, so the type never depends on timing.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        if let Some(c) = refusal_in(log_message) {
            self.refused(c);
        }
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
                tracing::warn!(fac, log_message, "librdkafka")
            }
            _ => tracing::debug!(fac, log_message, "librdkafka"),
        }
    }
}

/// A TLS or authentication refusal named in a librdkafka failure text. Only texts that cannot
/// come from a transient fault: a disconnect during the TLS handshake ("SSL handshake failed:
/// Disconnected") is not one.
fn refusal_in(text: &str) -> Option<rdkafka::types::RDKafkaErrorCode> {
    use rdkafka::types::RDKafkaErrorCode as C;
    const TLS: [&str; 4] = [
        "SSL routines",
        "certificate verify failed",
        "Failed to verify broker certificate",
        "Broker did not provide a certificate",
    ];
    if TLS.iter().any(|t| text.contains(t)) {
        Some(C::SSL)
    } else if text.contains("SASL authentication error") {
        Some(C::Authentication)
    } else {
        None
    }
}

impl ConnectContext {
    fn refused(&self, code: rdkafka::types::RDKafkaErrorCode) {
        self.refused.lock().get_or_insert(code);
    }
}

impl rdkafka::consumer::ConsumerContext for ConnectContext {}

impl ConnectContext {
    /// The typed error for a refusal seen so far, if any: not retryable, the same credentials
    /// or certificates would be refused again.
    fn refusal(&self) -> Option<Error> {
        use rdkafka::types::RDKafkaErrorCode as C;
        let code = (*self.refused.lock())?;
        Some(match code {
            C::SSL => error::err(
                ErrorKind::Connect,
                "TLS handshake with the Kafka cluster failed (certificate, CA, host name or \
                 protocol mismatch: check EVENTBUS_KAFKA_SECURITY_PROTOCOL, EVENTBUS_KAFKA_SSL_CA, \
                 EVENTBUS_KAFKA_SSL_CERT and EVENTBUS_KAFKA_SSL_KEY, or the same librdkafka \
                 `ssl.*` options)",
            )
            .permanent(),
            _ => error::err(
                ErrorKind::Auth,
                "the Kafka cluster refused the credentials (EVENTBUS_KAFKA_SASL_USERNAME, \
                 EVENTBUS_KAFKA_SASL_PASSWORD and EVENTBUS_KAFKA_SASL_MECHANISM, or the same \
                 librdkafka `sasl.*` options)",
            ),
        })
    }
}

/// Serve librdkafka's event queue until it is empty: error and log events reach the context
/// only here, and one `poll` returns after at most one error event.
fn serve_events(consumer: &BaseConsumer<ConnectContext>) {
    for _ in 0..256 {
        if consumer.poll(Duration::from_millis(5)).is_none() {
            break;
        }
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

impl KafkaBackend {
    /// Check that the cluster answers (metadata request within `connect_timeout`).
    pub async fn connect(config: KafkaConfig) -> Result<Self, Error> {
        config.validate()?;
        let c = config.clone();
        let probe = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer<ConnectContext> = c
                .client_config()
                .create_with_context(ConnectContext::default())
                .map_err(|e| error::other("invalid Kafka client configuration", e))?;
            // Short metadata requests until `connect_timeout`, so a TLS or authentication
            // refusal (reported through the error callback) ends the wait at once.
            let deadline = std::time::Instant::now() + c.connect_timeout;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let r = consumer.fetch_metadata(None, left.min(Duration::from_millis(100)));
                serve_events(&consumer);
                if let Some(refused) = consumer.context().refusal() {
                    return Err(refused);
                }
                match r {
                    Ok(_) => break,
                    Err(e) if left <= Duration::from_millis(100) => {
                        // A refusal queued behind the last request still types the error.
                        serve_events(&consumer);
                        if let Some(refused) = consumer.context().refusal() {
                            return Err(refused);
                        }
                        return Err(error::other("could not reach the Kafka cluster", e));
                    }
                    // Some failures return at once: do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            Ok::<_, Error>(consumer)
        })
        .await
        .map_err(|_| error::err(ErrorKind::Other, "connect task failed"))??;
        Ok(KafkaBackend {
            config,
            lag_readers: subscriber::LagReaders::default(),
            probe: Probe(Arc::new(probe)),
            admin: Admin::default(),
        })
    }

    /// A sink that does not send the `eventbus-id` header: consumers then see generated ids
    /// (no de-duplication by id downstream). Some brokers pay per header: tansu 0.6.0's SQLite
    /// engine stores 100,000 108-byte records at ~100k msg/s without headers and ~50k msg/s
    /// with one 32-byte header, whoever produces them.
    pub fn sink_without_id(&self) -> Result<KafkaSink, Error> {
        KafkaSink::new(&self.config, false)
    }

    /// A consume-transform-produce processor whose outputs and input offsets commit in one
    /// Kafka transaction per batch ([`TxnProcessor`]): it joins the group, subscribes and
    /// registers its transactional id (fencing an older instance with the same id).
    pub async fn transactional(&self, spec: TxnSpec) -> Result<TxnProcessor, Error> {
        TxnProcessor::start(&self.config, spec).await
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Create every topic in `specs` unless it exists, in one CreateTopics request: with the
    /// spec's partitions (default 1), replication factor (default 1) and age limit
    /// (`retention.ms`, default the broker's). Every spec is checked before anything is sent;
    /// an invalid name or option fails the call with nothing created.
    ///
    /// ```no_run
    /// # async fn demo(kafka: eventbus_kafka::KafkaBackend) -> Result<(), eventbus_core::Error> {
    /// use eventbus_core::TopicSpec;
    /// let specs = ["orders", "payments", "refunds"].map(|t| TopicSpec::new(t).partitions(3));
    /// kafka.ensure_topics(&specs).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), Error> {
        use eventbus_core::Backend as _;
        let caps = self.capabilities();
        let mut plan = Vec::with_capacity(specs.len());
        for spec in specs {
            eventbus_core::validate::topic(spec.name(), &TOPIC_RULES)?;
            spec.check(&caps, error::BACKEND)?;
            let int = |n: Option<u32>| {
                i32::try_from(n.unwrap_or(1)).map_err(|_| {
                    error::err(
                        ErrorKind::Config,
                        "partitions and replicas must fit in an i32",
                    )
                })
            };
            // Rounded up: an age under a millisecond must not become `0` (no retention).
            let retention = spec
                .get_max_age()
                .map(|d| d.as_nanos().div_ceil(1_000_000).to_string());
            plan.push((
                spec.name(),
                int(spec.get_partitions())?,
                int(spec.get_replicas())?,
                retention,
            ));
        }
        if specs.is_empty() {
            return Ok(());
        }
        let admin = self.admin()?;
        let new: Vec<NewTopic<'_>> = plan
            .iter()
            .map(|(name, partitions, replicas, retention)| {
                let t = NewTopic::new(name, *partitions, TopicReplication::Fixed(*replicas));
                match retention {
                    Some(ms) => t.set("retention.ms", ms),
                    None => t,
                }
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new, &opts)
            .await
            .map_err(|e| error::other("create topic failed", e))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    use rdkafka::types::RDKafkaErrorCode as C;
                    let kind = match code {
                        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
                            ErrorKind::Auth
                        }
                        _ => ErrorKind::Rejected,
                    };
                    return Err(error::err(
                        kind,
                        format!("create topic {topic} failed: {code:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The shared admin client, created on first use.
    fn admin(&self) -> Result<Arc<AdminClient<DefaultClientContext>>, Error> {
        let mut slot = self.admin.0.lock();
        if let Some(a) = slot.as_ref() {
            return Ok(Arc::clone(a));
        }
        let a: AdminClient<DefaultClientContext> = self
            .config
            .client_config()
            .create()
            .map_err(|e| error::other("could not create the admin client", e))?;
        let a = Arc::new(a);
        *slot = Some(Arc::clone(&a));
        Ok(a)
    }

    /// Low and high watermarks of every partition of `topic`.
    pub async fn watermarks(&self, topic: &str) -> Result<Vec<(i32, i64, i64)>, Error> {
        let (c, consumer) = (self.config.clone(), Arc::clone(&self.probe.0));
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            // Metadata and offsets can be slow on a loaded broker: allow more than connect.
            let wait = c.connect_timeout.max(Duration::from_secs(30));
            let md = consumer
                .fetch_metadata(Some(&topic), wait)
                .map_err(|e| error::other("metadata", e))?;
            let mut out = Vec::new();
            for t in md.topics() {
                for p in t.partitions() {
                    let (lo, hi) = consumer
                        .fetch_watermarks(&topic, p.id(), wait)
                        .map_err(|e| error::other("watermarks", e))?;
                    out.push((p.id(), lo, hi));
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| error::err(ErrorKind::Other, "watermark task failed"))?
    }
}

/// Convert a record read with a plain rdkafka consumer into a [`Message`](eventbus_core::Message)
/// (id from the `eventbus-id` header, key, text headers, payload).
pub use headers::decode as decode_record;
