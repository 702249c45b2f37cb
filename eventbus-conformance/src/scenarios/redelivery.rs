//! Acks, nacks, redelivery, de-duplication and dead letters.

use super::*;

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
