//! Health, lag and metrics on a tiny HTTP endpoint, for liveness and readiness probes and for
//! Prometheus:
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 when the broker answers a round trip (`Bus::health`), else 503 |
//! | `/readyz` | 200 when an end-to-end heartbeat (publish, then receive) completes in 5 s, else 503 |
//! | `/lag` | the consumer group's lag as JSON (`pending`, `unacked`) |
//! | `/metrics` | every `eventbus_*` metric in the Prometheus text format |
//!
//! It publishes and consumes a trickle of messages so the metrics move. Listens on
//! `EXAMPLE_HTTP_ADDR` (default `127.0.0.1:9898`); stops on Ctrl-C or SIGTERM. The HTTP part is
//! hand-written to keep the example small; a service would use its own HTTP stack (axum, hyper).
//!
//! ```sh
//! EVENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo run -p eventbus --example health_http
//! curl -s localhost:9898/metrics | grep eventbus_publish_outcomes_total
//! ```

use std::sync::Arc;
use std::time::Duration;

use eventbus::handler::{self, HandlerConfig};
use eventbus::ops::{LagEvent, LagWatch, heartbeat};
use eventbus::{
    Bus, BusConfig, BusPublisher, Message, Publisher, SubscribeSpec, Subscriber, Topic,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GROUP: &str = "examples-http";

struct App {
    bus: Bus,
    publisher: BusPublisher,
    topic: Topic,
    beat: Topic,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Install the Prometheus recorder first: the SDK's metrics go through the `metrics` facade.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let config = BusConfig::load(None)?;
    let bus = Bus::connect(&config).await?;
    let (topic, beat) = (
        Topic::new("examples.http"),
        Topic::new("examples.heartbeat"),
    );
    bus.ensure_topic(topic.as_str()).await?;
    bus.ensure_topic(beat.as_str()).await?;
    let publisher = bus.publisher().await?;
    let app = Arc::new(App {
        bus: bus.clone(),
        publisher: publisher.clone(),
        topic: topic.clone(),
        beat,
        prometheus,
    });

    // Traffic: 200 messages a second, and a consumer group handling them.
    let traffic = tokio::spawn({
        let (publisher, topic) = (publisher.clone(), topic.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                let Ok(ack) = publisher.publish(Message::new(topic.clone(), "{}")).await else {
                    break;
                };
                drop(ack); // outcomes are counted in eventbus_publish_outcomes_total
            }
        }
    });
    let sub = bus
        .subscriber()
        .subscribe(SubscribeSpec::new(topic.clone()).group(GROUP))
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let consumer = tokio::spawn(handler::run(
        sub,
        HandlerConfig::default(),
        |_msg, _info| async { Ok(()) },
        {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        },
    ));
    // The consumer-lag gauge, and a log line when the lag crosses 1,000 either way.
    let _lag_watch = LagWatch::start(
        bus.subscriber(),
        topic.clone(),
        GROUP,
        Duration::from_secs(1),
        1_000,
        |e: LagEvent| println!("lag: {e:?}"),
    );

    let addr = std::env::var("EXAMPLE_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:9898".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("serving /healthz /readyz /lag /metrics on http://{addr}");
    let signal = tokio::spawn(wait_for_signal());
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            conn = listener.accept() => {
                let (stream, _) = conn?;
                tokio::spawn(serve(Arc::clone(&app), stream));
            }
        }
    }
    println!("stopping");
    traffic.abort();
    let _ = stop_tx.send(true);
    let report = consumer.await?;
    let close = publisher.close(Duration::from_secs(5)).await?;
    println!(
        "consumer acked {}; publisher closed with {} unresolved",
        report.acked, close.unresolved
    );
    Ok(())
}

/// Answer one request (one per connection).
async fn serve(app: Arc<App>, mut stream: tokio::net::TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let request = String::from_utf8_lossy(&buf);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = route(&app, path).await;
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn route(app: &App, path: &str) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => {
            let h = app.bus.health(Duration::from_secs(2)).await;
            let body = format!(
                "{} {} in {:?}: {}\n",
                h.backend,
                if h.up { "up" } else { "down" },
                h.latency,
                h.detail
            );
            (
                if h.up {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                TEXT,
                body,
            )
        }
        "/readyz" => {
            let sub = app.bus.subscriber();
            match heartbeat(&app.publisher, &sub, &app.beat, Duration::from_secs(5)).await {
                Ok(rtt) => ("200 OK", TEXT, format!("heartbeat round trip {rtt:?}\n")),
                Err(e) => (
                    "503 Service Unavailable",
                    TEXT,
                    format!("heartbeat failed: {e}\n"),
                ),
            }
        }
        "/lag" => match app.bus.subscriber().lag(&app.topic, GROUP).await {
            Ok(lag) => (
                "200 OK",
                "application/json",
                format!(
                    "{{\"topic\":\"{}\",\"group\":\"{GROUP}\",\"pending\":{},\"unacked\":{},\"publisher_in_flight\":{}}}\n",
                    app.topic,
                    lag.pending,
                    lag.unacked,
                    app.publisher.stats().in_flight
                ),
            ),
            Err(e) => (
                "503 Service Unavailable",
                TEXT,
                format!("lag unavailable: {e}\n"),
            ),
        },
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            app.prometheus.render(),
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "try /healthz /readyz /lag /metrics\n".into(),
        ),
    }
}

/// Ctrl-C, or SIGTERM on Unix.
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
