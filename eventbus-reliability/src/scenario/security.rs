//! The `security` row ([`security`]): each case is a line of a table, what is refused and
//! how, or what connects and publishes.

use std::time::{Duration, Instant};

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::{Backend as _, Publisher};

use super::{Row, ms};
use crate::plan::Target;

/// Security. NATS: TLS with a wrong CA, a `nats://` URL to a TLS server, a host name mismatch,
/// mutual TLS without a client certificate, a wrong password, and a publish without
/// permission. Kafka: the same TLS cases (a plaintext client instead of the URL scheme) plus
/// TLS and mutual TLS that work, and SASL SCRAM-SHA-512 with a wrong and the right password.
/// Each connect goes through a proxy that counts connection attempts: every refusal must be
/// typed, not retryable (except a plaintext Kafka client, which cannot tell a TLS listener from
/// a broken broker), within the connect timeout (+1 s), with no secret in its text and no
/// reconnect attempts in the 2 s after it.
pub async fn security(on: Target) -> Row {
    let mut row = Row::new("security", &on.name());
    match on {
        #[cfg(feature = "nats")]
        Target::Nats => {
            security_nats(&mut row).await;
            // Backend-agnostic (it relays to the memory backend): run once, on this row.
            outbox_tls(&mut row).await;
        }
        #[cfg(feature = "kafka")]
        Target::Kafka => security_kafka(&mut row).await,
        _ => row
            .failures
            .push(format!("security is not run on {}", on.name())),
    }
    row
}

/// The outbox's PostgreSQL over TLS, through a program built on the `eventbus` facade alone
/// (feature `outbox`, [`crate::facade_probe`]): a server that accepts only TLS, a URL with
/// `sslmode=verify-full` and the test CA; the connection must be encrypted and a relay must
/// publish what one transaction enqueued. The same server must refuse `sslmode=disable`, so
/// the first case cannot pass without TLS.
#[cfg(feature = "nats")]
async fn outbox_tls(row: &mut Row) {
    let pki = eventbus_brokers::tls::Pki::new("pg-ca");
    let (cert, key) = pki.leaf("postgres", &["localhost", "127.0.0.1"]);
    let started = tokio::task::spawn_blocking(move || {
        eventbus_brokers::Postgres::start_tls(&cert, &key).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .flatten();
    let pg = match started {
        Ok(pg) => pg,
        Err(e) => return row.failures.push(format!("PostgreSQL with TLS: {e}")),
    };
    let tls = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        pki.ca().display()
    );
    row.outcome(
        "outbox over TLS, through the facade alone",
        crate::facade_probe::outbox(&tls).await,
    );
    // Refused by the server for want of encryption, nothing else (the probe also fails when it
    // gets in without TLS, which must count against the row).
    match crate::facade_probe::outbox(&format!("{}?sslmode=disable", pg.url())).await {
        Err(e) if e.contains("no pg_hba.conf entry") && e.contains("no encryption") => {
            row.notes.push(format!(
                "outbox without TLS refused by the server, as it must be: {}",
                e.lines().next().unwrap_or_default()
            ))
        }
        Err(e) => row.failures.push(format!(
            "outbox with sslmode=disable: not the server's refusal of a plaintext client: {e}"
        )),
        Ok(line) => row.failures.push(format!(
            "outbox: a PostgreSQL that accepts only TLS let a plaintext client in: {line}"
        )),
    }
}

/// A Kafka client configured by `EVENTBUS_KAFKA_*` variables (the way a service configures
/// it), in front of the broker at `addr`.
#[cfg(feature = "kafka")]
fn kafka_from_vars(
    addr: &str,
    vars: &[(&str, String)],
) -> Result<eventbus_kafka::KafkaConfig, String> {
    eventbus_kafka::KafkaConfig::new(addr)
        .connect_timeout(REFUSAL_TIMEOUT)
        .with_vars(vars.iter().map(|(k, v)| (*k, v.clone())))
        .map_err(|e| format!("config: {e}"))
}

/// Connect to `addr` with the `EVENTBUS_KAFKA_*` settings `vars` and publish one message to
/// `topic` (created with one partition) through a fresh engine; then the same through a program
/// that depends on the `eventbus` facade alone ([`crate::facade_probe`]). A note if both are
/// acked, a failure naming `what` otherwise.
#[cfg(feature = "kafka")]
async fn connects_and_publishes(
    row: &mut Row,
    what: &str,
    addr: &str,
    vars: &[(&str, String)],
    topic: &str,
) {
    let published = async {
        let backend = eventbus_kafka::KafkaBackend::connect(kafka_from_vars(addr, vars)?)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        backend
            .ensure_topic(&eventbus_core::TopicSpec::new(topic))
            .await
            .map_err(|e| format!("topic: {e}"))?;
        let sink = backend.sink().await.map_err(|e| format!("sink: {e}"))?;
        let p = Batcher::new(
            sink,
            BatchConfig::default().ack_timeout(Duration::from_secs(10)),
        )
        .map_err(|e| format!("batcher: {e}"))?;
        let o = p
            .publish(eventbus_core::Message::new(topic, "secured"))
            .await
            .map_err(|e| format!("publish: {e}"))?
            .await;
        let _ = p.close(Duration::from_secs(2)).await;
        if o.is_acked() {
            Ok(())
        } else {
            Err(format!("not acked: {o:?}"))
        }
    };
    let published = published
        .await
        .map(|()| "connected, one publish acked".to_owned());
    row.outcome(what, published);
    let topic = format!("{topic}-facade");
    row.outcome(
        &format!("{what}, through the facade alone"),
        crate::facade_probe::run(addr, vars, &topic).await,
    );
}

/// A connect that must be refused, and how (see [`expect_refusal`]).
struct Refusal<'a, C> {
    what: &'static str,
    /// The client's configuration (for NATS, made from the URL to connect to).
    config: C,
    want: eventbus_core::ErrorKind,
    /// A retryable error is right here (a client that cannot tell the refusal from a fault).
    retryable_ok: bool,
    /// Text that must not appear in the error.
    secrets: &'a [&'a str],
}

