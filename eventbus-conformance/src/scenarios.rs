//! The scenarios. Each takes a [`Harness`] and panics with a clear message on failure.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher, OnFull};
use eventbus_core::{
    BatchSink, Delivery, Envelope, ErrorKind, Message, Outcome, Position, Publisher, SubscribeSpec,
    Subscriber, Subscription, Topic,
};
use tokio::time::timeout;

use crate::Harness;

mod groups;
mod ops;
mod order;
mod publish;
mod redelivery;
pub use groups::{
    close_and_reopen_loses_nothing, concurrent_subscribe_and_close, consumer_groups,
    many_publishers_and_subscribers, new_subscriber_reads_old_messages,
    second_member_takes_over_after_close, several_topics_in_one_subscription, topics_isolated,
};
pub use ops::{health_and_heartbeat, lag_grows_and_shrinks, traceparent_reaches_the_handler};
pub use order::{
    handler_orders_per_key_and_retries, live_tail_keeps_publish_order, per_key_order,
    per_key_order_through_a_cut,
};
pub use publish::{
    bad_message_fails_alone, batch_outcomes_in_order, close_flushes_everything,
    fuzzed_bad_input_is_isolated, headers_keep_order_and_repeats, invalid_input_typed_errors,
    oversize_rejected_before_window, publish_after_close_fails, roundtrip_intact,
    window_bounds_in_flight,
};
pub use redelivery::{
    dead_letters_after_max_deliveries, dedup_hands_each_id_over_once,
    gives_up_after_max_deliveries, late_acks_lose_nothing, nack_redelivers,
    refused_dead_letter_keeps_the_message, typed_handler_dead_letters_bad_payloads,
    unacked_redelivered_after_ack_wait,
};
mod topics;
pub use topics::{broker_dedup_as_capabilities_say, topic_options_honoured_or_refused};

/// Longest any scenario may run before it counts as hung.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);
const RECV_TIMEOUT: Duration = Duration::from_secs(20);

/// Run one scenario with a hang guard.
pub async fn run(name: &str, f: impl Future<Output = ()>) {
    if timeout(SCENARIO_TIMEOUT, f).await.is_err() {
        panic!("scenario {name} hung for more than {SCENARIO_TIMEOUT:?}");
    }
}

async fn publisher<H: Harness>(h: &H, cfg: BatchConfig) -> Batcher<H::Sink> {
    Batcher::new(h.sink().await, cfg).expect("valid batch config")
}

async fn subscribe<H: Harness>(h: &H, spec: SubscribeSpec) -> Subscription {
    h.subscriber()
        .await
        .subscribe(spec)
        .await
        .expect("subscribe")
}

async fn recv(sub: &mut Subscription, within: Duration) -> Option<Delivery> {
    match timeout(within, sub.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("subscription error: {e}"),
        Ok(None) => panic!("subscription ended unexpectedly"),
        Err(_) => None,
    }
}

/// Receive exactly `n` deliveries, acking each; panics if they do not arrive in time.
async fn take_acked(sub: &mut Subscription, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match recv(sub, RECV_TIMEOUT).await {
            Some(d) => {
                out.push(d.message().clone());
                d.ack().await.expect("ack");
            }
            None => panic!("received {} of {n} messages before timing out", out.len()),
        }
    }
    out
}

/// Receive and ack until every id in `expected` was seen (`got` holds those seen before); panics
/// naming `when` if deliveries stop first, and if anything unexpected arrived.
async fn ack_until_all_seen(
    sub: &mut Subscription,
    got: &mut HashSet<String>,
    expected: &HashSet<String>,
    when: &str,
) {
    while got.len() < expected.len() {
        let d = recv(sub, RECV_TIMEOUT).await.unwrap_or_else(|| {
            panic!(
                "{when}: only {} of {} distinct messages arrived",
                got.len(),
                expected.len()
            )
        });
        got.insert(d.message().id().to_string());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, expected, "{when}");
}

/// Assert nothing more arrives for `quiet`.
async fn assert_quiet(sub: &mut Subscription, quiet: Duration) {
    if let Some(d) = recv(sub, quiet).await {
        panic!(
            "unexpected extra delivery: {:?} (count {})",
            d.message(),
            d.info().delivery_count
        );
    }
}

/// Publish every message (each must be admitted), then await every outcome, in order.
pub async fn publish_all<P: Publisher>(p: &P, msgs: Vec<Message>) -> Vec<Outcome> {
    let mut acks = Vec::with_capacity(msgs.len());
    for m in msgs {
        acks.push(p.publish(m).await.expect("publish admitted"));
    }
    let mut out = Vec::with_capacity(acks.len());
    for a in acks {
        out.push(a.await);
    }
    out
}

fn assert_all_acked(outcomes: &[Outcome]) {
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.is_acked(), "message {i} not acked: {o:?}");
    }
}

fn numbered(topic: &Topic, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(topic, format!("m-{i}")))
        .collect()
}

fn ids(msgs: &[Message]) -> HashSet<String> {
    msgs.iter().map(|m| m.id().to_string()).collect()
}

fn position_key(p: &Position) -> (i64, i64, i64) {
    match p {
        Position::Stream { sequence, .. } => (0, *sequence as i64, 0),
        Position::StreamBatch {
            last_sequence,
            index,
            ..
        } => (0, *last_sequence as i64, *index as i64),
        Position::Partition { partition, offset } => (*partition as i64, *offset, 0),
        Position::Offset(o) => (0, *o as i64, 0),
        _ => (0, 0, 0),
    }
}
