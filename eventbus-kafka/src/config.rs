//! Producer configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use eventbus_core::backend::{BackendConfig, EnvTarget, EnvVar};
use serde::{Deserialize, Serialize};

/// Settings for [`KafkaBackend`](crate::KafkaBackend). Secrets passed through `options`
/// (SASL passwords, key material) are redacted from `Debug`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// `client.id`. Default `eventbus`.
    pub client_id: String,
    /// librdkafka's own batching delay (`linger.ms`). Default 5 ms. The eventbus engine hands
    /// messages over at once (its linger stays 0 for Kafka), so this is the only linger: no
    /// double buffering.
    #[serde(with = "eventbus_core::serde_millis")]
    pub linger: Duration,
    /// `message.timeout.ms`: how long librdkafka retries a message. Default 30 s. Keep it at or
    /// below the engine's `ack_timeout` so the engine never gives up first.
    #[serde(with = "eventbus_core::serde_millis")]
    pub message_timeout: Duration,
    /// Idempotent producer (`enable.idempotence`, implies `acks=all`). Default `true`.
    pub idempotence: bool,
    /// Largest message accepted (`message.max.bytes`). Default 1,000,000.
    pub max_message_bytes: usize,
    /// Connect / metadata timeout. Default 10 s.
    #[serde(with = "eventbus_core::serde_millis")]
    pub connect_timeout: Duration,
    /// How long a publish to a topic the cluster does not know waits for it to appear before
    /// it fails with `Rejected` (`topic.metadata.propagation.max.ms`). Default 3 s (librdkafka's
    /// own default, 30 s, made an unknown topic look like a hang).
    #[serde(with = "eventbus_core::serde_millis")]
    pub unknown_topic_timeout: Duration,
    /// Most bytes a subscriber's librdkafka client fetches ahead of the handler
    /// (`queued.max.messages.kbytes` and `fetch.max.bytes`; a single message larger than this
    /// is still fetched). Default 4 MiB. librdkafka's own default, 64 MiB plus up to 50 MiB per
    /// fetch in flight, let a slow consumer buffer a whole backlog (measured: +55 MiB RSS for a
    /// 39 MiB backlog with `prefetch` 64); `SubscribeSpec::prefetch` bounds the deliveries
    /// handed to the handler on top of this.
    ///
    /// The bound costs a draining consumer throughput against rdkafka left at its defaults
    /// (`cargo xtask bench`, 200,000 x 108 B backlog, tansu memory engine, medians of 5 and 7 repetitions): at
    /// 4 MiB the SDK drains at 0.78x of it (146.0k vs 186.4k msg/s); **16 MiB** reaches 0.96x
    /// (182.3k vs 190.7k) and lets a slow consumer's process grow by 28.8 MiB instead of 9.8 MiB
    /// (`cargo xtask reliability --scenario slow-consumer`). Raise it for consumers that drain
    /// backlogs and keep up; keep it for many subscriptions per process or slow handlers.
    pub consumer_buffer_bytes: usize,
    /// Any librdkafka property, applied last (escape hatch), e.g. `security.protocol`.
    ///
    /// Every client starts from `reconnect.backoff.max.ms=2000` (librdkafka's own default is
    /// 10 s; raised to `reconnect.backoff.ms` if that is set higher): while a broker is away,
    /// reconnect attempts are at most 2 s apart.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "eventbus".into(),
            linger: Duration::from_millis(5),
            message_timeout: Duration::from_secs(30),
            idempotence: true,
            max_message_bytes: 1_000_000,
            connect_timeout: Duration::from_secs(10),
            unknown_topic_timeout: Duration::from_secs(3),
            consumer_buffer_bytes: 4 << 20,
            options: BTreeMap::new(),
        }
    }
}

