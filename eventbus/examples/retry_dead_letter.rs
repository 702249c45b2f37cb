//! Retries and dead letters: a failing handler is retried in place with exponential backoff and
//! jitter; after the subscription's `max_deliveries` the message goes to a dead-letter topic
//! with its original topic, position, delivery count and reason in headers. Once the cause is
//! fixed, `dead_letter::replay` turns each dead letter back into a message for its topic.
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --example retry_dead_letter
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus::handler::{self, Backoff, HandlerConfig, HandlerError};
use eventbus::{Bus, BusConfig, Message, Publisher, SubscribeSpec, Subscriber, Topic, dead_letter};

const GOOD: u64 = 20;
const POISON: u64 = 3;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    let (topic, dlq) = (Topic::new("examples.retry"), Topic::new("examples.dead"));
    bus.ensure_topic(topic.as_str()).await?;
    bus.ensure_topic(dlq.as_str()).await?;
    let run = std::process::id().to_string();

    let publisher = bus.publisher().await?;
    for i in 0..GOOD + POISON {
        let body = if i < POISON { "poison" } else { "ok" };
        let msg = Message::new(topic.clone(), body).with_header("run", run.as_str());
        publisher.publish(msg).await?.await.into_result()?;
    }

    // 2 runs per delivery (1 retry after 20-40 ms), 3 deliveries, then the dead-letter topic.
    let retry = Backoff::default()
        .max_attempts(2)
        .initial(Duration::from_millis(20))
        .jitter(0.5);
    let spec = SubscribeSpec::new(topic.clone())
        .group("examples-retry")
        .max_deliveries(3)
        .dead_letter(dlq.clone())
        .ack_wait(Duration::from_secs(5));
    let handled = Arc::new(AtomicU64::new(0));
    let dead_seen = Arc::new(AtomicU64::new(0));
    let watcher = tokio::spawn(dead_letters_of_run(
        bus.subscriber(),
        dlq.clone(),
        run.clone(),
        Arc::clone(&dead_seen),
    ));
    let sub = bus.subscriber().subscribe(spec).await?;
    let report = handler::run(
        sub,
        HandlerConfig::default().concurrency(4).retry(retry),
        {
            let (handled, run) = (Arc::clone(&handled), run.clone());
            move |msg: Message, _info| {
                let (handled, run) = (Arc::clone(&handled), run.clone());
                async move {
                    if msg.headers().get("run") != Some(run.as_str()) {
                        return Ok(()); // an earlier run's message
                    }
                    if msg.payload().as_ref() == b"poison" {
                        return Err(HandlerError::new("cannot parse the order"));
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        },
        // Stop once this run's good messages are handled and its poison ones dead-lettered.
        {
            let (handled, dead_seen) = (Arc::clone(&handled), Arc::clone(&dead_seen));
            async move {
                let done = async {
                    while handled.load(Ordering::SeqCst) < GOOD
                        || dead_seen.load(Ordering::SeqCst) < POISON
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(60), done).await;
            }
        },
    )
    .await;
    let dead = watcher.await??;
    println!("dead letters of this run: {}", dead.len());
    for d in &dead {
        let h = d.headers();
        println!(
            "  from {} at {} after {} deliveries: {}",
            h.get(dead_letter::TOPIC).unwrap_or("?"),
            h.get(dead_letter::POSITION).unwrap_or("?"),
            h.get(dead_letter::DELIVERIES).unwrap_or("?"),
            h.get(dead_letter::REASON).unwrap_or("?"),
        );
    }
    println!(
        "handled {} good messages; {} handler failures, {} deliveries given up",
        handled.load(Ordering::SeqCst),
        report.failures,
        report.gave_up
    );

    // The fix is deployed: replay the dead letters onto their original topic.
    for d in &dead {
        let again = dead_letter::replay(d).ok_or("not a dead letter")?;
        assert_eq!(again.topic(), &topic);
        publisher.publish(again).await?.await.into_result()?;
    }
    println!("replayed {} dead letters to {topic}", dead.len());
    publisher.close(Duration::from_secs(5)).await?;
    if handled.load(Ordering::SeqCst) != GOOD || dead.len() as u64 != POISON {
        return Err(
            "expected every good message handled and every poison one dead-lettered".into(),
        );
    }
    Ok(())
}

/// Read the dead-letter topic until this run's poison messages are all there.
async fn dead_letters_of_run(
    subscriber: eventbus::BusSubscriber,
    dlq: Topic,
    run: String,
    seen: Arc<AtomicU64>,
) -> Result<Vec<Message>, eventbus::Error> {
    let mut sub = subscriber
        .subscribe(SubscribeSpec::new(dlq).group("examples-dead-letters"))
        .await?;
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (dead.len() as u64) < POISON {
        let Ok(Some(d)) = tokio::time::timeout_at(deadline, sub.next()).await else {
            break;
        };
        let d = d?;
        if d.message().headers().get("run") == Some(run.as_str()) {
            dead.push(d.message().clone());
            seen.fetch_add(1, Ordering::SeqCst);
        }
        d.ack().await?;
    }
    sub.close().await;
    Ok(dead)
}
