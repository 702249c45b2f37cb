//! TLS on a real nats-server with certificates made for the test (rcgen): the right CA
//! connects and publishes; a wrong CA, a hostname mismatch and a missing client certificate
//! each fail fast at connect with a typed, non-retryable error, and never fall back to
//! plaintext.

use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::tls::Pki;
use eventbus_brokers::{NatsOptions, NatsServer};
use eventbus_conformance::scenarios::publish_all;
use eventbus_core::{Backend as _, Error, ErrorKind, Message, Outcome};
use eventbus_nats::{NatsBackend, NatsConfig, StreamSpec};

/// nats-server with TLS on, its certificate for `names`; `verify` requires client certificates
/// signed by the same CA.
fn tls_server(pki: &Pki, names: &[&str], verify: bool) -> NatsServer {
    NatsServer::start_with(NatsOptions {
        args: pki.nats_args(names, verify),
        ..NatsOptions::default()
    })
    .expect("start nats-server with TLS")
}

fn tls_url(server: &NatsServer) -> String {
    server.url().replace("nats://", "tls://")
}

/// Connect, expecting a fast typed refusal; returns the error.
async fn refused(config: NatsConfig) -> Error {
    let start = Instant::now();
    let e = NatsBackend::connect(config.connect_timeout(Duration::from_secs(3)))
        .await
        .expect_err("connected although TLS must fail");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    assert!(
        !e.is_retryable(),
        "a TLS failure is not fixed by retrying: {e:?}"
    );
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_ca_connects_and_publishes() {
    let pki = Pki::new("ca");
    let server = tls_server(&pki, &["localhost", "127.0.0.1"], false);
    let nats =
        NatsBackend::connect(NatsConfig::new(tls_url(&server)).tls_root_certificates(pki.ca()))
            .await
            .expect("connect over TLS");
    nats.ensure_stream(&StreamSpec::new("TLS", ["tls.>"]))
        .await
        .expect("stream");
    let p = Batcher::new(nats.sink().await.expect("sink"), BatchConfig::default()).unwrap();
    let outcomes = publish_all(
        &p,
        (0..10)
            .map(|i| Message::new("tls.x", format!("{i}")))
            .collect(),
    )
    .await;
    assert!(outcomes.iter().all(Outcome::is_acked), "{outcomes:?}");
    assert_eq!(nats.stream_state("TLS").await.unwrap().messages, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_fast_without_plaintext_fallback() {
    let pki = Pki::new("ca");
    let other = Pki::new("other-ca");
    let server = tls_server(&pki, &["localhost", "127.0.0.1"], false);
    // tls:// with the wrong CA.
    refused(NatsConfig::new(tls_url(&server)).tls_root_certificates(other.ca())).await;
    // A plain nats:// URL to a TLS server: the client must upgrade (and then fail on the
    // unknown CA), never talk plaintext.
    refused(NatsConfig::new(server.url()).tls_root_certificates(other.ca())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostname_mismatch_fails_fast() {
    let pki = Pki::new("ca");
    let server = tls_server(&pki, &["other.example"], false);
    refused(NatsConfig::new(tls_url(&server)).tls_root_certificates(pki.ca())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_the_client_certificate() {
    let pki = Pki::new("ca");
    let server = tls_server(&pki, &["localhost", "127.0.0.1"], true);
    refused(NatsConfig::new(tls_url(&server)).tls_root_certificates(pki.ca())).await;
    let (cert, key) = pki.leaf("client", &["client"]);
    let nats = NatsBackend::connect(
        NatsConfig::new(tls_url(&server))
            .tls_root_certificates(pki.ca())
            .tls_client_cert(cert, key),
    )
    .await
    .expect("connect with a client certificate");
    assert!(nats.server_version().starts_with("2."));
}
