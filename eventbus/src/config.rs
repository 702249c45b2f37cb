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

/// Describe a serde error at `path` without any value from the input: configs hold secrets,
/// and serde's own messages quote the offending value (`unknown variant `...``, `invalid type:
/// string "..."`). What stays: the field path, field and variant *names*, and the expected form.
fn describe(path: &str, msg: &str) -> String {
    let at = if path.is_empty() || path == "." {
        String::new()
    } else {
        format!("`{path}`: ")
    };
    // serde's `Expected` texts (type names, variant and field lists) come from our own types.
    let expected = msg
        .rfind(", expected ")
        .map(|i| &msg[i + ", expected ".len()..])
        .filter(|e| !e.is_empty());
    let with_expected = |what: &str| match expected {
        Some(e) => format!("{at}{what}, expected {e}"),
        None => format!("{at}{what}"),
    };
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        // The unknown name is a key the user typed, not a value.
        let name = rest.split(", expected").next().unwrap_or(rest);
        return with_expected(&format!("unknown field {name}"));
    }
    if msg.starts_with("missing field ") {
        return format!("{at}{msg}");
    }
    if msg.starts_with("unknown variant ") {
        return with_expected("unknown variant (value not shown)");
    }
    if msg.starts_with("invalid type: ") {
        return with_expected("wrong type (value not shown)");
    }
    if msg.starts_with("invalid length ") {
        return with_expected("wrong number of items");
    }
    with_expected("invalid value (not shown)")
}

/// `line L, column C` of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> String {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

/// Deserialize a bus config from `de`, tracking the field path for errors.
fn from_deserializer<'de, D>(de: D) -> Result<BusConfig, (String, D::Error)>
where
    D: serde::Deserializer<'de>,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        (path, e.into_inner())
    })
}

