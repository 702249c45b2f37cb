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

/// Payload, key, headers, id and envelope survive a round trip.
pub async fn roundtrip_intact<H: Harness>(h: &H) {
    let topic = h.topic("roundtrip").await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let p = publisher(h, BatchConfig::default()).await;
    let env = Envelope::new("order.created")
        .event_id("evt-1")
        .aggregate_id("order-42")
        .schema_version(7)
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .trace_id("trace-1")
        .tenant("acme");
    let payload: Vec<u8> = (0..=255u8).collect();
    let sent = env.apply(
        Message::new(&topic, payload.clone())
            .with_key("key-1")
            .with_header("x-custom", "v 1")
            .with_header("x-empty", ""),
    );
    let o = p.publish(sent.clone()).await.expect("admitted").await;
    assert!(o.is_acked(), "{o:?}");
    let got = take_acked(&mut sub, 1).await.remove(0);
    assert_eq!(got.topic(), &topic);
    assert_eq!(&got.payload()[..], &payload[..], "payload");
    assert_eq!(got.key().map(|k| &k[..]), Some(&b"key-1"[..]), "key");
    assert_eq!(got.id(), sent.id(), "message id");
    assert_eq!(got.headers().get("x-custom"), Some("v 1"));
    assert_eq!(got.headers().get("x-empty"), Some(""));
    assert_eq!(
        Envelope::from_headers(got.headers()).expect("envelope"),
        env
    );
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// One subscription reads several topics; a group resumes on all of them after a close.
pub async fn several_topics_in_one_subscription<H: Harness>(h: &H) {
    let topics = [
        h.topic("multi-a").await,
        h.topic("multi-b").await,
        h.topic("multi-c").await,
    ];
    let p = publisher(h, BatchConfig::default()).await;
    let mut sent = Vec::new();
    for t in &topics {
        sent.extend(numbered(t, 4));
    }
    assert_all_acked(&publish_all(&p, sent.clone()).await);
    let spec = SubscribeSpec::topics(topics.iter().cloned()).group("g");
    let mut sub = subscribe(h, spec.clone()).await;
    let mut got = HashSet::new();
    ack_until_all_seen(&mut sub, &mut got, &ids(&sent), "three topics").await;
    sub.close().await;

    let later: Vec<Message> = topics.iter().map(|t| Message::new(t, "later")).collect();
    assert_all_acked(&publish_all(&p, later.clone()).await);
    // The group resumes on every topic. At least once: a message acked just before the close
    // may come again (a Kafka group rebalances as its per-topic members leave), nothing else.
    let mut sub = subscribe(h, spec).await;
    let want = ids(&later);
    let old = ids(&sent);
    let mut new_seen = HashSet::new();
    while new_seen.len() < want.len() {
        // Twice the usual wait: three per-topic members rejoin one after another, and on three
        // tansu brokers under the full suite's load their rebalances once took over 20 s.
        let d = recv(&mut sub, RECV_TIMEOUT * 2).await.unwrap_or_else(|| {
            panic!(
                "after reopening: {} of {} new messages",
                new_seen.len(),
                want.len()
            )
        });
        let id = d.message().id().to_string();
        assert!(
            want.contains(&id) || old.contains(&id),
            "a message that was never published: {id}"
        );
        if want.contains(&id) {
            new_seen.insert(id);
        }
        d.ack().await.expect("ack");
    }
    sub.close().await;
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// A typed handler gets decoded values; a payload that does not decode is a typed, permanent
/// failure that reaches the dead-letter topic without panicking or blocking the others.
pub async fn typed_handler_dead_letters_bad_payloads<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, HandlerConfig};
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u32,
        total_cents: i64,
    }
    let topic = h.topic("typed").await;
    let dlq = h.topic("typed-dlq").await;
    let p = publisher(h, BatchConfig::default()).await;
    let mut msgs: Vec<Message> = (0..5u32)
        .map(|id| {
            Message::encode(
                &topic,
                &Order {
                    id,
                    total_cents: i64::from(id) * 100,
                },
            )
            .expect("encode")
        })
        .collect();
    let bad = Message::new(&topic, r#"{"id":"secret-payload-text"}"#);
    msgs.insert(2, bad.clone());
    assert_all_acked(&publish_all(&p, msgs).await);
    let sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .group("g")
            .max_deliveries(2)
            .dead_letter(&dlq)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let done = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (seen, done) = (Arc::clone(&seen), Arc::clone(&done));
        move |order: Order, msg: Message| {
            let (seen, done) = (Arc::clone(&seen), Arc::clone(&done));
            async move {
                assert_eq!(msg.headers().get("content-type"), Some("application/json"));
                let mut s = seen.lock();
                s.push(order);
                if s.len() == 5 {
                    done.notify_one();
                }
                Ok(())
            }
        }
    };
    let mut dl = subscribe(h, SubscribeSpec::new(&dlq)).await;
    let shutdown = {
        let done = Arc::clone(&done);
        async move {
            done.notified().await;
            // The bad payload is handed back at once; let its redelivery be rejected too.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let report = timeout(
        RECV_TIMEOUT * 2,
        handler::run_typed(sub, HandlerConfig::default(), handler, shutdown),
    )
    .await
    .expect("typed handler run");
    let mut ids: Vec<u32> = seen.lock().iter().map(|o| o.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3, 4], "{report:?}");
    assert!(report.rejected >= 1, "{report:?}");
    assert_eq!(report.acked, 5, "{report:?}");
    let got = take_acked(&mut dl, 1).await.remove(0);
    assert_eq!(
        got.payload(),
        bad.payload(),
        "the bad payload is dead-lettered"
    );
    assert_eq!(
        got.headers().get(eventbus_core::dead_letter::ID),
        Some(bad.id().to_string().as_str())
    );
}

/// With [`Subscription::dedup`], two stored copies of one message id reach the handler once,
/// while a nacked delivery still comes back.
pub async fn dedup_hands_each_id_over_once<H: Harness>(h: &H) {
    use eventbus_core::DedupConfig;
    let topic = h.topic("dedup").await;
    let p = publisher(h, BatchConfig::default()).await;
    let originals = numbered(&topic, 10);
    assert_all_acked(&publish_all(&p, originals.clone()).await);
    // A retried publish: the same ids again. Kafka and memory store the copies; NATS
    // de-duplicates them by id (acked as duplicates, or refused whole in atomic mode), so the
    // outcomes are not asserted.
    let _ = publish_all(&p, originals.to_vec()).await;
    let expected = ids(&originals);
    let mut sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .group("g")
            .ack_wait(Duration::from_secs(30)),
    )
    .await
    .dedup(DedupConfig::default());
    let mut handled: HashMap<String, u32> = HashMap::new();
    let mut nacked: Option<String> = None;
    let mut came_back = false;
    while handled.len() < expected.len() || !came_back {
        let d = recv(&mut sub, RECV_TIMEOUT).await.unwrap_or_else(|| {
            panic!(
                "{} of {} ids handled (nacked one back: {came_back})",
                handled.len(),
                expected.len()
            )
        });
        let id = d.message().id().to_string();
        if nacked.is_none() {
            // At least once survives de-duplication: this delivery must come back.
            nacked = Some(id);
            d.nack(Duration::ZERO).await.expect("nack");
            continue;
        }
        came_back |= nacked.as_deref() == Some(id.as_str());
        *handled.entry(id).or_default() += 1;
        d.ack().await.expect("ack");
    }
    assert_quiet(&mut sub, Duration::from_millis(800)).await;
    let keys: HashSet<String> = handled.keys().cloned().collect();
    assert_eq!(keys, expected);
    assert!(
        handled.values().all(|n| *n == 1),
        "an id reached the handler twice: {handled:?}"
    );
    sub.close().await;
}

