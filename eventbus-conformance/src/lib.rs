#![doc = include_str!("../README.md")]

use std::any::Any;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_core::{
    Backend, BatchSink, Capabilities, Error, ErrorKind, Subscriber, Topic, TopicSpec,
};

pub mod scenarios;

/// How one test broker differs from the suite's defaults: timings and known broker defects, not
/// properties of the backend (those are [`Capabilities`], which the suite reads from the
/// backend itself).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Quirks {
    /// Shortest ack wait the broker honours promptly in tests. Default 500 ms.
    pub min_ack_wait: Duration,
    /// How soon after one group member closes the next one, started then, has the rest. Default
    /// 2 s. A Kafka broker holds the first join into an empty group for
    /// `group.initial.rebalance.delay.ms` (3 s by default in Apache Kafka and in librdkafka's
    /// mock cluster; tansu has none).
    pub handover_within: Duration,
    /// A group that many members joined and left at once still serves the next member. Default
    /// `true`. tansu 0.6.0 keeps a departed leader when the leader leaves while the group is
    /// rebalancing (`Forming::leave` in its `coordinator/group/administrator.rs` never clears
    /// `leader`; nothing does later), so every later join of that group loops forever; on
    /// tansu the churn scenario checks the group's commits and reads with a fresh group.
    pub rejoin_after_churn: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            min_ack_wait: Duration::from_millis(500),
            handover_within: Duration::from_secs(2),
            rejoin_after_churn: true,
        }
    }
}

impl Quirks {
    /// Set `min_ack_wait`.
    pub fn min_ack_wait(mut self, d: Duration) -> Self {
        self.min_ack_wait = d;
        self
    }
    /// Set `rejoin_after_churn`.
    pub fn rejoin_after_churn(mut self, v: bool) -> Self {
        self.rejoin_after_churn = v;
        self
    }
    /// Set `handover_within`.
    pub fn handover_within(mut self, d: Duration) -> Self {
        self.handover_within = d;
        self
    }
}

/// What a backend provides to the suite.
pub trait Harness: Send + Sync + 'static {
    /// The publishing sink.
    type Sink: BatchSink;
    /// The subscriber.
    type Sub: Subscriber + Send + Sync + 'static;

    /// What the backend can do ([`Backend::capabilities`]).
    fn capabilities(&self) -> Capabilities;

    /// How the broker under test differs from the suite's defaults.
    fn quirks(&self) -> Quirks;

    /// Make sure `spec`'s topic exists ([`Backend::ensure_topic`], or the broker's own means
    /// where the harness provisions topics itself).
    fn ensure_topic(&self, spec: &TopicSpec) -> impl Future<Output = Result<(), Error>> + Send;

    /// A fresh topic name, unique to this call, not provisioned. `hint` is a readable suffix.
    fn topic_name(&self, hint: &str) -> String;

    /// A fresh topic, unique to this call ([`Harness::topic_name`]), provisioned so it can be
    /// published to and subscribed (with several partitions where the backend has them).
    fn topic(&self, hint: &str) -> impl Future<Output = Topic> + Send;

    /// A topic that passes validation but which the broker refuses (no stream covers it,
    /// unknown topic, blocked).
    fn unroutable_topic(&self) -> impl Future<Output = Topic> + Send;

    /// A new sink.
    fn sink(&self) -> impl Future<Output = Self::Sink> + Send;

    /// A new subscriber.
    fn subscriber(&self) -> impl Future<Output = Self::Sub> + Send;

    /// The backend's own health check ([`eventbus_core::ops::HealthCheck`]).
    fn health(&self, timeout: Duration) -> impl Future<Output = eventbus_core::ops::Health> + Send;

    /// Cut (`true`: a blackhole, nothing forwarded and nothing closed) or restore (`false`:
    /// every connection reset, then forwarded again) the connections between this harness's
    /// clients and its broker. Returns `false`, doing nothing, when the harness has no fault
    /// proxy in front of its broker (the in-memory backend has no connection; a cluster's
    /// clients would go around a proxy on one node).
    fn cut(&self, _on: bool) -> bool {
        false
    }
}

/// What [`BackendHarness::fault`] calls to cut and to restore the connections.
type Fault = (Box<dyn Fn() + Send + Sync>, Box<dyn Fn() + Send + Sync>);

/// Creates a topic by a broker's own means, for brokers whose admin API the backend cannot use.
type Provision = Box<dyn Fn(&str, u32) -> Result<(), String> + Send + Sync>;

/// The [`Harness`] for any [`Backend`]: topics through [`Backend::ensure_topic`], sinks and
/// subscribers from the backend, and whatever keeps its broker alive held until the test ends.
/// A backend's conformance test is one line:
///
/// ```ignore
/// eventbus_conformance::conformance_tests!(
///     BackendHarness::new(MemoryBroker::new()).unroutable(Topic::new("nowhere"))
/// );
/// ```
pub struct BackendHarness<B: Backend> {
    // Field order matters: fields drop in order, so the backend's clients close before the
    // broker they talk to goes away.
    backend: B,
    _broker: Box<dyn Any + Send + Sync>,
    quirks: Quirks,
    partitions: u32,
    unroutable: Topic,
    provision: Option<Provision>,
    fault: Option<Fault>,
    next: AtomicU64,
}

