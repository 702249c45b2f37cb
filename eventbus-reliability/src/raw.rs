//! The raw clients with no SDK in between, driven through the same load, ledger and checker as
//! the SDK, so a fault row can show what the SDK adds. The raw client is used as its own docs
//! show: every message carries its id (`Nats-Msg-Id`), each publish's ack future is awaited,
//! and whatever the client reports is what the caller sees. Nothing is retried inside the
//! publisher; the scenario's own retry of unknown outcomes (same ids) runs after the fault, as
//! it does for the SDK.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventbus_core::{
    Ack, CloseReport, Error, ErrorKind, Message, Outcome, PendingAck, Position, Publisher,
};

/// Anything the scenarios publish through that can say how many messages it holds unresolved.
pub trait InFlight {
    /// Admitted messages without an outcome yet.
    fn in_flight(&self) -> usize;
}

impl<S: eventbus_core::BatchSink> InFlight for eventbus_batch::Batcher<S> {
    fn in_flight(&self) -> usize {
        self.stats().in_flight
    }
}

/// Publishes of a raw client awaiting their outcome.
#[derive(Clone, Debug, Default)]
struct Tally(Arc<AtomicUsize>);

impl Tally {
    fn up(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn down(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// A `PendingAck` resolved with what `outcome` yields, counted until then.
    fn track(&self, outcome: impl Future<Output = Outcome> + Send + 'static) -> PendingAck {
        self.up();
        let (tx, pending) = PendingAck::channel();
        let tally = self.clone();
        tokio::spawn(async move {
            let o = outcome.await;
            tally.down();
            tx.send(o);
        });
        pending
    }

    /// Wait until nothing is awaited or `deadline` passed; returns what is still awaited.
    async fn wait_idle(&self, deadline: Duration) -> u64 {
        let until = Instant::now() + deadline;
        while self.get() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.get() as u64
    }
}

/// async-nats's JetStream context: `publish_with_headers` per message, its ack future awaited
/// on a task. Its window is the context's `max_ack_inflight` with backpressure on.
#[cfg(feature = "nats")]
#[derive(Clone, Debug)]
pub struct RawNats {
    js: async_nats::jetstream::Context,
    in_flight: Tally,
}

#[cfg(feature = "nats")]
impl RawNats {
    /// Connect to `seeds` (comma separated) with an ack timeout of `ack_timeout` and a window
    /// of `window` publishes awaiting acks.
    pub async fn connect(
        seeds: &str,
        ack_timeout: Duration,
        window: usize,
    ) -> Result<Self, String> {
        let addrs: Vec<async_nats::ServerAddr> = seeds
            .split(',')
            .map(|s| s.parse().map_err(|e| format!("seed {s}: {e}")))
            .collect::<Result<_, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(crate::target::nats_cluster::RAW_CONNECTION)
            .connect(addrs)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(ack_timeout)
            .max_ack_inflight(window)
            .backpressure_on_inflight(true)
            .build(client);
        Ok(RawNats {
            js,
            in_flight: Tally::default(),
        })
    }
}

#[cfg(feature = "nats")]
impl InFlight for RawNats {
    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }
}

/// What the caller of the raw client learns from an ack future's error.
#[cfg(feature = "nats")]
fn outcome(e: &async_nats::jetstream::context::PublishError) -> Outcome {
    use async_nats::jetstream::context::PublishErrorKind as K;
    let text = format!("raw async-nats client: {}", e.kind());
    match e.kind() {
        // "No responders": nothing stored.
        K::StreamNotFound => Outcome::Failed(Error::new(ErrorKind::Rejected, text).temporary()),
        K::TimedOut => Outcome::Unknown(Error::new(ErrorKind::Timeout, text)),
        K::Other | K::WrongLastMessageId | K::WrongLastSequence | K::MaxPayloadExceeded => {
            Outcome::Failed(Error::new(ErrorKind::Rejected, text))
        }
        _ => Outcome::Unknown(Error::new(ErrorKind::Connect, text)),
    }
}

#[cfg(feature = "nats")]
impl Publisher for RawNats {
    fn publish(&self, msg: Message) -> impl Future<Output = Result<PendingAck, Error>> + Send {
        let (js, in_flight) = (self.js.clone(), self.in_flight.clone());
        async move {
            let mut h = async_nats::HeaderMap::new();
            for (n, v) in msg.headers().iter() {
                h.append(n, v);
            }
            h.insert("Nats-Msg-Id", msg.id().to_string().as_str());
            let subject = msg.topic().as_str().to_owned();
            let ack = js
                .publish_with_headers(subject, h, msg.payload().clone())
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Connect, format!("raw publish: {}", e.kind()))
                })?;
            Ok(in_flight.track(async move {
                match ack.await {
                    Ok(a) => Outcome::Acked(Ack {
                        position: Position::Stream {
                            stream: a.stream.into(),
                            sequence: a.sequence,
                            duplicate: a.duplicate,
                        },
                    }),
                    Err(e) => outcome(&e),
                }
            }))
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        self.in_flight.wait_idle(Duration::from_secs(60)).await;
        Ok(())
    }

    async fn close(&self, deadline: Duration) -> Result<CloseReport, Error> {
        Ok(CloseReport::new(self.in_flight.wait_idle(deadline).await))
    }
}

/// rdkafka's `FutureProducer` as its docs show it: idempotent, `acks=all`, one `send_result`
/// per message with the message's key and headers, its delivery future awaited on a task.
/// librdkafka retries inside `message.timeout.ms`; what it reports after that is what the
/// caller sees.
#[cfg(feature = "kafka")]
#[derive(Clone)]
pub struct RawKafka {
    producer: rdkafka::producer::FutureProducer,
    in_flight: Tally,
}

