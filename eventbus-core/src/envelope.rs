//! An event envelope carried in headers, so it round-trips through every backend unchanged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind};
use crate::message::{Headers, Message};

/// Header names used by [`Envelope`]. They are plain header names, so any client can read them.
pub mod names {
    /// Event id (defaults to the message id when absent).
    pub const EVENT_ID: &str = "eventbus-event-id";
    /// Aggregate (entity) id; also used as the ordering key by handlers when no key is set.
    pub const AGGREGATE_ID: &str = "eventbus-aggregate-id";
    /// Event type, e.g. `order.created`.
    pub const EVENT_TYPE: &str = "eventbus-event-type";
    /// Payload schema version.
    pub const SCHEMA_VERSION: &str = "eventbus-schema-version";
    /// Event time in milliseconds since the Unix epoch.
    pub const TIMESTAMP_MS: &str = "eventbus-timestamp-ms";
    /// Correlation id (the request or saga this event belongs to).
    pub const CORRELATION_ID: &str = "eventbus-correlation-id";
    /// Causation id (the event that caused this one).
    pub const CAUSATION_ID: &str = "eventbus-causation-id";
    /// Trace id (for systems that do not use W3C `traceparent`).
    pub const TRACE_ID: &str = "eventbus-trace-id";
    /// Tenant id.
    pub const TENANT: &str = "eventbus-tenant";
}

/// Event metadata: who, what, when and why. Every field is optional.
///
/// ```
/// use eventbus_core::{Envelope, Message};
/// let env = Envelope::new("order.created")
///     .aggregate_id("order-42")
///     .schema_version(2)
///     .correlation_id("req-9")
///     .tenant("acme");
/// let msg = env.apply(Message::new("orders", "{}"));
/// let back = Envelope::from_headers(msg.headers()).unwrap();
/// assert_eq!(back, env);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// Event id.
    pub event_id: Option<String>,
    /// Aggregate id.
    pub aggregate_id: Option<String>,
    /// Event type.
    pub event_type: Option<String>,
    /// Schema version.
    pub schema_version: Option<u32>,
    /// Event time, in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<u64>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Causation id.
    pub causation_id: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
}

impl Envelope {
    /// An envelope for an event of `event_type`, stamped with the current time.
    pub fn new(event_type: impl Into<String>) -> Self {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Envelope {
            event_type: Some(event_type.into()),
            timestamp_ms: Some(ts.as_millis() as u64),
            ..Envelope::default()
        }
    }

    /// Set the event id.
    pub fn event_id(mut self, v: impl Into<String>) -> Self {
        self.event_id = Some(v.into());
        self
    }
    /// Set the aggregate id.
    pub fn aggregate_id(mut self, v: impl Into<String>) -> Self {
        self.aggregate_id = Some(v.into());
        self
    }
    /// Set the schema version.
    pub fn schema_version(mut self, v: u32) -> Self {
        self.schema_version = Some(v);
        self
    }
    /// Set the timestamp (ms since the Unix epoch).
    pub fn timestamp_ms(mut self, v: u64) -> Self {
        self.timestamp_ms = Some(v);
        self
    }
    /// Set the correlation id.
    pub fn correlation_id(mut self, v: impl Into<String>) -> Self {
        self.correlation_id = Some(v.into());
        self
    }
    /// Set the causation id.
    pub fn causation_id(mut self, v: impl Into<String>) -> Self {
        self.causation_id = Some(v.into());
        self
    }
    /// Set the trace id.
    pub fn trace_id(mut self, v: impl Into<String>) -> Self {
        self.trace_id = Some(v.into());
        self
    }
    /// Set the tenant.
    pub fn tenant(mut self, v: impl Into<String>) -> Self {
        self.tenant = Some(v.into());
        self
    }

    /// Write the envelope into `headers`, replacing earlier envelope headers.
    pub fn write(&self, headers: &mut Headers) {
        let strs = [
            (names::EVENT_ID, &self.event_id),
            (names::AGGREGATE_ID, &self.aggregate_id),
            (names::EVENT_TYPE, &self.event_type),
            (names::CORRELATION_ID, &self.correlation_id),
            (names::CAUSATION_ID, &self.causation_id),
            (names::TRACE_ID, &self.trace_id),
            (names::TENANT, &self.tenant),
        ];
        for (name, value) in strs {
            match value {
                Some(v) => headers.insert(name, v.clone()),
                None => {
                    headers.remove(name);
                }
            }
        }
        match self.schema_version {
            Some(v) => headers.insert(names::SCHEMA_VERSION, v.to_string()),
            None => {
                headers.remove(names::SCHEMA_VERSION);
            }
        }
        match self.timestamp_ms {
            Some(v) => headers.insert(names::TIMESTAMP_MS, v.to_string()),
            None => {
                headers.remove(names::TIMESTAMP_MS);
            }
        }
    }

    /// Attach the envelope to a message's headers.
    pub fn apply(&self, mut msg: Message) -> Message {
        self.write(msg.headers_mut());
        msg
    }

    /// Read an envelope back from headers. Missing fields are `None`; a malformed number is an
    /// [`ErrorKind::InvalidMessage`] error.
    pub fn from_headers(h: &Headers) -> Result<Envelope, Error> {
        let s = |n: &str| h.get(n).map(str::to_owned);
        let num = |n: &'static str| -> Result<Option<u64>, Error> {
            h.get(n)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        Error::new(
                            ErrorKind::InvalidMessage,
                            format!("header {n} is not a number"),
                        )
                    })
                })
                .transpose()
        };
        Ok(Envelope {
            event_id: s(names::EVENT_ID),
            aggregate_id: s(names::AGGREGATE_ID),
            event_type: s(names::EVENT_TYPE),
            schema_version: num(names::SCHEMA_VERSION)?
                .map(|v| {
                    u32::try_from(v).map_err(|_| {
                        Error::new(ErrorKind::InvalidMessage, "schema version out of range")
                    })
                })
                .transpose()?,
            timestamp_ms: num(names::TIMESTAMP_MS)?,
            correlation_id: s(names::CORRELATION_ID),
            causation_id: s(names::CAUSATION_ID),
            trace_id: s(names::TRACE_ID),
            tenant: s(names::TENANT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_roundtrip_and_overwrite() {
        let env = Envelope::new("t")
            .event_id("e")
            .aggregate_id("a")
            .schema_version(3)
            .timestamp_ms(17)
            .correlation_id("c")
            .causation_id("k")
            .trace_id("tr")
            .tenant("te");
        let mut h = Headers::new();
        env.write(&mut h);
        assert_eq!(Envelope::from_headers(&h).unwrap(), env);
        let smaller = Envelope::default().event_id("e2");
        smaller.write(&mut h);
        assert_eq!(Envelope::from_headers(&h).unwrap(), smaller);
    }

    #[test]
    fn malformed_number() {
        let h: Headers = [(names::SCHEMA_VERSION, "x")].into_iter().collect();
        assert_eq!(
            Envelope::from_headers(&h).unwrap_err().kind(),
            ErrorKind::InvalidMessage
        );
    }
}