impl<C> Refusal<'_, C> {
    /// Refused with `want`, not retryable, no secret to look for.
    fn new(what: &'static str, config: C, want: eventbus_core::ErrorKind) -> Self {
        Refusal {
            what,
            config,
            want,
            retryable_ok: false,
            secrets: &[],
        }
    }
}

/// A Kafka case: the listener's counts of accepted connections and of completed TLS
/// handshakes (which must not grow, if given), and the settings to connect with.
#[cfg(feature = "kafka")]
type KafkaRefusal<'a> = (
    &'a (dyn Fn() -> u64 + Sync),
    Option<&'a (dyn Fn() -> u64 + Sync)>,
    Refusal<'a, eventbus_kafka::KafkaConfig>,
);

/// One refused Kafka connect (see [`expect_refusal`]).
#[cfg(feature = "kafka")]
async fn refused_kafka(row: &mut Row, worst: &mut Duration, case: KafkaRefusal<'_>) {
    let (accepted, handshakes, c) = case;
    let before = handshakes.map(|h| h());
    let connect = eventbus_kafka::KafkaBackend::connect(c.config.clone());
    expect_refusal(
        row,
        worst,
        accepted,
        async { connect.await.map(|_| ()) },
        &c,
    )
    .await;
    if let (Some(h), Some(before)) = (handshakes, before) {
        row.require(
            h() == before,
            format!("{}: the client completed a TLS handshake", c.what),
        );
    }
}

const PASSWORD: &str = "s3cret-Pa55";
const WRONG: &str = "not-the-Pa55";

/// The Kafka listeners of the security cases, each a tansu of its own behind a proxy on the
/// port it advertises (so every connection goes through the proxy).
#[cfg(feature = "kafka")]
struct KafkaListeners {
    /// TLS, the server's certificate for localhost.
    tls: crate::tls_proxy::TlsProxy,
    /// TLS, the server's certificate for another name.
    mismatch: crate::tls_proxy::TlsProxy,
    /// TLS requiring a client certificate.
    mtls: crate::tls_proxy::TlsProxy,
    /// TLS in front of a tansu requiring SCRAM (user alice).
    sasl_tls: crate::tls_proxy::TlsProxy,
    /// Plaintext, counting connections, in front of a tansu requiring SCRAM (user alice).
    sasl: crate::proxy::FaultProxy,
    _tansu: Vec<eventbus_brokers::Tansu>,
}

