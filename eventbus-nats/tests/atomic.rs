//! Atomic batch publishing (ADR-50) against a real nats-server 2.15: one ack per batch,
//! consecutive stream sequences, and all-or-nothing storage checked on the stream itself.

use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::NatsServer;
use eventbus_conformance::scenarios::publish_all;
use eventbus_core::{ErrorKind, Message, MessageId, Outcome, Position, Publisher};
use eventbus_nats::{NatsBackend, NatsConfig, NatsSink, PublishMode, SinkOptions, StreamSpec};

async fn setup(allow_atomic: bool) -> (NatsServer, NatsBackend, Batcher<NatsSink>) {
    let server = NatsServer::start().expect("start nats-server");
    let nats = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .expect("connect");
    nats.ensure_stream(&StreamSpec::new("ATOMIC", ["atomic.>"]).allow_atomic(allow_atomic))
        .await
        .expect("stream");
    let sink = nats
        .sink_with(SinkOptions::default().mode(PublishMode::Atomic))
        .await
        .expect("sink");
    // A long linger makes each flush one full batch of 500.
    let p = Batcher::new(
        sink,
        BatchConfig::default()
            .linger(Duration::from_millis(200))
            .max_messages(500),
    )
    .unwrap();
    (server, nats, p)
}

fn seq(o: &Outcome) -> u64 {
    match o {
        Outcome::Acked(a) => match &a.position {
            Position::Stream { sequence, .. } => *sequence,
            p => panic!("unexpected position {p:?}"),
        },
        o => panic!("not acked: {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_commit_whole_with_consecutive_sequences() {
    let (_server, nats, p) = setup(true).await;
    let msgs: Vec<Message> = (0..2_000)
        .map(|i| Message::new(format!("atomic.s{}", i % 3), format!("{i}")))
        .collect();
    let outcomes = publish_all(&p, msgs).await;
    let seqs: Vec<u64> = outcomes.iter().map(seq).collect();
    assert_eq!(
        seqs,
        (1..=2_000).collect::<Vec<u64>>(),
        "one publisher: sequences 1..=2000"
    );
    let state = nats.stream_state("ATOMIC").await.expect("state");
    assert_eq!(state.messages, 2_000);
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// A batch with a duplicate message id is refused by the server as a whole: every message of
/// that batch fails, none is stored, and the next batch is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_stores_nothing() {
    let (_server, nats, p) = setup(true).await;
    let id = MessageId::custom("same-id-twice");
    let mut bad: Vec<Message> = (0..10)
        .map(|i| Message::new("atomic.bad", format!("{i}")))
        .collect();
    bad[3] = Message::new("atomic.bad", "dup-a").with_id(id.clone());
    bad[7] = Message::new("atomic.bad", "dup-b").with_id(id);
    let outcomes = publish_all(&p, bad).await;
    for (i, o) in outcomes.iter().enumerate() {
        let e = o
            .error()
            .unwrap_or_else(|| panic!("message {i} of a refused batch: {o:?}"));
        assert!(o.is_failed(), "message {i}: {o:?}");
        assert_eq!(e.kind(), ErrorKind::Rejected, "{e}");
    }
    assert_eq!(
        nats.stream_state("ATOMIC").await.expect("state").messages,
        0
    );
    let good = publish_all(&p, vec![Message::new("atomic.good", "ok")]).await;
    assert_eq!(seq(&good[0]), 1);
}

/// Atomic mode on a stream without `allow_atomic`: typed failure, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_allow_atomic_fails_typed() {
    let (_server, nats, p) = setup(false).await;
    let outcomes = publish_all(
        &p,
        (0..5)
            .map(|i| Message::new("atomic.x", format!("{i}")))
            .collect(),
    )
    .await;
    for o in &outcomes {
        assert!(o.is_failed(), "{o:?}");
        assert_eq!(o.error().expect("error").kind(), ErrorKind::Rejected);
    }
    assert_eq!(
        nats.stream_state("ATOMIC").await.expect("state").messages,
        0
    );
}