/// Headers come back in the order they were added, repeated names included.
pub async fn headers_keep_order_and_repeats<H: Harness>(h: &H) {
    let topic = h.topic("hdr-order").await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let p = publisher(h, BatchConfig::default()).await;
    let orders: [&[(&str, &str)]; 3] = [
        &[("b", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("a", "5")],
        &[("z-last", "x"), ("a-first", "y")],
        &[("same", "1"), ("same", "2"), ("same", "3")],
    ];
    let mut sent = Vec::new();
    for (i, pairs) in orders.iter().enumerate() {
        let mut m = Message::new(&topic, format!("{i}"));
        for (n, v) in *pairs {
            m.headers_mut().append(*n, *v);
        }
        sent.push(m);
    }
    assert_all_acked(&publish_all(&p, sent.clone()).await);
    let got = take_acked(&mut sub, sent.len()).await;
    for m in got {
        let i: usize = String::from_utf8_lossy(m.payload()).parse().expect("index");
        let want: Vec<(&str, &str)> = sent[i].headers().iter().collect();
        let have: Vec<(&str, &str)> = m.headers().iter().collect();
        assert_eq!(have, want, "message {i}: header order");
    }
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// Invalid topics, header names and values fail with typed errors before any I/O, and nothing
/// else is affected.
pub async fn invalid_input_typed_errors<H: Harness>(h: &H) {
    let topic = h.topic("invalid").await;
    let p = publisher(h, BatchConfig::default()).await;
    let bad = [
        Message::new("", "x"),
        Message::new("a*b", "x"),
        Message::new("a b", "x"),
        Message::new("a\r\nb", "x"),
        Message::new(&topic, "x").with_header("bad:name", "v"),
        Message::new(&topic, "x").with_header("bad name", "v"),
        Message::new(&topic, "x").with_header("name", "evil\r\nInjected: 1"),
    ];
    for m in bad {
        let shown = format!("{m:?}");
        let err = p
            .publish(m)
            .await
            .expect_err("invalid message must be rejected");
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{shown}: {err}");
        assert!(!err.is_retryable());
        assert!(
            !err.to_string().contains("evil"),
            "error echoes header value: {err}"
        );
    }
    assert_eq!(
        p.stats().in_flight,
        0,
        "rejected messages hold no window slot"
    );
    // A dead-letter topic no publish could reach is refused at subscribe, typed.
    let subscriber = h.subscriber().await;
    for dlq in ["", "a b", "a\r\nb"] {
        let spec = SubscribeSpec::new(&topic)
            .max_deliveries(3)
            .dead_letter(dlq);
        let err = subscriber
            .subscribe(spec)
            .await
            .err()
            .unwrap_or_else(|| panic!("dead-letter topic {dlq:?} accepted"));
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{dlq:?}: {err}");
        assert!(!err.is_retryable());
    }
    let o = p
        .publish(Message::new(&topic, "good"))
        .await
        .expect("admitted")
        .await;
    assert!(o.is_acked(), "{o:?}");
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let got = take_acked(&mut sub, 1).await;
    assert_eq!(&got[0].payload()[..], b"good");
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// Five concurrent publishers, three subscribers in one group: every message arrives,
/// none is lost.
pub async fn many_publishers_and_subscribers<H: Harness>(h: &H) {
    let topic = h.topic("many").await;
    const PUBLISHERS: usize = 5;
    const PER: usize = 400;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(subscribe(h, SubscribeSpec::new(&topic).group("g")).await);
    }
    let p = publisher(h, BatchConfig::default()).await;
    let mut tasks = Vec::new();
    for w in 0..PUBLISHERS {
        let p = p.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let msgs: Vec<Message> = (0..PER)
                .map(|i| Message::new(&topic, format!("w{w}-{i}")).with_key(format!("k{w}")))
                .collect();
            let expected = ids(&msgs);
            assert_all_acked(&publish_all(&p, msgs).await);
            expected
        }));
    }
    let mut expected = HashSet::new();
    for t in tasks {
        expected.extend(t.await.expect("publisher task"));
    }
    // Members joining one after another rebalance the group, so a message handed to one member
    // before a revoke may be delivered again to another (at least once): stop on distinct ids.
    let received = Arc::new(parking_set());
    let mut readers = Vec::new();
    for mut s in subs {
        let received = Arc::clone(&received);
        readers.push(tokio::spawn(async move {
            while received.lock().unwrap().len() < PUBLISHERS * PER {
                if let Some(d) = recv(&mut s, Duration::from_millis(200)).await {
                    received
                        .lock()
                        .unwrap()
                        .insert(d.message().id().to_string());
                    d.ack().await.expect("ack");
                }
            }
            s.close().await;
        }));
    }
    let waited = timeout(Duration::from_secs(60), async {
        for r in readers {
            r.await.expect("reader");
        }
    })
    .await;
    let got = received.lock().unwrap().clone();
    assert!(
        waited.is_ok(),
        "only {} of {} messages arrived",
        got.len(),
        expected.len()
    );
    assert_eq!(got, expected, "received ids differ from published ids");
    p.close(Duration::from_secs(5)).await.expect("close");
}

fn parking_set() -> std::sync::Mutex<HashSet<String>> {
    std::sync::Mutex::new(HashSet::new())
}

/// Messages on one topic never show up on another.
pub async fn topics_isolated<H: Harness>(h: &H) {
    let a = h.topic("iso-a").await;
    let b = h.topic("iso-b").await;
    let p = publisher(h, BatchConfig::default()).await;
    assert_all_acked(&publish_all(&p, numbered(&a, 10)).await);
    assert_all_acked(&publish_all(&p, numbered(&b, 3)).await);
    let mut sa = subscribe(h, SubscribeSpec::new(&a)).await;
    let mut sb = subscribe(h, SubscribeSpec::new(&b)).await;
    let ga = take_acked(&mut sa, 10).await;
    let gb = take_acked(&mut sb, 3).await;
    assert!(ga.iter().all(|m| m.topic() == &a));
    assert!(gb.iter().all(|m| m.topic() == &b));
    assert_quiet(&mut sb, Duration::from_millis(500)).await;
}

