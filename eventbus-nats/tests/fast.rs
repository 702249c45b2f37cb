//! Fast-ingest batch publishing (ADR-50, `PublishMode::Fast`) against a real nats-server 2.15:
//! every outcome checked against what the stream really holds.

use std::time::Duration;

use async_nats::jetstream::stream;
use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{NatsOptions, NatsServer};
use eventbus_conformance::scenarios::publish_all;
use eventbus_core::{Backend as _, ErrorKind, Message, Outcome, Position, Publisher};
use eventbus_nats::{NatsBackend, NatsConfig, NatsSink, PublishMode, SinkOptions, StreamSpec};

async fn connect() -> (NatsServer, NatsBackend) {
    let server = NatsServer::start().expect("start nats-server");
    let nats = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .expect("connect");
    (server, nats)
}

async fn fast_publisher(nats: &NatsBackend, max_messages: usize) -> Batcher<NatsSink> {
    let sink = nats
        .sink_with(SinkOptions::default().mode(PublishMode::Fast))
        .await
        .expect("sink");
    assert_eq!(sink.options().mode, PublishMode::Fast, "2.15 supports fast");
    // A long linger makes each flush one full batch.
    Batcher::new(
        sink,
        BatchConfig::default()
            .linger(Duration::from_millis(100))
            .max_messages(max_messages),
    )
    .unwrap()
}

fn messages(subject: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(subject, format!("m-{i}")))
        .collect()
}

/// The stream sequence a fast-batch ack implies when nothing else writes to the stream.
fn implied_sequence(o: &Outcome) -> u64 {
    match o {
        Outcome::Acked(a) => match &a.position {
            Position::StreamBatch {
                last_sequence,
                index,
                count,
                ..
            } => last_sequence - (count - index),
            p => panic!("fast mode acked with {p:?}"),
        },
        o => panic!("not acked: {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_batches_store_every_message_once_in_order() {
    let (_server, nats) = connect().await;
    nats.ensure_stream(&StreamSpec::new("FAST", ["fast.>"]).allow_batched(true))
        .await
        .expect("stream");
    let p = fast_publisher(&nats, 700).await;
    let msgs: Vec<Message> = (0..5_000)
        .map(|i| Message::new(format!("fast.s{}", i % 3), format!("{i}")))
        .collect();
    let outcomes = publish_all(&p, msgs).await;
    let seqs: Vec<u64> = outcomes.iter().map(implied_sequence).collect();
    assert_eq!(
        seqs,
        (1..=5_000).collect::<Vec<u64>>(),
        "one publisher, one stream: implied sequences are exact"
    );
    assert_eq!(nats.stream_state("FAST").await.unwrap().messages, 5_000);
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// Fast mode on a stream without `allow_batched`: published in async mode instead, every
/// message acked with its exact sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_allow_batched_falls_back_to_async() {
    let (_server, nats) = connect().await;
    nats.ensure_stream(&StreamSpec::new("PLAIN", ["plain.>"]).allow_batched(false))
        .await
        .expect("stream");
    nats.ensure_stream(&StreamSpec::new("FAST", ["fast.>"]))
        .await
        .expect("stream");
    let p = fast_publisher(&nats, 100).await;
    // One engine batch spanning both streams.
    let mut msgs = messages("plain.a", 50);
    msgs.extend(messages("fast.a", 50));
    let outcomes = publish_all(&p, msgs).await;
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            Outcome::Acked(a) => match (&a.position, i < 50) {
                (Position::Stream { sequence, .. }, true) => assert_eq!(*sequence, i as u64 + 1),
                (Position::StreamBatch { .. }, false) => {}
                (p, _) => panic!("message {i}: {p:?}"),
            },
            o => panic!("message {i}: {o:?}"),
        }
    }
    assert_eq!(nats.stream_state("PLAIN").await.unwrap().messages, 50);
    assert_eq!(nats.stream_state("FAST").await.unwrap().messages, 50);
}

