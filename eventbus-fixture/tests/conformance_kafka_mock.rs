//! The shared conformance suite against librdkafka's in-process mock cluster (3 brokers), the
//! second Kafka target next to the tansu process: the same scenarios (all but two, see below),
//! a different broker implementation (librdkafka's own protocol mock, which also serves
//! consumer groups), through the facade's `Bus`. Topics are created through the mock's own
//! API: it does not serve the admin CreateTopics request.
//!
//! The mock cluster is not `Send`, so it lives on a thread of its own for the whole test and
//! is torn down when the harness is dropped.

use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;

use eventbus::Bus;
use eventbus_brokers::Protocol;
use eventbus_conformance::{BackendHarness, Quirks};
use eventbus_fixture::{Fixture, Select};
use rdkafka::types::RDKafkaErrorCode;

type Create = (String, i32, mpsc::Sender<Result<(), String>>);

/// The mock cluster's thread: serves topic creation, ends when dropped.
struct MockThread {
    requests: Mutex<Option<mpsc::Sender<Create>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MockThread {
    fn drop(&mut self) {
        drop(self.requests.lock().take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl MockThread {
    fn create_topic(&self, name: &str, partitions: u32) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .requests
            .lock()
            .as_ref()
            .map(|r| r.send((name.to_owned(), partitions as i32, tx)).is_ok());
        match sent {
            Some(true) => rx.recv().unwrap_or_else(|_| Err("mock thread gone".into())),
            _ => Err("mock thread gone".into()),
        }
    }
}

async fn mock_cluster() -> BackendHarness<Bus> {
    let (boot_tx, boot_rx) = mpsc::channel();
    let (requests, incoming) = mpsc::channel::<Create>();
    let thread = std::thread::spawn(move || {
        let mock = rdkafka::mocking::MockCluster::new(3).expect("mock cluster");
        boot_tx
            .send(mock.bootstrap_servers())
            .expect("harness waits");
        // Until the harness is dropped.
        while let Ok((name, partitions, reply)) = incoming.recv() {
            // What exists is left as it is, as `ensure_topic` promises.
            let created = match mock.create_topic(&name, partitions, 1) {
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAlreadyExists) => {
                    Ok(())
                }
                other => other.map_err(|e| e.to_string()),
            };
            let _ = reply.send(created);
        }
    });
    let bootstrap = boot_rx.recv().expect("mock cluster started");
    let guard = std::sync::Arc::new(MockThread {
        requests: Mutex::new(Some(requests)),
        thread: Some(thread),
    });
    let creates = std::sync::Arc::clone(&guard);
    // After a member leaves, the mock's coordinator waits `session.timeout.ms` minus 1 s (9 s
    // here) for the others to rejoin before it rebalances (`rd_kafka_mock_cgrp_classic_rebalance`
    // in librdkafka's `rdkafka_mock_cgrp.c`; Apache Kafka rebalances as soon as every remaining
    // member has rejoined).
    let quirks = Quirks::default()
        .min_ack_wait(Duration::from_secs(1))
        .handover_within(Duration::from_secs(12));
    Fixture::start(Select::External(Protocol::Kafka, bootstrap), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .harness()
        .quirks(quirks)
        .provision_with(move |name, partitions| creates.create_topic(name, partitions))
        .keep(guard)
}

// Every scenario but `bad_message_fails_alone` and `refused_dead_letter_keeps_the_message`: the
// mock cluster creates any topic on its first produce, so it has no topic a broker refuses
// (tried: `topic_error` only affects metadata). Those scenarios run on the tansu process, which
// refuses unknown topics.
eventbus_conformance::conformance_tests!(@each mock_cluster().await;
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
    oversize_rejected_before_window,
    window_bounds_in_flight,
    publish_after_close_fails,
    lag_grows_and_shrinks,
    health_and_heartbeat,
    traceparent_reaches_the_handler,
    fuzzed_bad_input_is_isolated,
);
