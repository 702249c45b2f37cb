//! Durable pull consumers behind the `Subscriber` trait.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use eventbus_core::spi::{AckHandle, DeadLetters, Feed};
use eventbus_core::{
    Acker, Bytes, Delivery, DeliveryInfo, Error, ErrorKind, MessageId, Position, StartFrom,
    SubscribeSpec, Subscriber, Subscription, Topic,
};
use futures_util::{FutureExt, StreamExt};

use crate::error::{self, BACKEND};
use crate::headers;

/// Subscribes with JetStream pull consumers. A consumer group is one durable consumer shared by
/// its members; `group: None` gets an ephemeral consumer of its own.
#[derive(Clone, Debug)]
pub struct NatsSubscriber {
    pub(crate) js: jetstream::Context,
}

/// How long one pull request waits on an idle stream before it is renewed. It also bounds how
/// long [`Subscription::close`](eventbus_core::Subscription::close) waits on an idle stream: the
/// open request is drained (late messages nacked for prompt redelivery) rather than abandoned,
/// since a message the server sends to an abandoned request waits out the ack wait. 1 s made
/// every idle close take 1 s; 250 ms costs an idle subscription 4 small requests a second.
const PULL_EXPIRES: Duration = Duration::from_millis(250);

/// How long a pull request may stay silent (no message, no end) before it is given up and a new
/// one is asked for. A healthy request ends [`PULL_EXPIRES`] after its last message; one lost
/// with its connection or with the server that held it (a kill, a restart, a new consumer
/// leader) never ends, and async-nats gives it up only 5 s after its expiry: that was the pause
/// in deliveries after every broker restart.
const PULL_SILENCE: Duration = Duration::from_millis(1_000);

/// How often a waiting pull checks whether the client has connected again (pull requests open
/// on the old connection are gone with it) and whether its request went silent. Polled:
/// async-nats keeps its connection-state watch to itself.
const RECHECK: Duration = Duration::from_millis(50);

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

/// The stream that captures `subject`.
async fn stream_of(
    js: &jetstream::Context,
    subject: &str,
) -> Result<jetstream::stream::Stream, Error> {
    use async_nats::jetstream::context::GetStreamByNameErrorKind as K;
    let name = js
        .stream_by_subject(subject)
        .await
        .map_err(|e| match e.kind() {
            K::NotFound | K::InvalidSubject => error::err(
                ErrorKind::Rejected,
                "no JetStream stream covers the subject",
            ),
            // A timeout or a lost connection says nothing about the subject (an election, a
            // restart): typed by the error itself, retryable where it can help.
            _ => error::other("stream lookup failed", e),
        })?;
    js.get_stream(&name)
        .await
        .map_err(|e| error::other("stream lookup failed", e))
}

/// The durable consumer name of group `group` on `topic`.
fn durable(group: &str, topic: &str) -> String {
    format!("{}-{}", safe(group), safe(topic))
}

impl Subscriber for NatsSubscriber {
    /// JetStream's own count for the group's durable consumer: `num_pending` (not yet
    /// delivered) and `num_ack_pending` (delivered, not acked).
    fn lag(
        &self,
        topic: &Topic,
        group: &str,
    ) -> impl Future<Output = Result<eventbus_core::ops::Lag, Error>> + Send {
        let js = self.js.clone();
        let (subject, name) = (topic.as_str().to_owned(), durable(group, topic.as_str()));
        async move {
            let stream = stream_of(&js, &subject).await?;
            let mut consumer: jetstream::consumer::Consumer<pull::Config> =
                stream.get_consumer(&name).await.map_err(|e| {
                    error::err(
                        ErrorKind::Rejected,
                        format!("no such consumer group (durable consumer {name}): {e}"),
                    )
                })?;
            let info = consumer
                .info()
                .await
                .map_err(|e| error::other("consumer info failed", e))?;
            Ok(eventbus_core::ops::Lag::new(
                info.num_pending,
                info.num_ack_pending as u64,
            ))
        }
    }

    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send {
        let js = self.js.clone();
        async move {
            for t in spec.all_topics() {
                eventbus_core::validate::subscription_filter(t.as_str())
                    .map_err(|e| e.with_backend(BACKEND))?;
            }
            let letters = DeadLetters::for_spec(&spec, &crate::SUBJECT_RULES, BACKEND, || {
                let js = js.clone();
                Ok(move |letter| publish_letter(js.clone(), letter))
            })?;
            Subscription::per_topic(spec, letters, |one, feed| subscribe_one(&js, one, feed)).await
        }
    }
}

