//! Credentials and permissions on a real nats-server with users and publish permissions:
//! wrong credentials fail at connect with a typed error and no reconnect loop, a publish
//! without permission is refused with a typed error (not left to time out), other subjects are
//! unaffected, and no secret appears in errors, `Debug` output or logs at TRACE.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_brokers::{NatsOptions, NatsServer};
use eventbus_core::{Backend as _, ErrorKind, Message, Outcome, Publisher};
use eventbus_nats::{NatsAuth, NatsBackend, NatsConfig, StreamSpec};

const PASSWORD: &str = "pw-7f3a9c-do-not-log";
const WRONG: &str = "wrong-pw-5e1b2d-do-not-log";

/// Everything logged by any target at TRACE, for the whole test binary.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&w)))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn server() -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("auth.conf");
    std::fs::write(
        &conf,
        format!(
            r#"authorization {{
  users = [
    {{ user: alice, password: "{PASSWORD}",
       permissions: {{ publish: {{ allow: ["ok.>", "secret.>", "$JS.API.>"], deny: ["secret.>"] }},
                       subscribe: ">" }} }}
  ]
}}
"#
        ),
    )
    .expect("write config");
    let s = NatsServer::start_with(NatsOptions {
        args: vec!["-c".into(), conf.display().to_string()],
        ..NatsOptions::default()
    })
    .expect("start nats-server");
    (s, dir)
}

fn config(url: String, password: &str) -> NatsConfig {
    NatsConfig::new(url)
        .auth(NatsAuth::UserPassword {
            user: "alice".into(),
            password: password.into(),
        })
        .connect_timeout(Duration::from_secs(2))
        .ack_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_permissions() {
    let logs = logs();
    let (server, _dir) = server();

    // Wrong password: a typed Auth error, fast, not retryable, without the secret in it.
    let t0 = Instant::now();
    let e = NatsBackend::connect(config(server.url(), WRONG))
        .await
        .expect_err("wrong password must not connect");
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(!e.is_retryable(), "wrong credentials are not retryable");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains(WRONG), "secret in error: {text}");
    }
    let cfg = config(server.url(), PASSWORD);
    assert!(!format!("{cfg:?}").contains(PASSWORD), "secret in Debug");

    // Right password.
    let nats = NatsBackend::connect(cfg).await.expect("connect");
    nats.ensure_stream(&StreamSpec::new("SEC", ["ok.>", "secret.>"]))
        .await
        .expect("stream");
    let p = Batcher::new(
        nats.sink().await.expect("sink"),
        BatchConfig::default().ack_timeout(Duration::from_secs(3)),
    )
    .expect("batcher");

    // The first refused publish is only reported by the server asynchronously, with no reply:
    // it resolves at its deadline, not as acked.
    let first = p
        .publish(Message::new("secret.x", "no"))
        .await
        .expect("admitted")
        .await;
    assert!(!first.is_acked(), "a refused publish was acked: {first:?}");
    // From then on the subject is refused at once with a typed error, nothing sent.
    let t0 = Instant::now();
    let refused_again = p.publish(Message::new("secret.x", "no")).await;
    let e2 = refused_again.expect_err("known-denied subject must be refused");
    assert_eq!(e2.kind(), ErrorKind::Auth, "{e2}");
    assert!(t0.elapsed() < Duration::from_millis(500));
    // Other subjects are unaffected.
    let ok = p
        .publish(Message::new("ok.x", "yes"))
        .await
        .expect("admitted")
        .await;
    assert!(matches!(ok, Outcome::Acked(_)), "{ok:?}");
    let state = nats.stream_state("SEC").await.expect("state");
    assert_eq!(state.messages, 1, "only the permitted message is stored");
    p.close(Duration::from_secs(5)).await.expect("close");

    // No secret anywhere in the TRACE logs (async-nats's own included).
    assert_not_logged(logs, &[PASSWORD, WRONG]);
}

/// None of `secrets` appears in anything logged so far, at any level, by any target.
fn assert_not_logged(logs: &Mutex<Vec<u8>>, secrets: &[&str]) {
    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    assert!(!text.is_empty(), "the log capture saw nothing");
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "secret in logs: {}",
            text.lines()
                .find(|l| l.contains(secret))
                .unwrap_or_default()
        );
    }
}

/// Token and NKey authentication on real servers: the right secret connects and publishes, a
/// wrong one is a fast, non-retryable `Auth` error, and no secret shows in errors, `Debug` or
/// the TRACE logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_nkey_authentication() {
    let logs = logs();
    const TOKEN: &str = "tok-4d2a91-do-not-log";
    let token_server = NatsServer::start_with(NatsOptions {
        args: vec!["--auth".into(), TOKEN.into()],
        ..NatsOptions::default()
    })
    .expect("start nats-server with a token");
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .expect("write config");
    let nkey_server = NatsServer::start_with(NatsOptions {
        args: vec!["-c".into(), conf.display().to_string()],
        ..NatsOptions::default()
    })
    .expect("start nats-server with an nkey user");
    let other_seed = nkeys::KeyPair::new_user().seed().expect("seed");

    let cases = [
        (
            token_server.url(),
            NatsAuth::Token {
                token: TOKEN.into(),
            },
            true,
        ),
        (
            token_server.url(),
            NatsAuth::Token {
                token: "wrong-token-do-not-log".into(),
            },
            false,
        ),
        (
            nkey_server.url(),
            NatsAuth::NKey { seed: seed.clone() },
            true,
        ),
        (
            nkey_server.url(),
            NatsAuth::NKey {
                seed: other_seed.clone(),
            },
            false,
        ),
    ];
    for (url, auth, good) in cases {
        let cfg = NatsConfig::new(url)
            .auth(auth)
            .connect_timeout(Duration::from_secs(2));
        let debug = format!("{cfg:?}");
        let t0 = Instant::now();
        match NatsBackend::connect(cfg).await {
            Ok(nats) => {
                assert!(good, "connected with a wrong secret");
                nats.ensure_stream(&StreamSpec::new("AUTH", ["auth.>"]))
                    .await
                    .expect("stream");
                let p = Batcher::new(nats.sink().await.expect("sink"), BatchConfig::default())
                    .expect("batcher");
                let o = p
                    .publish(Message::new("auth.x", "x"))
                    .await
                    .expect("admitted")
                    .await;
                assert!(o.is_acked(), "{o:?}");
            }
            Err(e) => {
                assert!(!good, "the right secret was refused: {e:?}");
                assert_eq!(e.kind(), ErrorKind::Auth, "{e:?}");
                assert!(!e.is_retryable());
                assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
                for text in [e.to_string(), format!("{e:?}")] {
                    for secret in [TOKEN, "wrong-token-do-not-log", &seed, &other_seed] {
                        assert!(!text.contains(secret), "secret in error: {text}");
                    }
                }
            }
        }
        for secret in [TOKEN, "wrong-token-do-not-log", &seed, &other_seed] {
            assert!(!debug.contains(secret), "secret in Debug: {debug}");
        }
    }
    assert_not_logged(logs, &[TOKEN, "wrong-token-do-not-log", &seed, &other_seed]);
}
