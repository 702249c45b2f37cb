//! The Kafka producer against a real tansu broker (Kafka protocol), read back with a plain
//! rdkafka consumer: ids, keys, headers, envelope and per-key order intact; bad input typed.

use std::collections::HashMap;
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{Tansu, TansuStorage};
use eventbus_core::{Backend as _, Envelope, ErrorKind, Message, Position, Publisher, TopicSpec};
use eventbus_kafka::{KafkaBackend, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

async fn start() -> (Tansu, KafkaBackend) {
    let broker =
        Tansu::start(TansuStorage::Memory).unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let kafka = KafkaBackend::connect(KafkaConfig::new(broker.bootstrap()))
        .await
        .expect("connect to tansu");
    (broker, kafka)
}

/// Read `n` records from every partition of `topic` with a plain consumer (no group protocol).
fn read_back(brokers: &str, topic: &str, partitions: i32, n: usize) -> Vec<Message> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "verify")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n && std::time::Instant::now() < deadline {
        if let Some(r) = consumer.poll(Duration::from_millis(200)) {
            let m = r.expect("consume");
            out.push(eventbus_kafka::decode_record(&m));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_plain_consumer_reads_everything_intact() {
    let (broker, kafka) = start().await;
    kafka
        .ensure_topic(&TopicSpec::new("orders").partitions(3))
        .await
        .expect("create topic");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let env = Envelope::new("order.created")
        .aggregate_id("a-1")
        .tenant("acme");
    let mut sent = Vec::new();
    let mut acks = Vec::new();
    for i in 0..1_000u32 {
        let m = env.apply(
            Message::new("orders", format!("{i}"))
                .with_key(format!("k{}", i % 10))
                .with_header("x-n", i.to_string()),
        );
        sent.push(m.clone());
        acks.push(p.publish(m).await.expect("admitted"));
    }
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let mut key_partition: HashMap<String, i32> = HashMap::new();
    for (m, a) in sent.iter().zip(acks) {
        let ack = a.await.into_result().expect("acked");
        let Position::Partition { partition, offset } = ack.position else {
            panic!("not a partition position")
        };
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        assert_eq!(
            *key_partition.entry(key).or_insert(partition),
            partition,
            "one key, one partition"
        );
        let prev = last_offset.insert(partition, offset).unwrap_or(-1);
        assert!(
            offset > prev,
            "offsets grow in publish order within a partition"
        );
    }
    let report = p.close(Duration::from_secs(10)).await.expect("close");
    assert_eq!(report.unresolved, 0);

    let got = read_back(&broker.bootstrap(), "orders", 3, 1_000);
    assert_eq!(
        got.len(),
        1_000,
        "a plain Kafka consumer reads every message"
    );
    let by_id: HashMap<String, &Message> = sent.iter().map(|m| (m.id().to_string(), m)).collect();
    let mut seen_per_key: HashMap<Vec<u8>, i64> = HashMap::new();
    for m in &got {
        let orig = by_id
            .get(&m.id().to_string())
            .expect("id header round-trips");
        assert_eq!(m.payload(), orig.payload());
        assert_eq!(m.key(), orig.key());
        assert_eq!(m.headers().get("x-n"), orig.headers().get("x-n"));
        assert_eq!(Envelope::from_headers(m.headers()).unwrap(), env);
        let i: i64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
        let prev = seen_per_key
            .insert(m.key().unwrap().to_vec(), i)
            .unwrap_or(-1);
        assert!(i > prev, "per-key order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_typed_and_touches_nothing_else() {
    let (_broker, kafka) = start().await;
    kafka
        .ensure_topic(&TopicSpec::new("good"))
        .await
        .expect("create topic");
    let sink = kafka.sink().await.expect("sink");
    let limit = eventbus_core::BatchSink::limits(&sink)
        .max_message_bytes
        .unwrap();
    let p = Batcher::new(sink, BatchConfig::default()).unwrap();
    for (m, kind) in [
        (Message::new("bad/topic", "x"), ErrorKind::InvalidMessage),
        (Message::new("..", "x"), ErrorKind::InvalidMessage),
        (
            Message::new("x".repeat(250), "x"),
            ErrorKind::InvalidMessage,
        ),
        (
            Message::new("good", "x").with_header("a:b", "v"),
            ErrorKind::InvalidMessage,
        ),
        (
            Message::new("good", vec![0u8; limit + 1]),
            ErrorKind::TooLarge,
        ),
    ] {
        let e = p.publish(m).await.expect_err("must be refused before I/O");
        assert_eq!(e.kind(), kind, "{e}");
        assert_eq!(e.backend(), "kafka");
    }
    assert_eq!(p.stats().in_flight, 0);
    let ok = p
        .publish(Message::new("good", "fine"))
        .await
        .expect("admitted")
        .await;
    assert!(ok.is_acked(), "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_fails_connect_with_a_typed_error() {
    let port = eventbus_brokers::free_port().unwrap();
    let cfg = KafkaConfig::new(format!("127.0.0.1:{port}")).connect_timeout(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let e = KafkaBackend::connect(cfg)
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Other
        ),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fails within its timeout, no hang"
    );
}

/// The other direction: records a plain rdkafka producer wrote (keys, headers, no eventbus id
/// header) are consumed by the SDK's subscriber with key, headers and payload intact, each with
/// an id of its own, in per-partition order; the id is the same in every group and on
/// redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_consumes_what_a_plain_producer_wrote() {
    use eventbus_core::{SubscribeSpec, Subscriber};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (broker, kafka) = start().await;
    kafka
        .ensure_topic(&TopicSpec::new("foreign"))
        .await
        .expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .expect("producer");
    const N: usize = 50;
    for i in 0..N {
        let headers = OwnedHeaders::new().insert(Header {
            key: "source",
            value: Some(format!("legacy-{i}").as_bytes()),
        });
        producer
            .send(
                FutureRecord::to("foreign")
                    .key(&format!("k{}", i % 3))
                    .payload(&format!("payload-{i}"))
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("plain produce");
    }
    let mut sub = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("foreign").group("sdk-reader"))
        .await
        .expect("subscribe");
    let mut ids = std::collections::HashSet::new();
    let mut first = HashMap::new();
    for i in 0..N {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {N} records arrived"))
            .expect("open")
            .expect("delivery");
        let m = d.message();
        assert_eq!(&m.payload()[..], format!("payload-{i}").as_bytes());
        assert_eq!(
            m.key().map(|k| &k[..]),
            Some(format!("k{}", i % 3).as_bytes())
        );
        assert_eq!(
            m.headers().get("source"),
            Some(format!("legacy-{i}").as_str())
        );
        assert!(ids.insert(m.id().to_string()), "ids are distinct");
        first.insert(m.payload().clone(), m.id().to_string());
        d.ack().await.expect("ack");
    }
    sub.close().await;

    // Ids are derived from where the record is stored: another group sees the same ids, and a
    // redelivery keeps its id.
    let mut sub = kafka
        .subscriber()
        .subscribe(SubscribeSpec::new("foreign").group("sdk-reader-2"))
        .await
        .expect("subscribe");
    let mut seen = 0;
    let mut nacked = false;
    while seen < N {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("group 2: only {seen} of {N} records arrived"))
            .expect("open")
            .expect("delivery");
        let m = d.message();
        assert_eq!(
            first.get(m.payload()),
            Some(&m.id().to_string()),
            "group 2 sees the id group 1 saw"
        );
        let eventbus_core::Position::Partition { partition, offset } = d.info().position else {
            panic!("a Kafka position");
        };
        assert_eq!(
            m.id().to_string(),
            format!("kafka:foreign:{partition}:{offset}")
        );
        if !nacked {
            nacked = true;
            d.nack(Duration::ZERO).await.expect("nack");
            continue;
        }
        seen += 1;
        d.ack().await.expect("ack");
    }
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_creates_all_in_one_call_and_validates_first() {
    fn two<const N: usize>(names: [&str; N]) -> [TopicSpec; N] {
        names.map(|t| TopicSpec::new(t).partitions(2))
    }
    let (_broker, kafka) = start().await;
    // One invalid name: the call fails typed and creates none of the valid ones.
    let e = kafka
        .ensure_topics(&two(["batch-a", "bad topic", "batch-b"]))
        .await
        .expect_err("invalid name");
    assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
    let md = kafka.watermarks("batch-a").await;
    assert!(
        md.as_ref().map_or(true, |p| p.is_empty()),
        "nothing created before validation passed: {md:?}"
    );
    kafka
        .ensure_topics(&two(["batch-a", "batch-b", "batch-c"]))
        .await
        .expect("create three");
    for t in ["batch-a", "batch-b", "batch-c"] {
        let parts = kafka.watermarks(t).await.expect("metadata");
        assert_eq!(parts.len(), 2, "{t}: {parts:?}");
    }
    // Existing topics are fine, and the shared admin client serves later calls.
    kafka
        .ensure_topics(&two(["batch-a", "batch-d"]))
        .await
        .expect("again, with one new");
    assert_eq!(kafka.watermarks("batch-d").await.expect("d").len(), 2);
    kafka.ensure_topics(&[]).await.expect("empty is a no-op");
}

/// What the SDK reports acked, the broker holds, counted by the broker's own watermarks (a
/// plain client, not the SDK), and still holds after a SIGKILL and a restart on its SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_holds_every_acked_record_across_a_restart() {
    use eventbus_brokers::{BrokerKind, TestBroker};
    let mut broker = BrokerKind::Tansu(TansuStorage::Sqlite)
        .start()
        .unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let kafka = KafkaBackend::connect(KafkaConfig::new(broker.address()))
        .await
        .expect("connect to tansu");
    kafka
        .ensure_topic(&TopicSpec::new("counted").partitions(2))
        .await
        .expect("create topic");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let mut acks = Vec::new();
    for i in 0..300u32 {
        let m = Message::new("counted", format!("{i}")).with_key(format!("k{}", i % 7));
        acks.push(p.publish(m).await.expect("admitted"));
    }
    for a in acks {
        a.await.into_result().expect("acked");
    }
    p.close(Duration::from_secs(5)).await.expect("close");
    let count = |b: Box<dyn TestBroker>| {
        tokio::task::spawn_blocking(move || {
            let n = b.stored("counted");
            (b, n)
        })
    };
    let (b, before) = count(broker).await.expect("join");
    assert_eq!(before.expect("watermarks"), 300);
    broker = b;
    broker.kill(0);
    broker.restart(0).expect("restart tansu");
    let (_broker, after) = count(broker).await.expect("join");
    assert_eq!(after.expect("watermarks after a restart"), 300);
}
