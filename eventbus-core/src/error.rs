//! The one error type of eventbus.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// What went wrong, as a category a caller can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Invalid configuration (bad option, missing field, unsupported mode).
    Config,
    /// The message itself is invalid: topic/subject name, header name or value.
    InvalidMessage,
    /// The message (or batch) is larger than the backend allows.
    TooLarge,
    /// Could not connect to, or lost the connection to, the broker.
    Connect,
    /// Wrong or missing credentials, or no permission for the operation.
    Auth,
    /// An operation did not complete in time; the outcome may be unknown.
    Timeout,
    /// The broker refused the message (no stream for the subject, unknown topic, ...).
    Rejected,
    /// The ACK window or a client queue is full and the configuration says fail fast.
    Overloaded,
    /// The publisher or subscriber is closed.
    Closed,
    /// A backend broke the engine's contract (for example returned the wrong number of outcomes).
    Contract,
    /// The database of an outbox or inbox failed (connection, query, constraint).
    Storage,
    /// Another instance with the same transactional identity took over: this one must stop
    /// (its open transaction is aborted by the broker and never becomes visible).
    Fenced,
    /// The backend cannot do what was asked (a topic option it has no equivalent for, see
    /// [`Capabilities`](crate::Capabilities)).
    Unsupported,
    /// Anything else.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "invalid configuration",
            ErrorKind::InvalidMessage => "invalid message",
            ErrorKind::TooLarge => "message too large",
            ErrorKind::Connect => "connection error",
            ErrorKind::Auth => "authentication or authorization error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Rejected => "rejected by broker",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Closed => "closed",
            ErrorKind::Contract => "backend contract violation",
            ErrorKind::Storage => "storage error",
            ErrorKind::Fenced => "fenced by a newer instance",
            ErrorKind::Unsupported => "not supported by the backend",
            ErrorKind::Other => "error",
        })
    }
}

/// Whether retrying the same operation can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retry {
    /// Retrying cannot help (bad input, permission denied, closed).
    Permanent,
    /// A later retry may succeed (timeout, connection loss, overload).
    Temporary,
}

/// The error type of every eventbus crate.
///
/// It is cheap to clone (a whole-batch failure fans out to every message of the batch), carries a
/// [`ErrorKind`], a [`Retry`] hint, the backend name and an optional source. By construction it
/// never holds payload bytes or secrets: backends build the message text from names and codes only.
///
/// ```
/// use eventbus_core::{Error, ErrorKind};
/// let e = Error::new(ErrorKind::Overloaded, "ack window full").temporary().with_backend("nats");
/// assert_eq!(e.kind(), ErrorKind::Overloaded);
/// assert!(e.is_retryable());
/// assert_eq!(e.to_string(), "overloaded (nats): ack window full");
/// ```
#[derive(Clone, thiserror::Error)]
#[error("{kind} ({backend}): {message}")]
pub struct Error {
    kind: ErrorKind,
    retry: Retry,
    backend: &'static str,
    message: Cow<'static, str>,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("retry", &self.retry)
            .field("backend", &self.backend)
            .field("message", &self.message);
        if let Some(s) = &self.source {
            // Display of the source, not Debug: backend Debug output may contain request bodies.
            d.field("source", &format_args!("{s}"));
        }
        d.finish()
    }
}

impl Error {
    /// A new, permanent error of `kind`. The backend name defaults to `"eventbus"`.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        let retry = match kind {
            ErrorKind::Timeout | ErrorKind::Connect | ErrorKind::Overloaded => Retry::Temporary,
            _ => Retry::Permanent,
        };
        Error {
            kind,
            retry,
            backend: "eventbus",
            message: message.into(),
            source: None,
        }
    }

    /// Mark the error as temporary: a retry may succeed.
    pub fn temporary(mut self) -> Self {
        self.retry = Retry::Temporary;
        self
    }

    /// Mark the error as permanent: a retry cannot succeed.
    pub fn permanent(mut self) -> Self {
        self.retry = Retry::Permanent;
        self
    }

    /// Set the backend name (`"nats"`, `"kafka"`, `"memory"`).
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        self.backend = backend;
        self
    }

    /// Attach the underlying error. Its `Display` must not contain secrets or payload bytes.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The retry hint.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// `true` when retrying the operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry == Retry::Temporary
    }

    /// The backend that produced this error.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The human-readable message (without kind and backend).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Shorthand for a [`ErrorKind::Closed`] error.
    pub fn closed(what: &'static str) -> Self {
        Error::new(ErrorKind::Closed, what)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_sensible_retry_defaults() {
        assert!(Error::new(ErrorKind::Timeout, "t").is_retryable());
        assert!(Error::new(ErrorKind::Connect, "c").is_retryable());
        assert!(!Error::new(ErrorKind::InvalidMessage, "i").is_retryable());
        assert!(!Error::new(ErrorKind::TooLarge, "x").is_retryable());
        assert!(
            Error::new(ErrorKind::Rejected, "r")
                .temporary()
                .is_retryable()
        );
    }

    #[test]
    fn debug_shows_source_display_only() {
        #[derive(Debug, thiserror::Error)]
        #[error("io broke")]
        struct Inner {
            #[allow(dead_code)] // read only through Debug, which must not be printed
            secret: &'static str,
        }
        let e = Error::new(ErrorKind::Other, "x").with_source(Inner { secret: "hunter2" });
        let dbg = format!("{e:?}");
        assert!(dbg.contains("io broke"));
        assert!(!dbg.contains("hunter2"));
        let c = e.clone();
        assert_eq!(c.kind(), ErrorKind::Other);
        assert!(std::error::Error::source(&c).is_some());
    }
}