/// A stream that fills up mid-batch (max 25 messages, discard new): the server stores 25,
/// refuses the 26th and ends the batch there. Exactly the stored ones are acked; the 26th fails
/// with the server's reason, the rest are sent again one by one and refused for themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_short_by_the_server_reports_exactly_what_is_stored() {
    let (_server, nats) = connect().await;
    nats.jetstream()
        .create_stream(stream::Config {
            name: "FULL".into(),
            subjects: vec!["full.>".into()],
            max_messages: 25,
            discard: stream::DiscardPolicy::New,
            allow_batch_publish: true,
            ..Default::default()
        })
        .await
        .expect("stream");
    let p = fast_publisher(&nats, 100).await;
    let outcomes = publish_all(&p, messages("full.x", 60)).await;
    let acked = outcomes.iter().filter(|o| o.is_acked()).count();
    assert_eq!(acked, 25, "{:?}", &outcomes[24..27]);
    assert!(outcomes[..25].iter().all(Outcome::is_acked));
    for (i, o) in outcomes.iter().enumerate().skip(25) {
        assert!(o.is_failed(), "message {i}: {o:?}");
        let e = o.error().expect("error");
        assert!(
            e.to_string().contains("maximum messages"),
            "message {i}: {e}"
        );
    }
    assert_eq!(nats.stream_state("FULL").await.unwrap().messages, 25);
}

/// A server that allows one fast batch in flight per stream refuses the others as a whole
/// ("too many in flight", nothing stored): their lanes send them again after a backoff, and
/// every message ends up acked and stored exactly once, each publisher's (one key) in order. Two connections publish at once, so their batches
/// overlap at the server (one connection's batches arrive one after another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_servers_in_flight_limit_are_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        "jetstream { limits { batch { max_inflight_per_stream: 1 } } }\n",
    )
    .expect("write config");
    let server = NatsServer::start_with(NatsOptions {
        args: vec!["-c".into(), conf.display().to_string()],
        ..NatsOptions::default()
    })
    .expect("start nats-server");
    let nats = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .expect("connect");
    nats.ensure_stream(&StreamSpec::new("LIMIT", ["limit.>"]))
        .await
        .expect("stream");
    let mut tasks = Vec::new();
    for w in 0..2 {
        let url = server.url();
        tasks.push(tokio::spawn(async move {
            let nats = NatsBackend::connect(NatsConfig::new(url))
                .await
                .expect("connect");
            let sink = nats.sink().await.expect("sink");
            let resent = sink.clone();
            let p = Batcher::new(sink, BatchConfig::default().max_messages(20)).unwrap();
            let msgs = messages(&format!("limit.w{w}"), 3_000)
                .into_iter()
                .map(|m| m.with_key(format!("w{w}")))
                .collect();
            let out = publish_all(&p, msgs).await;
            p.close(Duration::from_secs(5)).await.expect("close");
            (out, resent.resent())
        }));
    }
    let mut resent = 0;
    for t in tasks {
        let (outcomes, r) = t.await.expect("publisher");
        resent += r;
        for (i, o) in outcomes.iter().enumerate() {
            match o {
                Outcome::Acked(a) => {
                    assert!(matches!(a.position, Position::StreamBatch { .. }), "{a:?}")
                }
                o => panic!("message {i}: {o:?}"),
            }
        }
    }
    eprintln!("{resent} messages sent again");
    assert!(
        resent > 0,
        "the limit was never hit: the test proves nothing"
    );
    assert_eq!(nats.stream_state("LIMIT").await.unwrap().messages, 6_000);
    // Each publisher's messages (one key) are stored in publish order.
    let mut next = [0usize; 2];
    let stream = nats.jetstream().get_stream("LIMIT").await.expect("stream");
    for seq in 1..=6_000u64 {
        let m = stream.get_raw_message(seq).await.expect("stored message");
        let w: usize = m.subject.as_str()["limit.w".len()..]
            .parse()
            .expect("subject");
        let body = std::str::from_utf8(&m.payload).expect("utf-8");
        assert_eq!(
            body,
            format!("m-{}", next[w]),
            "publisher {w} at stream sequence {seq}"
        );
        next[w] += 1;
    }
}

/// A message over the stream's own `max_msg_size` (but under the server's `max_payload`) fails
/// alone with `TooLarge` before sending; the rest of its batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_stream_limit_fails_alone() {
    let (_server, nats) = connect().await;
    nats.jetstream()
        .create_stream(stream::Config {
            name: "SMALL".into(),
            subjects: vec!["small.>".into()],
            max_message_size: 512,
            allow_batch_publish: true,
            ..Default::default()
        })
        .await
        .expect("stream");
    let p = fast_publisher(&nats, 100).await;
    let mut msgs = messages("small.x", 10);
    msgs[4] = Message::new("small.x", vec![b'x'; 2_000]);
    let outcomes = publish_all(&p, msgs).await;
    for (i, o) in outcomes.iter().enumerate() {
        if i == 4 {
            assert_eq!(o.error().expect("failed").kind(), ErrorKind::TooLarge);
            assert!(o.is_failed());
        } else {
            assert!(o.is_acked(), "message {i}: {o:?}");
        }
    }
    assert_eq!(nats.stream_state("SMALL").await.unwrap().messages, 9);
}

