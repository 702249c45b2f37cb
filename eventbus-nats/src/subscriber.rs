//! Durable pull consumers behind the `Subscriber` trait.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use eventbus_core::{
    AckHandle, Acker, Delivery, DeliveryInfo, Error, Feed, Position, StartFrom, SubscribeSpec,
    Subscriber, Subscription,
};
use futures_util::StreamExt;

use crate::error::{self, BACKEND};
use crate::headers;

/// Subscribes with JetStream pull consumers. A consumer group is one durable consumer shared by
/// its members; `group: None` gets an ephemeral consumer of its own.
#[derive(Clone, Debug)]
pub struct NatsSubscriber {
    pub(crate) js: jetstream::Context,
}

/// How long one pull request waits on an idle stream before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// A durable-name-safe version of `s` (no `.`, `*`, `>`, whitespace).
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Subscriber for NatsSubscriber {
    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send {
        let js = self.js.clone();
        async move {
            eventbus_core::validate::subscription_filter(spec.topic.as_str())
                .map_err(|e| e.with_backend(BACKEND))?;
            let stream_name = js
                .stream_by_subject(spec.topic.as_str())
                .await
                .map_err(|e| error::other("no JetStream stream covers the subject", e))?;
            let stream = js
                .get_stream(&stream_name)
                .await
                .map_err(|e| error::other("stream lookup failed", e))?;
            let mut config = pull::Config {
                filter_subject: spec.topic.as_str().to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: spec.ack_wait,
                max_deliver: spec.max_deliveries.map_or(-1, i64::from),
                deliver_policy: match spec.start {
                    StartFrom::Latest => jetstream::consumer::DeliverPolicy::New,
                    _ => jetstream::consumer::DeliverPolicy::All,
                },
                max_ack_pending: (spec.prefetch as i64 * 8).max(1_000),
                ..Default::default()
            };
            let consumer: jetstream::consumer::Consumer<pull::Config> = match &spec.group {
                Some(g) => {
                    let name = format!("{}-{}", safe(g), safe(spec.topic.as_str()));
                    config.durable_name = Some(name.clone());
                    stream
                        .get_or_create_consumer(&name, config)
                        .await
                        .map_err(|e| error::other("could not create the durable consumer", e))?
                }
                None => {
                    config.inactive_threshold = Duration::from_secs(30);
                    stream
                        .create_consumer(config)
                        .await
                        .map_err(|e| error::other("could not create the consumer", e))?
                }
            };
            let (sub, feed) = Subscription::channel(spec.prefetch);
            tokio::spawn(pump(consumer, spec.prefetch, feed));
            Ok(sub)
        }
    }
}

/// Pull batches and hand each message to the subscriber. On close, every message already pulled
/// but not handed over is nacked so it is redelivered at once, not after the ack wait.
async fn pump(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    prefetch: usize,
    mut feed: Feed,
) {
    'outer: loop {
        let batch = consumer
            .batch()
            .max_messages(prefetch)
            .expires(PULL_EXPIRES)
            .messages();
        let mut batch = tokio::select! {
            b = batch => match b {
                Ok(b) => b,
                Err(e) => {
                    if feed.send(Err(error::other("pull request failed", e))).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = feed.stopped() => break,
        };
        loop {
            let next = tokio::select! {
                m = batch.next() => m,
                _ = feed.stopped() => {
                    release_rest(&mut batch).await;
                    break 'outer;
                }
            };
            let msg = match next {
                None => break, // batch done: pull again
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull batch ended with an error");
                    break;
                }
            };
            let delivery = to_delivery(msg);
            if let Err(Ok(d)) = feed.send(Ok(delivery)).await {
                let _ = d.nack(Duration::ZERO).await;
                release_rest(&mut batch).await;
                break 'outer;
            }
        }
    }
}

async fn release_rest(batch: &mut pull::Batch) {
    while let Ok(Some(Ok(m))) = tokio::time::timeout(PULL_EXPIRES * 2, batch.next()).await {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}

fn to_delivery(msg: jetstream::Message) -> Delivery {
    let (count, position) = match msg.info() {
        Ok(i) => (
            i.delivered.clamp(1, i64::from(u32::MAX)) as u32,
            Position::Stream {
                stream: i.stream.to_owned(),
                sequence: i.stream_sequence,
                duplicate: false,
            },
        ),
        Err(_) => (
            1,
            Position::Stream {
                stream: String::new(),
                sequence: 0,
                duplicate: false,
            },
        ),
    };
    let m = headers::decode(
        msg.subject.as_str(),
        msg.headers.as_ref(),
        msg.payload.clone(),
    );
    Delivery::new(
        m,
        DeliveryInfo::new(count, position),
        Acker::new(NatsAcker { msg }),
    )
}

struct NatsAcker {
    msg: jetstream::Message,
}

fn ack_err(e: async_nats::Error) -> Error {
    Error::new(
        eventbus_core::ErrorKind::Connect,
        format!("ack not sent: {e}"),
    )
    .temporary()
    .with_backend(BACKEND)
}

#[async_trait::async_trait]
impl AckHandle for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        self.msg.ack().await.map_err(ack_err)
    }
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), Error> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.msg
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(ack_err)
    }
    async fn term(self: Box<Self>) -> Result<(), Error> {
        self.msg.ack_with(AckKind::Term).await.map_err(ack_err)
    }
}
