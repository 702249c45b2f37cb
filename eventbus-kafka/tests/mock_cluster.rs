//! Fault injection with librdkafka's in-process mock cluster: retriable produce errors are
//! absorbed (every message stored once, in order, no error seen), a broker down longer than
//! `message.timeout.ms` resolves every message as unknown or failed without hanging, and a
//! permanent error fails fast for its own topic while other topics are unaffected.

use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_conformance::scenarios::publish_all;
use eventbus_core::{
    Backend as _, ErrorKind, Message, Outcome, Position, Publisher, SubscribeSpec, Subscriber,
};
use eventbus_kafka::{KafkaBackend, KafkaConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn offset(o: &Outcome) -> i64 {
    match o {
        Outcome::Acked(a) => match a.position {
            Position::Partition { offset, .. } => offset,
            ref p => panic!("unexpected position {p:?}"),
        },
        o => panic!("not acked: {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_absorbed_once_in_order() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("retry", 1, 1).expect("topic");
    let kafka = KafkaBackend::connect(KafkaConfig::new(mock.bootstrap_servers()))
        .await
        .expect("connect");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    // The next five produce requests fail with retriable errors.
    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        ],
    );
    let msgs: Vec<Message> = (0..1_000)
        .map(|i| Message::new("retry", format!("{i}")).with_key("k"))
        .collect();
    let ids: Vec<String> = msgs.iter().map(|m| m.id().to_string()).collect();
    let outcomes = publish_all(&p, msgs).await;
    let offsets: Vec<i64> = outcomes.iter().map(offset).collect();
    assert_eq!(
        offsets,
        (0..1_000).collect::<Vec<i64>>(),
        "stored once each, in publish order"
    );
    p.close(Duration::from_secs(10)).await.expect("close");

    // Read back: exactly the published ids, in order, no duplicates.
    let mut sub = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("retry"))
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("read back {} of {}", got.len(), ids.len()))
            .expect("open")
            .expect("delivery");
        got.push(d.message().id().to_string());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, ids);
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_past_message_timeout_resolves_everything() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("down", 1, 1).expect("topic");
    let kafka = KafkaBackend::connect(
        KafkaConfig::new(mock.bootstrap_servers()).message_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    // Warm up (producer id, metadata) so the outage hits publishing, not set-up.
    assert!(publish_all(&p, vec![Message::new("down", "warm")]).await[0].is_acked());

    mock.broker_down(1).expect("broker down");
    let started = Instant::now();
    let outcomes = tokio::time::timeout(
        Duration::from_secs(20),
        publish_all(
            &p,
            (0..100)
                .map(|i| Message::new("down", format!("{i}")))
                .collect(),
        ),
    )
    .await
    .expect("every publish resolves while the broker is down");
    for o in &outcomes {
        assert!(o.is_unknown() || o.is_failed(), "{o:?}");
        assert!(!o.is_acked());
    }
    let unknown = outcomes.iter().filter(|o| o.is_unknown()).count();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "resolved after {:?}",
        started.elapsed()
    );
    eprintln!(
        "broker down: {unknown} unknown, {} failed, in {:?}",
        outcomes.len() - unknown,
        started.elapsed()
    );

    mock.broker_up(1).expect("broker up");
    // Publishing recovers once librdkafka has reconnected (its reconnect backoff grows to
    // the SDK's 2 s cap while the broker is down); each attempt is bounded by the 2 s message
    // timeout.
    let up = Instant::now();
    loop {
        let after = publish_all(&p, vec![Message::new("down", "after")]).await;
        if after[0].is_acked() {
            eprintln!("recovered {:?} after the broker came back", up.elapsed());
            break;
        }
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "no recovery 30 s after the broker came back: {:?}",
            after[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_fails_fast_and_alone() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("allowed", 1, 1).expect("topic");
    mock.create_topic("denied", 1, 1).expect("topic");
    mock.topic_error(
        "denied",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .expect("topic error");
    let kafka = KafkaBackend::connect(KafkaConfig::new(mock.bootstrap_servers()))
        .await
        .expect("connect");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let started = Instant::now();
    let mut msgs: Vec<Message> = (0..20)
        .map(|i| Message::new("allowed", format!("{i}")))
        .collect();
    msgs.insert(10, Message::new("denied", "nope"));
    let outcomes = publish_all(&p, msgs).await;
    for (i, o) in outcomes.iter().enumerate() {
        if i == 10 {
            assert!(o.is_failed(), "{o:?}");
            assert_eq!(o.error().expect("error").kind(), ErrorKind::Auth, "{o:?}");
        } else {
            assert!(o.is_acked(), "message {i}: {o:?}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "permanent error took {:?} (message timeout is 30 s)",
        started.elapsed()
    );
}

/// The idempotent producer cannot get a producer id (authorization refused): librdkafka raises a
/// fatal error; in-flight messages resolve (never as acked) and later publishes fail at once
/// with a typed `Closed` error instead of queueing into a dead producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_idempotence_error_stops_publishing() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("fatal", 1, 1).expect("topic");
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
    );
    let kafka = KafkaBackend::connect(
        KafkaConfig::new(mock.bootstrap_servers()).message_timeout(Duration::from_secs(5)),
    )
    .await
    .expect("connect");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let first = publish_all(&p, vec![Message::new("fatal", "first")]).await;
    assert!(!first[0].is_acked(), "{:?}", first[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match p.publish(Message::new("fatal", "later")).await {
            Err(e) => break e,
            Ok(ack) => {
                assert!(!ack.await.is_acked(), "a dead producer acked");
                assert!(Instant::now() < deadline, "publishing never stopped");
            }
        }
    };
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    assert!(!err.is_retryable());
}