/// The environment variables [`KafkaConfig::with_vars`] reads: the bootstrap servers and the
/// security settings, which set librdkafka properties. The one list of them: the `eventbus`
/// facade's docs and the README's table are made from it.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar::new(
        "EVENTBUS_KAFKA_BROKERS",
        EnvTarget::Field("brokers"),
        "bootstrap servers, `host:port` comma separated",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SECURITY_PROTOCOL",
        EnvTarget::ClientOption("security.protocol"),
        "`plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SASL_MECHANISM",
        EnvTarget::ClientOption("sasl.mechanism"),
        "`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER`",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SASL_USERNAME",
        EnvTarget::ClientOption("sasl.username"),
        "user name; with `EVENTBUS_KAFKA_SASL_PASSWORD`",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SASL_PASSWORD",
        EnvTarget::ClientOption("sasl.password"),
        "password",
    )
    .secret(),
    EnvVar::new(
        "EVENTBUS_KAFKA_SSL_CA",
        EnvTarget::ClientOption("ssl.ca.location"),
        "path of the CA certificate (PEM)",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SSL_CERT",
        EnvTarget::ClientOption("ssl.certificate.location"),
        "mutual TLS: path of the client certificate (PEM)",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SSL_KEY",
        EnvTarget::ClientOption("ssl.key.location"),
        "mutual TLS: path of the client key (PEM)",
    ),
    EnvVar::new(
        "EVENTBUS_KAFKA_SSL_KEY_PASSWORD",
        EnvTarget::ClientOption("ssl.key.password"),
        "password of the client key",
    )
    .secret(),
];

/// The `(variable, librdkafka property)` pairs among [`ENV_VARS`].
pub(crate) fn env_options() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENV_VARS.iter().filter_map(|v| match v.sets {
        EnvTarget::ClientOption(p) => Some((v.name, p)),
        _ => None,
    })
}

/// librdkafka's `reconnect.backoff.max.ms` on every client (its own default is 10 s).
///
/// Measured with `eventbus-reliability --scenario consume-kill` on tansu (the broker SIGKILLed
/// and restarted; time from the broker serving again to the live consumer's next delivery):
/// with a 3 s outage, 1.4-2.6 s at 2 s against 5.0-13.5 s at librdkafka's 10 s; with a 300 ms
/// outage, 0.29-0.55 s at 2 s (10 runs) against 0.27-2.6 s at 10 s. A 1 s cap was slower on
/// short outages (1.0-1.4 s in 13 runs).
const RECONNECT_BACKOFF_MAX_MS: u64 = 2_000;

/// The `security.protocol` values librdkafka knows (lower case).
const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

/// The `sasl.mechanism` values librdkafka knows. GSSAPI needs librdkafka built with Cyrus SASL
/// (rdkafka's `gssapi` feature, which this crate does not switch on).
const MECHANISMS: [&str; 5] = [
    "PLAIN",
    "SCRAM-SHA-256",
    "SCRAM-SHA-512",
    "GSSAPI",
    "OAUTHBEARER",
];

/// A librdkafka property as the user set it: the property (a key of `options`, `[kafka.options]`
/// in a config file) and the `EVENTBUS_KAFKA_*` variable that sets it, if one does. Never the
/// value.
pub(crate) fn named(property: &str) -> String {
    match env_options().find(|(_, p)| *p == property) {
        Some((var, _)) => format!("{var} (librdkafka `{property}`)"),
        None => format!("librdkafka `{property}`"),
    }
}

fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas"]
        .iter()
        .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opts: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if secret_key(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("linger", &self.linger)
            .field("message_timeout", &self.message_timeout)
            .field("idempotence", &self.idempotence)
            .field("options", &opts)
            .finish_non_exhaustive()
    }
}