/// A nacked message is delivered again, with a higher delivery count.
pub async fn nack_redelivers<H: Harness>(h: &H) {
    let topic = h.topic("nack").await;
    let p = publisher(h, BatchConfig::default()).await;
    assert_all_acked(&publish_all(&p, vec![Message::new(&topic, "again")]).await);
    let mut sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .group("g")
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    let first = recv(&mut sub, RECV_TIMEOUT).await.expect("first delivery");
    assert_eq!(first.info().delivery_count, 1);
    let id = first.message().id().clone();
    first.nack(Duration::from_millis(100)).await.expect("nack");
    let second = recv(&mut sub, RECV_TIMEOUT)
        .await
        .expect("redelivery after nack");
    assert_eq!(second.message().id(), &id);
    assert_eq!(second.info().delivery_count, 2);
    second.ack().await.expect("ack");
    assert_quiet(&mut sub, Duration::from_millis(800)).await;
}

/// After `max_deliveries` unsettled deliveries a message goes to the dead-letter topic (payload,
/// key and headers intact, original id, topic and delivery count in headers) and is not
/// delivered again.
pub async fn dead_letters_after_max_deliveries<H: Harness>(h: &H) {
    use eventbus_core::dead_letter;
    let topic = h.topic("dlsrc").await;
    let dlq = h.topic("dlq").await;
    let p = publisher(h, BatchConfig::default()).await;
    let sent = Message::new(&topic, "poison")
        .with_key("k-1")
        .with_header("x-a", "1");
    assert_all_acked(&publish_all(&p, vec![sent.clone()]).await);
    let mut sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .group("g")
            .max_deliveries(2)
            .dead_letter(&dlq)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    let mut seen = 0;
    for n in 1..=2 {
        let d = recv(&mut sub, RECV_TIMEOUT).await.expect("delivery");
        assert_eq!(d.message().id(), sent.id());
        assert_eq!(d.info().delivery_count, n);
        d.nack(Duration::ZERO).await.expect("nack");
        seen += 1;
    }
    let mut dl = subscribe(h, SubscribeSpec::new(&dlq)).await;
    // The subscription moves the message out as it reads the delivery past the limit: read on.
    let got = tokio::select! {
        mut got = take_acked(&mut dl, 1) => got.remove(0),
        d = recv(&mut sub, RECV_TIMEOUT * 2) => match d {
            Some(d) => panic!("delivery {} handed over past max_deliveries", d.info().delivery_count),
            None => panic!("no dead letter"),
        },
    };
    assert_eq!(&got.payload()[..], b"poison");
    assert_eq!(got.key().map(|k| &k[..]), Some(&b"k-1"[..]));
    assert_eq!(got.headers().get("x-a"), Some("1"));
    let original_id = sent.id().to_string();
    assert_eq!(
        got.headers().get(dead_letter::ID),
        Some(original_id.as_str())
    );
    assert_eq!(got.headers().get(dead_letter::TOPIC), Some(topic.as_str()));
    // The broker delivered it once more than the handler saw: that delivery moved it out.
    let deliveries = (seen + 1).to_string();
    assert_eq!(
        got.headers().get(dead_letter::DELIVERIES),
        Some(deliveries.as_str())
    );
    assert_eq!(
        got.headers().get(dead_letter::REASON),
        Some(dead_letter::MAX_DELIVERIES)
    );
    assert_quiet(&mut sub, Duration::from_millis(800)).await;
    assert_quiet(&mut dl, Duration::from_millis(300)).await;
}

/// Without a dead-letter topic, a message past `max_deliveries` is given up on the same way on
/// every backend: the handler sees it exactly `max_deliveries` times, the message beside it is
/// unaffected, and the group never gets it again, not even through a new member.
pub async fn gives_up_after_max_deliveries<H: Harness>(h: &H) {
    let topic = h.topic("giveup").await;
    let p = publisher(h, BatchConfig::default()).await;
    let poison = Message::new(&topic, "poison");
    let good = Message::new(&topic, "good");
    assert_all_acked(&publish_all(&p, vec![poison.clone(), good.clone()]).await);
    let spec = || {
        SubscribeSpec::new(&topic)
            .group("g")
            .max_deliveries(2)
            .ack_wait(Duration::from_secs(30))
    };
    let mut sub = subscribe(h, spec()).await;
    let (mut poisoned, mut goods) = (0, 0);
    while poisoned < 2 || goods < 1 {
        let d = recv(&mut sub, RECV_TIMEOUT).await.expect("delivery");
        if d.message().id() == poison.id() {
            poisoned += 1;
            assert_eq!(d.info().delivery_count, poisoned);
            d.nack(Duration::ZERO).await.expect("nack");
        } else {
            assert_eq!(d.message().id(), good.id());
            goods += 1;
            d.ack().await.expect("ack");
        }
    }
    assert_quiet(&mut sub, Duration::from_secs(1)).await;
    sub.close().await;
    let mut sub = subscribe(h, spec()).await;
    assert_quiet(&mut sub, Duration::from_secs(1)).await;
    sub.close().await;
}

/// A dead letter the broker refuses loses nothing: the message stays in the group, and a later
/// member with a dead-letter topic that works either gets it again or dead-letters it there.
pub async fn refused_dead_letter_keeps_the_message<H: Harness>(h: &H) {
    use eventbus_core::dead_letter;
    let topic = h.topic("dlrefused").await;
    let refusing = h.unroutable_topic().await;
    let dlq = h.topic("dlq2").await;
    let p = publisher(h, BatchConfig::default()).await;
    let sent = Message::new(&topic, "poison");
    assert_all_acked(&publish_all(&p, vec![sent.clone()]).await);
    let spec = |to: &Topic| {
        SubscribeSpec::new(&topic)
            .group("g")
            .max_deliveries(2)
            .dead_letter(to)
            .ack_wait(Duration::from_secs(30))
    };
    let mut sub = subscribe(h, spec(&refusing)).await;
    for _ in 1..=2 {
        let d = recv(&mut sub, RECV_TIMEOUT).await.expect("delivery");
        assert_eq!(d.message().id(), sent.id());
        d.nack(Duration::ZERO).await.expect("nack");
    }
    // Out of deliveries: the dead letter is tried (and refused) while nothing reaches the handler.
    assert_quiet(&mut sub, Duration::from_secs(2)).await;
    sub.close().await;

    let mut sub = subscribe(h, spec(&dlq)).await;
    let mut dl = subscribe(h, SubscribeSpec::new(&dlq)).await;
    let within = RECV_TIMEOUT * 3;
    tokio::select! {
        d = recv(&mut sub, within) => {
            let d = d.expect("the message, delivered again or dead-lettered");
            assert_eq!(d.message().id(), sent.id());
            d.ack().await.expect("ack");
        }
        d = recv(&mut dl, within) => {
            let d = d.expect("the message, delivered again or dead-lettered");
            let original = sent.id().to_string();
            assert_eq!(d.message().headers().get(dead_letter::ID), Some(original.as_str()));
            d.ack().await.expect("ack");
        }
    }
}