#[cfg(feature = "kafka")]
impl KafkaListeners {
    async fn start(pki: &eventbus_brokers::tls::Pki) -> Result<KafkaListeners, String> {
        let names = ["localhost", "127.0.0.1"];
        let (t1, tls) = Self::behind_tls(pki, pki.leaf("kafka", &names), false, false).await?;
        let other = pki.leaf("other", &["other.example"]);
        let (t2, mismatch) = Self::behind_tls(pki, other, false, false).await?;
        let (t3, mtls) = Self::behind_tls(pki, pki.leaf("mtls", &names), true, false).await?;
        let leaf = pki.leaf("sasl-tls", &names);
        let (t4, sasl_tls) = Self::behind_tls(pki, leaf, false, true).await?;
        let port = eventbus_brokers::free_port().map_err(|e| e.to_string())?;
        let t5 = Self::tansu(port, true)?;
        let sasl = crate::proxy::FaultProxy::start_on(port, ([127, 0, 0, 1], t5.port()).into())
            .await
            .map_err(|e| format!("proxy: {e}"))?;
        Ok(KafkaListeners {
            tls,
            mismatch,
            mtls,
            sasl_tls,
            sasl,
            _tansu: vec![t1, t2, t3, t4, t5],
        })
    }

    /// Settings for user alice with SASL `mechanism` on the plaintext listener.
    fn sasl_as_alice(&self, mechanism: &str, password: &str) -> eventbus_kafka::KafkaConfig {
        kafka_from_vars(
            &self.sasl.addr().to_string(),
            &alice("sasl_plaintext", mechanism, password),
        )
        .expect("SASL settings")
    }

    /// A tansu advertising `port`. With `auth`, user alice is stored first (tansu's CLI cannot
    /// authenticate), then tansu restarts on the same SQLite file requiring authentication.
    fn tansu(port: u16, auth: bool) -> Result<eventbus_brokers::Tansu, String> {
        use eventbus_brokers::{Tansu, TansuStorage};
        let storage = if auth {
            TansuStorage::Sqlite
        } else {
            TansuStorage::Memory
        };
        let mut tansu =
            Tansu::start_advertising(storage, Some(port)).map_err(|e| format!("tansu: {e}"))?;
        if auth {
            tansu
                .create_user("alice", PASSWORD)
                .map_err(|e| e.to_string())?;
            tansu
                .restart_with(vec!["--authentication".into()])
                .map_err(|e| format!("tansu restart: {e}"))?;
        }
        Ok(tansu)
    }

    /// A tansu behind a TLS proxy serving `cert`, requiring a client certificate signed by
    /// `pki` if `client_ca`.
    async fn behind_tls(
        pki: &eventbus_brokers::tls::Pki,
        cert: (std::path::PathBuf, std::path::PathBuf),
        client_ca: bool,
        auth: bool,
    ) -> Result<(eventbus_brokers::Tansu, crate::tls_proxy::TlsProxy), String> {
        let port = eventbus_brokers::free_port().map_err(|e| e.to_string())?;
        let tansu = Self::tansu(port, auth)?;
        let upstream = ([127, 0, 0, 1], tansu.port()).into();
        let ca = client_ca.then(|| pki.ca());
        let proxy = crate::tls_proxy::TlsProxy::start_on(port, upstream, &cert.0, &cert.1, ca)
            .await
            .map_err(|e| format!("tls proxy: {e}"))?;
        Ok((tansu, proxy))
    }
}

/// `EVENTBUS_KAFKA_*` settings for TLS trusting `ca`.
#[cfg(feature = "kafka")]
fn ssl(ca: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
        ("EVENTBUS_KAFKA_SSL_CA", ca.display().to_string()),
    ]
}

/// `EVENTBUS_KAFKA_*` settings for user alice with SASL `mechanism` over `protocol`.
#[cfg(feature = "kafka")]
fn alice(protocol: &str, mechanism: &str, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", protocol.to_owned()),
        ("EVENTBUS_KAFKA_SASL_MECHANISM", mechanism.to_owned()),
        ("EVENTBUS_KAFKA_SASL_USERNAME", "alice".to_owned()),
        ("EVENTBUS_KAFKA_SASL_PASSWORD", password.to_owned()),
    ]
}

