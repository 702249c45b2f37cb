//! Subscriptions and consumer groups: several topics, many members, closing and reopening.

use super::*;

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