impl KafkaConfig {
    /// Defaults with `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            ..Default::default()
        }
    }
    /// Set a librdkafka property (applied last).
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }
    /// Set librdkafka's linger.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }
    /// Set the connect / metadata timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// Set how long a publish to an unknown topic waits before failing.
    pub fn unknown_topic_timeout(mut self, d: Duration) -> Self {
        self.unknown_topic_timeout = d;
        self
    }
    /// Set `message.timeout.ms`.
    pub fn message_timeout(mut self, d: Duration) -> Self {
        self.message_timeout = d;
        self
    }
    /// Set how many bytes a subscriber fetches ahead (see
    /// [`consumer_buffer_bytes`](Self::consumer_buffer_bytes)).
    pub fn consumer_buffer_bytes(mut self, n: usize) -> Self {
        self.consumer_buffer_bytes = n;
        self
    }

    /// Read the variables of [`ENV_VARS`] (`EVENTBUS_KAFKA_BROKERS` and the security settings,
    /// which set librdkafka properties) from the environment, on top of the defaults. Secrets
    /// belong in the environment, not in a config file.
    ///
    /// Errors name the variable, never its value.
    ///
    /// ```
    /// use eventbus_kafka::KafkaConfig;
    /// let c = KafkaConfig::default().with_vars([
    ///     ("EVENTBUS_KAFKA_BROKERS", "k1:9092,k2:9092"),
    ///     ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
    ///     ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
    ///     ("EVENTBUS_KAFKA_SASL_USERNAME", "svc"),
    ///     ("EVENTBUS_KAFKA_SASL_PASSWORD", "s3cret"),
    /// ]).unwrap();
    /// assert_eq!(c.brokers, "k1:9092,k2:9092");
    /// assert!(!format!("{c:?}").contains("s3cret"));
    /// ```
    pub fn from_env() -> Result<Self, eventbus_core::Error> {
        KafkaConfig::default().with_vars(std::env::vars())
    }

    /// Apply the variables of [`ENV_VARS`] from any
    /// `(key, value)` pairs on top of this config; other keys are ignored.
    pub fn with_vars<K: AsRef<str>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, eventbus_core::Error> {
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.into());
            if k == "EVENTBUS_KAFKA_BROKERS" {
                self.brokers = v;
                continue;
            }
            if let Some((_, property)) = env_options().find(|(var, _)| *var == k) {
                self.options.insert(property.to_owned(), v);
            }
        }
        self.validate()?;
        Ok(self)
    }

    /// Check the security settings before librdkafka sees them: `security.protocol` and
    /// `sasl.mechanism` are ones librdkafka knows, SASL user and password come together, and a
    /// protocol or mechanism that needs OpenSSL is only asked of a build that has it (feature
    /// `ssl`, on by default). Errors name the variable and the property, never the value.
    /// [`KafkaBackend::connect`](crate::KafkaBackend::connect) checks this too.
    pub fn validate(&self) -> Result<(), eventbus_core::Error> {
        let invalid = |property: &str, why: &str| {
            eventbus_core::Error::new(
                eventbus_core::ErrorKind::Config,
                format!("{}: {why}", named(property)),
            )
            .with_backend("kafka")
            .permanent()
        };
        let get = |p: &str| self.options.get(p).map(|v| v.to_ascii_lowercase());
        let protocol = get("security.protocol");
        if let Some(p) = &protocol
            && !PROTOCOLS.contains(&p.as_str())
        {
            return Err(invalid(
                "security.protocol",
                "expected plaintext, ssl, sasl_plaintext or sasl_ssl",
            ));
        }
        let mechanism = get("sasl.mechanism");
        if let Some(m) = &mechanism
            && !MECHANISMS.iter().any(|known| known.eq_ignore_ascii_case(m))
        {
            return Err(invalid(
                "sasl.mechanism",
                "expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, GSSAPI or OAUTHBEARER",
            ));
        }
        if self.options.contains_key("sasl.username") != self.options.contains_key("sasl.password")
        {
            return Err(invalid(
                "sasl.username",
                "must be set together with `sasl.password` (EVENTBUS_KAFKA_SASL_PASSWORD)",
            ));
        }
        if !cfg!(feature = "ssl") {
            if let Some(p) = protocol.filter(|p| p.ends_with("ssl")) {
                return Err(invalid(
                    "security.protocol",
                    &format!(
                        "{p} needs librdkafka built with OpenSSL: enable the `ssl` feature of \
                         eventbus-kafka (on by default; the `eventbus` facade's `kafka` feature \
                         includes it)"
                    ),
                ));
            }
            if let Some(m) = mechanism.filter(|m| m.starts_with("scram")) {
                return Err(invalid(
                    "sasl.mechanism",
                    &format!(
                        "{} needs librdkafka built with OpenSSL: enable the `ssl` feature of \
                         eventbus-kafka (on by default; the `eventbus` facade's `kafka` feature \
                         includes it)",
                        m.to_ascii_uppercase()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn client_config(&self) -> rdkafka::ClientConfig {
        self.with_options(self.base_config())
    }

    /// What every client of this config shares: the brokers, the client id and the reconnect
    /// back-off.
    fn base_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // librdkafka doubles its reconnect back-off up to 10 s, so a broker that takes a
            // few seconds to restart was reached again up to 10 s after it served.
            .set("reconnect.backoff.max.ms", self.reconnect_backoff_max());
        c
    }

    /// [`RECONNECT_BACKOFF_MAX_MS`], or the user's `reconnect.backoff.ms` if that is longer:
    /// librdkafka refuses a configuration whose first back-off exceeds the cap.
    fn reconnect_backoff_max(&self) -> String {
        self.options
            .get("reconnect.backoff.ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(RECONNECT_BACKOFF_MAX_MS, |first| {
                first.max(RECONNECT_BACKOFF_MAX_MS)
            })
            .to_string()
    }

    /// `c` with the user's `options` applied last (they win over everything set before).
    fn with_options(&self, mut c: rdkafka::ClientConfig) -> rdkafka::ClientConfig {
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// A consumer for `group`: no auto-commit and no automatic offset store (the subscription
    /// commits the acked prefix itself), partition EOF events off.
    pub(crate) fn consumer_config(&self, group: &str, earliest: bool) -> rdkafka::ClientConfig {
        let mut c = self.base_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A member that vanished without leaving is evicted after 10 s, not 45 s.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .set(
                "auto.offset.reset",
                if earliest { "earliest" } else { "latest" },
            )
            // Bounded read-ahead: the queue of prefetched messages and each fetch response.
            .set(
                "queued.max.messages.kbytes",
                (self.consumer_buffer_bytes / 1024).max(1).to_string(),
            )
            .set(
                "fetch.max.bytes",
                self.consumer_buffer_bytes.max(1024).to_string(),
            )
            // With a bounded queue, librdkafka's default 1 s back-off after the queue was full
            // throttled a draining consumer to ~1k msg/s; retry the fetch after 10 ms instead.
            .set("fetch.queue.backoff.ms", "10");
        self.with_options(c)
    }

    pub(crate) fn producer_config(&self) -> rdkafka::ClientConfig {
        let mut c = self.base_config();
        c.set(
            "enable.idempotence",
            if self.idempotence { "true" } else { "false" },
        )
        .set("acks", "all")
        .set("linger.ms", self.linger.as_millis().to_string())
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        // librdkafka's queue far above the engine's window: ours is the one that binds.
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .set(
            "message.timeout.ms",
            self.message_timeout.as_millis().to_string(),
        )
        .set("message.max.bytes", self.max_message_bytes.to_string())
        .set(
            "topic.metadata.propagation.max.ms",
            self.unknown_topic_timeout.as_millis().to_string(),
        );
        self.with_options(c)
    }
}

impl BackendConfig for KafkaConfig {
    type Backend = crate::KafkaBackend;
    const NAME: &'static str = "kafka";
    const ENV: &'static [EnvVar] = ENV_VARS;

    fn with_vars(self, vars: Vec<(String, String)>) -> Result<Self, eventbus_core::Error> {
        KafkaConfig::with_vars(self, vars)
    }

    fn validate(&self) -> Result<(), eventbus_core::Error> {
        KafkaConfig::validate(self)
    }

    async fn connect(self) -> Result<crate::KafkaBackend, eventbus_core::Error> {
        crate::KafkaBackend::connect(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secret_options() {
        let c = KafkaConfig::new("h:1")
            .option("sasl.password", "hunter2")
            .option("security.protocol", "SASL_SSL");
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("SASL_SSL"));
    }

    #[test]
    fn environment_sets_security_options_and_never_shows_secrets() {
        let c = KafkaConfig::default()
            .with_vars([
                ("EVENTBUS_KAFKA_BROKERS", "a:1,b:2,c:3"),
                ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("EVENTBUS_KAFKA_SASL_USERNAME", "svc"),
                ("EVENTBUS_KAFKA_SASL_PASSWORD", "pw-secret-1"),
                ("EVENTBUS_KAFKA_SSL_CA", "/etc/ca.pem"),
                ("EVENTBUS_KAFKA_SSL_KEY_PASSWORD", "key-secret-2"),
                ("UNRELATED", "x"),
            ])
            .expect("vars");
        assert_eq!(c.brokers, "a:1,b:2,c:3");
        let p = c.producer_config();
        assert_eq!(p.get("sasl.password"), Some("pw-secret-1"));
        assert_eq!(p.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(p.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(
            c.consumer_config("g", true).get("security.protocol"),
            Some("SASL_SSL")
        );
        let d = format!("{c:?}");
        assert!(
            !d.contains("pw-secret-1") && !d.contains("key-secret-2"),
            "{d}"
        );
        assert!(d.contains("svc"), "{d}");

        for vars in [
            vec![("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "pw-secret-1")],
            vec![("EVENTBUS_KAFKA_SASL_PASSWORD", "pw-secret-1")],
        ] {
            let e = KafkaConfig::default().with_vars(vars).unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(!text.contains("pw-secret-1"), "{text}");
            assert!(text.contains("EVENTBUS_KAFKA_"), "{text}");
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config);
        }
    }

    /// Without OpenSSL, asking for TLS or SCRAM is a config error naming the feature, not
    /// librdkafka's refusal at connect.
    #[cfg(not(feature = "ssl"))]
    #[test]
    fn build_without_ssl_refuses_tls_and_scram_by_name() {
        for (var, value) in [
            ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ] {
            let e = KafkaConfig::default()
                .with_vars([(var, value)])
                .expect_err("needs OpenSSL");
            assert!(e.to_string().contains(var), "{e}");
            assert!(e.to_string().contains("`ssl` feature"), "{e}");
        }
    }

    #[test]
    fn security_settings_are_checked_by_the_variable_that_set_them() {
        for (var, value) in [
            ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-1024-pw-secret"),
            ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "tls-pw-secret"),
        ] {
            let e = KafkaConfig::default()
                .with_vars([(var, value)])
                .expect_err("an unknown value");
            let text = format!("{e} {e:?}");
            assert!(text.contains(var), "{text}");
            assert!(!text.contains("pw-secret"), "{text}");
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config);
        }
        // Every mechanism librdkafka knows, in any case.
        for m in ["PLAIN", "scram-sha-256", "SCRAM-SHA-512", "OAUTHBEARER"] {
            KafkaConfig::default()
                .with_vars([("EVENTBUS_KAFKA_SASL_MECHANISM", m)])
                .unwrap_or_else(|e| panic!("{m}: {e}"));
        }
        // The same checks hold for options set in code or a config file.
        let e = KafkaConfig::default()
            .option("sasl.mechanism", "NOPE")
            .validate()
            .expect_err("unknown mechanism");
        assert!(e.to_string().contains("sasl.mechanism"), "{e}");
    }

    /// TLS and SCRAM need librdkafka with OpenSSL (feature `ssl`, on by default): with it, the
    /// settings the docs show are accepted as they are.
    #[cfg(feature = "ssl")]
    #[test]
    fn ssl_build_accepts_tls_and_scram() {
        let c = KafkaConfig::default()
            .with_vars([
                ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
                ("EVENTBUS_KAFKA_SASL_USERNAME", "svc"),
                ("EVENTBUS_KAFKA_SASL_PASSWORD", "pw"),
            ])
            .expect("valid");
        c.client_config()
            .create::<rdkafka::consumer::BaseConsumer>()
            .expect("librdkafka with OpenSSL takes sasl_ssl and SCRAM");
    }

    #[test]
    fn reconnect_backoff_is_capped_and_overridable() {
        let c = KafkaConfig::new("h:1");
        for cfg in [
            c.client_config(),
            c.consumer_config("g", true),
            c.producer_config(),
        ] {
            assert_eq!(
                cfg.get("reconnect.backoff.max.ms"),
                Some(RECONNECT_BACKOFF_MAX_MS.to_string().as_str())
            );
        }
        let c = KafkaConfig::new("h:1").option("reconnect.backoff.max.ms", "5000");
        for cfg in [
            c.client_config(),
            c.consumer_config("g", true),
            c.producer_config(),
        ] {
            assert_eq!(cfg.get("reconnect.backoff.max.ms"), Some("5000"));
        }
        // A first back-off above the cap raises the cap with it: librdkafka refuses a client
        // whose reconnect.backoff.ms exceeds reconnect.backoff.max.ms.
        let c = KafkaConfig::new("h:1").option("reconnect.backoff.ms", "3000");
        assert_eq!(
            c.client_config().get("reconnect.backoff.max.ms"),
            Some("3000")
        );
        c.client_config()
            .create::<rdkafka::consumer::BaseConsumer>()
            .expect("librdkafka takes a first back-off of 3 s");
    }

    #[test]
    fn consumer_read_ahead_is_bounded_and_overridable() {
        let c = KafkaConfig::new("h:1").consumer_config("g", true);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("4096"));
        assert_eq!(c.get("fetch.max.bytes"), Some("4194304"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
        let c = KafkaConfig::new("h:1")
            .consumer_buffer_bytes(1 << 20)
            .consumer_config("g", true);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("1024"));
        // An explicit librdkafka option still wins.
        let c = KafkaConfig::new("h:1")
            .option("queued.max.messages.kbytes", "65536")
            .consumer_config("g", true);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("65536"));
        // The producer is not affected.
        assert_eq!(
            KafkaConfig::new("h:1")
                .producer_config()
                .get("queued.max.messages.kbytes"),
            None
        );
    }
}
