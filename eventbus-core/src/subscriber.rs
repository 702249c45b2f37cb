//! The user-facing subscribe API: subscriptions yield deliveries, each acked exactly once.
//!
//! - [`SubscribeSpec`] (here) says what to read; [`Subscriber`] starts it.
//! - `delivery`: one delivery and its ack handle.
//! - `stream`: the [`Subscription`] stream and the backend's [`Feed`], one buffer per
//!   subscription, with the steps core applies to every delivery.
//! - `limit`: `max_deliveries`, with a dead-letter topic ([`DeadLetters`]) or without.
//! - [`dead_letter`]: the dead letter's shape and its replay.

use std::future::Future;
use std::time::Duration;

use crate::error::Error;
use crate::message::Topic;

pub mod dead_letter;
mod delivery;
mod limit;
mod stream;

pub use delivery::{AckHandle, AckToken, Acker, Delivery, DeliveryInfo, SharedAck};
pub use limit::DeadLetters;
pub use stream::{Feed, Subscription, TrySend};
pub(crate) use stream::{Layer, Step};

/// Where a new consumer (group) starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// Everything the broker still retains (default).
    #[default]
    Earliest,
    /// Only messages published after the subscription was created.
    Latest,
}

/// What to subscribe to and how.
///
/// ```
/// use std::time::Duration;
/// use eventbus_core::SubscribeSpec;
/// let spec = SubscribeSpec::new("orders.created").group("billing").ack_wait(Duration::from_secs(5));
/// assert_eq!(spec.group.as_deref(), Some("billing"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscribeSpec {
    /// The topic or pattern. What a backend accepts:
    /// - NATS: a subject or a subject filter with wildcards (`orders.*`, `orders.>`), within
    ///   one stream.
    /// - Kafka: a topic name, or a regular expression starting with `^` (librdkafka's
    ///   convention, e.g. `^orders\..*`), matched against the cluster's topics when the
    ///   subscription starts (topics created later are not picked up).
    /// - memory: a topic name.
    pub topic: Topic,
    /// More topics or patterns read by the same subscription (see
    /// [`SubscribeSpec::topics`]). Default none.
    pub more_topics: Vec<Topic>,
    /// Consumer group: every group sees every message, members of one group share them.
    /// `None` gives an exclusive, non-durable subscription that sees every message.
    pub group: Option<String>,
    /// How long a delivery may stay un-acked before it is redelivered. Default 30 s.
    pub ack_wait: Duration,
    /// Deliveries a message gets before it is given up on, on every backend: past this many it
    /// never reaches the handler again; it is moved to [`SubscribeSpec::dead_letter`] if set,
    /// otherwise terminated with a warning (counter `eventbus_deliveries_exhausted_total`).
    /// Default: none (delivered until acked or terminated).
    pub max_deliveries: Option<u32>,
    /// Most deliveries buffered ahead of the handler. Default 256.
    pub prefetch: usize,
    /// Where a new group starts. Default [`StartFrom::Earliest`].
    pub start: StartFrom,
    /// Where a message goes once it has been delivered `max_deliveries` times without an ack:
    /// it is published there (see [`dead_letter`]) and only then removed from this
    /// subscription. Without it, such a message is terminated with a warning. Default: none.
    pub dead_letter: Option<Topic>,
}

impl SubscribeSpec {
    /// Subscribe to `topic` with defaults.
    pub fn new(topic: impl Into<Topic>) -> Self {
        SubscribeSpec {
            topic: topic.into(),
            more_topics: Vec::new(),
            group: None,
            ack_wait: Duration::from_secs(30),
            max_deliveries: None,
            prefetch: 256,
            start: StartFrom::Earliest,
            dead_letter: None,
        }
    }
    /// Subscribe to every topic or pattern in `topics` with one subscription: deliveries of
    /// all of them arrive on the one stream, each acked on its own topic; a group shares each
    /// topic among its members. Panics if `topics` is empty.
    ///
    /// ```
    /// use eventbus_core::SubscribeSpec;
    /// let spec = SubscribeSpec::topics(["orders", "payments", "refunds"]).group("audit");
    /// assert_eq!(spec.all_topics().count(), 3);
    /// ```
    pub fn topics<T: Into<Topic>>(topics: impl IntoIterator<Item = T>) -> Self {
        let mut all = topics.into_iter().map(Into::into);
        let first = all
            .next()
            .expect("SubscribeSpec::topics needs at least one topic");
        SubscribeSpec {
            more_topics: all.collect(),
            ..SubscribeSpec::new(first)
        }
    }
    /// Also read `topic` (or pattern) in this subscription.
    pub fn also(mut self, topic: impl Into<Topic>) -> Self {
        self.more_topics.push(topic.into());
        self
    }
    /// Every topic or pattern of this subscription, the first one first.
    pub fn all_topics(&self) -> impl Iterator<Item = &Topic> {
        std::iter::once(&self.topic).chain(&self.more_topics)
    }
    /// One spec per distinct topic, each with this spec's settings: what a backend that reads
    /// one topic per consumer subscribes (see [`Subscription::per_topic`]). Filters
    /// that overlap (`a.*` and `a.b`) are separate consumers: a message both match is delivered
    /// twice.
    pub fn split(&self) -> Vec<SubscribeSpec> {
        let mut seen = std::collections::HashSet::new();
        self.all_topics()
            .filter(|t| seen.insert(t.as_str()))
            .map(|t| SubscribeSpec {
                topic: t.clone(),
                more_topics: Vec::new(),
                ..self.clone()
            })
            .collect()
    }
    /// Join consumer group `name`.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Some(name.into());
        self
    }
    /// Set the ack wait.
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }
    /// Set the maximum deliveries.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }
    /// Set the prefetch bound (at least 1).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// Set the start position.
    pub fn start(mut self, s: StartFrom) -> Self {
        self.start = s;
        self
    }
    /// Dead-letter exhausted messages to `topic` (use with [`SubscribeSpec::max_deliveries`]).
    pub fn dead_letter(mut self, topic: impl Into<Topic>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }
}

