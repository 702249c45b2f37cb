//! Config errors never show a value from the input: every error path (TOML syntax, unknown
//! field, unknown variant, wrong type, the environment overlay) is fed a secret on the
//! offending line, and the secret must not appear in the error's `Display`, `Debug`, source
//! chain, or any log line written while loading.

use std::error::Error as _;
use std::io::Write;
use std::sync::Arc;

use eventbus::BusConfig;
use eventbus_core::{Error, ErrorKind};

const SECRET: &str = "hunter2-secret";

/// Every text the error can show.
fn all_text(e: &Error) -> String {
    let mut text = format!("{e} {e:?} {e:#?}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    text
}

#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Run `f` with every tracing event at TRACE captured; returns what it returned and the log.
fn with_log<T>(f: impl FnOnce() -> T) -> (T, String) {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let log = String::from_utf8_lossy(&out.0.lock()).into_owned();
    (r, log)
}

fn assert_no_secret(what: &str, r: Result<BusConfig, Error>, log: &str, names: &[&str]) {
    let e = r.expect_err(what);
    eprintln!("{what}: {e}");
    assert_eq!(e.kind(), ErrorKind::Config, "{what}: {e}");
    assert!(!e.is_retryable(), "{what}: a config error is permanent");
    let text = all_text(&e);
    assert!(!text.contains(SECRET), "{what}: the secret shows: {text}");
    assert!(
        !log.contains(SECRET),
        "{what}: the secret was logged: {log}"
    );
    for n in names {
        assert!(
            text.contains(n),
            "{what}: the error does not name {n:?}: {e}"
        );
    }
}

#[test]
fn toml_errors_never_show_values() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "syntax error (unterminated string)",
            format!("[nats]\nauth = {{ type = \"token\", token = \"{SECRET} }}\n"),
            &["line 2"],
        ),
        (
            "syntax error (bare value)",
            format!("[nats]\nurl = {SECRET}\n"),
            &["line 2"],
        ),
        (
            "unknown variant (the README's inline auth form, misspelled)",
            format!(
                "[nats]\nauth = {{ type = \"user_pasword\", user = \"svc\", password = \"{SECRET}\" }}\n"
            ),
            &["nats.auth", "user_password"],
        ),
        (
            "unknown field next to a secret",
            format!("[nats]\nauth = {{ type = \"token\", tokn = \"{SECRET}\" }}\n"),
            &["nats.auth"],
        ),
        (
            "unknown variant whose value is the secret",
            format!("backend = \"{SECRET}\"\n"),
            &["backend", "nats"],
        ),
        (
            "wrong type",
            format!("[batch]\nmax_in_flight = \"{SECRET}\"\n"),
            &["batch.max_in_flight"],
        ),
        (
            "wrong type for a table",
            format!("nats = \"{SECRET}\"\n"),
            &["nats"],
        ),
    ];
    for (what, text, names) in cases {
        let (r, log) = with_log(|| BusConfig::from_toml(text));
        assert_no_secret(what, r, &log, names);
    }
}

/// (what is tried, the variables, the name the error must show).
type EnvCase = (&'static str, Vec<(&'static str, String)>, &'static str);

#[test]
fn environment_errors_name_the_variable_never_the_value() {
    let cases: &[EnvCase] = &[
        (
            "unknown backend",
            vec![("EVENTBUS_BACKEND", SECRET.to_owned())],
            "EVENTBUS_BACKEND",
        ),
        (
            "not an integer",
            vec![("EVENTBUS_BATCH_MAX_IN_FLIGHT", SECRET.to_owned())],
            "EVENTBUS_BATCH_MAX_IN_FLIGHT",
        ),
        (
            "not a boolean",
            vec![("EVENTBUS_NATS_TLS", SECRET.to_owned())],
            "EVENTBUS_NATS_TLS",
        ),
        (
            "a variable for no field",
            vec![("EVENTBUS_NATS_PASSWRD", SECRET.to_owned())],
            "EVENTBUS_NATS_PASSWRD",
        ),
        (
            "a password without its user",
            vec![("EVENTBUS_NATS_PASSWORD", SECRET.to_owned())],
            "EVENTBUS_NATS_USER",
        ),
    ];
    for (what, vars, name) in cases {
        let (r, log) = with_log(|| BusConfig::default().with_vars(vars.clone()));
        assert_no_secret(what, r, &log, &[name]);
    }
}

#[test]
fn reading_a_file_never_shows_its_contents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bus.toml");
    std::fs::write(
        &path,
        format!("[nats]\nauth = {{ type = \"token\", tokn = \"{SECRET}\" }}\n"),
    )
    .expect("write");
    let (r, log) = with_log(|| BusConfig::from_file(&path));
    assert_no_secret("file", r, &log, &["nats.auth"]);
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_credentials_come_from_the_environment_redacted() {
    let cfg = BusConfig::from_toml("backend = \"kafka\"")
        .expect("config")
        .with_vars([
            ("EVENTBUS_KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("EVENTBUS_KAFKA_SASL_USERNAME", "svc"),
            ("EVENTBUS_KAFKA_SASL_PASSWORD", SECRET),
        ])
        .expect("overlay");
    assert_eq!(cfg.kafka.brokers, "k1:9092,k2:9092");
    assert_eq!(
        cfg.kafka.options.get("sasl.password").map(String::as_str),
        Some(SECRET)
    );
    assert_eq!(
        cfg.kafka.options.get("sasl.mechanism").map(String::as_str),
        Some("SCRAM-SHA-512")
    );
    let debug = format!("{cfg:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    let (r, log) =
        with_log(|| BusConfig::default().with_vars([("EVENTBUS_KAFKA_SECURITY_PROTOCOL", SECRET)]));
    assert_no_secret(
        "bad protocol",
        r,
        &log,
        &["EVENTBUS_KAFKA_SECURITY_PROTOCOL"],
    );
}
