//! The bus facade: config from TOML and environment (errors name the field, secrets stay out
//! of `Debug`), and a bus built from config publishing and subscribing on the in-process
//! backend and on a real nats-server.

use std::time::Duration;

use eventbus::{BackendKind, Bus, BusConfig};
use eventbus_core::{
    Backend as _, ErrorKind, Message, Publisher, SubscribeSpec, Subscriber, Topic,
};

#[test]
fn toml_errors_name_the_field() {
    for (text, field) in [
        ("[batch]\nmax_inflight = 1", "max_inflight"),
        ("backend = \"redis\"", "backend"),
        ("[batch]\nmax_in_flight = \"many\"", "max_in_flight"),
        ("[handler.retry]\nmax_atempts = 2", "max_atempts"),
        ("[batch]\nmax_messages = 0", "max_messages"),
        ("[handler]\nconcurrency = 0", "concurrency"),
    ] {
        let e = BusConfig::from_toml(text).expect_err(text);
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains(field), "{text:?}: {e}");
    }
}

#[test]
fn environment_overrides_the_file_and_names_bad_variables() {
    let cfg = BusConfig::from_toml("[batch]\nmax_in_flight = 100\nlinger = 5")
        .expect("config")
        .with_vars([
            ("EVENTBUS_BACKEND", "memory"),
            ("EVENTBUS_BATCH_MAX_IN_FLIGHT", "250"),
            ("EVENTBUS_HANDLER_RETRY_MAX_ATTEMPTS", "7"),
            ("EVENTBUS_NATS_URL", "nats://10.0.0.1:4222"),
            ("EVENTBUS_NATS_USER", "svc"),
            ("EVENTBUS_NATS_PASSWORD", "pw-do-not-print"),
            ("UNRELATED", "ignored"),
        ])
        .expect("overlay");
    assert_eq!(cfg.backend, BackendKind::Memory);
    assert_eq!(cfg.batch.max_in_flight, 250);
    assert_eq!(
        cfg.batch.linger,
        Duration::from_millis(5),
        "file value kept"
    );
    assert_eq!(cfg.handler.retry.max_attempts, 7);
    assert_eq!(cfg.nats.url, "nats://10.0.0.1:4222");
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("pw-do-not-print"), "{debug}");
    assert!(debug.contains("svc"), "{debug}");

    let e = BusConfig::default()
        .with_vars([("EVENTBUS_BATCH_MAX_INFLIGHT", "1")])
        .unwrap_err();
    assert!(e.to_string().contains("EVENTBUS_BATCH_MAX_INFLIGHT"), "{e}");
    let e = BusConfig::default()
        .with_vars([("EVENTBUS_BATCH_MAX_IN_FLIGHT", "secret-looking-value")])
        .unwrap_err();
    assert!(e.to_string().contains("integer"), "{e}");
    assert!(!e.to_string().contains("secret-looking-value"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bus_from_config_publishes_and_subscribes() {
    let cfg =
        BusConfig::from_toml("backend = \"memory\"\n[batch]\nmax_in_flight = 64").expect("config");
    let bus = Bus::connect(&cfg).await.expect("connect");
    assert!(bus.health(Duration::from_secs(1)).await.up);
    let topic = Topic::new("bus.orders");
    let mut sub = bus
        .subscriber()
        .subscribe(SubscribeSpec::new(&topic).group("g"))
        .await
        .expect("subscribe");
    let p = bus.publisher().await.expect("publisher");
    let o = p
        .publish(Message::new(&topic, "hello"))
        .await
        .expect("admitted")
        .await;
    assert!(o.is_acked(), "{o:?}");
    let d = sub.next().await.expect("open").expect("delivery");
    assert_eq!(&d.message().payload()[..], b"hello");
    d.ack().await.expect("ack");
    p.close(Duration::from_secs(1)).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_bus_from_config_and_environment() {
    let server = eventbus_brokers::NatsServer::start().expect("start nats-server");
    let cfg = BusConfig::from_toml("backend = \"nats\"")
        .expect("config")
        .with_vars([
            ("EVENTBUS_NATS_URL", server.url()),
            ("EVENTBUS_NATS_PUBLISH_MODE", "async".into()),
            ("EVENTBUS_NATS_DEDUP", "false".into()),
        ])
        .expect("overlay");
    let bus = Bus::connect(&cfg).await.expect("connect");
    assert_eq!(bus.backend_name(), "nats");
    let nats = bus.backend::<eventbus::NatsBackend>().expect("a NATS bus");
    // The backend's own options reach the bus's sinks: the facade chooses nothing itself.
    let opts = nats.sink().await.expect("sink").options();
    assert_eq!(opts.mode, eventbus::nats::PublishMode::Async);
    assert!(!opts.dedup);
    nats.ensure_stream(&eventbus_nats::StreamSpec::new("BUS", ["bus.>"]))
        .await
        .expect("stream");
    let health = bus.health(Duration::from_secs(2)).await;
    assert!(health.up, "{health:?}");
    let p = bus.publisher().await.expect("publisher");
    for i in 0..10 {
        let o = p
            .publish(Message::new("bus.x", format!("{i}")))
            .await
            .expect("admitted")
            .await;
        assert!(o.is_acked(), "{o:?}");
    }
    assert_eq!(nats.stream_state("BUS").await.unwrap().messages, 10);
    let lag = bus.subscriber().lag(&Topic::new("bus.x"), "nobody").await;
    assert_eq!(lag.unwrap_err().kind(), ErrorKind::Rejected);
}

/// The configuration example in the workspace README parses as written.
#[test]
fn the_readme_example_config_parses() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("```toml\n# eventbus.toml")
        .expect("the eventbus.toml block in the README")
        + 8;
    let len = readme[start..].find("```").expect("closed block");
    let cfg = BusConfig::from_toml(&readme[start..start + len]).expect("README config");
    assert_eq!(cfg.backend, BackendKind::Nats);
    assert_eq!(cfg.handler.retry.max_attempts, 5);
    assert!(!format!("{cfg:?}").contains("\"...\""), "password redacted");
}

/// The README's Rust examples and this crate's own docs need `eventbus` alone: they are
/// compiled as doctests of this crate, and here no other eventbus crate may be named in them.
#[test]
fn examples_need_only_the_facade() {
    fn rust_blocks(text: &str, doc_prefix: Option<&str>) -> Vec<String> {
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| match doc_prefix {
                Some(p) => l
                    .trim_start()
                    .strip_prefix(p)
                    .map(|l| l.strip_prefix(' ').unwrap_or(l)),
                None => Some(l),
            })
            .collect();
        let mut blocks = Vec::new();
        // `Some(Some(text))` inside a Rust block, `Some(None)` inside another language's.
        let mut current: Option<Option<String>> = None;
        for l in lines {
            let fence = l.trim_start().strip_prefix("```");
            match (&mut current, fence) {
                (None, Some(lang)) => {
                    // Rustdoc treats an unlabelled fence and `no_run` / `ignore` / ... as Rust.
                    let other = ["sh", "toml", "text", "json", "console", "bash"]
                        .iter()
                        .any(|o| lang.starts_with(o));
                    current = Some((!other).then(String::new));
                }
                (Some(block), Some(_)) => {
                    if let Some(b) = block.take() {
                        blocks.push(b);
                    }
                    current = None;
                }
                (Some(Some(b)), None) => {
                    b.push_str(l);
                    b.push('\n');
                }
                _ => {}
            }
        }
        blocks
    }
    let readme = rust_blocks(include_str!("../../README.md"), None);
    let crate_doc = rust_blocks(include_str!("../src/lib.rs"), Some("//!"));
    let config_doc = rust_blocks(include_str!("../src/config.rs"), Some("///"));
    assert!(readme.len() >= 2, "README examples found: {}", readme.len());
    assert!(!crate_doc.is_empty(), "crate doc example found");
    for block in readme.iter().chain(&crate_doc).chain(&config_doc) {
        for crate_name in [
            "eventbus_core",
            "eventbus_batch",
            "eventbus_nats",
            "eventbus_kafka",
            "eventbus_memory",
        ] {
            assert!(
                !block.contains(crate_name),
                "an example names {crate_name}; use the `eventbus` re-export:\n{block}"
            );
        }
    }
}
