//! Connects with `BusConfig::load(None)` (the `EVENTBUS_*` environment only), provisions the
//! topic named by the first argument, publishes a few messages, awaits every ack, then reads them
//! back through a consumer group. Prints one line and exits 0 when all of that worked; on an
//! error prints the error's `Display` (what a user's log would show) and exits 1.
//!
//! `facade-probe --outbox <postgres url>` instead opens the outbox's PostgreSQL at that URL
//! (the row gives a TLS URL), checks the connection is encrypted, enqueues messages in a
//! transaction, and has a relay publish them through the bus the environment names.

use std::process::ExitCode;
use std::time::Duration;

use eventbus::{Bus, BusConfig, Error, Message, Publisher, StartFrom, SubscribeSpec, Subscriber};

const MESSAGES: usize = 20;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match &args[..] {
        [flag, url] if flag == "--outbox" => outbox(url).await,
        _ => {
            let topic = args
                .first()
                .cloned()
                .unwrap_or_else(|| "facade-probe".into());
            run(&topic)
                .await
                .map(|()| format!("{MESSAGES} published, acked and read back on {topic}"))
                .map_err(Into::into)
        }
    };
    match result {
        Ok(line) => {
            println!("facade-probe: {line}");
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

/// The outbox on the PostgreSQL at `url`: the connection must be encrypted; `MESSAGES` enqueued
/// in one transaction are published by a relay through the environment's bus.
async fn outbox(url: &str) -> Result<String, Box<dyn std::error::Error>> {
    use eventbus::outbox::sqlx::{self, PgPool};
    use eventbus::outbox::{OutboxStore, PgOutbox, Relay, RelayConfig};
    let pool = PgPool::connect(url).await?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    if !ssl {
        return Err("connected, but not over TLS".into());
    }
    let outbox = PgOutbox::new(pool.clone());
    outbox.migrate().await?;
    let bus = Bus::connect(&BusConfig::load(None)?).await?;
    let relay = Relay::start(
        outbox.clone(),
        bus.publisher().await?,
        RelayConfig::default(),
    );
    let mut tx = pool.begin().await?;
    for i in 0..MESSAGES {
        outbox
            .enqueue(&mut tx, &Message::new("probe.outbox", format!("m{i}")))
            .await?;
    }
    tx.commit().await?;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = outbox.stats().await?;
        if stats.pending == 0 {
            break;
        }
        if std::time::Instant::now() > until {
            return Err(format!("{} of {MESSAGES} still pending after 30 s", stats.pending).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.close(Duration::from_secs(5)).await;
    Ok(format!(
        "outbox over TLS: {MESSAGES} enqueued in one transaction and published by the relay"
    ))
}
