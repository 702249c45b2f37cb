//! A consumer group with an ordered handler: messages with the same key are handled strictly
//! in order while different keys run in parallel (bounded concurrency); a handler error is
//! retried in place with backoff, so order holds even across failures.
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --example ordered_consumer
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eventbus::handler::{self, HandlerConfig, HandlerError};
use eventbus::{Bus, BusConfig, Message, Publisher, SubscribeSpec, Subscriber, Topic, TopicSpec};
use parking_lot::Mutex;

const KEYS: u64 = 8;
const PER_KEY: u64 = 200;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    let topic = Topic::new("examples.ordered");
    // Where topics have partitions (Kafka), four: keys spread over them, order holds per key.
    let spec = TopicSpec::new(topic.as_str());
    let spec = match bus.capabilities().partitions {
        true => spec.partitions(4),
        false => spec,
    };
    bus.ensure_topic(spec).await?;
    // Messages of earlier runs may still be on the topic: this run only counts its own.
    let run = std::process::id().to_string();

    let publisher = bus.publisher().await?;
    let mut acks = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let msg = Message::new(topic.clone(), seq.to_string())
                .with_key(format!("account-{key}"))
                .with_header("run", run.as_str());
            acks.push(publisher.publish(msg).await?);
        }
    }
    for ack in acks {
        ack.await.into_result()?;
    }
    println!("published {} messages over {KEYS} keys", KEYS * PER_KEY);

    let sub = bus
        .subscriber()
        .subscribe(
            SubscribeSpec::new(topic.clone())
                .group("examples-ordered")
                .ack_wait(Duration::from_secs(10)),
        )
        .await?;
    // Next sequence expected per key: the handler checks each key's messages come in order.
    let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let (s, v) = (Arc::clone(&seen), Arc::clone(&violations));
    let report = handler::run(
        sub,
        HandlerConfig::default().concurrency(4),
        move |msg: Message, info| {
            let (seen, violations, done_tx) = (Arc::clone(&s), Arc::clone(&v), done_tx.clone());
            let run = run.clone();
            async move {
                if msg.headers().get("run") != Some(run.as_str()) {
                    return Ok(()); // an earlier run's message: ack and skip
                }
                let key =
                    String::from_utf8_lossy(msg.key().map(|k| &k[..]).unwrap_or(b"")).into_owned();
                let seq: u64 = std::str::from_utf8(msg.payload())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| HandlerError::new("payload is not a sequence number"))?;
                // Simulated work; different keys overlap here, one key never does.
                tokio::time::sleep(Duration::from_micros(200)).await;
                let mut seen = seen.lock();
                let next = seen.entry(key.clone()).or_insert(0);
                if seq == *next {
                    *next += 1;
                } else if !(info.delivery_count > 1 && seq < *next) {
                    // (A redelivery may repeat a sequence already handled: at-least-once.)
                    violations
                        .lock()
                        .push(format!("{key}: got {seq}, expected {next}"));
                }
                if seen.values().sum::<u64>() == KEYS * PER_KEY {
                    let _ = done_tx.send(true);
                }
                Ok(())
            }
        },
        async move {
            let mut done = done_rx;
            let _ = tokio::time::timeout(Duration::from_secs(60), done.wait_for(|d| *d)).await;
        },
    )
    .await;
    let handled: u64 = seen.lock().values().sum();
    let violations = violations.lock().clone();
    println!(
        "handled {handled} of this run's messages in per-key order ({} acked in all, {} failures); order violations: {}",
        report.acked,
        report.failures,
        violations.len()
    );
    publisher.close(Duration::from_secs(5)).await?;
    if handled != KEYS * PER_KEY || !violations.is_empty() {
        return Err(format!("ordering check failed: {violations:?}").into());
    }
    Ok(())
}
