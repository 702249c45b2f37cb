//! Broker restart mid-publish: 10,000 messages from 5 concurrent publishers while nats-server is
//! killed (-9) and restarted twice on the same store. Every acked message must be in the stream
//! afterwards, counted by id with a fresh consumer; no outcome is lost or reported twice. Run in
//! async and fast-ingest mode.

use std::collections::HashSet;
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{BrokerKind, NatsServer};
use eventbus_core::{Backend as _, Message, Outcome, Publisher, SubscribeSpec, Subscriber};
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
    let mut server = BrokerKind::Nats.start().expect("start nats-server");
    let cfg = NatsConfig::new(server.address()).ack_timeout(Duration::from_secs(2));
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
        server.kill(0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart(0).expect("restart nats-server");
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
    // The server's monitoring endpoint, not the client under test, agrees on the count.
    let monitored = tokio::task::spawn_blocking(move || {
        let n = server.stored("RESTART");
        (server, n)
    });
    let (_server, monitored) = monitored.await.expect("join");
    assert_eq!(monitored.expect("/jsz"), state.messages);
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

/// "No responders" (nothing stored: JetStream not ready, or no stream yet) is tried again with
/// backoff: messages published just before their stream exists are stored once it does, each
/// exactly once. Past the first attempts (about 1.5 s) the sink asks JetStream whether a stream
/// covers the subject at all: when none does, the outcome is a `Rejected` failure, not a wait
/// until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_are_retried_with_backoff() {
    let server = NatsServer::start().expect("start nats-server");
    let nats = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .expect("connect");
    let sink = nats
        .sink_with(SinkOptions::default().mode(PublishMode::Async))
        .await
        .expect("sink");
    let p = Batcher::new(sink, BatchConfig::default()).unwrap();
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(
            p.publish(Message::new("late.x", format!("{i}")))
                .await
                .expect("admitted"),
        );
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    nats.ensure_stream(&StreamSpec::new("LATE", ["late.>"]))
        .await
        .expect("stream");
    for a in acks {
        let o = a.await;
        assert!(o.is_acked(), "{o:?}");
    }
    assert_eq!(nats.stream_state("LATE").await.unwrap().messages, 5);
    // No stream ever: a retryable failure after the attempts, not a hang.
    let start = std::time::Instant::now();
    let o = p
        .publish(Message::new("never.x", "x"))
        .await
        .expect("admitted")
        .await;
    assert!(o.is_failed(), "{o:?}");
    let e = o.error().expect("error");
    assert_eq!(e.kind(), eventbus_core::ErrorKind::Rejected, "{e}");
    assert!(e.to_string().contains("no JetStream stream"), "{e}");
    assert!(
        start.elapsed() >= Duration::from_millis(1_400),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
