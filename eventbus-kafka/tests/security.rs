//! SASL against a real tansu started with `--authentication`: a wrong password fails
//! `connect` at once with a typed, non-retryable `Auth` error (librdkafka reports it only
//! through its error callback; without handling that, connect waited out its timeout and
//! returned a retryable `Connect`), the password appears in neither the error nor the config's
//! `Debug`, and the right password publishes. SCRAM-SHA-512 (tansu's PLAIN refuses even the
//! right password of a stored user); TLS runs in `cargo xtask reliability --scenario security`.

use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{Tansu, TansuStorage};
use eventbus_core::{Backend as _, ErrorKind, Message, Publisher, TopicSpec};
use eventbus_kafka::{KafkaBackend, KafkaConfig};

const PASSWORD: &str = "pw-4c81e0-do-not-log";
const WRONG: &str = "wrong-pw-9d27b3-do-not-log";

fn scram(brokers: String, password: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .connect_timeout(Duration::from_secs(3))
        .option("security.protocol", "sasl_plaintext")
        .option("sasl.mechanism", "SCRAM-SHA-512")
        .option("sasl.username", "alice")
        .option("sasl.password", password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_fails_fast_and_typed_right_one_publishes() {
    // Credentials are stored before authentication is switched on (tansu's own CLI cannot
    // authenticate), on SQLite so they survive the restart.
    let mut broker =
        Tansu::start(TansuStorage::Sqlite).unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    broker
        .create_user("alice", PASSWORD)
        .expect("tansu user create");
    broker
        .restart_with(vec!["--authentication".into()])
        .expect("restart with --authentication");

    let wrong = scram(broker.bootstrap(), WRONG);
    let debug = format!("{wrong:?}");
    assert!(
        !debug.contains(WRONG),
        "password in the config's Debug: {debug}"
    );
    let t0 = Instant::now();
    let e = KafkaBackend::connect(wrong)
        .await
        .expect_err("a wrong password must not connect");
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(!e.is_retryable(), "the same password fails again: {e}");
    assert!(
        took < Duration::from_secs(2),
        "refused after {took:?}: it waited out the 3 s connect timeout"
    );
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(WRONG) && !text.contains(PASSWORD),
        "secret in the error: {text}"
    );

    let kafka = KafkaBackend::connect(scram(broker.bootstrap(), PASSWORD))
        .await
        .expect("the right password connects");
    kafka
        .ensure_topic(&TopicSpec::new("sasl-ok"))
        .await
        .expect("topic");
    let p =
        Batcher::new(kafka.sink().await.expect("sink"), BatchConfig::default()).expect("engine");
    let outcome = p
        .publish(Message::new("sasl-ok", "authenticated"))
        .await
        .expect("admitted")
        .await;
    assert!(outcome.is_acked(), "{outcome:?}");
    p.close(Duration::from_secs(5)).await.expect("close");
    let stored: i64 = kafka
        .watermarks("sasl-ok")
        .await
        .expect("watermarks")
        .iter()
        .map(|(_, lo, hi)| hi - lo)
        .sum();
    assert_eq!(stored, 1);
}
