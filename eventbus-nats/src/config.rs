//! Connection configuration.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use eventbus_core::backend::{BackendConfig, EnvTarget, EnvVar};
use eventbus_core::{Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::PublishMode;

/// How to authenticate. Secrets are redacted from `Debug`.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
#[non_exhaustive]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// User and password.
    UserPassword {
        /// User name.
        user: String,
        /// Password (secret).
        password: String,
    },
    /// Token (secret).
    Token {
        /// The token.
        token: String,
    },
    /// NKey seed (secret).
    NKey {
        /// The seed, `SU...`.
        seed: String,
    },
    /// A `.creds` file (JWT and seed).
    CredsFile {
        /// Path to the file.
        path: PathBuf,
    },
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            NatsAuth::Token { .. } => f.write_str("Token(<redacted>)"),
            NatsAuth::NKey { .. } => f.write_str("NKey(<redacted>)"),
            NatsAuth::CredsFile { path } => {
                f.debug_struct("CredsFile").field("path", path).finish()
            }
        }
    }
}

/// The environment variables [`NatsConfig::with_vars`] reads: the connection, its credentials,
/// and how sinks publish. The one list of them: the `eventbus` facade's docs and the README's
/// table are made from it.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar::new(
        "EVENTBUS_NATS_URL",
        EnvTarget::Field("url"),
        "server URL(s), comma separated: every seed of a cluster",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_USER",
        EnvTarget::Field("auth"),
        "user name; with `EVENTBUS_NATS_PASSWORD`",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_PASSWORD",
        EnvTarget::Field("auth"),
        "password; with `EVENTBUS_NATS_USER`",
    )
    .secret(),
    EnvVar::new("EVENTBUS_NATS_TOKEN", EnvTarget::Field("auth"), "token").secret(),
    EnvVar::new("EVENTBUS_NATS_NKEY", EnvTarget::Field("auth"), "NKey seed").secret(),
    EnvVar::new(
        "EVENTBUS_NATS_CREDS",
        EnvTarget::Field("auth"),
        "path of a `.creds` file (JWT)",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_TLS",
        EnvTarget::Field("tls_required"),
        "`true` / `1`: require TLS",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_CA",
        EnvTarget::Field("tls_root_certificates"),
        "path of root certificates (PEM) to trust",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_PUBLISH_MODE",
        EnvTarget::Field("publish_mode"),
        "`fast` (default), `async` or `atomic`",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_DEDUP",
        EnvTarget::Field("dedup"),
        "`true` (default) / `false`: send `Nats-Msg-Id`",
    ),
    EnvVar::new(
        "EVENTBUS_NATS_STREAM_REPLICAS",
        EnvTarget::Field("stream_replicas"),
        "replicas of streams the backend creates (1, 3, 5)",
    ),
];

