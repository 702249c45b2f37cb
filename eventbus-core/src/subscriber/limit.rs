//! What a subscription does with a delivery past [`SubscribeSpec::max_deliveries`]: move it to
//! the dead-letter topic, or give up on it. The same on every backend: a backend only keeps
//! redelivering with an honest delivery count.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::SubscribeSpec;
use super::dead_letter;
use super::delivery::Delivery;
use super::stream::{Layer, Step};
use crate::error::{Error, ErrorKind};
use crate::message::{Message, Topic};

/// How a backend publishes dead letters, for a subscription whose spec has both
/// [`SubscribeSpec::dead_letter`] and [`SubscribeSpec::max_deliveries`]; the backend hands it
/// to [`Subscription::per_topic`](crate::Subscription::per_topic). A delivery past
/// `max_deliveries` then never reaches the handler: its dead letter ([`dead_letter::message`])
/// is published, and only once that publish is acked is the message terminated. A refused or
/// failed publish nacks it instead, so the broker offers it again (and the subscription tries
/// again) after [`DeadLetters::RETRY`]: nothing is dropped. A backend says only how to publish
/// (any [`Publisher`](crate::Publisher), or its own producer).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use eventbus_core::spi::DeadLetters;
/// use eventbus_core::{Message, SubscribeSpec, Topic};
/// use eventbus_core::validate::PORTABLE;
/// let spec = SubscribeSpec::new("orders").max_deliveries(5).dead_letter("orders.dlq");
/// let publish = || Ok(|letter: Message| async move {
///     assert_eq!(letter.topic().as_str(), "orders.dlq");
///     Ok(()) // publish it somewhere
/// });
/// let layer = DeadLetters::for_spec(&spec, &PORTABLE, "demo", publish).unwrap();
/// assert!(layer.is_some());
/// let none = DeadLetters::for_spec(&SubscribeSpec::new("orders"), &PORTABLE, "demo", publish);
/// assert!(none.unwrap().is_none());
/// let bad = SubscribeSpec::new("orders").max_deliveries(5).dead_letter("orders dlq");
/// assert!(DeadLetters::for_spec(&bad, &PORTABLE, "demo", publish).is_err());
/// # });
/// ```
#[derive(Clone)]
pub struct DeadLetters {
    to: Topic,
    max: u32,
    post:
        Arc<dyn Fn(Message) -> crate::backend::BoxFuture<'static, Result<(), Error>> + Send + Sync>,
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("to", &self.to)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// How long a message whose dead letter was refused waits before it is offered again.
    pub const RETRY: Duration = Duration::from_secs(1);

    /// Dead-letter to `to` the deliveries past `max`, publishing each letter with `post`
    /// (`Ok` once the broker stored it).
    pub fn new<F, Fut>(to: Topic, max: u32, post: F) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        DeadLetters {
            to,
            max,
            post: Arc::new(move |m| Box::pin(post(m))),
        }
    }

    /// Like [`DeadLetters::new`], publishing through `publisher` and waiting for the ack.
    pub fn through<P: crate::Publisher + 'static>(to: Topic, max: u32, publisher: P) -> Self {
        let publisher = Arc::new(publisher);
        Self::new(to, max, move |letter| {
            let publisher = Arc::clone(&publisher);
            async move {
                publisher
                    .publish(letter)
                    .await?
                    .await
                    .into_result()
                    .map(drop)
            }
        })
    }

    /// The layer `spec` asks for (`dead_letter` and `max_deliveries` both set), if any, what
    /// every backend does before [`Subscription::per_topic`](crate::Subscription::per_topic):
    ///
    /// - a dead-letter topic is checked against the backend's `rules` whenever the spec names
    ///   one (a bad name is a typed [`ErrorKind::InvalidMessage`] at subscribe, tagged with
    ///   `backend`, not a failure at the first letter);
    /// - `make` is called, once, only when there will be letters to publish: it returns how to
    ///   publish one (a backend may open a producer there).
    pub fn for_spec<M, F, Fut>(
        spec: &SubscribeSpec,
        rules: &crate::spi::TopicRules,
        backend: &'static str,
        make: M,
    ) -> Result<Option<Self>, Error>
    where
        M: FnOnce() -> Result<F, Error>,
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let Some(to) = spec.dead_letter.clone() else {
            return Ok(None);
        };
        crate::validate::topic(to.as_str(), rules).map_err(|e| e.with_backend(backend))?;
        let Some(max) = spec.max_deliveries else {
            return Ok(None);
        };
        Ok(Some(Self::new(to, max, make()?)))
    }

    /// The topic letters go to.
    pub fn topic(&self) -> &Topic {
        &self.to
    }

    /// Publish `d`'s dead letter, then terminate `d`; nack it if the publish fails.
    async fn move_out(&self, d: Delivery) {
        let (msg, info, acker) = d.split();
        let letter = dead_letter::message(
            &msg,
            &self.to,
            &info.position,
            info.delivery_count,
            dead_letter::MAX_DELIVERIES,
        );
        match (self.post)(letter).await {
            Ok(()) => {
                if let Err(e) = acker.term().await {
                    tracing::warn!(error = %e, to = %self.to, "dead letter stored, but the original was not terminated; it may be dead-lettered again");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, to = %self.to, "dead letter not stored; the message is kept and offered again");
                let _ = acker.nack(Self::RETRY).await;
            }
        }
    }
}

