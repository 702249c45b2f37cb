//! Envelopes: event metadata (type, id, aggregate, schema version, time, correlation and
//! causation ids, tenant) travels as headers beside an opaque payload, on every backend, and
//! is read back on the consumer side. The aggregate id also orders the handler (see
//! `ordered_consumer`).
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --example envelopes
//! ```

use std::time::Duration;

use eventbus::{Bus, BusConfig, Envelope, Message, Publisher, SubscribeSpec, Subscriber, Topic};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    let topic = Topic::new("examples.envelopes");
    bus.ensure_topic(topic.as_str()).await?;
    let correlation = format!("checkout-{}", std::process::id());

    let publisher = bus.publisher().await?;
    let created = Envelope::new("order.created")
        .event_id(format!("{correlation}-1"))
        .aggregate_id("order-42")
        .schema_version(2)
        .correlation_id(correlation.as_str())
        .tenant("acme");
    // The follow-up event names the first as its cause.
    let paid = Envelope::new("order.paid")
        .event_id(format!("{correlation}-2"))
        .aggregate_id("order-42")
        .schema_version(1)
        .correlation_id(correlation.as_str())
        .causation_id(format!("{correlation}-1"))
        .tenant("acme");
    for (env, body) in [
        (&created, r#"{"total":1999}"#),
        (&paid, r#"{"method":"card"}"#),
    ] {
        let msg = env.apply(Message::new(topic.clone(), body));
        publisher.publish(msg).await?.await.into_result()?;
    }
    publisher.close(Duration::from_secs(5)).await?;

    // A fresh exclusive subscription reads the topic from the start; keep this run's events.
    let mut sub = bus
        .subscriber()
        .subscribe(SubscribeSpec::new(topic.clone()))
        .await?;
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while received.len() < 2 {
        let d = tokio::time::timeout_at(deadline, sub.next())
            .await
            .map_err(|_| "timed out waiting for the envelopes")?
            .ok_or("subscription ended")??;
        let env = Envelope::from_headers(d.message().headers())?;
        if env.correlation_id.as_deref() == Some(correlation.as_str()) {
            println!(
                "{} v{} for {} (event {}, caused by {}): {}",
                env.event_type.as_deref().unwrap_or("?"),
                env.schema_version.unwrap_or(0),
                env.aggregate_id.as_deref().unwrap_or("?"),
                env.event_id.as_deref().unwrap_or("?"),
                env.causation_id.as_deref().unwrap_or("-"),
                String::from_utf8_lossy(d.message().payload())
            );
            received.push(env);
        }
        d.ack().await?;
    }
    sub.close().await;
    if received != [created, paid] {
        return Err("the envelopes did not round-trip".into());
    }
    println!("both envelopes round-tripped with every field intact");
    Ok(())
}
