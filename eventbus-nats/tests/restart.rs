//! Broker restart mid-publish: 10,000 messages from 5 concurrent publishers while nats-server is
//! killed (-9) and restarted twice on the same store. Every acked message must be in the stream
//! afterwards, counted by id with a fresh consumer; no outcome is lost or reported twice. Run in
//! async and fast-ingest mode.

use std::collections::HashSet;
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::NatsServer;
use eventbus_core::{Message, Outcome, Publisher, SubscribeSpec, Subscriber};
use eventbus_nats::{NatsBackend, NatsConfig, PublishMode, SinkOptions, StreamSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_twice_loses_no_acked_message() {
    kill_and_restart_twice(PublishMode::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_twice_loses_no_acked_message_fast_mode() {
    kill_and_restart_twice(PublishMode::Fast).await;
}

async fn kill_and_restart_twice(mode: PublishMode) {
    let mut server = NatsServer::start().expect("start nats-server");
    let cfg = NatsConfig::new(server.url()).ack_timeout(Duration::from_secs(2));
    let nats = NatsBackend::connect(cfg).await.expect("connect");
    nats.ensure_stream(&StreamSpec::new("RESTART", ["restart.>"]).allow_batched(true))
        .await
        .expect("stream");
    let publisher = Batcher::new(
        nats.sink_with(SinkOptions::default().mode(mode))
            .await
            .expect("sink"),
        BatchConfig::default().ack_timeout(Duration::from_secs(5)),
    )
    .unwrap();

    const PUBLISHERS: usize = 5;
    const PER: usize = 2_000;
    let mut tasks = Vec::new();
    for w in 0..PUBLISHERS {
        let p = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::with_capacity(PER);
            for i in 0..PER {
                let m = Message::new(format!("restart.w{w}"), format!("{w}-{i}"));
                let id = m.id().to_string();
                match p.publish(m).await {
                    Ok(ack) => results.push((id, Some(ack))),
                    Err(e) => panic!("publish refused: {e}"),
                }
                // Spread publishing over ~2 s so both kills land mid-publish.
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let mut out = Vec::with_capacity(PER);
            for (id, ack) in results {
                out.push((id, ack.expect("admitted").await));
            }
            out
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart().expect("restart nats-server");
    }
    let mut acked = HashSet::new();
    let (mut failed, mut unknown) = (0, 0);
    for t in tasks {
        for (id, o) in t.await.expect("publisher task") {
            match o {
                Outcome::Acked(_) => assert!(acked.insert(id), "an id acked twice"),
                Outcome::Failed(_) => failed += 1,
                Outcome::Unknown(_) => unknown += 1,
            }
        }
    }
    assert_eq!(
        acked.len() + failed + unknown,
        PUBLISHERS * PER,
        "every message resolved exactly once"
    );
    eprintln!("acked {} failed {failed} unknown {unknown}", acked.len());
    assert!(!acked.is_empty());

    // A fresh consumer reads the whole stream.
    let state = nats.stream_state("RESTART").await.expect("stream state");
    let mut sub = nats
        .subscriber()
        .subscribe(SubscribeSpec::new("restart.>").prefetch(512))
        .await
        .expect("subscribe");
    let mut stored = HashSet::new();
    while stored.len() < state.messages as usize {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("drain timed out")
            .expect("open")
            .expect("delivery");
        stored.insert(d.message().id().to_string());
        d.ack().await.expect("ack");
    }
    let lost: Vec<_> = acked.difference(&stored).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} acked messages missing from the stream, e.g. {lost:?}",
        acked.difference(&stored).count()
    );
    publisher
        .close(Duration::from_secs(5))
        .await
        .expect("close");
}