/// The handler runtime (`eventbus_core::handler`): strict order per key while keys run in
/// parallel, failed and panicking runs retried in place, everything acked exactly once. The
/// concurrency limit is twice the number of keys, so only per-key serialization keeps at most
/// one handler per key running; later messages are faster, so without it they would overtake.
pub async fn handler_orders_per_key_and_retries<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, Backoff, HandlerConfig, HandlerError};
    use std::sync::Mutex;
    const KEYS: usize = 4;
    const PER: usize = 30;
    let topic = h.topic("handler").await;
    let p = publisher(h, BatchConfig::default()).await;
    let mut msgs = Vec::new();
    for i in 0..PER {
        for k in 0..KEYS {
            msgs.push(Message::new(&topic, format!("{k}:{i}")).with_key(format!("key-{k}")));
        }
    }
    assert_all_acked(&publish_all(&p, msgs).await);
    let sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .prefetch(64)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    /// What the handler saw, shared by every invocation.
    #[derive(Default)]
    struct Probe {
        log: Mutex<Vec<(usize, usize)>>,
        attempts: Mutex<HashMap<String, u32>>,
        /// Handlers running per key, and the most ever seen at once for any key / in total.
        running: Mutex<HashMap<usize, usize>>,
        peak_per_key: AtomicUsize,
        peak_total: AtomicUsize,
        all_done: tokio::sync::Notify,
    }
    let probe = Arc::new(Probe::default());
    let handler = {
        let probe = Arc::clone(&probe);
        move |msg: Message, _info| {
            let probe = Arc::clone(&probe);
            async move {
                let text = String::from_utf8(msg.payload().to_vec()).expect("utf8");
                let (k, i) = text.split_once(':').expect("k:i");
                let (k, i): (usize, usize) = (k.parse().expect("k"), i.parse().expect("i"));
                {
                    let mut r = probe.running.lock().unwrap();
                    *r.entry(k).or_insert(0) += 1;
                    probe.peak_per_key.fetch_max(r[&k], Ordering::SeqCst);
                    probe
                        .peak_total
                        .fetch_max(r.values().sum(), Ordering::SeqCst);
                }
                // Earlier messages take longer: unordered handling would let later ones pass.
                tokio::time::sleep(Duration::from_millis(1 + ((PER - i) % 4) as u64 * 2)).await;
                let n = {
                    let mut a = probe.attempts.lock().unwrap();
                    let n = a.entry(text.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                *probe.running.lock().unwrap().get_mut(&k).expect("running") -= 1;
                if i % 7 == 3 && n == 1 {
                    return Err(HandlerError::new("first attempt fails"));
                }
                if i % 11 == 5 && n == 1 {
                    panic!("first attempt panics (expected by the test)");
                }
                let mut l = probe.log.lock().unwrap();
                l.push((k, i));
                if l.len() == KEYS * PER {
                    probe.all_done.notify_one();
                }
                Ok(())
            }
        }
    };
    let cfg = HandlerConfig::default()
        .concurrency(KEYS * 2)
        .retry(Backoff::default().initial(Duration::from_millis(5)));
    let done = Arc::clone(&probe);
    let report = timeout(
        Duration::from_secs(60),
        handler::run(
            sub,
            cfg,
            handler,
            async move { done.all_done.notified().await },
        ),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "handler run did not finish: {} of {} handled",
            probe.log.lock().unwrap().len(),
            KEYS * PER
        )
    });
    let log = probe.log.lock().unwrap().clone();
    for k in 0..KEYS {
        let seen: Vec<usize> = log
            .iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(
            seen,
            (0..PER).collect::<Vec<_>>(),
            "key {k}: order or completeness"
        );
    }
    let per_key = probe.peak_per_key.load(Ordering::SeqCst);
    let total = probe.peak_total.load(Ordering::SeqCst);
    assert_eq!(per_key, 1, "two handlers of one key ran at once");
    assert!(
        total >= 2,
        "different keys never ran in parallel (peak {total})"
    );
    let failing = (0..PER).filter(|i| i % 7 == 3).count() * KEYS;
    let panicking = (0..PER).filter(|i| i % 11 == 5).count() * KEYS;
    assert_eq!(report.acked as usize, KEYS * PER, "{report:?}");
    assert_eq!(report.failures as usize, failing + panicking, "{report:?}");
    assert_eq!(report.panics as usize, panicking, "{report:?}");
    assert_eq!(report.gave_up, 0, "{report:?}");
}

/// A delivery that is neither acked nor nacked comes back after the ack wait.
pub async fn unacked_redelivered_after_ack_wait<H: Harness>(h: &H) {
    let topic = h.topic("ackwait").await;
    let wait = h.quirks().min_ack_wait;
    let p = publisher(h, BatchConfig::default()).await;
    assert_all_acked(&publish_all(&p, vec![Message::new(&topic, "slow")]).await);
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).group("g").ack_wait(wait)).await;
    let first = recv(&mut sub, RECV_TIMEOUT).await.expect("first delivery");
    let (msg, _, acker) = first.split();
    let started = tokio::time::Instant::now();
    let second = recv(&mut sub, RECV_TIMEOUT + wait * 4)
        .await
        .expect("redelivery after ack wait");
    assert!(
        started.elapsed() >= wait / 2,
        "redelivered too early: {:?}",
        started.elapsed()
    );
    assert_eq!(second.message().id(), msg.id());
    assert!(second.info().delivery_count >= 2);
    second.ack().await.expect("ack");
    drop(acker);
}

/// A handler slower than the ack wait: the first deliveries are held past it (the backend
/// delivers them again meanwhile) and acked late, and the copies that come after those late
/// acks are acked too. Every message must still arrive: late acks must not upset the
/// subscription's count of what is in flight (on Kafka they did: the count wrapped, the
/// partitions stayed paused and the rest never came).
pub async fn late_acks_lose_nothing<H: Harness>(h: &H) {
    const N: usize = 600;
    let topic = h.topic("lateacks").await;
    let wait = h.quirks().min_ack_wait;
    let p = publisher(h, BatchConfig::default()).await;
    let msgs = numbered(&topic, N);
    let expected = ids(&msgs);
    assert_all_acked(&publish_all(&p, msgs).await);
    let mut sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .group("g")
            .prefetch(4)
            .ack_wait(wait),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(
            recv(&mut sub, RECV_TIMEOUT)
                .await
                .expect("first deliveries"),
        );
    }
    // Past the ack wait: what was handed over is delivered again behind the rest.
    tokio::time::sleep(wait + wait / 2).await;
    let mut got = HashSet::new();
    // The first stays unacked for now, so that what is acked after it stays in flight on the
    // backend's books (not yet committed past) when its copies come round.
    let first = held.remove(0);
    got.insert(first.message().id().to_string());
    for d in held {
        got.insert(d.message().id().to_string());
        d.ack().await.expect("late ack");
    }
    ack_until_all_seen(&mut sub, &mut got, &expected, "after late acks").await;
    first.ack().await.expect("ack");
}