/// One subject filter's subscription: a pull consumer on the stream that covers it (durable
/// per group and filter).
async fn subscribe_one(
    js: &jetstream::Context,
    spec: SubscribeSpec,
    feed: Feed,
) -> Result<(), Error> {
    let js = js.clone();
    let stream = stream_of(&js, spec.topic.as_str()).await?;
    let mut config = pull::Config {
        filter_subject: spec.topic.as_str().to_owned(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        // The server keeps redelivering: the subscription gives up on a message past
        // `max_deliveries` (dead letter or a logged termination), where the server would stop
        // delivering it without a word.
        max_deliver: -1,
        deliver_policy: match spec.start {
            StartFrom::Latest => jetstream::consumer::DeliverPolicy::New,
            _ => jetstream::consumer::DeliverPolicy::All,
        },
        max_ack_pending: (spec.prefetch as i64 * 8).max(1_000),
        ..Default::default()
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> = match &spec.group {
        Some(g) => {
            let name = durable(g, spec.topic.as_str());
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
    tokio::spawn(pump(consumer, Arc::new(js.client()), spec.prefetch, feed));
    Ok(())
}

/// Pull batches and hand each message to the subscriber. Two pull requests overlap: the next
/// one is asked for once half of the current batch is handed over, so the handler does not wait
/// a round trip at every batch boundary. Both may then be filled at once ([`Pulls`] hands their
/// messages over in delivery order). On close, every message already pulled but not handed
/// over is nacked so it is redelivered at once, not after the ack wait.
async fn pump(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    client: Arc<async_nats::Client>,
    prefetch: usize,
    mut feed: Feed,
) {
    let stats = client.statistics();
    let mut pulls = Pulls::default();
    let mut names = Names::default();
    'outer: loop {
        let connects = stats.connects.load(Ordering::Relaxed);
        if pulls.open.is_empty() {
            let asked = tokio::select! {
                b = request(&consumer, prefetch) => b,
                _ = feed.stopped() => break,
            };
            match asked {
                Ok(b) => pulls.push(b),
                Err(e) => {
                    if feed
                        .send(Err(error::other("pull request failed", e)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        // One timer per round of requests, not per message: every tick checks for a reconnect
        // (open requests went with the old connection) and for requests silent too long.
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pulls.open.is_empty() {
            if pulls.wants_another(prefetch) {
                // An early request that fails is asked again, and reported, when these end.
                if let Ok(b) = request(&consumer, prefetch).await {
                    pulls.push(b);
                }
            }
            let since = tokio::time::Instant::now();
            let msg = loop {
                tokio::select! {
                    m = pulls.next() => break Some(m),
                    _ = tick.tick() => {
                        if stats.connects.load(Ordering::Relaxed) != connects {
                            tracing::debug!("reconnected; asking again");
                            break None;
                        }
                        if since.elapsed() >= PULL_SILENCE {
                            tracing::debug!("pull request silent; asking again");
                            break None;
                        }
                    }
                    _ = feed.stopped() => {
                        pulls.release().await;
                        break 'outer;
                    }
                }
            };
            // Reconnected or silent: the requests went the same way; ask afresh.
            let Some(msg) = msg else {
                pulls.abandon().await;
                break;
            };
            let Some(msg) = msg else { continue }; // a request ended
            if let Err(Ok(d)) = feed.send(Ok(to_delivery(msg, &client, &mut names))).await {
                let _ = d.nack(Duration::ZERO).await;
                pulls.release().await;
                break 'outer;
            }
        }
    }
}

/// The open pull requests, oldest first (at most two), and the message each has waiting.
///
/// nats-server hands its waiting pull requests messages in turn, so while two are open the
/// tail of a live stream is split between them. Reading one request to its end before the next
/// would hand the subscriber messages out of stream order (and hold half of them until the
/// first request ends). Instead each request's next message is taken as soon as it arrives and
/// the one delivered first (lowest consumer sequence) goes first. That is exact: the client
/// reads one connection and routes its messages to the requests' inboxes in arrival order, so
/// once a message is seen, every message delivered before it is already in its inbox, and the
/// other requests are polled again (outside tokio's cooperative budget) before it is handed
/// over.
#[derive(Default)]
struct Pulls {
    open: Vec<Open>,
}

struct Open {
    batch: pull::Batch,
    /// Taken from the request, not yet handed over: its consumer sequence and the message.
    held: Option<(u64, jetstream::Message)>,
    ended: bool,
    handed: usize,
}

impl Pulls {
    fn push(&mut self, batch: pull::Batch) {
        self.open.push(Open {
            batch,
            held: None,
            ended: false,
            handed: 0,
        });
    }

    /// One request is open and half of it handed over: time to ask for the next.
    fn wants_another(&self, prefetch: usize) -> bool {
        matches!(&self.open[..], [only] if only.handed >= prefetch.div_ceil(2))
    }

    /// The next message in delivery order, or `None` when a request ended (it is dropped).
    /// Cancel-safe: a message taken from a request is kept in `held` until handed over.
    async fn next(&mut self) -> Option<jetstream::Message> {
        loop {
            if let [only] = &mut self.open[..] {
                // One request: its own order is delivery order, nothing to compare. Awaiting
                // the stream directly is cancel-safe (a message is only taken when returned).
                let item = match only.held.take() {
                    Some((_, m)) => Some(Ok(m)),
                    None if only.ended => None,
                    None => only.batch.next().await,
                };
                if let Some(Ok(m)) = item {
                    only.handed += 1;
                    return Some(m);
                }
                only.take(item);
                self.open.clear();
                return None;
            }
            if self.open.is_empty() {
                return None;
            }
            for o in self
                .open
                .iter_mut()
                .filter(|o| o.held.is_none() && !o.ended)
            {
                // Unconstrained: with the task's cooperative budget spent, tokio's channel
                // answers "pending" although a message waits, which would pass it over.
                if let Some(item) = tokio::task::unconstrained(o.batch.next()).now_or_never() {
                    o.take(item);
                }
            }
            let before = self.open.len();
            self.open.retain(|o| !o.ended || o.held.is_some());
            if self.open.len() < before {
                return None;
            }
            let first = self
                .open
                .iter_mut()
                .filter(|o| o.held.is_some())
                .min_by_key(|o| o.held.as_ref().map(|(seq, _)| *seq));
            if let Some(o) = first {
                o.handed += 1;
                return o.held.take().map(|(_, m)| m);
            }
            // Nothing has arrived: wait for any request to move, then sort it out above.
            let waiting = self
                .open
                .iter_mut()
                .map(|o| Box::pin(async move { (o.batch.next().await, o) }));
            let ((item, o), _, _) = futures_util::future::select_all(waiting).await;
            o.take(item);
        }
    }

    /// Drop the open requests, gone with their connection or silent, nacking what was pulled
    /// and not handed over.
    async fn abandon(&mut self) {
        for mut o in self.open.drain(..) {
            if let Some((_, m)) = o.held.take() {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
            // What already arrived for the request is nacked too, not left to the ack wait.
            while let Some(Some(Ok(m))) = tokio::task::unconstrained(o.batch.next()).now_or_never()
            {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
        }
    }

    /// Nack what was pulled and not handed over, and wait out the open requests (a message
    /// the server sends to an abandoned request would wait out the ack wait).
    async fn release(&mut self) {
        for mut o in self.open.drain(..) {
            if let Some((_, m)) = o.held.take() {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
            if !o.ended {
                release_rest(&mut o.batch).await;
            }
        }
    }
}

impl Open {
    fn take(&mut self, item: Option<Result<jetstream::Message, async_nats::Error>>) {
        match item {
            Some(Ok(m)) => {
                let seq = m.info().map_or(0, |i| i.consumer_sequence);
                self.held = Some((seq, m));
            }
            None => self.ended = true,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "pull batch ended with an error");
                self.ended = true;
            }
        }
    }
}

/// One pull request for up to `prefetch` messages, open for [`PULL_EXPIRES`].
async fn request(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    prefetch: usize,
) -> Result<pull::Batch, pull::BatchError> {
    consumer
        .batch()
        .max_messages(prefetch)
        .expires(PULL_EXPIRES)
        .messages()
        .await
}

/// How the dead-letter layer publishes a letter here: a JetStream publish, done once its pub
/// ack says the letter is stored.
async fn publish_letter(
    js: jetstream::Context,
    letter: eventbus_core::Message,
) -> Result<(), Error> {
    let (subject, payload, hdrs) = headers::encode(letter, true);
    js.publish_with_headers(subject, hdrs, payload)
        .await
        .map_err(|e| error::other("dead letter not sent", e))?
        .await
        .map_err(|e| error::other("dead letter not stored", e))?;
    Ok(())
}

async fn release_rest(batch: &mut pull::Batch) {
    while let Ok(Some(Ok(m))) = tokio::time::timeout(PULL_EXPIRES * 2, batch.next()).await {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}

/// Names a subscription's messages share (the stream, and the subject while it stays the
/// same), so a delivery does not allocate them anew.
#[derive(Default)]
struct Names {
    stream: Option<Arc<str>>,
    topic: Option<Topic>,
}

impl Names {
    fn stream(&mut self, name: &str) -> Arc<str> {
        match &self.stream {
            Some(s) if &**s == name => Arc::clone(s),
            _ => Arc::clone(self.stream.insert(Arc::from(name))),
        }
    }

    fn topic(&mut self, subject: &str) -> Topic {
        Topic::reusing(&mut self.topic, subject)
    }
}

/// The delivery of `msg`; its ack goes out on `client`, the subscription's.
fn to_delivery(
    msg: jetstream::Message,
    client: &Arc<async_nats::Client>,
    names: &mut Names,
) -> Delivery {
    let (count, position) = match msg.info() {
        Ok(i) => (
            i.delivered.clamp(1, i64::from(u32::MAX)) as u32,
            Position::Stream {
                stream: names.stream(i.stream),
                sequence: i.stream_sequence,
                duplicate: false,
            },
        ),
        Err(_) => (
            1,
            Position::Stream {
                stream: Arc::from(""),
                sequence: 0,
                duplicate: false,
            },
        ),
    };
    // The message without its JetStream context: the ack needs only the reply subject.
    let msg = msg.message;
    let m = headers::decode(
        names.topic(msg.subject.as_str()),
        msg.headers.as_ref(),
        msg.payload,
        || match &position {
            Position::Stream {
                stream, sequence, ..
            } if !stream.is_empty() => {
                MessageId::custom_fmt(format_args!("nats:{stream}:{sequence}"))
            }
            _ => MessageId::generate(),
        },
    );
    Delivery::new(
        m,
        DeliveryInfo::new(count, position),
        Acker::new(NatsAcker {
            client: Arc::clone(client),
            reply: msg.reply,
        }),
    )
}

/// Acks a message by publishing the ack on its reply subject, as async-nats's
/// `jetstream::Message::ack_with` does, without holding the message and a clone of its
/// JetStream context per delivery.
struct NatsAcker {
    client: Arc<async_nats::Client>,
    reply: Option<async_nats::Subject>,
}

impl NatsAcker {
    /// Publish `payload` on the reply subject: empty for an ack (as `ack()` sends it), else
    /// the [`AckKind`]'s.
    async fn send(self: Box<Self>, payload: Bytes) -> Result<(), Error> {
        let Some(reply) = self.reply else {
            return Err(Error::new(
                ErrorKind::Other,
                "no reply subject: not a JetStream message",
            )
            .with_backend(BACKEND));
        };
        self.client
            .publish(reply, payload)
            .await
            .map_err(|e| ack_err(e.into()))
    }
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
        self.send(Bytes::new()).await
    }
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), Error> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.send(AckKind::Nak(delay).into()).await
    }
    async fn term(self: Box<Self>) -> Result<(), Error> {
        self.send(AckKind::Term.into()).await
    }
}
