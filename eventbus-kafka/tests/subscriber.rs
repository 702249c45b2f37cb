//! Kafka-specific subscriber behaviour on a real tansu broker: flow control with a small
//! prefetch, and commits that never pass an unacked message.

use std::collections::HashSet;
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{Tansu, TansuStorage};
use eventbus_core::{Message, Publisher, SubscribeSpec, Subscriber};
use eventbus_kafka::{KafkaBackend, KafkaConfig};

async fn start() -> (Tansu, KafkaBackend) {
    let broker =
        Tansu::start(TansuStorage::Sqlite).unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let kafka = KafkaBackend::connect(KafkaConfig::new(broker.bootstrap()))
        .await
        .expect("connect to tansu");
    (broker, kafka)
}

async fn publish(kafka: &KafkaBackend, topic: &str, n: usize) -> HashSet<String> {
    let p = Batcher::new(kafka.sink().expect("sink"), BatchConfig::default()).unwrap();
    let mut acks = Vec::new();
    let mut ids = HashSet::new();
    for i in 0..n {
        let m = Message::new(topic, format!("{i}")).with_key(format!("k{}", i % 7));
        ids.insert(m.id().to_string());
        acks.push(p.publish(m).await.expect("admitted"));
    }
    for a in acks {
        assert!(a.await.is_acked());
    }
    p.close(Duration::from_secs(10)).await.expect("close");
    ids
}

/// Far more messages than `prefetch`, and a handler that stalls long enough for the partitions
/// to be paused (then resumed mid-batch): nothing is skipped. Runs on tansu's SQLite engine,
/// whose fetch returns the batch containing the requested offset, as Kafka does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_prefetch_reads_everything() {
    let (_broker, kafka) = start().await;
    kafka.ensure_topic("flow", 3).await.expect("topic");
    let expected = publish(&kafka, "flow", 2_000).await;
    for group in [None, Some("g")] {
        let mut spec = SubscribeSpec::new("flow").prefetch(16);
        if let Some(g) = group {
            spec = spec.group(g);
        }
        let mut sub = kafka.subscriber().subscribe(spec).await.expect("subscribe");
        let mut got = HashSet::new();
        while got.len() < expected.len() {
            let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "group {group:?}: only {} of {} arrived",
                        got.len(),
                        expected.len()
                    )
                })
                .expect("open")
                .expect("delivery");
            got.insert(d.message().id().to_string());
            d.ack().await.expect("ack");
            if got.len() == 100 {
                // Stall past the subscriber's pause threshold (1 s).
                tokio::time::sleep(Duration::from_millis(2_500)).await;
            }
        }
        assert_eq!(got, expected, "group {group:?}");
        sub.close().await;
    }
}

/// The group's committed offset never passes an unacked message: after a close with message 5
/// of 20 unsettled (and 6..20 acked), the group resumes at 5; 0..5 are not seen again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_stops_at_the_first_unacked_message() {
    let (_broker, kafka) = start().await;
    kafka.ensure_topic("prefix", 1).await.expect("topic");
    publish(&kafka, "prefix", 20).await;
    let spec = SubscribeSpec::new("prefix")
        .group("g")
        .ack_wait(Duration::from_secs(60));
    let mut sub = kafka
        .subscriber()
        .subscribe(spec.clone())
        .await
        .expect("subscribe");
    let mut held = None;
    for _ in 0..20 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("delivery in time")
            .expect("open")
            .expect("delivery");
        let offset = match d.info().position {
            eventbus_core::Position::Partition { offset, .. } => offset,
            ref p => panic!("unexpected position {p:?}"),
        };
        if offset == 5 {
            held = Some(d); // neither acked nor nacked
        } else {
            d.ack().await.expect("ack");
        }
    }
    assert!(held.is_some(), "offset 5 was delivered");
    tokio::time::sleep(Duration::from_millis(500)).await; // several commit rounds
    sub.close().await;
    drop(held);

    let mut sub = kafka
        .subscriber()
        .subscribe(spec)
        .await
        .expect("resubscribe");
    let mut offsets = Vec::new();
    while offsets.len() < 15 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only offsets {offsets:?} came back"))
            .expect("open")
            .expect("delivery");
        if let eventbus_core::Position::Partition { offset, .. } = d.info().position {
            offsets.push(offset);
        }
        d.ack().await.expect("ack");
    }
    assert_eq!(offsets, (5..20).collect::<Vec<i64>>());
    sub.close().await;
}

/// Reading a group's lag repeatedly reuses one reader per group, shared by every subscriber of
/// the backend, and still sees the committed offsets move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_readings_reuse_one_reader_per_group() {
    let (_broker, kafka) = start().await;
    kafka.ensure_topic("lagged", 1).await.expect("topic");
    publish(&kafka, "lagged", 10).await;
    let topic = eventbus_core::Topic::new("lagged");
    for _ in 0..5 {
        let lag = kafka
            .subscriber()
            .lag(&topic, "readers")
            .await
            .expect("lag");
        assert_eq!(lag.total(), 10);
    }
    assert!(
        format!("{:?}", kafka.subscriber()).contains("groups: 1"),
        "{:?}",
        kafka.subscriber()
    );
    let mut sub = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("lagged").group("readers"))
        .await
        .expect("subscribe");
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("delivery in time")
            .expect("open")
            .expect("delivery");
        d.ack().await.expect("ack");
    }
    let reader = kafka.subscriber();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lag = reader.lag(&topic, "readers").await.expect("lag");
        if lag.total() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag stayed at {lag:?} after every message was acked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.close().await;
    assert!(format!("{reader:?}").contains("groups: 1"), "{reader:?}");
}
