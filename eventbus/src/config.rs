//! [`BusConfig`]: the whole bus in one serde structure, from TOML and `EVENTBUS_*` variables.

use std::fmt;
use std::path::Path;

use eventbus_batch::BatchConfig;
use eventbus_core::handler::HandlerConfig;
use eventbus_core::{Error, ErrorKind, SinkLimits};
use serde::{Deserialize, Serialize};

/// Which backend the bus talks to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackendKind {
    /// NATS JetStream (feature `nats`).
    #[default]
    Nats,
    /// A Kafka-protocol cluster (feature `kafka`).
    Kafka,
    /// The in-process backend, for tests (feature `memory`).
    Memory,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Nats => "nats",
            BackendKind::Kafka => "kafka",
            BackendKind::Memory => "memory",
        })
    }
}

/// Everything a service configures: the backend and its connection, batching and the ACK
/// window, and the handler runtime (concurrency, ordering, retries). Every section has
/// defaults; unknown fields are errors. `Debug` redacts credentials.
///
/// ```
/// use eventbus::BusConfig;
/// let cfg = BusConfig::from_toml(r#"
///     backend = "nats"
///     [nats]
///     url = "nats://127.0.0.1:4222"
///     [batch]
///     max_in_flight = 10000
///     linger = 2          # milliseconds
///     [handler]
///     concurrency = 16
///     [handler.retry]
///     max_attempts = 5
/// "#).unwrap();
/// assert_eq!(cfg.batch.max_in_flight, 10_000);
/// // Environment variables win: EVENTBUS_<SECTION>_<FIELD>.
/// let cfg = cfg.with_vars([("EVENTBUS_BATCH_MAX_IN_FLIGHT", "500")]).unwrap();
/// assert_eq!(cfg.batch.max_in_flight, 500);
/// // A typo names the field.
/// let e = BusConfig::from_toml("[batch]\nmax_inflight = 1").unwrap_err();
/// assert!(e.to_string().contains("max_inflight"), "{e}");
/// ```
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BusConfig {
    /// The backend. Default `nats`.
    pub backend: BackendKind,
    /// NATS connection (used when `backend = "nats"`).
    #[cfg(feature = "nats")]
    pub nats: eventbus_nats::NatsConfig,
    /// Kafka connection (used when `backend = "kafka"`).
    #[cfg(feature = "kafka")]
    pub kafka: eventbus_kafka::KafkaConfig,
    /// Batching and the ACK window.
    pub batch: BatchConfig,
    /// The handler runtime.
    pub handler: HandlerConfig,
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BusConfig");
        d.field("backend", &self.backend);
        #[cfg(feature = "nats")]
        d.field("nats", &self.nats);
        #[cfg(feature = "kafka")]
        d.field("kafka", &self.kafka);
        d.field("batch", &self.batch)
            .field("handler", &self.handler)
            .finish()
    }
}

fn config_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, msg.into()).permanent()
}

impl BusConfig {
    /// Parse TOML. Errors name the field and position (`unknown field`, wrong type, ...).
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let cfg: BusConfig =
            toml::from_str(text).map_err(|e| config_error(format!("bus config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_error(format!("could not read bus config {}: {e}", path.display()))
        })?;
        Self::from_toml(&text)
    }

