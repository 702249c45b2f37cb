//! Connects with `BusConfig::load(None)` (the `EVENTBUS_*` environment only), provisions the
//! topic named by the first argument, publishes a few messages, awaits every ack, then reads them
//! back through a consumer group. Prints one line and exits 0 when all of that worked; on an
//! error prints the error's `Display` (what a user's log would show) and exits 1.

use std::process::ExitCode;
use std::time::Duration;

use eventbus::{Bus, BusConfig, Error, Message, Publisher, StartFrom, SubscribeSpec, Subscriber};

const MESSAGES: usize = 20;

#[tokio::main]
async fn main() -> ExitCode {
    let topic = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "facade-probe".into());
    match run(&topic).await {
        Ok(()) => {
            println!("facade-probe: {MESSAGES} published, acked and read back on {topic}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("facade-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(topic: &str) -> Result<(), Error> {
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    bus.ensure_topic(topic).await?;
    let publisher = bus.publisher().await?;
    let mut acks = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        acks.push(
            publisher
                .publish(Message::new(topic, format!("m{i}")))
                .await?,
        );
    }
    for ack in acks {
        ack.await.into_result()?;
    }
    publisher.close(Duration::from_secs(5)).await?;

    let spec = SubscribeSpec::new(topic)
        .group("facade-probe")
        .start(StartFrom::Earliest);
    let mut sub = bus.subscriber().subscribe(spec).await?;
    let mut read = 0;
    while read < MESSAGES {
        let next = tokio::time::timeout(Duration::from_secs(30), sub.next()).await;
        let Ok(Some(delivery)) = next else {
            return Err(Error::new(
                eventbus::ErrorKind::Timeout,
                format!("read back {read} of {MESSAGES} in 30 s"),
            ));
        };
        delivery?.ack().await?;
        read += 1;
    }
    sub.close().await;
    Ok(())
}