/// When one member of a group closes and the next one starts (a rolling restart), the next one
/// gets the rest within [`Quirks::handover_within`](crate::Quirks::handover_within) (2 s) of `close`
/// returning: `close` returns after the member has left the group, so nothing waits for the
/// broker to notice that the member is gone.
pub async fn second_member_takes_over_after_close<H: Harness>(h: &H) {
    let topic = h.topic("handover").await;
    let p = publisher(h, BatchConfig::default()).await;
    let msgs = numbered(&topic, 20);
    let expected = ids(&msgs);
    assert_all_acked(&publish_all(&p, msgs).await);
    let spec = SubscribeSpec::new(&topic)
        .group("g")
        .prefetch(4)
        .ack_wait(Duration::from_secs(30));
    let mut first = subscribe(h, spec.clone()).await;
    let mut got = ids(&take_acked(&mut first, 5).await);
    first.close().await;
    // A rolling restart: the next member starts once the previous one is gone.
    let closed = tokio::time::Instant::now();
    let mut second = subscribe(h, spec).await;
    let within = h.quirks().handover_within;
    let deadline = closed + within;
    while got.len() < expected.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(d) = recv(&mut second, left).await else {
            panic!(
                "{within:?} after the first member closed, the second had {} of {} messages",
                got.len(),
                expected.len()
            );
        };
        got.insert(d.message().id().to_string());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, expected);
    second.close().await;
}

/// Closing a subscription with unhandled deliveries and opening the group again loses nothing.
pub async fn close_and_reopen_loses_nothing<H: Harness>(h: &H) {
    let topic = h.topic("reopen").await;
    let p = publisher(h, BatchConfig::default()).await;
    let msgs = numbered(&topic, 50);
    let expected = ids(&msgs);
    assert_all_acked(&publish_all(&p, msgs).await);
    let spec = SubscribeSpec::new(&topic)
        .group("g")
        .prefetch(8)
        .ack_wait(Duration::from_secs(30));
    let mut sub = subscribe(h, spec.clone()).await;
    let mut got: HashSet<String> = ids(&take_acked(&mut sub, 10).await);
    sub.close().await;
    let mut sub = subscribe(h, spec).await;
    ack_until_all_seen(&mut sub, &mut got, &expected, "after reopen").await;
}

/// Subscribing and closing concurrently neither hangs nor loses messages.
pub async fn concurrent_subscribe_and_close<H: Harness>(h: &H) {
    let topic = h.topic("churn").await;
    let p = publisher(h, BatchConfig::default()).await;
    let msgs = numbered(&topic, 20);
    let expected = ids(&msgs);
    assert_all_acked(&publish_all(&p, msgs).await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let sub = h.subscriber().await;
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let s = sub
                .subscribe(SubscribeSpec::new(&topic).group("g").prefetch(4))
                .await
                .expect("subscribe");
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.close().await;
        }));
    }
    for t in tasks {
        t.await.expect("churn task");
    }
    // Nothing was acked, so nothing may have been committed: the whole topic is still owed.
    let lag = h
        .subscriber()
        .await
        .lag(&topic, "g")
        .await
        .expect("lag of the churned group");
    assert_eq!(
        lag.pending + lag.unacked,
        20,
        "after churn the group still owes every message: {lag:?}"
    );
    let group = if h.quirks().rejoin_after_churn {
        "g"
    } else {
        "g-after-churn"
    };
    let mut sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .group(group)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    ack_until_all_seen(&mut sub, &mut HashSet::new(), &expected, "after churn").await;
}

/// Messages with the same key arrive in publish order.
pub async fn per_key_order<H: Harness>(h: &H) {
    let topic = h.topic("order").await;
    let p = publisher(h, BatchConfig::default().max_messages(7)).await;
    const KEYS: usize = 4;
    const PER: usize = 100;
    let mut msgs = Vec::new();
    for i in 0..PER {
        for k in 0..KEYS {
            msgs.push(Message::new(&topic, format!("{k}:{i}")).with_key(format!("key-{k}")));
        }
    }
    assert_all_acked(&publish_all(&p, msgs).await);
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).prefetch(64)).await;
    let got = take_acked(&mut sub, KEYS * PER).await;
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in got {
        let s = String::from_utf8(m.payload().to_vec()).expect("utf8");
        let (k, i) = s.split_once(':').expect("k:i");
        let i: i64 = i.parse().expect("number");
        let prev = last.insert(k.to_owned(), i).unwrap_or(-1);
        assert_eq!(i, prev + 1, "key {k}: got {i} after {prev}");
    }
}

/// Messages of one key published one at a time to a subscriber that is already reading (a
/// live tail, not a backlog) arrive in publish order. A reader that keeps more than one pull
/// open can get the tail split between them (nats-server hands waiting pulls messages in turn)
/// and must still hand them over in stream order.
pub async fn live_tail_keeps_publish_order<H: Harness>(h: &H) {
    const N: usize = 150;
    let topic = h.topic("livetail").await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).prefetch(16)).await;
    let p = publisher(h, BatchConfig::default()).await;
    // The subscriber is reading before the first message: wait until a probe arrives.
    let probe = Message::new(&topic, "probe").with_key("k");
    assert_all_acked(&publish_all(&p, vec![probe]).await);
    assert_eq!(
        take_acked(&mut sub, 1).await[0].payload().as_ref(),
        b"probe"
    );
    let publishing = async {
        for i in 0..N {
            let m = Message::new(&topic, format!("{i}")).with_key("k");
            assert_all_acked(&publish_all(&p, vec![m]).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let (got, ()) = tokio::join!(take_acked(&mut sub, N), publishing);
    let got: Vec<usize> = got
        .iter()
        .map(|m| {
            std::str::from_utf8(m.payload())
                .expect("utf8")
                .parse()
                .expect("number")
        })
        .collect();
    let behind = got.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "{behind} deliveries came after a later message"
    );
}

/// A keyed sequence published from one task while the connections to the broker are cut (a
/// blackhole: nothing forwarded, nothing closed, for longer than a NATS sink waits for an ack)
/// and then restored (reset) is acked whole, stored once, and handed to a handler in publish
/// order per key. Harnesses without a fault proxy run the same sequence without the cut.
pub async fn per_key_order_through_a_cut<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, HandlerConfig};
    use std::sync::Mutex;
    const KEYS: usize = 8;
    const PER: usize = 200;
    let topic = h.topic("cutorder").await;
    let p = publisher(
        h,
        BatchConfig::default()
            .linger(Duration::from_millis(2))
            .ack_timeout(Duration::from_secs(60)),
    )
    .await;
    // Publishing takes ~4 s; the cut starts after 0.6 s and lasts 2.5 s.
    let publishing = async {
        let mut acks = Vec::with_capacity(KEYS * PER);
        for i in 0..PER {
            for k in 0..KEYS {
                let m = Message::new(&topic, format!("{k}:{i}")).with_key(format!("key-{k}"));
                acks.push(p.publish(m).await.expect("publish admitted"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        futures_util::future::join_all(acks).await
    };
    let fault = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        if h.cut(true) {
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            h.cut(false);
        }
    };
    let (outcomes, ()) = tokio::join!(publishing, fault);
    assert_all_acked(&outcomes);
    let sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .prefetch(64)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let all = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (log, all) = (Arc::clone(&log), Arc::clone(&all));
        move |msg: Message, _info| {
            let (log, all) = (Arc::clone(&log), Arc::clone(&all));
            async move {
                let text = String::from_utf8(msg.payload().to_vec()).expect("utf8");
                let (k, i) = text.split_once(':').expect("k:i");
                let (k, i): (usize, usize) = (k.parse().expect("k"), i.parse().expect("i"));
                let mut l = log.lock().unwrap();
                l.push((k, i));
                if l.len() == KEYS * PER {
                    all.notify_one();
                }
                Ok::<(), handler::HandlerError>(())
            }
        }
    };
    let cfg = HandlerConfig::default().concurrency(KEYS);
    let done = Arc::clone(&all);
    let handled = timeout(
        Duration::from_secs(60),
        handler::run(sub, cfg, handler, async move { done.notified().await }),
    )
    .await;
    let log = log.lock().unwrap().clone();
    assert!(
        handled.is_ok(),
        "handler run did not finish: {} of {} handled",
        log.len(),
        KEYS * PER
    );
    for k in 0..KEYS {
        let seen: Vec<usize> = log
            .iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, i)| *i)
            .collect();
        let out_of_order = seen.windows(2).filter(|w| w[1] <= w[0]).count();
        assert!(
            seen == (0..PER).collect::<Vec<_>>(),
            "key {k}: {} handled, {out_of_order} behind a later one (stored out of publish order or twice)",
            seen.len()
        );
    }
}

