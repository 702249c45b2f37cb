//! What a topic is created with ([`TopicSpec`]) and what a backend can do ([`Capabilities`]).
//!
//! A backend creating a topic honours every option of a [`TopicSpec`] its [`Capabilities`]
//! list, and refuses any other with [`ErrorKind::Unsupported`]: nothing asked for is dropped
//! silently. A topic that already exists is left as it is, whatever the spec says (provision
//! changes with the broker's own tooling). Portable code reads the capabilities first:
//!
//! ```
//! use std::time::Duration;
//! use eventbus_core::{Capabilities, TopicSpec};
//!
//! fn orders(caps: &Capabilities) -> TopicSpec {
//!     let mut spec = TopicSpec::new("orders").max_age(Duration::from_secs(7 * 24 * 3600));
//!     if caps.partitions {
//!         spec = spec.partitions(6);
//!     }
//!     spec
//! }
//! let spec = orders(&Capabilities::default());
//! assert_eq!(spec.name(), "orders");
//! assert_eq!(spec.get_partitions(), None);
//! assert!(spec.check(&Capabilities::default(), "memory").is_err(), "no retention here");
//! ```

use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// A topic to create: its name and the options it is created with. Every option is optional;
/// an option left unset takes the backend's default (one partition, the backend's configured
/// replication, no age limit).
///
/// A `&str` or `String` converts into a spec with no options.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicSpec {
    name: String,
    partitions: Option<u32>,
    replicas: Option<u32>,
    max_age: Option<Duration>,
}

impl TopicSpec {
    /// A topic named `name`, with the backend's defaults.
    pub fn new(name: impl Into<String>) -> Self {
        TopicSpec {
            name: name.into(),
            partitions: None,
            replicas: None,
            max_age: None,
        }
    }

    /// Split the topic into `n` partitions (Kafka). Order holds per key, and a consumer
    /// group's members share the topic partition by partition. Needs
    /// [`Capabilities::partitions`] for any `n` above 1.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = Some(n);
        self
    }

    /// Keep `n` copies of every message on different broker nodes (a NATS stream's replicas,
    /// a Kafka topic's replication factor). Needs [`Capabilities::replicas`] for any `n`
    /// above 1.
    pub fn replicas(mut self, n: u32) -> Self {
        self.replicas = Some(n);
        self
    }

    /// Let the broker delete messages older than `age` (a NATS stream's `max_age`, Kafka's
    /// `retention.ms`). Needs [`Capabilities::max_age`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partitions asked for, if any.
    pub fn get_partitions(&self) -> Option<u32> {
        self.partitions
    }

    /// The replicas asked for, if any.
    pub fn get_replicas(&self) -> Option<u32> {
        self.replicas
    }

    /// The age limit asked for, if any.
    pub fn get_max_age(&self) -> Option<Duration> {
        self.max_age
    }

    /// Refuse, with [`ErrorKind::Unsupported`] naming `backend` and the option, any option
    /// `caps` do not cover; refuse zero partitions, zero replicas and a zero age with
    /// [`ErrorKind::Config`]. What a backend calls before it creates anything.
    pub fn check(&self, caps: &Capabilities, backend: &str) -> Result<(), Error> {
        let zero = |what: &str| {
            Err(Error::new(
                ErrorKind::Config,
                format!("topic {}: {what} must be at least 1", self.name),
            ))
        };
        let unsupported = |what: &str| {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!("topic {}: {backend} has no {what}", self.name),
            ))
        };
        match self.partitions {
            Some(0) => return zero("partitions"),
            Some(n) if n > 1 && !caps.partitions => return unsupported("partitions"),
            _ => {}
        }
        match self.replicas {
            Some(0) => return zero("replicas"),
            Some(n) if n > 1 && !caps.replicas => return unsupported("replicas"),
            _ => {}
        }
        match self.max_age {
            Some(d) if d.is_zero() => zero("max_age"),
            Some(_) if !caps.max_age => unsupported("age limit (max_age)"),
            _ => Ok(()),
        }
    }
}

impl From<&str> for TopicSpec {
    fn from(name: &str) -> Self {
        TopicSpec::new(name)
    }
}

impl From<String> for TopicSpec {
    fn from(name: String) -> Self {
        TopicSpec::new(name)
    }
}

impl From<&String> for TopicSpec {
    fn from(name: &String) -> Self {
        TopicSpec::new(name.as_str())
    }
}

/// What a connected backend can do, for programs (and the conformance suite) to read instead
/// of knowing backends by name. [`Backend::capabilities`](crate::Backend::capabilities)
/// returns it; `Default` is the least: no option beyond a topic's name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Topics have partitions ([`TopicSpec::partitions`]). Order then holds per partition,
    /// that is per key; a consumer group's members share a topic partition by partition, so
    /// their shares can be uneven (two members of a three-partition topic get two and one).
    /// Without partitions, members share message by message.
    pub partitions: bool,
    /// Topics keep copies on several broker nodes ([`TopicSpec::replicas`]).
    pub replicas: bool,
    /// Topics can drop messages by age ([`TopicSpec::max_age`]).
    pub max_age: bool,
    /// The broker itself drops a message whose id it stored recently (NATS JetStream's
    /// duplicate window, with `Nats-Msg-Id` sent): a publish retried after an unknown outcome
    /// stores one copy. Without it a retry can store two, and consumers de-duplicate by id
    /// ([`Subscription::dedup`](crate::Subscription::dedup)).
    pub broker_dedup: bool,
}

impl Capabilities {
    /// No capabilities: [`Capabilities::default`].
    pub const fn none() -> Self {
        Capabilities {
            partitions: false,
            replicas: false,
            max_age: false,
            broker_dedup: false,
        }
    }

    /// Set [`Capabilities::partitions`].
    pub const fn with_partitions(mut self, on: bool) -> Self {
        self.partitions = on;
        self
    }

    /// Set [`Capabilities::replicas`].
    pub const fn with_replicas(mut self, on: bool) -> Self {
        self.replicas = on;
        self
    }

    /// Set [`Capabilities::max_age`].
    pub const fn with_max_age(mut self, on: bool) -> Self {
        self.max_age = on;
        self
    }

    /// Set [`Capabilities::broker_dedup`].
    pub const fn with_broker_dedup(mut self, on: bool) -> Self {
        self.broker_dedup = on;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_beyond_the_capabilities_are_refused_by_name() {
        let none = Capabilities::none();
        let all = none
            .with_partitions(true)
            .with_replicas(true)
            .with_max_age(true);
        let spec = TopicSpec::new("t")
            .partitions(3)
            .replicas(3)
            .max_age(Duration::from_secs(60));
        assert!(spec.check(&all, "x").is_ok());
        for (caps, what) in [
            (all.with_partitions(false), "partitions"),
            (all.with_replicas(false), "replicas"),
            (all.with_max_age(false), "max_age"),
        ] {
            let e = spec.check(&caps, "x").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(e.to_string().contains(what), "{e}");
        }
        // One partition and one replica are what every backend has.
        assert!(
            TopicSpec::new("t")
                .partitions(1)
                .replicas(1)
                .check(&none, "x")
                .is_ok()
        );
    }

    #[test]
    fn zero_is_a_config_error() {
        let all = Capabilities::none()
            .with_partitions(true)
            .with_replicas(true)
            .with_max_age(true);
        for spec in [
            TopicSpec::new("t").partitions(0),
            TopicSpec::new("t").replicas(0),
            TopicSpec::new("t").max_age(Duration::ZERO),
        ] {
            assert_eq!(spec.check(&all, "x").unwrap_err().kind(), ErrorKind::Config);
        }
    }
}
