//! Scenarios on what a backend says it can do: topic options and broker-side de-duplication,
//! read from [`Capabilities`](eventbus_core::Capabilities) and checked against the broker.

use std::time::Duration;

use eventbus_batch::BatchConfig;
use eventbus_core::{ErrorKind, Message, Publisher, SubscribeSpec, Topic, TopicSpec};

use super::{RECV_TIMEOUT, assert_all_acked, publish_all, publisher, recv, subscribe};
use crate::Harness;

/// Every [`TopicSpec`] option the backend's capabilities list is honoured (the topic is
/// created and carries a message); every other is refused with `Unsupported` naming the option,
/// and the plain topic can still be made under that name. Ensuring an existing topic again
/// succeeds.
pub async fn topic_options_honoured_or_refused<H: Harness>(h: &H) {
    let caps = h.capabilities();
    type With = fn(TopicSpec) -> TopicSpec;
    let options: [(&str, bool, With); 3] = [
        ("partitions", caps.partitions, |s| s.partitions(3)),
        ("replicas", caps.replicas, |s| s.replicas(2)),
        ("max_age", caps.max_age, |s| {
            s.max_age(Duration::from_secs(3600))
        }),
    ];
    for (what, supported, with) in options {
        let name = h.topic_name(what);
        if what == "replicas" && supported {
            // Two copies need two nodes, and a test broker may be one: ask for one, explicitly.
            let spec = TopicSpec::new(name.as_str()).replicas(1);
            h.ensure_topic(&spec)
                .await
                .expect("one replica is always honoured");
            carries_a_message(h, &Topic::new(&name)).await;
            continue;
        }
        let spec = with(TopicSpec::new(name.as_str()));
        let got = h.ensure_topic(&spec).await;
        if supported {
            got.unwrap_or_else(|e| panic!("{what} is a capability, yet refused: {e}"));
            carries_a_message(h, &Topic::new(&name)).await;
            h.ensure_topic(&spec)
                .await
                .unwrap_or_else(|e| panic!("ensuring an existing topic ({what}) again: {e}"));
        } else {
            let e = got.expect_err(&format!("{what} is not a capability, yet accepted"));
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{what}: {e}");
            assert!(e.to_string().contains(what), "the error names {what}: {e}");
            // The name is still usable for a topic the backend can make.
            h.ensure_topic(&TopicSpec::new(name.as_str()))
                .await
                .expect("the plain topic");
            carries_a_message(h, &Topic::new(&name)).await;
        }
    }
}

/// Publish one message to `topic` and read it back from the start.
async fn carries_a_message<H: Harness>(h: &H, topic: &Topic) {
    let p = publisher(h, BatchConfig::default()).await;
    let m = Message::new(topic, "probe");
    assert_all_acked(&publish_all(&p, vec![m.clone()]).await);
    p.close(Duration::from_secs(5)).await.expect("close");
    let mut sub = subscribe(h, SubscribeSpec::new(topic).group("probe")).await;
    let d = recv(&mut sub, RECV_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("nothing arrived from {topic}"));
    assert_eq!(d.message().id(), m.id());
    d.ack().await.expect("ack");
    sub.close().await;
}

/// A retried publish (the same ids, sent again after the first copies were acked) stores one
/// copy where [`Capabilities::broker_dedup`](eventbus_core::Capabilities::broker_dedup) says
/// the broker de-duplicates, and two where it says it does not: a consumer without its own
/// de-duplication sees exactly that many.
pub async fn broker_dedup_as_capabilities_say<H: Harness>(h: &H) {
    let caps = h.capabilities();
    let topic = h.topic("brokerdedup").await;
    let p = publisher(h, BatchConfig::default()).await;
    // One key: one partition, so the end marker comes after every copy.
    let originals: Vec<Message> = (0..5)
        .map(|i| Message::new(&topic, format!("d-{i}")).with_key("k"))
        .collect();
    assert_all_acked(&publish_all(&p, originals.clone()).await);
    // Outcomes not asserted: a de-duplicating broker may ack the copies as duplicates or
    // (NATS atomic batches) refuse them whole.
    let _ = publish_all(&p, originals.clone()).await;
    let end = Message::new(&topic, "end").with_key("k");
    assert_all_acked(&publish_all(&p, vec![end.clone()]).await);
    p.close(Duration::from_secs(5)).await.expect("close");

    let mut sub = subscribe(h, SubscribeSpec::new(&topic).group("raw")).await;
    let mut copies = std::collections::HashMap::<String, usize>::new();
    loop {
        let d = recv(&mut sub, RECV_TIMEOUT)
            .await
            .expect("the end marker arrives after every copy");
        let id = d.message().id().to_string();
        d.ack().await.expect("ack");
        if id == end.id().to_string() {
            break;
        }
        *copies.entry(id).or_default() += 1;
    }
    sub.close().await;
    let want = if caps.broker_dedup { 1 } else { 2 };
    assert_eq!(copies.len(), originals.len(), "every id arrives");
    for (id, n) in &copies {
        assert_eq!(
            *n, want,
            "id {id}: {n} stored copies, broker_dedup = {}",
            caps.broker_dedup
        );
    }
}