/// Kafka: TLS through a TLS-terminating proxy in front of tansu (tansu 0.6.0 has no TLS
/// listener; the proxy sits on the port tansu advertises, so every connection is TLS), and
/// SASL SCRAM against tansu's own `--authentication`.
#[cfg(feature = "kafka")]
async fn security_kafka(row: &mut Row) {
    use eventbus_brokers::tls::Pki;
    use eventbus_kafka::KafkaBackend;

    let pki = Pki::new("ca");
    let other = Pki::new("other-ca");
    let mut worst = Duration::ZERO;
    let l = match KafkaListeners::start(&pki).await {
        Ok(l) => l,
        Err(e) => return row.failures.push(e),
    };

    kafka_accepted(row, &l, &pki).await;
    kafka_refused(row, &mut worst, &l, &pki, &other).await;
    // Broker behaviour, recorded, not asserted: tansu's SASL PLAIN with each password.
    for (what, password) in [("wrong", WRONG), ("right", PASSWORD)] {
        let r = KafkaBackend::connect(l.sasl_as_alice("PLAIN", password)).await;
        row.notes.push(format!(
            "broker: SASL PLAIN with the {what} password: {}",
            match r {
                Ok(_) => "accepted".to_owned(),
                Err(e) => format!("refused ({:?})", e.kind()),
            }
        ));
    }
    row.detect_ms = Some(ms(worst));
}

/// The Kafka cases that must connect: one publish acked, directly and through the facade
/// alone; and a missing CA file, reported by the facade by its variable.
#[cfg(feature = "kafka")]
async fn kafka_accepted(row: &mut Row, l: &KafkaListeners, pki: &eventbus_brokers::tls::Pki) {
    let (tls, mtls, sasl_tls, proxy) = (&l.tls, &l.mtls, &l.sasl_tls, &l.sasl);
    let (client_cert, client_key) = pki.leaf("client", &["client"]);
    let mut with_cert = ssl(pki.ca());
    with_cert.push(("EVENTBUS_KAFKA_SSL_CERT", client_cert.display().to_string()));
    with_cert.push(("EVENTBUS_KAFKA_SSL_KEY", client_key.display().to_string()));
    let mut sasl_ssl = alice("sasl_ssl", "SCRAM-SHA-512", PASSWORD);
    sasl_ssl.push(("EVENTBUS_KAFKA_SSL_CA", pki.ca().display().to_string()));
    let accepted = [
        (
            "TLS with the right CA",
            tls.addr(),
            ssl(pki.ca()),
            "sec-tls",
        ),
        (
            "mutual TLS with a client certificate",
            mtls.addr(),
            with_cert,
            "sec-mtls",
        ),
        (
            "right password (SCRAM-SHA-512)",
            proxy.addr(),
            alice("sasl_plaintext", "SCRAM-SHA-512", PASSWORD),
            "sec-sasl",
        ),
        (
            "right password (SCRAM-SHA-256)",
            proxy.addr(),
            alice("sasl_plaintext", "SCRAM-SHA-256", PASSWORD),
            "sec-sasl256",
        ),
        (
            "SCRAM-SHA-512 inside TLS",
            sasl_tls.addr(),
            sasl_ssl,
            "sec-sasl-tls",
        ),
    ];
    for (what, addr, vars, topic) in accepted {
        connects_and_publishes(row, what, &addr.to_string(), &vars, topic).await;
    }
    // Through the facade alone, a CA file that does not exist is reported by the variable that
    // named it, never by its path.
    let missing = std::env::temp_dir().join("eventbus-missing-ca-5d1e.pem");
    match crate::facade_probe::probe(&tls.addr().to_string(), &ssl(&missing), "sec-no-ca").await {
        Ok(run) => {
            row.require(!run.ok, "facade: a CA file that does not exist connected");
            row.require(
                run.output.contains("EVENTBUS_KAFKA_SSL_CA") && !run.output.contains("5d1e"),
                format!("facade: a missing CA file reported as: {}", run.output),
            );
            row.notes
                .push(format!("facade, a missing CA file: {}", run.output));
        }
        Err(e) => row.failures.push(e),
    }
}