/// Every group sees every message; members of one group share them without duplicates.
pub async fn consumer_groups<H: Harness>(h: &H) {
    let topic = h.topic("groups").await;
    let mut a1 = subscribe(h, SubscribeSpec::new(&topic).group("a").prefetch(16)).await;
    let mut a2 = subscribe(h, SubscribeSpec::new(&topic).group("a").prefetch(16)).await;
    let mut b = subscribe(h, SubscribeSpec::new(&topic).group("b")).await;
    let p = publisher(h, BatchConfig::default()).await;
    let msgs: Vec<Message> = (0..200)
        .map(|i| Message::new(&topic, format!("{i}")).with_key(format!("k{i}")))
        .collect();
    let expected = ids(&msgs);
    assert_all_acked(&publish_all(&p, msgs).await);
    assert_eq!(
        ids(&take_acked(&mut b, 200).await),
        expected,
        "group b sees everything"
    );
    let mut seen1 = HashSet::new();
    let mut seen2 = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen1.len() + seen2.len() < 200 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            d = a1.next() => { let d = d.expect("open").expect("ok"); seen1.insert(d.message().id().to_string()); d.ack().await.expect("ack"); }
            d = a2.next() => { let d = d.expect("open").expect("ok"); seen2.insert(d.message().id().to_string()); d.ack().await.expect("ack"); }
        }
    }
    assert!(
        seen1.is_disjoint(&seen2),
        "members of one group both received the same message"
    );
    let union: HashSet<String> = seen1.union(&seen2).cloned().collect();
    assert_eq!(union, expected, "group a (two members) sees everything");
    if !h.capabilities().partitions {
        assert!(
            !seen1.is_empty() && !seen2.is_empty(),
            "both members get a share: {} / {}",
            seen1.len(),
            seen2.len()
        );
    }
}

/// A subscriber created after publishing reads the retained messages.
pub async fn new_subscriber_reads_old_messages<H: Harness>(h: &H) {
    let topic = h.topic("old").await;
    let p = publisher(h, BatchConfig::default()).await;
    let msgs = numbered(&topic, 25);
    let expected = ids(&msgs);
    assert_all_acked(&publish_all(&p, msgs).await);
    p.close(Duration::from_secs(5)).await.expect("close");
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).group("late")).await;
    assert_eq!(ids(&take_acked(&mut sub, 25).await), expected);
}

