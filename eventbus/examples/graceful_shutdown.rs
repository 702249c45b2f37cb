//! Graceful shutdown on Ctrl-C (SIGINT) or SIGTERM: stop publishing, `close(deadline)` flushes
//! what is queued and waits for its acks, the handler runtime finishes running handlers and
//! hands back what it had not started. Every publish ends as acked, failed or reported
//! unresolved: nothing is dropped silently.
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --example graceful_shutdown
//! # ... then press Ctrl-C
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus::handler::{self, HandlerConfig};
use eventbus::{Bus, BusConfig, Message, Publisher, SubscribeSpec, Subscriber, Topic};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    let topic = Topic::new("examples.shutdown");
    bus.ensure_topic(topic.as_str()).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // The consumer: stops taking deliveries on the signal; running handlers finish.
    let handled = Arc::new(AtomicU64::new(0));
    let sub = bus
        .subscriber()
        .subscribe(SubscribeSpec::new(topic.clone()).group("examples-shutdown"))
        .await?;
    let consumer = tokio::spawn({
        let handled = Arc::clone(&handled);
        handler::run(
            sub,
            HandlerConfig::default(),
            move |_msg, _info| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            },
            stopped(stop_rx.clone()),
        )
    });

    // The producer: publishes until the signal; a task collects every ack.
    let publisher = bus.publisher().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let acks = tokio::spawn(async move {
        let mut tally = [0u64; 3]; // acked, failed, unknown
        while let Some(ack) = rx.recv().await {
            let outcome: eventbus::Outcome = ack.await;
            tally[if outcome.is_acked() {
                0
            } else if outcome.is_failed() {
                1
            } else {
                2
            }] += 1;
        }
        tally
    });
    println!("publishing to {topic}; press Ctrl-C to stop");
    let mut published = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut stop = stop_rx.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            // ~1,000 msg/s: a steady service load any broker keeps up with, so the
            // shutdown, not the broker's capacity, is what the example shows.
            _ = tick.tick() => {
                let msg = Message::new(topic.clone(), format!("{{\"n\":{published}}}"));
                tx.send(publisher.publish(msg).await?)?;
                published += 1;
            }
        }
    }
    println!(
        "signal received: closing with {} messages in flight",
        publisher.stats().in_flight
    );
    let close = publisher.close(Duration::from_secs(10)).await?;
    drop(tx);
    let [acked, failed, unknown] = acks.await?;
    let report = consumer.await?;
    println!(
        "published {published}: acked {acked}, failed {failed}, unknown {unknown} \
         (close: {} unresolved at the deadline); consumer handled {} (acked {}, handed back {})",
        close.unresolved,
        handled.load(Ordering::Relaxed),
        report.acked,
        report.released
    );
    if acked + failed + unknown != published || failed + unknown > 0 {
        return Err("some publishes were not acked".into());
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what container runtimes send).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