/// The Kafka cases that must be refused (see [`expect_refusal`]).
#[cfg(feature = "kafka")]
async fn kafka_refused(
    row: &mut Row,
    worst: &mut Duration,
    l: &KafkaListeners,
    pki: &eventbus_brokers::tls::Pki,
    other: &eventbus_brokers::tls::Pki,
) {
    use eventbus_core::ErrorKind;
    use eventbus_kafka::KafkaConfig;

    let (tls, mismatch, mtls, proxy) = (&l.tls, &l.mismatch, &l.mtls, &l.sasl);
    let ssl_config = |addr: std::net::SocketAddr, ca: &std::path::Path| {
        kafka_from_vars(&addr.to_string(), &ssl(ca)).expect("TLS settings")
    };
    let wrong = l.sasl_as_alice("SCRAM-SHA-512", WRONG);
    row.require(
        !format!("{wrong:?}").contains(WRONG),
        "the SASL password shows in the config's Debug",
    );
    let refusals: [KafkaRefusal<'_>; 5] = [
        (
            &|| tls.accepted(),
            None,
            Refusal::new(
                "wrong CA",
                ssl_config(tls.addr(), other.ca()),
                ErrorKind::Connect,
            ),
        ),
        // A plaintext client gets no answer it can parse from a TLS listener: it cannot tell
        // that from a broken broker, so a retryable Connect is the honest outcome here.
        (
            &|| tls.accepted(),
            Some(&|| tls.handshakes()),
            Refusal {
                retryable_ok: true,
                ..Refusal::new(
                    "plaintext client to a TLS listener",
                    KafkaConfig::new(tls.addr().to_string()).connect_timeout(REFUSAL_TIMEOUT),
                    ErrorKind::Connect,
                )
            },
        ),
        (
            &|| mismatch.accepted(),
            None,
            Refusal::new(
                "host name mismatch",
                ssl_config(mismatch.addr(), pki.ca()),
                ErrorKind::Connect,
            ),
        ),
        (
            &|| mtls.accepted(),
            None,
            Refusal::new(
                "mutual TLS without a client certificate",
                ssl_config(mtls.addr(), pki.ca()),
                ErrorKind::Connect,
            ),
        ),
        (
            &|| proxy.accepted(),
            None,
            Refusal {
                secrets: &[WRONG, PASSWORD],
                ..Refusal::new("wrong password (SCRAM-SHA-512)", wrong, ErrorKind::Auth)
            },
        ),
    ];
    for case in refusals {
        refused_kafka(row, worst, case).await;
    }
}

/// What a refused connect must look like: typed `want` (and not retryable unless
/// `retryable_ok`), within `timeout` + 1 s, no secret in its text, and no new connection to
/// the listener (`accepted` counts them) in the 2 s after the error.
async fn expect_refusal<C, F: Future<Output = Result<(), eventbus_core::Error>>>(
    row: &mut Row,
    worst: &mut Duration,
    accepted: &(dyn Fn() -> u64 + Sync),
    connect: F,
    case: &Refusal<'_, C>,
) {
    let Refusal {
        what,
        want,
        retryable_ok,
        secrets,
        ..
    } = *case;
    let timeout = REFUSAL_TIMEOUT;
    // This case's connections only: earlier cases may have used the same listener.
    let before = accepted();
    let t0 = Instant::now();
    let result = connect.await;
    let took = t0.elapsed();
    *worst = (*worst).max(took);
    // The client is gone when `connect` returns (librdkafka's instance is destroyed before the
    // error is handed back), but a TCP connection it opened just before may still wait in the
    // listener's backlog: let the listener accept those before counting what comes after.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let counted = accepted();
    let attempts = counted - before;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = accepted() - counted;
    match result {
        Ok(()) => row.failures.push(format!("{what}: connected")),
        Err(e) => {
            let text = format!("{e} {e:?}");
            row.notes.push(format!(
                "{what}: {:?} (retry {}) in {} ms, {attempts} connection attempt(s), {later} after the error",
                e.kind(),
                e.is_retryable(),
                ms(took)
            ));
            row.require(
                e.kind() == want,
                format!("{what}: kind {:?}, want {want:?}", e.kind()),
            );
            row.require(
                retryable_ok || !e.is_retryable(),
                format!("{what}: reported retryable"),
            );
            for s in secrets {
                row.require(!text.contains(s), format!("{what}: secret in the error"));
            }
        }
    }
    row.require(
        took <= timeout + Duration::from_secs(1),
        format!("{what}: took {} ms", ms(took)),
    );
    row.require(
        later == 0,
        format!("{what}: {later} reconnects after the error"),
    );
}