/// Connection settings for [`NatsBackend`](crate::NatsBackend).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URL(s): one, or several seeds of a cluster comma separated
    /// (`nats://n1:4222,nats://n2:4222`); in TOML also a list. The client connects to one seed
    /// and learns the rest of the cluster from it. Default `nats://127.0.0.1:4222`.
    #[serde(deserialize_with = "string_or_list")]
    pub url: String,
    /// Credentials. Default none.
    pub auth: NatsAuth,
    /// Require TLS. Default `false` (a `tls://` URL also requires it).
    pub tls_required: bool,
    /// Extra root certificates (PEM) to trust. Default none.
    pub tls_root_certificates: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS. Default none.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// Time allowed for each seed at the initial connect (each address its host name resolves
    /// to): TCP, TLS and the server's handshake. Connect tries every seed once (in random order
    /// unless [`retain_seed_order`](Self::retain_seed_order)) and gives up after at most
    /// `connect_timeout` x seeds + 1 s. Default 5 s.
    #[serde(with = "eventbus_core::serde_millis")]
    pub connect_timeout: Duration,
    /// Try the seeds in the order given (nearest first, say) instead of a random order, at the
    /// initial connect and on reconnects. Default `false`: random, which spreads clients over a
    /// cluster.
    pub retain_seed_order: bool,
    /// How long a publish may hear nothing before the sink sends it again. Default 2 s. The
    /// batching engine's `ack_timeout` bounds a message's whole life; this bounds the wait on
    /// the wire: with de-duplication on, a publish that hears nothing for this long is sent
    /// again with the same id (that message then after twice as long, and so on) while the
    /// engine still waits, so a stream leader lost mid-publish costs a resend, not an
    /// `Unknown` outcome (the ack of a resent message that had been stored says `duplicate`).
    /// With the default, a SIGKILLed stream leader costs the election plus at most 2 s; a
    /// shorter value resends sooner, but sends again what a saturated server is only slow to
    /// ack (each copy dropped by its id, at the cost of the server's work).
    #[serde(with = "eventbus_core::serde_millis")]
    pub ack_timeout: Duration,
    /// How long to wait for a JetStream API reply (stream and consumer management, lookups)
    /// and for an ack awaited through the JetStream context (a dead letter's publish). Default
    /// 10 s: a request during an election may take a few seconds.
    #[serde(with = "eventbus_core::serde_millis")]
    pub request_timeout: Duration,
    /// async-nats's own limit of publishes awaiting acks. Default 262,144: set well above the
    /// engine's ACK window so that **our** window is the one that binds.
    pub max_ack_inflight: usize,
    /// Connection name shown by the server. Default `eventbus`.
    pub name: String,
    /// How [`Backend::sink`](eventbus_core::Backend::sink) publishes: `fast`, `async` or
    /// `atomic` (see [`PublishMode`]). Default `fast`.
    pub publish_mode: PublishMode,
    /// Send each message's id as `Nats-Msg-Id`, so the stream drops a retry it already stored
    /// (within its duplicate window). Default `true`.
    pub dedup: bool,
    /// Replicas of the streams [`Backend::ensure_topic`](eventbus_core::Backend::ensure_topic)
    /// creates (3 on a 3-node cluster for R3). Default 1.
    pub stream_replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            auth: NatsAuth::None,
            tls_required: false,
            tls_root_certificates: None,
            tls_client_cert: None,
            connect_timeout: Duration::from_secs(5),
            retain_seed_order: false,
            ack_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_ack_inflight: 262_144,
            name: "eventbus".into(),
            publish_mode: PublishMode::default(),
            dedup: true,
            stream_replicas: 1,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("auth", &self.auth)
            .field("tls_required", &self.tls_required)
            .field("connect_timeout", &self.connect_timeout)
            .field("retain_seed_order", &self.retain_seed_order)
            .field("ack_timeout", &self.ack_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_ack_inflight", &self.max_ack_inflight)
            .field("publish_mode", &self.publish_mode)
            .field("dedup", &self.dedup)
            .field("stream_replicas", &self.stream_replicas)
            .finish_non_exhaustive()
    }
}

/// A string, or a list of strings joined with `,`.
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom("invalid type, expected a URL string or a list of URL strings")
    })? {
        OneOrMany::One(s) => Ok(s),
        OneOrMany::Many(v) => Ok(v.join(",")),
    }
}