/// `close` sends and resolves everything admitted before it, even with a long linger.
pub async fn close_flushes_everything<H: Harness>(h: &H) {
    let topic = h.topic("closeflush").await;
    let p = publisher(
        h,
        BatchConfig::default()
            .linger(Duration::from_secs(3600))
            .max_messages(1_000_000),
    )
    .await;
    let msgs = numbered(&topic, 300);
    let expected = ids(&msgs);
    let mut acks = Vec::new();
    for m in msgs {
        acks.push(p.publish(m).await.expect("admitted"));
    }
    let report = p.close(Duration::from_secs(30)).await.expect("close");
    assert_eq!(report.unresolved, 0);
    for a in acks {
        let o = a.await;
        assert!(o.is_acked(), "{o:?}");
    }
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    assert_eq!(ids(&take_acked(&mut sub, 300).await), expected);
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// Outcomes come back per message, in order: positions grow with publish order.
pub async fn batch_outcomes_in_order<H: Harness>(h: &H) {
    let topic = h.topic("inorder").await;
    let p = publisher(
        h,
        BatchConfig::default()
            .linger(Duration::from_millis(20))
            .max_messages(50),
    )
    .await;
    let outcomes = publish_all(
        &p,
        (0..200)
            .map(|i| Message::new(&topic, format!("{i}")).with_key("same"))
            .collect(),
    )
    .await;
    let mut prev: Option<(i64, i64, i64)> = None;
    for o in outcomes {
        let ack = o.into_result().expect("acked");
        let k = position_key(&ack.position);
        if let Some(p) = prev {
            assert!(k > p, "position {k:?} after {p:?}");
        }
        prev = Some(k);
    }
}

/// One message the broker refuses, inside a batch of good ones, fails alone.
pub async fn bad_message_fails_alone<H: Harness>(h: &H) {
    let topic = h.topic("partial").await;
    let bad = h.unroutable_topic().await;
    let p = publisher(h, BatchConfig::default().linger(Duration::from_millis(50))).await;
    let mut msgs = numbered(&topic, 10);
    msgs.insert(5, Message::new(&bad, "nowhere"));
    let outcomes = publish_all(&p, msgs).await;
    for (i, o) in outcomes.iter().enumerate() {
        if i == 5 {
            let e = o.error().expect("unroutable message must not be acked");
            assert!(o.is_failed() || o.is_unknown(), "{o:?}");
            assert!(
                matches!(e.kind(), ErrorKind::Rejected | ErrorKind::InvalidMessage),
                "{e}"
            );
        } else {
            assert!(o.is_acked(), "message {i}: {o:?}");
        }
    }
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    take_acked(&mut sub, 10).await;
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// The backend's message size limit (every backend must declare one).
async fn message_limit<H: Harness>(h: &H) -> usize {
    h.sink()
        .await
        .limits()
        .max_message_bytes
        .expect("backend declares a message size limit")
}

/// An oversize message fails with `TooLarge` before it takes a window slot.
pub async fn oversize_rejected_before_window<H: Harness>(h: &H) {
    let topic = h.topic("oversize").await;
    let limit = message_limit(h).await;
    let p = publisher(
        h,
        BatchConfig::default()
            .max_in_flight(1)
            .on_full(OnFull::Error),
    )
    .await;
    let err = p
        .publish(Message::new(&topic, vec![7u8; limit + 1]))
        .await
        .expect_err("oversize must fail");
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert_eq!(p.stats().in_flight, 0);
    // The only window slot is still free.
    let o = p
        .publish(Message::new(&topic, "fits"))
        .await
        .expect("admitted")
        .await;
    assert!(o.is_acked(), "{o:?}");
}

/// The number of admitted, unresolved messages never exceeds the window; `OnFull::Error`
/// fails fast with `Overloaded` when it is full.
pub async fn window_bounds_in_flight<H: Harness>(h: &H) {
    let topic = h.topic("window").await;
    const WINDOW: usize = 8;
    let p = publisher(h, BatchConfig::default().max_in_flight(WINDOW)).await;
    let mut acks = Vec::new();
    let mut peak = 0;
    for m in numbered(&topic, 400) {
        acks.push(p.publish(m).await.expect("admitted"));
        let s = p.stats();
        assert!(
            s.in_flight <= WINDOW,
            "in flight {} > window {WINDOW}",
            s.in_flight
        );
        peak = peak.max(s.in_flight);
    }
    assert!(peak >= 1);
    for a in acks {
        assert!(a.await.is_acked());
    }
    assert_eq!(p.stats().in_flight, 0, "every slot released");
    // Fail fast: fill the window without awaiting acks; at least one publish must be refused
    // or all must fit (if the broker acks faster than we publish); never more than WINDOW.
    let fast = publisher(
        h,
        BatchConfig::default()
            .max_in_flight(WINDOW)
            .on_full(OnFull::Error),
    )
    .await;
    let mut admitted = Vec::new();
    let mut overloaded = 0;
    for m in numbered(&topic, 200) {
        match fast.publish(m).await {
            Ok(a) => admitted.push(a),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
                assert!(e.is_retryable());
                overloaded += 1;
            }
        }
        assert!(fast.stats().in_flight <= WINDOW);
    }
    assert_eq!(admitted.len() + overloaded, 200);
    for a in admitted {
        assert!(a.await.is_acked());
    }
}

/// After `close`, `publish` fails with `Closed`; close is idempotent.
pub async fn publish_after_close_fails<H: Harness>(h: &H) {
    let topic = h.topic("closed").await;
    let p = publisher(h, BatchConfig::default()).await;
    assert_all_acked(&publish_all(&p, numbered(&topic, 3)).await);
    let r = p.close(Duration::from_secs(5)).await.expect("close");
    assert_eq!(r.unresolved, 0);
    let e = p
        .publish(Message::new(&topic, "late"))
        .await
        .expect_err("closed");
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert!(!e.is_retryable());
    p.close(Duration::from_secs(1))
        .await
        .expect("second close is fine");
    p.flush().await.expect("flush after close returns");
}

/// Poll `f` until `ok` holds for its result, for at most `limit`; returns the last result.
async fn eventually<T, F, Fut>(limit: Duration, mut f: F, ok: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let start = std::time::Instant::now();
    loop {
        let v = f().await;
        if ok(&v) || start.elapsed() >= limit {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Consumer lag, read from the broker: it grows while a group's consumer does not ack, and
/// falls to zero once it has acked everything. A [`LagWatch`](eventbus_core::ops::LagWatch)
/// reports crossing its threshold both ways.
pub async fn lag_grows_and_shrinks<H: Harness>(h: &H) {
    use eventbus_core::ops::{LagEvent, LagWatch};
    const N: usize = 30;
    let topic = h.topic("lag").await;
    let subscriber = h.subscriber().await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).group("laggards").prefetch(8)).await;
    let p = publisher(h, BatchConfig::default()).await;
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let watch = LagWatch::start(
        h.subscriber().await,
        topic.clone(),
        "laggards",
        Duration::from_millis(100),
        N as u64,
        move |e| seen.lock().expect("events").push(e),
    );
    assert_all_acked(&publish_all(&p, numbered(&topic, N)).await);
    // Nothing acked yet: everything is behind (pending or delivered-but-unacked).
    let lag = eventually(
        Duration::from_secs(10),
        || subscriber.lag(&topic, "laggards"),
        |l| l.as_ref().is_ok_and(|l| l.total() == N as u64),
    )
    .await
    .expect("lag");
    assert_eq!(lag.total(), N as u64, "lag with nothing acked: {lag:?}");
    let events_now = || {
        let e = Arc::clone(&events);
        async move { e.lock().expect("events").clone() }
    };
    let above = eventually(Duration::from_secs(5), events_now, |e| !e.is_empty()).await;
    assert!(
        matches!(above.first(), Some(LagEvent::Above(l)) if l.total() >= N as u64),
        "the watch reports crossing the threshold: {above:?}"
    );
    // Consume and ack everything: the lag drains to zero.
    let got = take_acked(&mut sub, N).await;
    assert_eq!(got.len(), N);
    let lag = eventually(
        Duration::from_secs(15),
        || subscriber.lag(&topic, "laggards"),
        |l| l.as_ref().is_ok_and(|l| l.total() == 0),
    )
    .await
    .expect("lag");
    assert_eq!(lag.total(), 0, "lag after acking everything: {lag:?}");
    let below = eventually(Duration::from_secs(5), events_now, |e| e.len() >= 2).await;
    assert!(
        matches!(below.get(1), Some(LagEvent::Below(l)) if l.total() < N as u64),
        "the watch reports falling below the threshold: {below:?}"
    );
    drop(watch);
    sub.close().await;
    // A group the broker has never seen: an error, or (Kafka) everything pending.
    match subscriber.lag(&topic, "never-subscribed").await {
        Ok(l) => assert_eq!(l.total(), N as u64, "{l:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Rejected, "{e}"),
    }
}

/// The backend's health check reports the broker up, and an end-to-end heartbeat through a
/// real topic comes back within its timeout.
pub async fn health_and_heartbeat<H: Harness>(h: &H) {
    let health = h.health(Duration::from_secs(5)).await;
    assert!(health.up, "{health:?}");
    assert!(health.latency < Duration::from_secs(5), "{health:?}");
    let topic = h.topic("health").await;
    let p = publisher(h, BatchConfig::default()).await;
    let sub = h.subscriber().await;
    let rtt = eventbus_core::ops::heartbeat(&p, &sub, &topic, Duration::from_secs(20))
        .await
        .expect("heartbeat");
    assert!(rtt < Duration::from_secs(20));
    // A second beat on the same topic skips the first.
    eventbus_core::ops::heartbeat(&p, &sub, &topic, Duration::from_secs(20))
        .await
        .expect("second heartbeat");
}

/// A W3C `traceparent` set by the publisher reaches the handler unchanged (the handler runtime
/// also records it on its `eventbus.handle` span).
pub async fn traceparent_reaches_the_handler<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, HandlerConfig};
    use eventbus_core::trace::TraceParent;
    let topic = h.topic("trace").await;
    let sub = subscribe(h, SubscribeSpec::new(&topic).group("tracers")).await;
    let p = publisher(h, BatchConfig::default()).await;
    let sent = TraceParent::new_root().child();
    assert_all_acked(
        &publish_all(
            &p,
            vec![
                sent.inject(Message::new(&topic, "traced")),
                Message::new(&topic, "untraced"),
            ],
        )
        .await,
    );
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = Arc::clone(&seen);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(handler::run(
        sub,
        HandlerConfig::default(),
        move |msg, _info| {
            let got = Arc::clone(&got);
            async move {
                got.lock()
                    .expect("seen")
                    .push((msg.payload().clone(), TraceParent::extract(&msg)));
                Ok(())
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let all = eventually(
        RECV_TIMEOUT,
        || {
            let s = Arc::clone(&seen);
            async move { s.lock().expect("seen").clone() }
        },
        |v| v.len() >= 2,
    )
    .await;
    let _ = stop_tx.send(());
    let _ = run.await;
    assert_eq!(all.len(), 2, "{all:?}");
    for (payload, tp) in all {
        match &payload[..] {
            b"traced" => assert_eq!(tp, Some(sent), "traceparent carried intact"),
            _ => assert_eq!(tp, None, "no traceparent invented"),
        }
    }
}

/// One generated publish for [`fuzzed_bad_input_is_isolated`].
#[derive(Clone, Debug)]
enum Fuzzed {
    /// A valid message: payload length, optional key, a valid header.
    Valid(usize, bool),
    /// A topic with a character no backend accepts (or empty).
    BadTopic(String),
    /// A header name with `:`, whitespace or a control character (or empty).
    BadHeaderName(String),
    /// A header value with CR or LF.
    BadHeaderValue(String),
    /// A payload one byte over the backend's limit.
    Oversize,
}

fn fuzzed_batches() -> Vec<Vec<Fuzzed>> {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let bad_char = prop::sample::select(vec![" ", "\t", "\r", "\n", "*", "\r\n"]);
    let word = "[a-z0-9]{1,8}";
    let bad_topic = prop_oneof![
        Just(String::new()),
        (word, bad_char.clone(), word).prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ];
    let bad_name = prop_oneof![
        Just(String::new()),
        (
            word,
            prop::sample::select(vec![":", " ", "\r", "\n", "\t"]),
            word
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ];
    let bad_value = (
        "[ -~]{0,12}",
        prop::sample::select(vec!["\r", "\n", "\r\n"]),
        "[ -~]{0,12}",
    )
        .prop_map(|(a, c, b)| format!("{a}{c}{b}"));
    let one = prop_oneof![
        6 => (0usize..300, any::<bool>()).prop_map(|(n, k)| Fuzzed::Valid(n, k)),
        1 => bad_topic.prop_map(Fuzzed::BadTopic),
        1 => bad_name.prop_map(Fuzzed::BadHeaderName),
        1 => bad_value.prop_map(Fuzzed::BadHeaderValue),
        1 => Just(Fuzzed::Oversize),
    ];
    let batch = prop::collection::vec(one, 1..12);
    // A fixed seed: every backend sees the same inputs, and a failure names the case.
    let mut runner = TestRunner::deterministic();
    (0..40)
        .map(|_| batch.new_tree(&mut runner).expect("generate").current())
        .collect()
}

/// Generated bad input (proptest, fixed seed) mixed into batches of valid messages: every bad
/// message is refused at `publish` with a typed, non-retryable error that echoes no header value
/// and takes no window slot; every valid message of the same batch is acked; the topic then
/// holds exactly the valid messages. No panic anywhere.
pub async fn fuzzed_bad_input_is_isolated<H: Harness>(h: &H) {
    let topic = h.topic("fuzzed").await;
    let limit = message_limit(h).await;
    let p = publisher(h, BatchConfig::default().linger(Duration::from_millis(5))).await;
    let mut expected = HashSet::new();
    let mut refused = 0usize;
    for (case, batch) in fuzzed_batches().into_iter().enumerate() {
        let mut acks = Vec::new();
        for (i, f) in batch.iter().enumerate() {
            let msg = match f {
                Fuzzed::Valid(n, keyed) => {
                    let m =
                        Message::new(&topic, vec![b'v'; *n]).with_header("case", case.to_string());
                    if *keyed {
                        m.with_key(format!("k{i}"))
                    } else {
                        m
                    }
                }
                Fuzzed::BadTopic(t) => Message::new(t.as_str(), "x"),
                Fuzzed::BadHeaderName(n) => Message::new(&topic, "x").with_header(n.as_str(), "v"),
                Fuzzed::BadHeaderValue(v) => {
                    Message::new(&topic, "x").with_header("h", format!("secret{v}"))
                }
                Fuzzed::Oversize => Message::new(&topic, vec![0u8; limit + 1]),
            };
            let id = msg.id().to_string();
            match (f, p.publish(msg).await) {
                (Fuzzed::Valid(..), Ok(ack)) => {
                    expected.insert(id);
                    acks.push(ack);
                }
                (Fuzzed::Valid(..), Err(e)) => panic!("case {case}: valid {f:?} refused: {e}"),
                (_, Ok(_)) => panic!("case {case}: bad input {f:?} was admitted"),
                (_, Err(e)) => {
                    let want = if matches!(f, Fuzzed::Oversize) {
                        ErrorKind::TooLarge
                    } else {
                        ErrorKind::InvalidMessage
                    };
                    assert_eq!(e.kind(), want, "case {case}: {f:?}: {e}");
                    assert!(!e.is_retryable(), "case {case}: {f:?}: {e}");
                    assert!(
                        !e.to_string().contains("secret"),
                        "error echoes a header value: {e}"
                    );
                    refused += 1;
                }
            }
        }
        for (i, a) in acks.into_iter().enumerate() {
            let o = a.await;
            assert!(
                o.is_acked(),
                "case {case}: valid message {i} of {batch:?}: {o:?}"
            );
        }
        assert_eq!(
            p.stats().in_flight,
            0,
            "case {case}: a refused message holds a slot"
        );
    }
    assert!(
        refused > 0 && !expected.is_empty(),
        "the generator produced both kinds"
    );
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let mut got = HashSet::new();
    ack_until_all_seen(&mut sub, &mut got, &expected, "fuzzed valid messages").await;
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    p.close(Duration::from_secs(5)).await.expect("close");
}