impl BusConfig {
    /// Parse TOML. Errors name the field path, the position and the expected form, never the
    /// value found there (it may be a secret): `unknown field`, `unknown variant`, wrong type,
    /// a syntax error's line and column.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let at = e.span().map(|s| line_col(text, s.start));
            config_error(format!(
                "bus config: TOML syntax error{} (text not shown)",
                at.map(|a| format!(" at {a}")).unwrap_or_default()
            ))
        })?;
        let cfg = from_deserializer(de).map_err(|(path, e)| {
            let at = e
                .span()
                .map(|s| format!(" (at {})", line_col(text, s.start)))
                .unwrap_or_default();
            config_error(format!("bus config: {}{at}", describe(&path, e.message())))
        })?;
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
    /// milliseconds. The NATS backend reads its own variables (`eventbus_nats::ENV_VARS`):
    /// `EVENTBUS_NATS_URL`, `EVENTBUS_NATS_USER` with `EVENTBUS_NATS_PASSWORD`,
    /// `EVENTBUS_NATS_TOKEN`, `EVENTBUS_NATS_NKEY`, `EVENTBUS_NATS_CREDS`, `EVENTBUS_NATS_TLS`,
    /// `EVENTBUS_NATS_CA`, `EVENTBUS_NATS_PUBLISH_MODE`, `EVENTBUS_NATS_DEDUP`,
    /// `EVENTBUS_NATS_STREAM_REPLICAS`. Kafka security
    /// settings use the forms of
    /// [`KafkaConfig::from_env`](https://docs.rs/eventbus-kafka): `EVENTBUS_KAFKA_SECURITY_PROTOCOL`,
    /// `EVENTBUS_KAFKA_SASL_MECHANISM`, `EVENTBUS_KAFKA_SASL_USERNAME`,
    /// `EVENTBUS_KAFKA_SASL_PASSWORD`, `EVENTBUS_KAFKA_SSL_CA`, `EVENTBUS_KAFKA_SSL_CERT`,
    /// `EVENTBUS_KAFKA_SSL_KEY`, `EVENTBUS_KAFKA_SSL_KEY_PASSWORD`. A variable that
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
        let mut kafka_vars = Vec::new();
        // (field path as `a.b.c`, variable) for every variable applied, to name it in errors.
        let mut set: Vec<(String, String)> = Vec::new();
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.into());
            let Some(rest) = k.strip_prefix("EVENTBUS_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if nats_short_form(k) {
                nats_creds.push((k.to_owned(), v));
                continue;
            }
            if kafka_short_form(k) {
                kafka_vars.push((k.to_owned(), v));
                continue;
            }
            match set_path(root, &rest, &v).map_err(|why| config_error(format!("{k}: {why}")))? {
                Some(path) => set.push((path, k.to_owned())),
                None => {
                    return Err(config_error(format!(
                        "{k} names no bus config field (sections: backend, nats, kafka, batch, handler)"
                    )));
                }
            }
        }
        // Only the backends' own variables change it afterwards.
        #[cfg_attr(not(any(feature = "nats", feature = "kafka")), allow(unused_mut))]
        let mut cfg = from_deserializer(tree).map_err(|(path, e)| {
            // Name the variable that set this field (or a field inside it).
            let var = set
                .iter()
                .filter(|(p, _)| {
                    path == *p
                        || path.starts_with(&format!("{p}."))
                        || p.starts_with(&format!("{path}."))
                })
                .map(|(_, v)| v.as_str())
                .next();
            let why = describe(&path, e.message());
            match var {
                Some(v) => config_error(format!("{v}: {why}")),
                None => config_error(format!("bus config from environment: {why}")),
            }
        })?;
        #[cfg(feature = "nats")]
        if !nats_creds.is_empty() {
            cfg.nats = cfg.nats.with_vars(nats_creds)?;
        }
        #[cfg(not(feature = "nats"))]
        if let Some((k, _)) = nats_creds.first() {
            return Err(config_error(format!(
                "{k} is set but this build has no NATS backend (feature `nats`)"
            )));
        }
        #[cfg(feature = "kafka")]
        if !kafka_vars.is_empty() {
            cfg.kafka = cfg.kafka.with_vars(kafka_vars)?;
        }
        #[cfg(not(feature = "kafka"))]
        if let Some((k, _)) = kafka_vars.first() {
            return Err(config_error(format!(
                "{k} is set but this build has no Kafka backend (feature `kafka`)"
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

/// The NATS short forms (`EVENTBUS_NATS_URL`, `EVENTBUS_NATS_USER`, ...), which the backend
/// reads itself.
fn nats_short_form(var: &str) -> bool {
    #[cfg(feature = "nats")]
    return eventbus_nats::ENV_VARS.contains(&var);
    // Without the backend every NATS variable is refused, naming the missing feature.
    #[cfg(not(feature = "nats"))]
    return var.starts_with("EVENTBUS_NATS_");
}

/// The Kafka security short forms (`EVENTBUS_KAFKA_SASL_PASSWORD`, ...), which set librdkafka
/// options rather than a field of their own.
fn kafka_short_form(var: &str) -> bool {
    #[cfg(feature = "kafka")]
    return eventbus_kafka::ENV_OPTIONS.iter().any(|(v, _)| *v == var);
    // Without the backend every Kafka variable is refused, naming the missing feature.
    #[cfg(not(feature = "kafka"))]
    return var.starts_with("EVENTBUS_KAFKA_");
}

/// Set `path` (lowercase, `_`-joined) in `table` to `raw`, parsed as the type already there.
/// Returns the field's dotted path, or `None` when no field matches.
fn set_path(table: &mut toml::Table, path: &str, raw: &str) -> Result<Option<String>, String> {
    // Longest key first: field names contain '_' too (`max_in_flight`).
    let mut keys: Vec<String> = table.keys().cloned().collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
    for key in keys {
        if path == key {
            let slot = table.get_mut(&key).expect("key listed");
            *slot = parse_like(slot, raw).map_err(|t| format!("expected {t}"))?;
            return Ok(Some(key));
        }
        if let Some(rest) = path.strip_prefix(&format!("{key}_"))
            && let Some(toml::Value::Table(inner)) = table.get_mut(&key)
            && let Some(inner_path) = set_path(inner, rest, raw)?
        {
            return Ok(Some(format!("{key}.{inner_path}")));
        }
    }
    Ok(None)
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
