//! Publish with backpressure: the ACK window bounds what is in flight, so `publish` waits while
//! the broker catches up and memory stays bounded; a backlog watch calls back when the window
//! is nearly full. Every ack is awaited: nothing is reported sent that the broker did not take.
//!
//! ```sh
//! # against a local nats-server with JetStream (the default backend)
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --example publish_backpressure
//! # against a Kafka-protocol cluster
//! EVENTBUS_BACKEND=kafka EVENTBUS_KAFKA_BROKERS=127.0.0.1:9092 \
//!     cargo run -p eventbus --features kafka --example publish_backpressure
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbus::{BacklogEvent, Bus, BusConfig, Message, OnFull, Publisher, Topic};

const WINDOW: usize = 2_000;
const MESSAGES: usize = 50_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = BusConfig::load(None)?;
    // At most 2,000 messages (and 4 MiB) un-acked; a full window makes `publish` wait.
    config.batch = config
        .batch
        .max_in_flight(WINDOW)
        .max_in_flight_bytes(4 << 20)
        .on_full(OnFull::Wait);
    let bus = Bus::connect(&config).await?;
    let topic = Topic::new("examples.backpressure");
    bus.ensure_topic(topic.as_str()).await?;
    let publisher = bus.publisher().await?;

    // Alert when 90% of the window is in use (e.g. shed load, or flip a readiness probe).
    let alerts = Arc::new(AtomicU64::new(0));
    let watch = publisher.watch_backlog(Duration::from_millis(2), WINDOW * 9 / 10, {
        let alerts = Arc::clone(&alerts);
        move |e| {
            if let BacklogEvent::Above(s) = e {
                alerts.fetch_add(1, Ordering::Relaxed);
                if alerts.load(Ordering::Relaxed) <= 3 {
                    println!("backlog high: {} messages in flight", s.in_flight);
                }
            }
        }
    });

    // Acks are awaited on their own task, in publish order, so publishing never stalls on one.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<eventbus::PendingAck>(WINDOW);
    let acker = tokio::spawn(async move {
        let (mut acked, mut failed) = (0u64, 0u64);
        while let Some(ack) = rx.recv().await {
            match ack.await.into_result() {
                Ok(_) => acked += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("not acked: {e}");
                }
            }
        }
        (acked, failed)
    });
    let started = Instant::now();
    let mut peak = 0;
    for i in 0..MESSAGES {
        let msg = Message::new(topic.clone(), format!("{{\"order\":{i}}}"));
        let ack = publisher.publish(msg).await?;
        peak = peak.max(publisher.stats().in_flight);
        tx.send(ack).await?;
    }
    drop(tx);
    let (acked, failed) = acker.await?;
    let took = started.elapsed();
    drop(watch);
    println!(
        "published {MESSAGES}, acked {acked}, failed {failed} in {took:.2?} ({:.0} msg/s); \
         peak in flight {peak} (window {WINDOW}); backlog alerts {}",
        MESSAGES as f64 / took.as_secs_f64(),
        alerts.load(Ordering::Relaxed)
    );
    let report = publisher.close(Duration::from_secs(10)).await?;
    println!("closed: {report:?}");
    if acked != MESSAGES as u64 || peak > WINDOW {
        return Err("not every message was acked within the window".into());
    }
    Ok(())
}