/// The limit a subscription enforces: [`SubscribeSpec::max_deliveries`], with its dead-letter
/// topic or without.
pub(crate) enum Limit {
    /// Move exhausted messages to the dead-letter topic.
    DeadLetter(DeadLetters),
    /// No dead-letter topic: terminate exhausted messages, with a warning and the counter
    /// `eventbus_deliveries_exhausted_total`.
    GiveUp(u32),
}

impl Limit {
    /// The limit `spec` asks for, `letters` being the backend's answer to
    /// [`DeadLetters::for_spec`]. A spec with a dead-letter topic the backend gave no way to
    /// publish to is refused ([`ErrorKind::Unsupported`]) rather than silently given up on.
    pub(crate) fn for_spec(
        spec: &SubscribeSpec,
        letters: Option<DeadLetters>,
    ) -> Result<Option<Limit>, Error> {
        let Some(max) = spec.max_deliveries else {
            return Ok(None);
        };
        match (letters, &spec.dead_letter) {
            (Some(letters), _) => Ok(Some(Limit::DeadLetter(letters))),
            (None, None) => Ok(Some(Limit::GiveUp(max))),
            (None, Some(_)) => Err(Error::new(
                ErrorKind::Unsupported,
                "this backend cannot publish dead letters",
            )),
        }
    }

    fn max(&self) -> u32 {
        match self {
            Limit::DeadLetter(l) => l.max,
            Limit::GiveUp(max) => *max,
        }
    }
}

impl Layer for Limit {
    fn step(&mut self, d: Delivery) -> Step {
        if d.info().delivery_count <= self.max() {
            return Step::Pass(d);
        }
        // Off the delivery path: a slow or refusing dead-letter topic holds back only the
        // messages it is moving, never the others.
        match self {
            Limit::DeadLetter(letters) => {
                let letters = letters.clone();
                Step::Aside(Box::pin(async move { letters.move_out(d).await }))
            }
            Limit::GiveUp(max) => Step::Aside(Box::pin(give_up(d, *max))),
        }
    }
}

/// Terminate `d`, which has had its `max` deliveries and has nowhere to go.
async fn give_up(d: Delivery, max: u32) {
    metrics::counter!("eventbus_deliveries_exhausted_total").increment(1);
    let (msg, info, acker) = d.split();
    tracing::warn!(
        id = %msg.id(),
        topic = %msg.topic(),
        position = %info.position,
        deliveries = info.delivery_count,
        max,
        "message given up after max deliveries (no dead-letter topic): terminated"
    );
    if let Err(e) = acker.term().await {
        tracing::warn!(error = %e, "terminating a message past max deliveries failed; it may be delivered again");
    }
}
