//! Messages another client wrote (plain async-nats JetStream publishes: no `Nats-Msg-Id`, headers
//! in a chosen order): the SDK's subscriber gives each an id derived from its stream and
//! sequence, the same in every consumer group and on redelivery.

use std::collections::HashMap;
use std::time::Duration;

use eventbus_brokers::NatsServer;
use eventbus_core::{Backend as _, Position, SubscribeSpec, Subscriber, Subscription};
use eventbus_nats::{NatsBackend, NatsConfig, StreamSpec};

async fn next(sub: &mut Subscription, what: &str) -> eventbus_core::Delivery {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing arrived"))
        .expect("open")
        .expect("delivery")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_get_stable_ids() {
    let server = NatsServer::start().expect("start nats-server");
    let nats = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .expect("connect");
    nats.ensure_stream(&StreamSpec::new("LEGACY", ["legacy.>"]))
        .await
        .expect("stream");
    let client = async_nats::connect(server.url())
        .await
        .expect("raw connect");
    let js = async_nats::jetstream::new(client);
    const N: u64 = 20;
    for i in 0..N {
        let mut h = async_nats::HeaderMap::new();
        h.insert("source", format!("legacy-{i}").as_str());
        js.publish_with_headers("legacy.events", h, format!("p-{i}").into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    let mut by_group: Vec<HashMap<String, String>> = Vec::new();
    for group in ["a", "b"] {
        let mut sub = nats
            .subscriber()
            .subscribe(SubscribeSpec::new("legacy.events").group(group))
            .await
            .expect("subscribe");
        let mut ids = HashMap::new();
        let mut nacked = false;
        let mut redelivered = false;
        while (ids.len() as u64) < N || !redelivered {
            let d = next(&mut sub, group).await;
            let m = d.message();
            let Position::Stream {
                ref stream,
                sequence,
                ..
            } = d.info().position
            else {
                panic!("a stream position: {:?}", d.info().position);
            };
            assert_eq!(m.id().to_string(), format!("nats:{stream}:{sequence}"));
            assert_eq!(
                m.headers().get("source"),
                Some(format!("legacy-{}", sequence - 1).as_str())
            );
            let payload = String::from_utf8(m.payload().to_vec()).expect("utf8");
            if let Some(before) = ids.get(&payload) {
                assert_eq!(before, &m.id().to_string(), "redelivery keeps the id");
            }
            ids.insert(payload, m.id().to_string());
            redelivered |= d.info().delivery_count > 1;
            if !nacked {
                // Comes back later with delivery count 2: checked against `ids` above.
                nacked = true;
                d.nack(Duration::ZERO).await.expect("nack");
                continue;
            }
            d.ack().await.expect("ack");
        }
        sub.close().await;
        by_group.push(ids);
    }
    assert_eq!(by_group[0], by_group[1], "both groups see the same ids");
}