/// Retrying with the same ids inside a fast batch is de-duplicated by the stream
/// (`Nats-Msg-Id`): acked again, stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_in_fast_batches_are_deduplicated() {
    let (_server, nats) = connect().await;
    nats.ensure_stream(&StreamSpec::new("DEDUP", ["dedup.>"]).allow_batched(true))
        .await
        .expect("stream");
    let p = fast_publisher(&nats, 100).await;
    let msgs = messages("dedup.x", 40);
    let first = publish_all(&p, msgs.clone()).await;
    assert!(first.iter().all(Outcome::is_acked));
    let mut again = msgs[10..30].to_vec();
    again.extend(messages("dedup.x", 5));
    let second = publish_all(&p, again).await;
    assert!(second.iter().all(Outcome::is_acked), "{second:?}");
    assert_eq!(nats.stream_state("DEDUP").await.unwrap().messages, 45);
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// Several publishers on one sink and stream: many fast batches in flight at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_share_the_stream() {
    let (_server, nats) = connect().await;
    nats.ensure_stream(&StreamSpec::new("MANY", ["many.>"]).allow_batched(true))
        .await
        .expect("stream");
    let sink = nats
        .sink_with(SinkOptions::default().mode(PublishMode::Fast))
        .await
        .expect("sink");
    let p = Batcher::new(sink, BatchConfig::default().max_messages(50)).unwrap();
    let mut tasks = Vec::new();
    for w in 0..5 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..4_000 {
                let m = Message::new(format!("many.w{w}"), format!("{w}-{i}"));
                acks.push(p.publish(m).await.expect("admitted"));
            }
            let mut n = 0;
            for a in acks {
                assert!(a.await.is_acked());
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, 20_000);
    assert_eq!(nats.stream_state("MANY").await.unwrap().messages, 20_000);
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// Without options, a sink on a 2.15 server publishes fast batches to a stream made by
/// `StreamSpec::new` (which sets `allow_batched`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_is_the_default() {
    let (_server, nats) = connect().await;
    nats.ensure_stream(&StreamSpec::new("DEFAULT", ["default.>"]))
        .await
        .expect("stream");
    let sink = nats.sink().await.expect("sink");
    assert_eq!(sink.options().mode, PublishMode::Fast);
    let p = Batcher::new(sink, BatchConfig::default()).unwrap();
    let outcomes = publish_all(&p, messages("default.x", 20)).await;
    for o in &outcomes {
        match o {
            Outcome::Acked(a) => {
                assert!(matches!(a.position, Position::StreamBatch { .. }), "{a:?}")
            }
            o => panic!("{o:?}"),
        }
    }
}

/// Keys that keep every lane busy do not starve messages without a key: a lane whose batch
/// ends takes the waiting ones along. Every message is acked (none by its deadline) and stored
/// once, and each key's messages in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_messages_go_out_beside_busy_keys() {
    let (_server, nats) = connect().await;
    nats.ensure_stream(&StreamSpec::new("MIXED", ["mixed.>"]).allow_batched(true))
        .await
        .expect("stream");
    let sink = nats.sink().await.expect("sink");
    let p = Batcher::new(
        sink,
        BatchConfig::default().ack_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let msgs: Vec<Message> = (0..20_000)
        .map(|i: u64| {
            let m = Message::new("mixed.x", format!("{i}"));
            if i.is_multiple_of(2) {
                m.with_key(format!("k{}", i % 64))
            } else {
                m
            }
        })
        .collect();
    let outcomes = publish_all(&p, msgs).await;
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.is_acked(), "message {i}: {o:?}");
    }
    assert_eq!(nats.stream_state("MIXED").await.unwrap().messages, 20_000);
    let stream = nats.jetstream().get_stream("MIXED").await.expect("stream");
    let mut last: std::collections::HashMap<u64, u64> = Default::default();
    for seq in 1..=20_000u64 {
        let m = stream.get_raw_message(seq).await.expect("stored message");
        let i: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        if i.is_multiple_of(2) {
            let prev = last.insert(i % 64, i);
            assert!(
                prev.is_none_or(|p| p < i),
                "key k{} stored {i} after {prev:?}",
                i % 64
            );
        }
    }
    p.close(Duration::from_secs(5)).await.expect("close");
}
