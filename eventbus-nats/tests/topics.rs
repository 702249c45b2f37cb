//! `ensure_topic` honours a [`TopicSpec`] on a real nats-server, or refuses it with nothing
//! created: the stream's own config, read back from the server, is the evidence.

use std::time::Duration;

use eventbus_brokers::NatsServer;
use eventbus_core::{Backend, ErrorKind, TopicSpec};
use eventbus_nats::{NatsBackend, NatsConfig, StreamSpec};

/// Stream `name`'s config, as the server holds it.
async fn stream_config(nats: &NatsBackend, name: &str) -> async_nats::jetstream::stream::Config {
    let mut stream = nats
        .jetstream()
        .get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("stream {name}: {e}"));
    stream.info().await.expect("info").config.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_spec_reaches_the_stream_or_is_refused_whole() {
    let server = NatsServer::start().expect("start nats-server");
    let nats = NatsBackend::connect(NatsConfig::new(server.url()))
        .await
        .expect("connect");
    let caps = nats.capabilities();
    assert!(!caps.partitions && caps.replicas && caps.max_age && caps.broker_dedup);

    let day = Duration::from_secs(24 * 3600);
    nats.ensure_topic(&TopicSpec::new("audit.events").replicas(1).max_age(day))
        .await
        .expect("ensure");
    let config = stream_config(&nats, "audit_events").await;
    assert_eq!(config.max_age, day);
    assert_eq!(config.num_replicas, 1);
    assert_eq!(
        config.subjects,
        vec!["audit.events".to_owned(), "audit.events.>".to_owned()]
    );

    // An age under the 2-minute duplicate window shortens the window (the server refuses a
    // window longer than the age); an age under 100 ms is refused before anything is made.
    let minute = Duration::from_secs(60);
    nats.ensure_topic(&TopicSpec::new("short.events").max_age(minute))
        .await
        .expect("a one-minute age");
    let config = stream_config(&nats, "short_events").await;
    assert_eq!((config.max_age, config.duplicate_window), (minute, minute));
    let e = nats
        .ensure_topic(&TopicSpec::new("blink.events").max_age(Duration::from_millis(50)))
        .await
        .expect_err("under 100 ms");
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(nats.jetstream().get_stream("blink_events").await.is_err());

    // The same rules hold for a stream asked for directly: a window longer than the age.
    let e = nats
        .ensure_stream(&StreamSpec::new("AGED", ["aged.>"]).max_age(minute))
        .await
        .expect_err("a 2-minute window over a 1-minute age");
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");

    // Partitions are refused, typed, and no stream is made for the refused spec.
    let e = nats
        .ensure_topic(&TopicSpec::new("sharded.events").partitions(4))
        .await
        .expect_err("streams have no partitions");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(
        nats.jetstream().get_stream("sharded_events").await.is_err(),
        "nothing created for a refused spec"
    );

    // Two replicas on one server: the broker's own refusal comes back, nothing is stored.
    let e = nats
        .ensure_topic(&TopicSpec::new("copied.events").replicas(3))
        .await
        .expect_err("one server cannot hold three replicas");
    assert_ne!(
        e.kind(),
        ErrorKind::Unsupported,
        "a capability, refused by the server: {e}"
    );
}