/// Creates subscriptions.
///
/// # Contract
/// - Every group sees every message; members of one group share them; `group: None` sees every
///   message on its own.
/// - A delivery not acked within `ack_wait`, or nacked, is delivered again (at least once).
/// - Dropping or closing a subscription loses nothing: unsettled deliveries are redelivered.
pub trait Subscriber: Send + Sync {
    /// Start a subscription.
    fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> impl Future<Output = Result<Subscription, Error>> + Send;

    /// How far consumer group `group` is behind on `topic`, from the broker's own bookkeeping
    /// (so any process can read it). A group the broker does not know is a
    /// [`Rejected`](crate::ErrorKind::Rejected) error where the broker can tell (JetStream,
    /// memory); Kafka counts a group with nothing committed from the earliest retained offset.
    /// See [`crate::ops::LagWatch`] for a metric and a threshold callback.
    fn lag(
        &self,
        topic: &Topic,
        group: &str,
    ) -> impl Future<Output = Result<crate::ops::Lag, Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, Topic};
    use crate::outcome::Position;

    struct Settle(tokio::sync::mpsc::UnboundedSender<&'static str>);

    #[async_trait::async_trait]
    impl AckHandle for Settle {
        async fn ack(self: Box<Self>) -> Result<(), Error> {
            let _ = self.0.send("ack");
            Ok(())
        }
        async fn nack(self: Box<Self>, _: Duration) -> Result<(), Error> {
            let _ = self.0.send("nack");
            Ok(())
        }
        async fn term(self: Box<Self>) -> Result<(), Error> {
            let _ = self.0.send("term");
            Ok(())
        }
    }

    fn delivery(
        count: u32,
        settled: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    ) -> Result<Delivery, Error> {
        Ok(Delivery::new(
            Message::new("t", "x"),
            DeliveryInfo::new(count, Position::Offset(0)),
            Acker::new(Settle(settled.clone())),
        ))
    }

    /// Stand-in consumers: each topic's part hands over the deliveries `items` gives it, then
    /// ends if it says so, or holds its feed until the subscription stops.
    async fn subscription(
        spec: SubscribeSpec,
        items: impl Fn(&str) -> (Vec<Result<Delivery, Error>>, bool),
    ) -> Result<Subscription, Error> {
        Subscription::per_topic(spec, None, |one, mut feed| {
            let (items, end) = items(one.topic.as_str());
            async move {
                tokio::spawn(async move {
                    for d in items {
                        if feed.send(d).await.is_err() {
                            return;
                        }
                    }
                    if !end {
                        feed.stopped().await;
                    }
                });
                Ok(())
            }
        })
        .await
    }

    async fn next(sub: &mut Subscription) -> Option<Result<Delivery, Error>> {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("an item in time")
    }

    #[tokio::test]
    async fn topics_share_one_buffer_and_close_hands_it_back() {
        let (settled, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let spec = SubscribeSpec::topics(["a", "b", "c"]).prefetch(2);
        let sub = subscription(spec, |_| {
            ((0..5).map(|_| delivery(1, &settled)).collect(), false)
        })
        .await
        .expect("subscribe");
        // Three parts with five each, one buffer of two: the rest waits in the parts.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sub.buffered(), 2, "one buffer of prefetch for every topic");
        tokio::time::timeout(Duration::from_secs(5), sub.close())
            .await
            .expect("close returns once every part has closed");
        let mut nacked = 0;
        while let Ok(s) = seen.try_recv() {
            assert_eq!(s, "nack");
            nacked += 1;
        }
        assert_eq!(nacked, 2, "the buffered deliveries are handed back");
    }

    #[tokio::test]
    async fn errors_pass_and_a_part_that_ends_is_reported() {
        let spec = SubscribeSpec::topics(["ends", "stays"]);
        let mut sub = subscription(spec, |t| match t {
            "ends" => (
                vec![Err(Error::new(crate::ErrorKind::Timeout, "part error"))],
                true,
            ),
            _ => (Vec::new(), false),
        })
        .await
        .expect("subscribe");
        // The part's end is said as soon as it is seen, even before what it buffered.
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let item = next(&mut sub).await.expect("open");
            kinds.push(item.expect_err("errors only").kind());
        }
        kinds.sort_by_key(|k| format!("{k:?}"));
        assert_eq!(
            kinds,
            [crate::ErrorKind::Closed, crate::ErrorKind::Timeout],
            "the part's error passes and its end is reported"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), sub.next())
                .await
                .is_err(),
            "the other part goes on"
        );
        tokio::time::timeout(Duration::from_secs(5), sub.close())
            .await
            .expect("close");
    }

    #[tokio::test]
    async fn past_max_deliveries_is_terminated_never_handed_over() {
        let (settled, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let spec = SubscribeSpec::new("t").max_deliveries(2);
        let mut sub = subscription(spec, |_| {
            let counts = [1, 3, 2];
            (counts.map(|c| delivery(c, &settled)).into(), false)
        })
        .await
        .expect("subscribe");
        let counts = [next(&mut sub).await, next(&mut sub).await]
            .map(|d| d.expect("open").expect("delivery").info().delivery_count);
        assert_eq!(counts, [1, 2], "the third delivery is not handed over");
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), seen.recv())
                .await
                .expect("settled"),
            Some("term")
        );
        sub.close().await;
    }

    /// Dead letters being published when the subscription closes (or is dropped) are
    /// finished, the original terminated, before the consumer is asked to stop; what was
    /// buffered is handed back.
    #[tokio::test]
    async fn closing_finishes_dead_letters_before_stopping_the_consumer() {
        for drop_it in [false, true] {
            let (settled, mut seen) = tokio::sync::mpsc::unbounded_channel();
            let (gate_tx, gate) = tokio::sync::watch::channel(false);
            let letters = DeadLetters::new(Topic::new("t.dlq"), 1, move |_| {
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(())
                }
            });
            let spec = SubscribeSpec::new("t")
                .max_deliveries(1)
                .dead_letter("t.dlq");
            let consumer = settled.clone();
            let mut sub = Subscription::per_topic(spec, Some(letters), |_, mut feed| {
                let items = [2, 1, 1].map(|c| delivery(c, &consumer));
                let consumer = consumer.clone();
                async move {
                    tokio::spawn(async move {
                        for d in items {
                            if feed.send(d).await.is_err() {
                                return;
                            }
                        }
                        feed.stopped().await;
                        let _ = consumer.send("stopped");
                    });
                    Ok(())
                }
            })
            .await
            .expect("subscribe");
            let first = next(&mut sub).await.expect("open").expect("delivery");
            assert_eq!(
                first.info().delivery_count,
                1,
                "the exhausted one is set aside"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            if drop_it {
                drop(sub);
            } else {
                tokio::spawn(sub.close());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                seen.try_recv().is_err(),
                "nothing settled while the letter is held"
            );
            gate_tx.send(true).expect("gate");
            let mut order = Vec::new();
            while order.len() < 3 {
                let s = tokio::time::timeout(Duration::from_secs(5), seen.recv())
                    .await
                    .expect("settled in time")
                    .expect("open");
                order.push(s);
            }
            assert_eq!(order, ["term", "nack", "stopped"], "dropped: {drop_it}");
        }
    }

    #[tokio::test]
    async fn a_dead_letter_topic_without_a_publisher_is_refused() {
        let spec = SubscribeSpec::new("t")
            .max_deliveries(2)
            .dead_letter("t.dlq");
        let e = subscription(spec, |_| (Vec::new(), false))
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
    }

    #[test]
    fn split_drops_repeated_topics() {
        let spec = SubscribeSpec::topics(["a", "b", "a"]).group("g");
        let parts: Vec<String> = spec
            .split()
            .iter()
            .map(|s| s.topic.as_str().to_owned())
            .collect();
        assert_eq!(parts, ["a", "b"]);
        assert!(spec.split().iter().all(|s| s.group.as_deref() == Some("g")));
    }
}