impl<B: Backend> BackendHarness<B> {
    /// A harness over `backend`: default [`Quirks`], topics with 3 partitions where the
    /// backend has them (enough for two group members to share), `no.such.topic` as the
    /// unroutable topic.
    pub fn new(backend: B) -> Self {
        BackendHarness {
            backend,
            _broker: Box::new(()),
            quirks: Quirks::default(),
            partitions: 3,
            unroutable: Topic::new("no.such.topic"),
            provision: None,
            fault: None,
            next: AtomicU64::new(0),
        }
    }

    /// Keep `broker` (a process guard, a cluster) alive as long as the harness.
    pub fn keep(mut self, broker: impl Send + Sync + 'static) -> Self {
        self._broker = Box::new(broker);
        self
    }

    /// Set the broker's quirks.
    pub fn quirks(mut self, quirks: Quirks) -> Self {
        self.quirks = quirks;
        self
    }

    /// A topic that passes validation but which the broker refuses.
    pub fn unroutable(mut self, topic: Topic) -> Self {
        self.unroutable = topic;
        self
    }

    /// Create topics with `create(name, partitions)` instead of [`Backend::ensure_topic`].
    pub fn provision_with(
        mut self,
        create: impl Fn(&str, u32) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.provision = Some(Box::new(create));
        self
    }
}

impl<B: Backend> BackendHarness<B> {
    /// The backend's clients reach the broker through a fault proxy: `cut` blackholes their
    /// connections, `restore` resets them and forwards again (see [`Harness::cut`]).
    pub fn fault(
        mut self,
        cut: impl Fn() + Send + Sync + 'static,
        restore: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        self.fault = Some((Box::new(cut), Box::new(restore)));
        self
    }
}

impl<B: Backend> Harness for BackendHarness<B> {
    type Sink = B::Sink;
    type Sub = B::Subscriber;

    fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }

    fn quirks(&self) -> Quirks {
        self.quirks
    }

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), Error> {
        match &self.provision {
            Some(create) => {
                spec.check(&self.backend.capabilities(), self.backend.name())?;
                create(spec.name(), spec.get_partitions().unwrap_or(1))
                    .map_err(|e| Error::new(ErrorKind::Other, e))
            }
            None => self.backend.ensure_topic(spec).await,
        }
    }

    fn topic_name(&self, hint: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("t{n}.{hint}")
    }

    async fn topic(&self, hint: &str) -> Topic {
        let name = self.topic_name(hint);
        let mut spec = TopicSpec::new(name.as_str());
        if self.backend.capabilities().partitions {
            spec = spec.partitions(self.partitions);
        }
        self.ensure_topic(&spec).await.expect("ensure topic");
        Topic::new(name)
    }

    async fn unroutable_topic(&self) -> Topic {
        self.unroutable.clone()
    }

    async fn sink(&self) -> B::Sink {
        self.backend.sink().await.expect("sink")
    }

    async fn subscriber(&self) -> B::Subscriber {
        self.backend.subscriber()
    }

    async fn health(&self, timeout: Duration) -> eventbus_core::ops::Health {
        self.backend.health(timeout).await
    }

    fn cut(&self, on: bool) -> bool {
        match &self.fault {
            Some((cut, restore)) => {
                if on {
                    cut()
                } else {
                    restore()
                }
                true
            }
            None => false,
        }
    }
}

/// Expand the suite into one `#[tokio::test]` per scenario. `$harness` is an expression,
/// evaluated once per test, that yields a [`Harness`] (it may `.await`).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            roundtrip_intact,
            topic_options_honoured_or_refused,
            broker_dedup_as_capabilities_say,
            headers_keep_order_and_repeats,
            several_topics_in_one_subscription,
            typed_handler_dead_letters_bad_payloads,
            dedup_hands_each_id_over_once,
            invalid_input_typed_errors,
            many_publishers_and_subscribers,
            topics_isolated,
            nack_redelivers,
            dead_letters_after_max_deliveries,
            gives_up_after_max_deliveries,
            refused_dead_letter_keeps_the_message,
            handler_orders_per_key_and_retries,
            unacked_redelivered_after_ack_wait,
            late_acks_lose_nothing,
            close_and_reopen_loses_nothing,
            concurrent_subscribe_and_close,
            second_member_takes_over_after_close,
            per_key_order,
            per_key_order_through_a_cut,
            live_tail_keeps_publish_order,
            consumer_groups,
            new_subscriber_reads_old_messages,
            close_flushes_everything,
            batch_outcomes_in_order,
            bad_message_fails_alone,
            oversize_rejected_before_window,
            window_bounds_in_flight,
            publish_after_close_fails,
            lag_grows_and_shrinks,
            health_and_heartbeat,
            traceparent_reaches_the_handler,
            fuzzed_bad_input_is_isolated,
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::scenarios::run(stringify!($name), $crate::scenarios::$name(&harness)).await;
            }
        )*
    };
}