/// Remove `user:password@` from URLs.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}<redacted>@{}", &u[..s + 3], &u[at + 1..]),
            // `user:pass@host:port` without a scheme is a URL too (async-nats adds `nats://`).
            (None, Some(at)) => format!("<redacted>@{}", &u[at + 1..]),
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl NatsConfig {
    /// Defaults with `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            ..Default::default()
        }
    }
    /// Set credentials.
    pub fn auth(mut self, auth: NatsAuth) -> Self {
        self.auth = auth;
        self
    }
    /// Set how long a publish may hear nothing before it is sent again (see
    /// [`ack_timeout`](Self::ack_timeout)).
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self
    }
    /// Set the JetStream API timeout (see [`request_timeout`](Self::request_timeout)).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// Set `publish_mode` (what [`Backend::sink`](eventbus_core::Backend::sink) uses).
    pub fn publish_mode(mut self, mode: PublishMode) -> Self {
        self.publish_mode = mode;
        self
    }
    /// Set `dedup` (`Nats-Msg-Id` on every message).
    pub fn dedup(mut self, on: bool) -> Self {
        self.dedup = on;
        self
    }
    /// Set `stream_replicas`.
    pub fn stream_replicas(mut self, n: usize) -> Self {
        self.stream_replicas = n;
        self
    }
    /// Set the time allowed for each seed at the initial connect (see
    /// [`connect_timeout`](Self::connect_timeout)).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// Try the seeds in the order given (see [`retain_seed_order`](Self::retain_seed_order)).
    pub fn retain_seed_order(mut self, on: bool) -> Self {
        self.retain_seed_order = on;
        self
    }
    /// Require TLS (a `tls://` URL also requires it; a server that requires TLS gets it either
    /// way: there is no plaintext fallback).
    pub fn tls_required(mut self, on: bool) -> Self {
        self.tls_required = on;
        self
    }
    /// Trust the CA certificates in this PEM file (in addition to the system's roots).
    pub fn tls_root_certificates(mut self, pem: impl Into<PathBuf>) -> Self {
        self.tls_root_certificates = Some(pem.into());
        self
    }
    /// Present this client certificate and key (PEM files) for mutual TLS.
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_client_cert = Some((cert.into(), key.into()));
        self
    }

    /// The server addresses of [`url`](Self::url), each parsed. A bad entry is a `Config`
    /// error naming the entry (credentials redacted) and its position.
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, Error> {
        let entries: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if entries.is_empty() {
            return Err(Error::new(ErrorKind::Config, "nats url: no server given").permanent());
        }
        entries
            .iter()
            .enumerate()
            .map(|(i, u)| {
                u.parse::<async_nats::ServerAddr>().map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "nats url: server {} of {} ({}) is invalid: {e}",
                            i + 1,
                            entries.len(),
                            redact_url(u)
                        ),
                    )
                    .permanent()
                })
            })
            .collect()
    }

    /// Read the variables of [`ENV_VARS`] (`EVENTBUS_NATS_URL`, credentials, TLS, publish mode)
    /// on top of the defaults.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_iter(std::env::vars())
    }

    /// Like [`NatsConfig::from_env`], from any `(key, value)` pairs.
    #[allow(clippy::should_implement_trait)] // fallible, unlike FromIterator
    pub fn from_iter<K: AsRef<str>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, Error> {
        NatsConfig::default().with_vars(vars)
    }

    /// Apply the [`ENV_VARS`] among `vars` on top of this config (others are ignored). A user
    /// needs its password in the same set; errors name the variable, never its value.
    pub fn with_vars<K: AsRef<str>, V: Into<String>>(
        self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, Error> {
        let mut c = self;
        let (mut user, mut password) = (None, None);
        for (k, v) in vars {
            let v = v.into();
            match k.as_ref() {
                "EVENTBUS_NATS_URL" => c.url = v,
                "EVENTBUS_NATS_USER" => user = Some(v),
                "EVENTBUS_NATS_PASSWORD" => password = Some(v),
                "EVENTBUS_NATS_TOKEN" => c.auth = NatsAuth::Token { token: v },
                "EVENTBUS_NATS_NKEY" => c.auth = NatsAuth::NKey { seed: v },
                "EVENTBUS_NATS_CREDS" => c.auth = NatsAuth::CredsFile { path: v.into() },
                "EVENTBUS_NATS_TLS" => {
                    c.tls_required = !v.is_empty() && flag("EVENTBUS_NATS_TLS", &v)?
                }
                "EVENTBUS_NATS_CA" => c.tls_root_certificates = Some(v.into()),
                "EVENTBUS_NATS_PUBLISH_MODE" => {
                    // The names the `[nats]` TOML section takes.
                    use serde::Deserialize;
                    use serde::de::{IntoDeserializer, value::Error as Unnamed};
                    c.publish_mode = PublishMode::deserialize(v.trim().into_deserializer())
                        .map_err(|_: Unnamed| {
                            Error::new(
                                ErrorKind::Config,
                                "EVENTBUS_NATS_PUBLISH_MODE must be fast, async or atomic",
                            )
                        })?
                }
                "EVENTBUS_NATS_DEDUP" => c.dedup = flag("EVENTBUS_NATS_DEDUP", v.trim())?,
                "EVENTBUS_NATS_STREAM_REPLICAS" => {
                    c.stream_replicas = v.trim().parse().map_err(|_| {
                        Error::new(
                            ErrorKind::Config,
                            "EVENTBUS_NATS_STREAM_REPLICAS must be a positive integer",
                        )
                    })?
                }
                _ => {}
            }
        }
        match (user, password) {
            (Some(user), Some(password)) => c.auth = NatsAuth::UserPassword { user, password },
            (None, None) => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "EVENTBUS_NATS_USER and EVENTBUS_NATS_PASSWORD must be set together",
                ));
            }
        }
        Ok(c)
    }
}

