//! Consume from NATS, change a database, produce to Kafka: exactly once in effect, on any pair of
//! brokers. The handler's transaction records the input's id (the inbox), applies the payment
//! and enqueues the ledger event (the outbox); a relay publishes what committed to Kafka.
//!
//! To show what the inbox is for, the first delivery of every fourth payment "loses" its ack
//! (it is handed back to NATS after its transaction committed, as a crash before the ack
//! would): NATS delivers it again, the inbox skips it, and Kafka still gets one ledger event
//! per payment. SQLite here, in a temporary file; PostgreSQL works the same way with
//! `PgInbox` and `PgOutbox`.
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 EVENTBUS_KAFKA_BROKERS=127.0.0.1:9092 \
//!   cargo run -p eventbus --features outbox,nats,kafka --example pipeline
//! ```

use std::collections::HashMap;
use std::time::Duration;

use eventbus::handler::HandlerError;
use eventbus::outbox::inbox::{Processed, SqliteInbox};
use eventbus::outbox::sqlx::{self, SqliteConnection, SqlitePool};
use eventbus::outbox::{Relay, RelayConfig, SqliteOutbox};
use eventbus::{Bus, BusConfig, Message, Publisher, SubscribeSpec, Subscriber};

const PAYMENTS: i64 = 20;

/// A bus on `backend`, configured by the environment like any other (`EVENTBUS_NATS_URL`, ...).
async fn bus(backend: &str) -> Result<Bus, Box<dyn std::error::Error>> {
    let vars = std::env::vars().filter(|(k, _)| k != "EVENTBUS_BACKEND");
    let config = BusConfig::from_toml(&format!("backend = \"{backend}\""))?.with_vars(vars)?;
    Ok(Bus::connect(&config).await?)
}

