//! `Subscription::close` returns only after the member has committed and left the group, so a
//! process may exit right after it: the member that starts next gets the partitions at once
//! instead of waiting out `session.timeout.ms` (10 s) for the departed one.
//!
//! The first member runs in a child process (this test binary again) that exits the moment
//! `close` returns, the way a service shuts down in a rolling deploy.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{Tansu, TansuStorage};
use eventbus_core::{Backend as _, Message, Publisher, SubscribeSpec, Subscriber, TopicSpec};
use eventbus_kafka::{KafkaBackend, KafkaConfig};

/// Set in the child: the broker to use.
const CHILD: &str = "EVENTBUS_TEST_FIRST_MEMBER";

fn spec() -> SubscribeSpec {
    SubscribeSpec::new("leave").group("leavers").prefetch(4)
}

/// The child: ack five messages, close, exit at once.
async fn first_member(bootstrap: String) -> ! {
    let kafka = KafkaBackend::connect(KafkaConfig::new(bootstrap))
        .await
        .expect("connect");
    let mut sub = kafka
        .subscriber()
        .subscribe(spec())
        .await
        .expect("subscribe");
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("first member receives")
            .expect("open")
            .expect("delivery");
        println!("acked {}", d.message().id());
        d.ack().await.expect("ack");
    }
    sub.close().await;
    std::process::exit(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_leaves_the_group_before_it_returns() {
    if let Ok(bootstrap) = std::env::var(CHILD) {
        first_member(bootstrap).await;
    }
    let broker =
        Tansu::start(TansuStorage::Sqlite).unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let kafka = KafkaBackend::connect(KafkaConfig::new(broker.bootstrap()))
        .await
        .expect("connect");
    kafka
        .ensure_topic(&TopicSpec::new("leave").partitions(2))
        .await
        .expect("topic");
    let p = Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let mut want = HashSet::new();
    let mut acks = Vec::new();
    for i in 0..20 {
        let m = Message::new("leave", format!("{i}")).with_key(format!("k{i}"));
        want.insert(m.id().to_string());
        acks.push(p.publish(m).await.expect("admitted"));
    }
    for a in acks {
        assert!(a.await.is_acked());
    }
    p.close(Duration::from_secs(10))
        .await
        .expect("close publisher");

    let child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "close_leaves_the_group_before_it_returns",
            "--nocapture",
        ])
        .env(CHILD, broker.bootstrap())
        .output()
        .await
        .expect("run the first member");
    let exited = Instant::now();
    assert!(child.status.success(), "first member: {child:?}");
    let out = String::from_utf8_lossy(&child.stdout);
    let mut got: HashSet<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("acked "))
        .map(str::to_owned)
        .collect();
    assert_eq!(got.len(), 5, "the first member acked five: {out}");

    let mut second = kafka
        .subscriber()
        .subscribe(spec())
        .await
        .expect("subscribe");
    while got.len() < want.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), second.next())
            .await
            .unwrap_or_else(|_| panic!("second member: {} of {}", got.len(), want.len()))
            .expect("open")
            .expect("delivery");
        got.insert(d.message().id().to_string());
        d.ack().await.expect("ack");
    }
    let took = exited.elapsed();
    eprintln!("second member had everything {took:?} after the first process exited");
    assert_eq!(
        got, want,
        "the acked five were committed, the rest delivered"
    );
    assert!(
        took < Duration::from_secs(5),
        "the second member waited {took:?}: the first left without leaving the group"
    );
    second.close().await;
}