    /// The file (if any), then the process environment on top: what a service calls at start.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let base = match path {
            Some(p) => Self::from_file(p)?,
            None => BusConfig::default(),
        };
        base.with_vars(std::env::vars())
    }

    /// Apply `EVENTBUS_*` variables on top of this config: `EVENTBUS_BACKEND`, and
    /// `EVENTBUS_<SECTION>_<FIELD>` for any field of `nats`, `kafka`, `batch`, `handler`
    /// (nested tables join with `_`: `EVENTBUS_HANDLER_RETRY_MAX_ATTEMPTS`). Durations are
    /// milliseconds. NATS credentials use the short forms of
    /// [`NatsConfig::from_env`](https://docs.rs/eventbus-nats): `EVENTBUS_NATS_USER` with
    /// `EVENTBUS_NATS_PASSWORD`, `EVENTBUS_NATS_TOKEN`, `EVENTBUS_NATS_NKEY`,
    /// `EVENTBUS_NATS_CREDS`, and `EVENTBUS_NATS_TLS`, `EVENTBUS_NATS_CA`. A variable that
    /// names no field, or a value of the wrong type, is an error naming the variable (never
    /// its value). Other variables are ignored.
    pub fn with_vars<K: AsRef<str>, V: Into<String>>(
        self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, Error> {
        let mut tree =
            toml::Value::try_from(&self).map_err(|e| config_error(format!("bus config: {e}")))?;
        let root = tree.as_table_mut().expect("a struct serializes to a table");
        let mut nats_creds = Vec::new();
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.into());
            let Some(rest) = k.strip_prefix("EVENTBUS_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if matches!(
                rest.as_str(),
                "nats_url"
                    | "nats_user"
                    | "nats_password"
                    | "nats_token"
                    | "nats_nkey"
                    | "nats_creds"
                    | "nats_tls"
                    | "nats_ca"
            ) {
                nats_creds.push((k.to_owned(), v));
                continue;
            }
            if !set_path(root, &rest, &v).map_err(|why| config_error(format!("{k}: {why}")))? {
                return Err(config_error(format!(
                    "{k} names no bus config field (sections: backend, nats, kafka, batch, handler)"
                )));
            }
        }
        let mut cfg: BusConfig = tree
            .try_into()
            .map_err(|e| config_error(format!("bus config from environment: {e}")))?;
        #[cfg(feature = "nats")]
        if !nats_creds.is_empty() {
            let from_env = eventbus_nats::NatsConfig::from_iter(nats_creds.iter().cloned())?;
            for (k, _) in &nats_creds {
                match k.as_str() {
                    "EVENTBUS_NATS_URL" => cfg.nats.url = from_env.url.clone(),
                    "EVENTBUS_NATS_TLS" => cfg.nats.tls_required = from_env.tls_required,
                    "EVENTBUS_NATS_CA" => {
                        cfg.nats.tls_root_certificates = from_env.tls_root_certificates.clone()
                    }
                    _ => cfg.nats.auth = from_env.auth.clone(),
                }
            }
        }
        #[cfg(not(feature = "nats"))]
        if let Some((k, _)) = nats_creds.first() {
            return Err(config_error(format!(
                "{k} is set but this build has no NATS backend (feature `nats`)"
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check values (not only shapes): the chosen backend is compiled in, and the batch
    /// settings make sense. Errors name the field.
    pub fn validate(&self) -> Result<(), Error> {
        let built = match self.backend {
            BackendKind::Nats => cfg!(feature = "nats"),
            BackendKind::Kafka => cfg!(feature = "kafka"),
            BackendKind::Memory => cfg!(feature = "memory"),
        };
        if !built {
            return Err(config_error(format!(
                "backend = \"{}\", but this build does not include it (enable the `{}` feature)",
                self.backend, self.backend
            )));
        }
        self.batch.resolve(&SinkLimits::none())?;
        if self.handler.concurrency == 0 {
            return Err(config_error(
                "handler config: `concurrency` must be at least 1",
            ));
        }
        if self.handler.retry.max_attempts == 0 {
            return Err(config_error(
                "handler config: `retry.max_attempts` must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Set `path` (lowercase, `_`-joined) in `table` to `raw`, parsed as the type already there.
/// Returns `Ok(false)` when no field matches.
fn set_path(table: &mut toml::Table, path: &str, raw: &str) -> Result<bool, String> {
    // Longest key first: field names contain '_' too (`max_in_flight`).
    let mut keys: Vec<String> = table.keys().cloned().collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
    for key in keys {
        if path == key {
            let slot = table.get_mut(&key).expect("key listed");
            *slot = parse_like(slot, raw).map_err(|t| format!("expected {t}"))?;
            return Ok(true);
        }
        if let Some(rest) = path.strip_prefix(&format!("{key}_"))
            && let Some(toml::Value::Table(inner)) = table.get_mut(&key)
            && set_path(inner, rest, raw)?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn parse_like(current: &toml::Value, raw: &str) -> Result<toml::Value, &'static str> {
    use toml::Value as V;
    Ok(match current {
        V::Integer(_) => V::Integer(raw.trim().parse().map_err(|_| "an integer")?),
        V::Float(_) => V::Float(raw.trim().parse().map_err(|_| "a number")?),
        V::Boolean(_) => V::Boolean(match raw.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => return Err("true or false"),
        }),
        V::String(_) => V::String(raw.to_owned()),
        _ => return Err("a table (set its fields one by one)"),
    })
}