/// The connect timeout every refusal check uses.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(3);

/// A NATS case: the server, the URL scheme, and the configuration made from the URL.
#[cfg(feature = "nats")]
type NatsRefusal<'a> = (
    &'a eventbus_brokers::NatsServer,
    &'static str,
    Refusal<'a, &'a dyn Fn(String) -> eventbus_nats::NatsConfig>,
);

/// One refused NATS connect through a fresh counting proxy to the case's server (see
/// [`expect_refusal`]).
#[cfg(feature = "nats")]
async fn refused_connect(row: &mut Row, worst: &mut Duration, case: NatsRefusal<'_>) {
    let (server, scheme, c) = case;
    let upstream = ([127, 0, 0, 1], server.port()).into();
    let proxy = match crate::proxy::FaultProxy::start(upstream).await {
        Ok(p) => p,
        Err(e) => return row.failures.push(format!("{}: proxy: {e}", c.what)),
    };
    let url = format!("{scheme}://{}", proxy.addr());
    let connect =
        eventbus_nats::NatsBackend::connect((c.config)(url).connect_timeout(REFUSAL_TIMEOUT));
    expect_refusal(
        row,
        worst,
        &|| proxy.accepted(),
        async { connect.await.map(|_| ()) },
        &c,
    )
    .await;
}

/// The NATS servers of the security cases: TLS (certificate for localhost), TLS with a
/// certificate for another name, TLS requiring a client certificate, and one with user alice,
/// who may publish to `ok.>` but not `secret.>` (its config in the returned directory).
#[cfg(feature = "nats")]
#[allow(clippy::type_complexity)]
fn nats_servers(
    pki: &eventbus_brokers::tls::Pki,
) -> Result<
    (
        eventbus_brokers::NatsServer,
        eventbus_brokers::NatsServer,
        eventbus_brokers::NatsServer,
        eventbus_brokers::NatsServer,
        tempfile::TempDir,
    ),
    String,
> {
    use eventbus_brokers::{NatsOptions, NatsServer};
    let start = |args: Vec<String>| {
        NatsServer::start_with(NatsOptions {
            args,
            ..NatsOptions::default()
        })
        .map_err(|e| format!("nats-server: {e}"))
    };
    let names = ["localhost", "127.0.0.1"];
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let conf = dir.path().join("auth.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ user: alice, password: \"{PASSWORD}\", permissions: {{ publish: {{ allow: [\"ok.>\", \"secret.>\", \"$JS.API.>\"], deny: [\"secret.>\"] }}, subscribe: \">\" }} }} ] }}\n"
        ),
    )
    .map_err(|e| format!("auth config: {e}"))?;
    Ok((
        start(pki.nats_args(&names, false))?,
        start(pki.nats_args(&["other.example"], false))?,
        start(pki.nats_args(&names, true))?,
        start(vec!["-c".into(), conf.display().to_string()])?,
        dir,
    ))
}