#[cfg(feature = "kafka")]
impl std::fmt::Debug for RawKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKafka").finish_non_exhaustive()
    }
}

#[cfg(feature = "kafka")]
impl RawKafka {
    /// A producer for `bootstrap` whose messages time out after `timeout`.
    pub fn connect(bootstrap: &str, timeout: Duration) -> Result<Self, String> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()
            .map_err(|e| format!("producer: {e}"))?;
        Ok(RawKafka {
            producer,
            in_flight: Tally::default(),
        })
    }
}

#[cfg(feature = "kafka")]
impl InFlight for RawKafka {
    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }
}

#[cfg(feature = "kafka")]
impl Publisher for RawKafka {
    fn publish(&self, msg: Message) -> impl Future<Output = Result<PendingAck, Error>> + Send {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let (producer, in_flight) = (self.producer.clone(), self.in_flight.clone());
        async move {
            let mut headers = OwnedHeaders::new();
            for (n, v) in msg.headers().iter() {
                headers = headers.insert(Header {
                    key: n,
                    value: Some(v),
                });
            }
            let key = msg.key().cloned().unwrap_or_default();
            let record = FutureRecord::to(msg.topic().as_str())
                .payload(&msg.payload()[..])
                .key(&key[..])
                .headers(headers);
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| Error::new(ErrorKind::Overloaded, format!("raw send: {e}")))?;
            Ok(in_flight.track(async move {
                let text = "raw rdkafka client";
                match delivery.await {
                    Ok(Ok(d)) => Outcome::Acked(Ack {
                        position: Position::Partition {
                            partition: d.partition,
                            offset: d.offset,
                        },
                    }),
                    Ok(Err((KafkaError::MessageProduction(code), _)))
                        if code != RDKafkaErrorCode::MessageTimedOut
                            && code != RDKafkaErrorCode::RequestTimedOut =>
                    {
                        Outcome::Failed(Error::new(ErrorKind::Rejected, text))
                    }
                    Ok(Err(_)) | Err(_) => Outcome::Unknown(Error::new(ErrorKind::Timeout, text)),
                }
            }))
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        self.in_flight.wait_idle(Duration::from_secs(60)).await;
        Ok(())
    }

    async fn close(&self, deadline: Duration) -> Result<CloseReport, Error> {
        Ok(CloseReport::new(self.in_flight.wait_idle(deadline).await))
    }
}

/// What a raw client's consumer delivers, in order: a test message (`Some`), another message
/// (`None`), or an error the client reported (the stream goes on after it).
pub type Reads = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Option<crate::record::Read>, String>> + Send>,
>;

/// The connection name of the raw consumer ([`nats_reads`]), found again through `/connz`.
pub const RAW_CONSUMER_CONNECTION: &str = "eventbus-reliability-raw-consumer";

/// async-nats's pull consumer as its docs show it: a durable consumer (`live-raw`, explicit
/// acks) on `stream` filtered to `filter`, read through `Consumer::messages`, each message
/// acked after it is read. Errors the stream yields are passed on; the stream goes on.
#[cfg(feature = "nats")]
pub async fn nats_reads(
    servers: Vec<async_nats::ServerAddr>,
    stream: &str,
    filter: &str,
) -> Result<Reads, String> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures_util::StreamExt;
    let client = async_nats::ConnectOptions::new()
        .name(RAW_CONSUMER_CONNECTION)
        .connect(servers)
        .await
        .map_err(|e| format!("raw consumer connect: {e}"))?;
    let consumer = async_nats::jetstream::new(client)
        .get_stream(stream)
        .await
        .map_err(|e| format!("raw consumer stream: {e}"))?
        .get_or_create_consumer(
            "live-raw",
            pull::Config {
                durable_name: Some("live-raw".into()),
                filter_subject: filter.into(),
                ack_policy: AckPolicy::Explicit,
                ..pull::Config::default()
            },
        )
        .await
        .map_err(|e| format!("raw consumer: {e}"))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| format!("raw consumer messages: {e}"))?;
    Ok(Box::pin(messages.then(|m| async move {
        let m = m.map_err(|e| format!("raw consumer: {e}"))?;
        let read = crate::record::read_with(
            |n| Some(m.headers.as_ref()?.get(n)?.as_str().to_owned()),
            &m.payload,
        );
        m.ack()
            .await
            .map_err(|e| format!("raw consumer ack: {e}"))?;
        Ok(read)
    })))
}

/// rdkafka's `StreamConsumer` at its defaults (offsets stored as messages are read and committed
/// every 5 s) in group `live-raw`, reading `topic` from the earliest offset.
#[cfg(feature = "kafka")]
pub fn kafka_reads(bootstrap: &str, topic: &str) -> Result<Reads, String> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message as _};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "live-raw")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| format!("raw consumer: {e}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| format!("raw consumer subscribe: {e}"))?;
    Ok(Box::pin(futures_util::stream::unfold(
        consumer,
        |c| async move {
            let item = match c.recv().await {
                Ok(m) => Ok(crate::record::read_with(
                    |n| {
                        let h = m.headers()?.iter().find(|h| h.key == n)?;
                        Some(String::from_utf8_lossy(h.value?).into_owned())
                    },
                    m.payload().unwrap_or_default(),
                )),
                Err(e) => Err(format!("raw consumer: {e}")),
            };
            Some((item, c))
        },
    )))
}