/// The handler's work, in the inbox's transaction: apply payment `n:cents` to the account
/// (the message key) and enqueue its ledger event. Returns `n`.
async fn apply(
    outbox: &SqliteOutbox,
    msg: &Message,
    tx: &mut SqliteConnection,
    ledger: &str,
) -> Result<i64, String> {
    let text = String::from_utf8_lossy(msg.payload()).into_owned();
    let (n, cents) = text.split_once(':').ok_or("payload is n:cents")?;
    let (n, cents): (i64, i64) = match (n.parse(), cents.parse()) {
        (Ok(n), Ok(c)) => (n, c),
        _ => return Err("payload is n:cents, two numbers".into()),
    };
    let account = String::from_utf8_lossy(msg.key().ok_or("no key")?).into_owned();
    sqlx::query(
        "INSERT INTO balances (account, cents) VALUES (?, ?) \
         ON CONFLICT (account) DO UPDATE SET cents = cents + excluded.cents",
    )
    .bind(&account)
    .bind(cents)
    .execute(&mut *tx)
    .await
    .map_err(|e| format!("balance: {e}"))?;
    let event = Message::new(ledger, format!("{n}:{account}:{cents}"))
        .with_key(account)
        .with_header("run", msg.topic().as_str());
    outbox
        .enqueue(tx, &event)
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (nats, kafka) = (bus("nats").await?, bus("kafka").await?);
    let run = std::process::id().to_string();
    let (payments, ledger) = (format!("examples.payments.{run}"), "examples.ledger");
    nats.ensure_topic(&payments).await?;
    kafka.ensure_topic(ledger).await?;

    let dir = std::env::temp_dir().join(format!("eventbus-pipeline-example-{run}"));
    std::fs::create_dir_all(&dir)?;
    let db = format!("sqlite://{}?mode=rwc", dir.join("bank.db").display());
    let pool = SqlitePool::connect(&db).await?;
    sqlx::query("CREATE TABLE balances (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)")
        .execute(&pool)
        .await?;
    let inbox = SqliteInbox::new(pool.clone(), "ledger-writer");
    inbox.migrate().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    outbox.migrate().await?;
    // The relay publishes the outbox's committed rows to Kafka.
    let relay = Relay::start(
        outbox.clone(),
        kafka.publisher().await?,
        RelayConfig::default().poll(Duration::from_millis(50)),
    );

    // The upstream service publishes payments to NATS.
    let upstream = nats.publisher().await?;
    for i in 0..PAYMENTS {
        let payment = Message::new(payments.as_str(), format!("{i}:{}", 100 + i))
            .with_key(format!("account-{}", i % 4));
        upstream.publish(payment).await?.await.into_result()?;
    }

    let spec = SubscribeSpec::new(payments.as_str()).group("ledger-writer");
    let mut sub = nats.subscriber().subscribe(spec).await?;
    let (mut handled, mut skipped, mut lost_acks) = (0, 0, 0);
    while handled < PAYMENTS {
        let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await
        else {
            return Err(format!("only {handled} of {PAYMENTS} payments arrived").into());
        };
        let delivery = delivery?;
        let outcome = inbox
            .process_with(&outbox, delivery.message(), |outbox, msg, tx| {
                Box::pin(async move {
                    apply(outbox, msg, tx, ledger)
                        .await
                        .map_err(HandlerError::new)
                })
            })
            .await?;
        match outcome {
            Processed::Handled(n) if n % 4 == 0 && delivery.info().delivery_count == 1 => {
                // Committed, but the ack never reaches NATS: the payment comes again.
                lost_acks += 1;
                handled += 1;
                delivery.nack(Duration::ZERO).await?;
                continue;
            }
            Processed::Handled(_) => handled += 1,
            Processed::Duplicate => skipped += 1,
        }
        delivery.ack().await?;
    }
    // The redeliveries of the lost acks: each one skipped by the inbox.
    while skipped < lost_acks {
        let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await
        else {
            return Err(format!("{skipped} of {lost_acks} redeliveries arrived").into());
        };
        let delivery = delivery?;
        match inbox
            .process(delivery.message(), |_, _| Box::pin(async { Ok(()) }))
            .await?
        {
            Processed::Duplicate => skipped += 1,
            Processed::Handled(()) => return Err("a redelivery was processed twice".into()),
        }
        delivery.ack().await?;
    }
    sub.close().await;

    // Read the ledger back from Kafka: one event per payment.
    let spec = SubscribeSpec::new(ledger).group(format!("examples-pipeline-{run}"));
    let mut events = kafka.subscriber().subscribe(spec).await?;
    let mut per_payment: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut settle = None;
    loop {
        let until = settle.unwrap_or(deadline);
        let Ok(Some(delivery)) = tokio::time::timeout_at(until, events.next()).await else {
            break;
        };
        let delivery = delivery?;
        let m = delivery.message();
        if m.headers().get("run") == Some(payments.as_str()) {
            let n = String::from_utf8_lossy(m.payload())
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            *per_payment.entry(n).or_default() += 1;
            if per_payment.len() as i64 == PAYMENTS && settle.is_none() {
                // Wait a little longer for anything beyond one per payment.
                settle = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            }
        }
        delivery.ack().await?;
    }
    events.close().await;
    relay.close(Duration::from_secs(5)).await;

    let total: i64 = sqlx::query_scalar("SELECT sum(cents) FROM balances")
        .fetch_one(&pool)
        .await?;
    let expected: i64 = (0..PAYMENTS).map(|i| 100 + i).sum();
    let events: usize = per_payment.values().sum();
    println!(
        "payments {PAYMENTS}, acks lost {lost_acks}, redeliveries skipped by the inbox {skipped}, \
         ledger events in Kafka {events} for {} payments, balance total {total} (expected {expected})",
        per_payment.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    if per_payment.len() as i64 != PAYMENTS || events as i64 != PAYMENTS || total != expected {
        return Err("not exactly once".into());
    }
    println!("each payment applied once and published once");
    Ok(())
}