#[cfg(feature = "nats")]
async fn security_nats(row: &mut Row) {
    use eventbus_brokers::tls::Pki;
    use eventbus_core::ErrorKind;
    use eventbus_nats::{NatsAuth, NatsConfig};

    let pki = Pki::new("ca");
    let other = Pki::new("other-ca");
    let mut worst = Duration::ZERO;
    let (tls, mismatch, mtls, auth, _dir) = match nats_servers(&pki) {
        Ok(s) => s,
        Err(e) => return row.failures.push(e),
    };
    type Config<'a> = &'a dyn Fn(String) -> NatsConfig;
    let wrong_ca: Config<'_> = &|u| NatsConfig::new(u).tls_root_certificates(other.ca());
    let right_ca: Config<'_> = &|u| NatsConfig::new(u).tls_root_certificates(pki.ca());
    let with = |password: &'static str| {
        move |u: String| {
            NatsConfig::new(u)
                .auth(NatsAuth::UserPassword {
                    user: "alice".into(),
                    password: password.into(),
                })
                .ack_timeout(Duration::from_secs(2))
        }
    };
    let wrong_password = with(WRONG);
    let wrong_password: Config<'_> = &wrong_password;
    let refusals: [NatsRefusal<'_>; 5] = [
        (
            &tls,
            "tls",
            Refusal::new("wrong CA", wrong_ca, ErrorKind::Connect),
        ),
        (
            &tls,
            "nats",
            Refusal::new("nats:// URL to a TLS server", wrong_ca, ErrorKind::Connect),
        ),
        (
            &mismatch,
            "tls",
            Refusal::new("host name mismatch", right_ca, ErrorKind::Connect),
        ),
        (
            &mtls,
            "tls",
            Refusal::new(
                "mutual TLS without a client certificate",
                right_ca,
                ErrorKind::Connect,
            ),
        ),
        (
            &auth,
            "nats",
            Refusal {
                secrets: &[WRONG, PASSWORD],
                ..Refusal::new("wrong password", wrong_password, ErrorKind::Auth)
            },
        ),
    ];
    for case in refusals {
        refused_connect(row, &mut worst, case).await;
    }

    denied_publish(row, with(PASSWORD)(auth.url())).await;
    row.detect_ms = Some(ms(worst));
}

/// With the right password (`config`), a publish the account may not make: not acked, then
/// refused at once; a permitted publish after it acked; the stream holds only that one.
#[cfg(feature = "nats")]
async fn denied_publish(row: &mut Row, config: eventbus_nats::NatsConfig) {
    use eventbus_core::ErrorKind;
    use eventbus_nats::NatsBackend;

    let nats = match NatsBackend::connect(config).await {
        Ok(n) => n,
        Err(e) => return row.failures.push(format!("right password: {e}")),
    };
    if let Err(e) = nats
        .ensure_stream(&eventbus_nats::StreamSpec::new("SEC", ["ok.>", "secret.>"]))
        .await
    {
        return row.failures.push(format!("stream: {e}"));
    }
    let p = match nats.sink().await.map_err(|e| e.to_string()).and_then(|s| {
        Batcher::new(
            s,
            BatchConfig::default().ack_timeout(Duration::from_secs(2)),
        )
        .map_err(|e| e.to_string())
    }) {
        Ok(p) => p,
        Err(e) => return row.failures.push(format!("publisher: {e}")),
    };
    let t0 = Instant::now();
    let first = match p
        .publish(eventbus_core::Message::new("secret.x", "no"))
        .await
    {
        Ok(a) => a.await,
        Err(e) => {
            return row
                .failures
                .push(format!("first denied publish refused early: {e}"));
        }
    };
    let first_ms = ms(t0.elapsed());
    row.require(!first.is_acked(), "a publish without permission was acked");
    let t0 = Instant::now();
    let again = p
        .publish(eventbus_core::Message::new("secret.x", "no"))
        .await;
    let again_ms = ms(t0.elapsed());
    match &again {
        Ok(_) => row
            .failures
            .push("a known-denied subject was admitted".into()),
        Err(e) => row.require(e.kind() == ErrorKind::Auth, format!("denied publish: {e}")),
    }
    let ok = match p.publish(eventbus_core::Message::new("ok.x", "yes")).await {
        Ok(a) => a.await.is_acked(),
        Err(_) => false,
    };
    row.require(ok, "a permitted publish after a denied one was not acked");
    let stored = nats
        .stream_state("SEC")
        .await
        .map(|s| s.messages)
        .unwrap_or(u64::MAX);
    row.require(
        stored == 1,
        format!("stream holds {stored}, want 1 (only the permitted message)"),
    );
    row.notes.push(format!(
        "publish without permission: first resolves {} in {first_ms} ms (the server \
         refuses asynchronously, without a reply), then refused at once ({again_ms} ms, {}); permitted \
         publish acked; stream holds {stored}",
        if first.is_unknown() { "unknown" } else { "failed" },
        again.err().map(|e| format!("{:?}", e.kind())).unwrap_or_default()
    ));
    let _ = p.close(Duration::from_secs(2)).await;
}
