//! Kafka-specific subscriber behaviour on a real tansu broker: flow control with a small
//! prefetch, and commits that never pass an unacked message.

use std::collections::HashSet;
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{Tansu, TansuStorage};
use eventbus_core::{Backend as _, Message, Publisher, SubscribeSpec, Subscriber, TopicSpec};
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
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
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
    kafka
        .ensure_topic(&TopicSpec::new("flow").partitions(3))
        .await
        .expect("topic");
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
    kafka
        .ensure_topic(&TopicSpec::new("prefix"))
        .await
        .expect("topic");
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
    kafka
        .ensure_topic(&TopicSpec::new("lagged"))
        .await
        .expect("topic");
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

/// Rebalances under load: while 5 publishers write 6,000 keyed messages to a 3-partition topic,
/// a second member joins the group (partitions move to it) and later the first member leaves
/// (they move on again). Every message is handled; the first handling of each key's messages,
/// across both members, is in publish order; the revoke path commits what was handled, so
/// redeliveries stay a small fraction (counted, and bounded here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_under_load_lose_nothing() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Seen {
        /// id -> times handled.
        times: HashMap<String, u32>,
        /// key -> highest sequence handled for the first time.
        last_first: HashMap<String, i64>,
        order_errors: Vec<String>,
        /// member -> messages handled.
        by_member: HashMap<&'static str, usize>,
    }

    let (_broker, kafka) = start().await;
    kafka
        .ensure_topic(&TopicSpec::new("moving").partitions(3))
        .await
        .expect("topic");
    const PUBLISHERS: usize = 5;
    const PER: usize = 1_200;
    let spec = SubscribeSpec::new("moving")
        .group("movers")
        .ack_wait(Duration::from_secs(30));
    let seen: Arc<parking_lot::Mutex<Seen>> = Arc::default();
    let member = |name: &'static str, sub: eventbus_core::Subscription, stop: Arc<AtomicBool>| {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut sub = sub;
            while !stop.load(Ordering::SeqCst) {
                let d = match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                    Ok(Some(Ok(d))) => d,
                    Ok(Some(Err(e))) => panic!("{name}: subscription error {e}"),
                    Ok(None) => break,
                    Err(_) => continue,
                };
                let m = d.message();
                let key = String::from_utf8_lossy(m.key().expect("keyed")).into_owned();
                let seq: i64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
                {
                    let mut s = seen.lock();
                    *s.by_member.entry(name).or_insert(0) += 1;
                    let n = s.times.entry(m.id().to_string()).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        let prev = s.last_first.insert(key.clone(), seq).unwrap_or(-1);
                        if seq <= prev {
                            s.order_errors
                                .push(format!("{name} {key}: {seq} after {prev}"));
                        }
                    }
                }
                d.ack().await.expect("ack");
            }
            sub
        })
    };
    let (stop_first, stop_second) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let first = member(
        "first",
        kafka
            .subscriber()
            .subscribe(spec.clone())
            .await
            .expect("subscribe"),
        Arc::clone(&stop_first),
    );
    // Publish in the background, a little at a time, so the rebalances happen mid-stream.
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let mut publishers = Vec::new();
    for w in 0..PUBLISHERS {
        let p = p.clone();
        publishers.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut ids = Vec::new();
            for i in 0..PER {
                let m = Message::new("moving", i.to_string()).with_key(format!("w{w}-k{}", i % 4));
                ids.push(m.id().to_string());
                acks.push(p.publish(m).await.expect("admitted"));
                // ~1,000 msg/s in all, for ~6 s: the rebalances happen mid-stream.
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            for (i, a) in acks.into_iter().enumerate() {
                assert!(a.await.is_acked(), "publish {w}/{i}");
            }
            ids
        }));
    }
    let handled = |n: usize| {
        let seen = Arc::clone(&seen);
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                let have = seen.lock().times.len();
                if have >= n {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "stuck at {have} of {n}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    handled(1_000).await;
    let second = member(
        "second",
        kafka
            .subscriber()
            .subscribe(spec.clone())
            .await
            .expect("subscribe"),
        Arc::clone(&stop_second),
    );
    let joined = std::time::Instant::now();
    let second_before_leave = loop {
        let n = seen.lock().by_member.get("second").copied().unwrap_or(0);
        if n > 0 {
            break n;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "the joining member got no partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("second member handling after {:?}", joined.elapsed());
    // Some more handled while both are members (fewer if the stream is nearly done: a slow
    // join on a loaded machine can come after most of it).
    let so_far = seen.lock().times.len();
    handled((so_far + 500).min(PUBLISHERS * PER)).await;
    // The first member leaves the group: its partitions move to the second.
    stop_first.store(true, Ordering::SeqCst);
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("first member stops")
        .expect("first member");
    tokio::time::timeout(Duration::from_secs(30), first.close())
        .await
        .expect("first member leaves in time");
    eprintln!("first member left");
    let mut all = std::collections::HashSet::new();
    for t in publishers {
        all.extend(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("publisher finishes")
                .expect("publisher"),
        );
    }
    assert_eq!(all.len(), PUBLISHERS * PER);
    eprintln!("published {}", all.len());
    p.close(Duration::from_secs(10)).await.expect("close");
    handled(all.len()).await;
    stop_second.store(true, Ordering::SeqCst);
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("second member stops")
        .expect("second member");
    tokio::time::timeout(Duration::from_secs(30), second.close())
        .await
        .expect("second member leaves in time");
    let seen = seen.lock();
    let missing = all
        .iter()
        .filter(|id| !seen.times.contains_key(*id))
        .count();
    let redelivered: u32 = seen.times.values().map(|n| n - 1).sum();
    assert_eq!(missing, 0, "messages never handled");
    assert_eq!(seen.times.len(), all.len(), "unknown ids handled");
    assert!(seen.order_errors.is_empty(), "{:?}", seen.order_errors);
    assert!(
        (redelivered as usize) < all.len() / 10,
        "{redelivered} redeliveries of {} messages",
        all.len()
    );
    let second_total = seen.by_member.get("second").copied().unwrap_or(0);
    assert!(
        second_total > second_before_leave,
        "after the first member left, the second took over its partitions"
    );
    eprintln!(
        "rebalances under load: {} handled ({:?}), {redelivered} redelivered",
        all.len(),
        seen.by_member
    );
}

/// A `^regex` topic subscribes every matching topic of the cluster in one subscription; a
/// pattern that matches nothing is a typed `Rejected` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regex_subscribes_every_matching_topic() {
    let (_broker, kafka) = start().await;
    kafka
        .ensure_topics(&["rx-orders", "rx-refunds", "other-topic"].map(TopicSpec::new))
        .await
        .expect("topics");
    let mut want = publish(&kafka, "rx-orders", 5).await;
    want.extend(publish(&kafka, "rx-refunds", 5).await);
    let _ = publish(&kafka, "other-topic", 5).await;
    let mut sub = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("^rx-.*").group("rx"))
        .await
        .expect("subscribe");
    let mut got = HashSet::new();
    while got.len() < want.len() {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {} arrived", got.len(), want.len()))
            .expect("open")
            .expect("delivery");
        assert!(
            d.message().topic().as_str().starts_with("rx-"),
            "{:?}",
            d.message().topic()
        );
        got.insert(d.message().id().to_string());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, want);
    sub.close().await;

    let e = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("^nothing-matches-.*").group("rx"))
        .await
        .expect_err("no topic matches");
    assert_eq!(e.kind(), eventbus_core::ErrorKind::Rejected, "{e}");
    let e = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("^(unclosed").group("rx"))
        .await
        .expect_err("invalid regex");
    assert_eq!(e.kind(), eventbus_core::ErrorKind::InvalidMessage, "{e}");
}
