//! The backends this facade offers: one registry line each, at the end of this file. A backend
//! crate provides a [`BackendConfig`] (its name, its serde config section, its own environment
//! variables, `connect`); its line adds it as a [`BackendKind`] variant, a section of
//! [`BusConfig`], re-exports, and a case of every switch below, all under its cargo feature.

use std::sync::Arc;

use eventbus_batch::BatchConfig;
use eventbus_core::Error;
#[allow(unused_imports)] // every backend feature off leaves it unused (a compile error anyway)
use eventbus_core::backend::{BackendConfig, DynBackend, EnvVar};
use eventbus_core::handler::HandlerConfig;
use serde::{Deserialize, Serialize};

use crate::config::config_error;

/// Expands the registry: `"feature" => field: Variant = crate::Config { re-exported items };`
/// per backend, each line under its own cargo feature.
macro_rules! backends {
    ($(
        $(#[$doc:meta])*
        $feature:literal => $field:ident : $variant:ident = $krate:ident :: $config:ident
            { $($item:ident),* $(,)? };
    )*) => {
        /// Which backend the bus talks to: `backend = "<name>"` in a config file,
        /// `EVENTBUS_BACKEND=<name>`. Every backend the facade knows is a variant, built in or
        /// not; [`BusConfig::validate`](crate::BusConfig::validate) refuses one this build
        /// leaves out, naming its cargo feature.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum BackendKind {
            $(
                $(#[$doc])*
                #[doc = concat!("\n\nCargo feature `", $feature, "`.")]
                $variant,
            )*
        }

        impl BackendKind {
            /// Every backend the facade knows, built in or not.
            pub const ALL: &'static [BackendKind] = &[$(BackendKind::$variant),*];

            /// Its name: the value of `backend`, its config section, its cargo feature, the
            /// `EVENTBUS_<NAME>_` prefix of its variables.
            pub fn name(self) -> &'static str {
                match self {
                    $(BackendKind::$variant => $feature,)*
                }
            }

            /// Whether this build includes it.
            pub fn built(self) -> bool {
                match self {
                    $(BackendKind::$variant => cfg!(feature = $feature),)*
                }
            }
        }

        $(
            #[cfg(feature = $feature)]
            $(#[$doc])*
            #[doc = concat!("\n\nThe backend crate (feature `", $feature, "`), for what the [`Bus`](crate::Bus) does not cover.")]
            pub use $krate as $field;
            #[cfg(feature = $feature)]
            #[doc(no_inline)]
            pub use $krate::{$($item),*};
        )*

        /// Everything a service configures: the backend and its connection, batching and the
        /// ACK window, and the handler runtime (concurrency, ordering, retries). Every section
        /// has defaults; unknown fields are errors. `Debug` redacts credentials.
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
            $(
                #[cfg(feature = $feature)]
                #[doc = concat!("The `[", $feature, "]` section (used when `backend = \"", $feature, "\"`).")]
                pub $field: $krate::$config,
            )*
            /// Batching and the ACK window.
            pub batch: BatchConfig,
            /// The handler runtime.
            pub handler: HandlerConfig,
        }

        impl std::fmt::Debug for BusConfig {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct("BusConfig");
                d.field("backend", &self.backend);
                $(
                    #[cfg(feature = $feature)]
                    d.field(stringify!($field), &self.$field);
                )*
                d.field("batch", &self.batch)
                    .field("handler", &self.handler)
                    .finish()
            }
        }

        impl BusConfig {
            /// Connect the backend `kind`, from its section.
            pub(crate) async fn connect_backend(
                &self,
                kind: BackendKind,
            ) -> Result<Arc<dyn DynBackend>, Error> {
                match kind {
                    $(
                        #[cfg(feature = $feature)]
                        BackendKind::$variant => Ok(Arc::new(
                            BackendConfig::connect(self.$field.clone()).await?,
                        )),
                    )*
                    #[allow(unreachable_patterns)]
                    other => Err(not_built(other)),
                }
            }

            /// Check the section of backend `kind`.
            pub(crate) fn validate_section(&self, kind: BackendKind) -> Result<(), Error> {
                match kind {
                    $(
                        #[cfg(feature = $feature)]
                        BackendKind::$variant => BackendConfig::validate(&self.$field),
                    )*
                    #[allow(unreachable_patterns)]
                    other => Err(not_built(other)),
                }
            }

            /// Apply `vars`, the variables of backend `kind` (see [`own_var`]), to its section.
            pub(crate) fn apply_backend_vars(
                &mut self,
                kind: BackendKind,
                vars: Vec<(String, String)>,
            ) -> Result<(), Error> {
                match kind {
                    $(
                        #[cfg(feature = $feature)]
                        BackendKind::$variant => {
                            self.$field = BackendConfig::with_vars(self.$field.clone(), vars)?;
                            Ok(())
                        }
                    )*
                    #[allow(unreachable_patterns)]
                    other => Err(config_error(format!(
                        "{} is set but this build has no {other} backend (feature `{other}`)",
                        vars.first().map_or("a variable", |(k, _)| k.as_str()),
                    ))),
                }
            }
        }

        /// The backend that reads variable `var` itself: one of its [`BackendConfig::ENV`], or,
        /// for a backend this build leaves out, any `EVENTBUS_<NAME>_` variable (refused later,
        /// naming the feature).
        pub(crate) fn own_var(var: &str) -> Option<BackendKind> {
            $(
                #[cfg(feature = $feature)]
                {
                    if <$krate::$config as BackendConfig>::ENV.iter().any(|v| v.name == var) {
                        return Some(BackendKind::$variant);
                    }
                }
                #[cfg(not(feature = $feature))]
                {
                    if var
                        .strip_prefix("EVENTBUS_")
                        .and_then(|rest| rest.strip_prefix(&$feature.to_ascii_uppercase()))
                        .is_some_and(|rest| rest.starts_with('_'))
                    {
                        return Some(BackendKind::$variant);
                    }
                }
            )*
            None
        }

        /// The variables the backends built in read themselves, each with its backend.
        pub(crate) fn env_vars() -> Vec<(BackendKind, EnvVar)> {
            #[allow(unused_mut)]
            let mut all = Vec::new();
            $(
                #[cfg(feature = $feature)]
                all.extend(
                    <$krate::$config as BackendConfig>::ENV
                        .iter()
                        .map(|v| (BackendKind::$variant, *v)),
                );
            )*
            all
        }

        #[cfg(test)]
        mod names {
            #[allow(unused_imports)]
            use super::*;

            /// A registry line's name is its backend's [`BackendConfig::NAME`].
            #[test]
            fn registry_names_are_the_backends_own() {
                $(
                    #[cfg(feature = $feature)]
                    assert_eq!(<$krate::$config as BackendConfig>::NAME, $feature);
                )*
            }
        }
    };
}

/// `backend = "<name>"` names a backend this build leaves out.
fn not_built(kind: BackendKind) -> Error {
    config_error(format!(
        "backend = \"{kind}\", but this build does not include it (enable the `{kind}` feature)"
    ))
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Default for BackendKind {
    /// NATS.
    fn default() -> Self {
        BackendKind::Nats
    }
}

backends! {
    /// NATS JetStream.
    "nats" => nats: Nats = eventbus_nats::NatsConfig
        { NatsAuth, NatsBackend, NatsConfig, NatsSink, StreamSpec };
    /// A Kafka-protocol cluster (Apache Kafka, Redpanda, tansu ...).
    "kafka" => kafka: Kafka = eventbus_kafka::KafkaConfig { KafkaBackend, KafkaConfig, KafkaSink };
    /// The in-process backend, for a service's own tests.
    "memory" => memory: Memory = eventbus_memory::MemoryConfig { MemoryBroker, MemoryConfig };
}