impl BackendConfig for NatsConfig {
    type Backend = crate::NatsBackend;
    const NAME: &'static str = "nats";
    const ENV: &'static [EnvVar] = ENV_VARS;

    fn with_vars(self, vars: Vec<(String, String)>) -> Result<Self, Error> {
        NatsConfig::with_vars(self, vars)
    }

    async fn connect(self) -> Result<crate::NatsBackend, Error> {
        crate::NatsBackend::connect(self).await
    }
}

/// `1`/`true` or `0`/`false`, the value of variable `var`; the error names the variable, never
/// the value.
fn flag(var: &str, v: &str) -> Result<bool, Error> {
    match v {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(Error::new(
            ErrorKind::Config,
            format!("{var} must be true or false"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let c =
            NatsConfig::new("nats://alice:s3cret@127.0.0.1:4222").auth(NatsAuth::UserPassword {
                user: "alice".into(),
                password: "hunter2".into(),
            });
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2") && !d.contains("s3cret"), "{d}");
        assert!(d.contains("alice"));
        let t = format!(
            "{:?}",
            NatsAuth::Token {
                token: "tok-123".into()
            }
        );
        assert!(!t.contains("tok-123"));
        let n = format!(
            "{:?}",
            NatsAuth::NKey {
                seed: "SUAB".into()
            }
        );
        assert!(!n.contains("SUAB"));
    }

    #[test]
    fn seed_lists_parse_and_bad_entries_are_named() {
        let c = NatsConfig::new("nats://127.0.0.1:4001, nats://127.0.0.1:4002,tls://h3:4003");
        let servers = c.servers().expect("three seeds");
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[1].port(), 4002);
        let e = NatsConfig::new("nats://127.0.0.1:4001,nats://bob:pw-secret@h:notaport")
            .servers()
            .unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(text.contains("server 2 of 2"), "{text}");
        assert!(!text.contains("pw-secret"), "{text}");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(NatsConfig::new(" , ").servers().is_err());
        // Without a scheme too.
        let e = NatsConfig::new("nats://127.0.0.1:4001,bob:pw-secret@h:notaport")
            .servers()
            .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("pw-secret"), "{e}");
        let c = NatsConfig::new("bob:pw-secret@h:4222");
        assert!(!format!("{c:?}").contains("pw-secret"));
    }

    #[test]
    fn from_iter_reads_and_validates() {
        let c = NatsConfig::from_iter([
            ("EVENTBUS_NATS_URL", "nats://h:1"),
            ("EVENTBUS_NATS_USER", "u"),
            ("EVENTBUS_NATS_PASSWORD", "p"),
        ])
        .unwrap();
        assert_eq!(c.url, "nats://h:1");
        assert!(matches!(c.auth, NatsAuth::UserPassword { .. }));
        let e = NatsConfig::from_iter([("EVENTBUS_NATS_USER", "u")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(NatsConfig::from_iter([("EVENTBUS_NATS_TLS", "maybe")]).is_err());
        let c = NatsConfig::from_iter([
            ("EVENTBUS_NATS_PUBLISH_MODE", "atomic"),
            ("EVENTBUS_NATS_DEDUP", "false"),
            ("EVENTBUS_NATS_STREAM_REPLICAS", "3"),
        ])
        .unwrap();
        assert_eq!(
            (c.publish_mode, c.dedup, c.stream_replicas),
            (PublishMode::Atomic, false, 3)
        );
        let e = NatsConfig::from_iter([("EVENTBUS_NATS_PUBLISH_MODE", "turbo")]).unwrap_err();
        assert!(e.to_string().contains("EVENTBUS_NATS_PUBLISH_MODE"), "{e}");
        assert!(!e.to_string().contains("turbo"), "{e}");
    }
}
