//! The transactional outbox: a service writes an order and its `orders.created` event in one
//! database transaction (SQLite here, in a temporary file; PostgreSQL works the same way with
//! `PgOutbox`), a relay publishes what committed through the bus, and a consumer reads it.
//! Two of the seven transactions roll back: their orders and their events never appear.
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --features outbox --example outbox
//! ```

use std::time::Duration;

use eventbus::outbox::sqlx::{self, SqlitePool};
use eventbus::outbox::{Relay, RelayConfig, SqliteOutbox};
use eventbus::{Bus, BusConfig, Message, SubscribeSpec, Subscriber, Topic};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    let topic = Topic::new("examples.outbox");
    bus.ensure_topic(topic.as_str()).await?;
    let run = std::process::id().to_string();

    let dir = std::env::temp_dir().join(format!("eventbus-outbox-example-{run}"));
    std::fs::create_dir_all(&dir)?;
    let db = format!("sqlite://{}?mode=rwc", dir.join("shop.db").display());
    let pool = SqlitePool::connect(&db).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, total INTEGER)")
        .execute(&pool)
        .await?;
    let outbox = SqliteOutbox::new(pool.clone());
    outbox.migrate().await?;

    // The relay publishes through the bus's own publisher (batching, ACK window, ids).
    let relay = Relay::start(
        outbox.clone(),
        bus.publisher().await?,
        RelayConfig::default().poll(Duration::from_millis(50)),
    );

    for id in 1..=7_i64 {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders (id, total) VALUES (?, ?)")
            .bind(id)
            .bind(100 * id)
            .execute(&mut *tx)
            .await?;
        let event = Message::new(topic.clone(), format!(r#"{{"order":{id}}}"#))
            .with_key(format!("order-{id}"))
            .with_header("run", run.as_str());
        outbox.enqueue(&mut tx, &event).await?;
        if id % 3 == 0 {
            tx.rollback().await?; // orders 3 and 6: neither the row nor the event
        } else {
            tx.commit().await?;
        }
    }

    let spec = SubscribeSpec::new(topic.clone()).group(format!("examples-outbox-{run}"));
    let mut sub = bus.subscriber().subscribe(spec).await?;
    let mut orders = Vec::new();
    while orders.len() < 5 {
        let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await
        else {
            return Err(format!("only {} of 5 events arrived", orders.len()).into());
        };
        let delivery = delivery?;
        if delivery.message().headers().get("run") == Some(run.as_str()) {
            orders.push(String::from_utf8_lossy(delivery.message().payload()).into_owned());
        }
        delivery.ack().await?;
    }
    relay.close(Duration::from_secs(5)).await;
    sub.close().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    println!(
        "orders in the database: {rows}; events consumed: {}",
        orders.join(" ")
    );
    if rows != 5
        || orders
            .iter()
            .any(|o| o.contains(":3}") || o.contains(":6}"))
    {
        return Err("a rolled-back order was stored or published".into());
    }
    println!("published 5 of 5 committed, 0 of 2 rolled back");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
