//! A seed list reaches a live seed behind seeds that accept a connection and never answer (a
//! hung node, a load balancer in front of nothing): async-nats gives each seed
//! `connect_timeout`, so the overall limit must cover every seed, not one.

use std::time::{Duration, Instant};

use eventbus_brokers::NatsServer;
use eventbus_nats::{NatsBackend, NatsConfig};

/// A listener that accepts connections and holds them open without a word.
async fn silent_seed() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("nats://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_seed_behind_two_silent_ones_connects() {
    let nats = NatsServer::start().unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
    let seeds = [silent_seed().await, silent_seed().await, nats.url()].join(",");
    let per_seed = Duration::from_secs(1);
    let start = Instant::now();
    let backend = NatsBackend::connect(
        NatsConfig::new(seeds)
            .connect_timeout(per_seed)
            .retain_seed_order(true),
    )
    .await
    .unwrap_or_else(|e| panic!("the third seed is live: {e}"));
    let took = start.elapsed();
    // The seeds were tried in order: both silent ones cost their whole timeout first.
    assert!(took >= 2 * per_seed, "connected after {took:?}");
    assert!(took < 3 * per_seed + Duration::from_secs(1), "{took:?}");
    drop(backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_seeds_alone_fail_within_the_documented_limit() {
    let seeds = [silent_seed().await, silent_seed().await].join(",");
    let per_seed = Duration::from_millis(500);
    let start = Instant::now();
    let e = NatsBackend::connect(NatsConfig::new(seeds).connect_timeout(per_seed))
        .await
        .expect_err("no seed answers");
    let took = start.elapsed();
    assert!(e.is_retryable(), "a silent cluster may come back: {e}");
    // connect_timeout x seeds + 1 s.
    assert!(
        took <= 2 * per_seed + Duration::from_secs(1) + Duration::from_millis(300),
        "{took:?}"
    );
}
