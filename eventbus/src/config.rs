//! [`BusConfig`]: the whole bus in one serde structure, from TOML and `EVENTBUS_*` variables.

use std::path::Path;

use eventbus_core::{Error, ErrorKind, SinkLimits};

use crate::registry::{BackendKind, BusConfig, own_var};

pub(crate) fn config_error(msg: impl Into<String>) -> Error {
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
        let cfg = Self::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse TOML, checking shapes only: values are validated once the environment is
    /// applied too (a file may hold `sasl.username` and the environment its password).
    fn parse(text: &str) -> Result<Self, Error> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let at = e.span().map(|s| line_col(text, s.start));
            config_error(format!(
                "bus config: TOML syntax error{} (text not shown)",
                at.map(|a| format!(" at {a}")).unwrap_or_default()
            ))
        })?;
        from_deserializer(de).map_err(|(path, e)| {
            let at = e
                .span()
                .map(|s| format!(" (at {})", line_col(text, s.start)))
                .unwrap_or_default();
            config_error(format!("bus config: {}{at}", describe(&path, e.message())))
        })
    }

    /// Read a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let cfg = Self::parse(&Self::read(path.as_ref())?)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn read(path: &Path) -> Result<String, Error> {
        std::fs::read_to_string(path)
            .map_err(|e| config_error(format!("could not read bus config {}: {e}", path.display())))
    }

    /// The file (if any), then the process environment on top: what a service calls at start.
    /// Values are validated once, on the result.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let base = match path {
            Some(p) => Self::parse(&Self::read(p)?)?,
            None => BusConfig::default(),
        };
        base.with_vars(std::env::vars())
    }

    /// Apply `EVENTBUS_*` variables on top of this config: `EVENTBUS_BACKEND`, and
    /// `EVENTBUS_<SECTION>_<FIELD>` for any field of a backend's section, `batch` or
    /// `handler` (nested tables join with `_`: `EVENTBUS_HANDLER_RETRY_MAX_ATTEMPTS`).
    /// Durations are milliseconds. Each backend also reads its own variables, its short forms
    /// for connections and credentials ([`BusConfig::env_vars`]: `EVENTBUS_NATS_URL`,
    /// `EVENTBUS_KAFKA_SASL_PASSWORD`, ...). A variable that names no field, a value of the
    /// wrong type, or a variable of a backend this build leaves out is an error naming the
    /// variable (never its value). Other variables are ignored.
    pub fn with_vars<K: AsRef<str>, V: Into<String>>(
        self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, Error> {
        let mut tree =
            toml::Value::try_from(&self).map_err(|e| config_error(format!("bus config: {e}")))?;
        let root = tree.as_table_mut().expect("a struct serializes to a table");
        // Each backend's own variables, applied by the backend after the generic ones.
        let mut own: Vec<(BackendKind, Vec<(String, String)>)> = Vec::new();
        // (field path as `a.b.c`, variable) for every variable applied, to name it in errors.
        let mut set: Vec<(String, String)> = Vec::new();
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.into());
            let Some(rest) = k.strip_prefix("EVENTBUS_") else {
                continue;
            };
            if let Some(kind) = own_var(k) {
                match own.iter_mut().find(|(b, _)| *b == kind) {
                    Some((_, vs)) => vs.push((k.to_owned(), v)),
                    None => own.push((kind, vec![(k.to_owned(), v)])),
                }
                continue;
            }
            let rest = rest.to_ascii_lowercase();
            match set_path(root, &rest, &v).map_err(|why| config_error(format!("{k}: {why}")))? {
                Some(path) => set.push((path, k.to_owned())),
                None => {
                    let sections: Vec<&str> = root.keys().map(String::as_str).collect();
                    return Err(config_error(format!(
                        "{k} names no bus config field (sections: {})",
                        sections.join(", ")
                    )));
                }
            }
        }
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
        for (kind, vars) in own {
            cfg.apply_backend_vars(kind, vars)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The variables the backends of this build read themselves, each listed once by its
    /// backend crate (`eventbus_nats::ENV_VARS`, ...): their short forms for connections and
    /// credentials. Every other field is set by `EVENTBUS_<SECTION>_<FIELD>`.
    ///
    /// ```
    /// let vars = eventbus::BusConfig::env_vars();
    /// assert!(vars.iter().any(|(_, v)| v.name == "EVENTBUS_NATS_URL"));
    /// ```
    pub fn env_vars() -> Vec<(BackendKind, eventbus_core::backend::EnvVar)> {
        crate::registry::env_vars()
    }

    /// Check values (not only shapes): the chosen backend is compiled in, and the batch
    /// settings make sense. Errors name the field.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.backend.built() {
            return Err(config_error(format!(
                "backend = \"{}\", but this build does not include it (enable the `{}` feature)",
                self.backend, self.backend
            )));
        }
        self.validate_section(self.backend)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_variable_lists_the_sections_of_this_build() {
        let e = BusConfig::default()
            .with_vars([("EVENTBUS_BATCH_NO_SUCH", "1")])
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("EVENTBUS_BATCH_NO_SUCH"), "{text}");
        for kind in BackendKind::ALL.iter().filter(|k| k.built()) {
            assert!(text.contains(kind.name()), "{text}");
        }
    }

    #[cfg(feature = "memory")]
    #[test]
    fn a_backend_section_takes_generic_variables() {
        let cfg = BusConfig::default()
            .with_vars([
                ("EVENTBUS_BACKEND", "memory"),
                ("EVENTBUS_MEMORY_MAX_MESSAGE_BYTES", "2048"),
            ])
            .unwrap();
        assert_eq!(cfg.backend, BackendKind::Memory);
        assert_eq!(cfg.memory.max_message_bytes, 2048);
    }

    #[cfg(feature = "nats")]
    #[test]
    fn a_backends_own_variables_reach_its_section() {
        let cfg = BusConfig::default()
            .with_vars([
                ("EVENTBUS_NATS_URL", "nats://a:1,nats://b:2"),
                ("EVENTBUS_NATS_USER", "svc"),
                ("EVENTBUS_NATS_PASSWORD", "s3cret"),
            ])
            .unwrap();
        assert_eq!(cfg.nats.url, "nats://a:1,nats://b:2");
        assert!(!format!("{cfg:?}").contains("s3cret"));
        // A pair the backend checks, named by variable.
        let e = BusConfig::default()
            .with_vars([("EVENTBUS_NATS_USER", "svc")])
            .unwrap_err();
        assert!(e.to_string().contains("EVENTBUS_NATS_PASSWORD"), "{e}");
    }

    /// A file holds the user name, the environment its password: valid together (what
    /// `load` does: `parse`, then `with_vars`, which validates the result).
    #[cfg(feature = "kafka")]
    #[test]
    fn a_file_and_the_environment_are_validated_together() {
        let file = r#"
            backend = "kafka"
            [kafka.options]
            "security.protocol" = "sasl_plaintext"
            "sasl.mechanism" = "PLAIN"
            "sasl.username" = "svc"
        "#;
        assert!(
            BusConfig::from_toml(file).is_err(),
            "alone, the file lacks the password"
        );
        let cfg = BusConfig::parse(file)
            .unwrap()
            .with_vars([("EVENTBUS_KAFKA_SASL_PASSWORD", "s3cret")])
            .unwrap();
        assert_eq!(cfg.kafka.options["sasl.username"], "svc");
    }

    /// A build without a backend refuses its variables and its name, naming the feature.
    #[test]
    fn a_backend_left_out_is_refused_by_feature() {
        for kind in BackendKind::ALL.iter().filter(|k| !k.built()) {
            let var = format!("EVENTBUS_{}_ANYTHING", kind.name().to_ascii_uppercase());
            let e = BusConfig::default()
                .with_vars([(var.as_str(), "x")])
                .unwrap_err();
            assert!(e.to_string().contains(&format!("feature `{kind}`")), "{e}");
            let e = BusConfig::default()
                .with_vars([("EVENTBUS_BACKEND", kind.name())])
                .unwrap_err();
            assert!(e.to_string().contains(&format!("`{kind}` feature")), "{e}");
        }
    }

    #[test]
    fn every_variable_of_a_backend_carries_its_prefix_once() {
        let vars = BusConfig::env_vars();
        for (kind, v) in &vars {
            let prefix = format!("EVENTBUS_{}_", kind.name().to_ascii_uppercase());
            assert!(v.name.starts_with(&prefix), "{}", v.name);
            assert_eq!(vars.iter().filter(|(_, w)| w.name == v.name).count(), 1);
        }
    }
}
