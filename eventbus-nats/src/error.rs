//! One mapping function per async-nats error type. Messages are built from kinds and codes only:
//! never payloads, subjects' data or credentials.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use eventbus_core::{Error, ErrorKind, Outcome};

pub(crate) const BACKEND: &str = "nats";

pub(crate) fn err(kind: ErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(kind, msg).with_backend(BACKEND)
}

/// A publish that failed before it was written to the connection: definitely not stored.
pub(crate) fn send_failed(e: PublishError) -> Outcome {
    let kind = e.kind();
    let error = match kind {
        PublishErrorKind::MaxPayloadExceeded => err(
            ErrorKind::TooLarge,
            "message exceeds the server's max_payload",
        ),
        PublishErrorKind::MaxAckPending => {
            err(ErrorKind::Overloaded, "client ack window full").temporary()
        }
        PublishErrorKind::TimedOut => {
            // Timed out waiting for room in the client's write buffer: not written.
            err(ErrorKind::Timeout, "timed out queueing the publish").temporary()
        }
        _ => err(
            ErrorKind::Connect,
            "could not queue the publish on the connection",
        )
        .temporary(),
    };
    Outcome::Failed(error.with_source(e))
}

/// The ack of a publish that was written: map to acked / failed / unknown.
pub(crate) fn ack_result(
    r: Result<async_nats::jetstream::publish::PublishAck, PublishError>,
) -> Outcome {
    use eventbus_core::{Ack, Position};
    match r {
        Ok(a) => Outcome::Acked(Ack {
            position: Position::Stream {
                stream: a.stream,
                sequence: a.sequence,
                duplicate: a.duplicate,
            },
        }),
        Err(e) => match e.kind() {
            // "No responders": nothing listens on the subject, so nothing stored it.
            PublishErrorKind::StreamNotFound => Outcome::Failed(
                err(
                    ErrorKind::Rejected,
                    "no JetStream stream covers the subject",
                )
                .with_source(e),
            ),
            PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
                Outcome::Failed(
                    err(ErrorKind::Rejected, "expectation header not met").with_source(e),
                )
            }
            PublishErrorKind::MaxPayloadExceeded => Outcome::Failed(
                err(
                    ErrorKind::TooLarge,
                    "message exceeds the server's max_payload",
                )
                .with_source(e),
            ),
            PublishErrorKind::TimedOut => Outcome::Unknown(
                err(
                    ErrorKind::Timeout,
                    "no ack in time; the message may be stored",
                )
                .with_source(e),
            ),
            PublishErrorKind::BrokenPipe => Outcome::Unknown(
                err(
                    ErrorKind::Connect,
                    "connection lost before the ack; the message may be stored",
                )
                .with_source(e),
            ),
            _ => {
                // A JetStream API error in the ack means the server refused the message.
                let api_error = std::error::Error::source(&e)
                    .is_some_and(|s| s.downcast_ref::<async_nats::jetstream::Error>().is_some());
                if api_error {
                    Outcome::Failed(
                        err(ErrorKind::Rejected, "JetStream refused the message").with_source(e),
                    )
                } else {
                    Outcome::Unknown(
                        err(
                            ErrorKind::Other,
                            "unreadable ack; the message may be stored",
                        )
                        .with_source(e),
                    )
                }
            }
        },
    }
}

pub(crate) fn connect(e: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as K;
    let (kind, msg) = match e.kind() {
        K::ServerParse => (ErrorKind::Config, "invalid server URL"),
        K::Dns => (ErrorKind::Connect, "DNS lookup failed"),
        K::Authentication => (ErrorKind::Auth, "authentication failed"),
        K::AuthorizationViolation => (
            ErrorKind::Auth,
            "authorization violation (wrong credentials?)",
        ),
        K::TimedOut => (ErrorKind::Timeout, "connect timed out"),
        K::Tls => (ErrorKind::Connect, "TLS handshake or configuration failed"),
        K::Io => (ErrorKind::Connect, "could not connect"),
        K::MaxReconnects => (ErrorKind::Connect, "gave up reconnecting"),
    };
    let e2 = err(kind, msg).with_source(e);
    match kind {
        ErrorKind::Auth | ErrorKind::Config => e2.permanent(),
        _ => e2.temporary(),
    }
}

/// Any other async-nats error (stream and consumer management, pulls).
pub(crate) fn other<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
    e: E,
) -> Error {
    let text = e.to_string();
    let kind = if text.contains("timed out") {
        ErrorKind::Timeout
    } else if text.contains("not found") || text.contains("no responders") {
        ErrorKind::Rejected
    } else if text.contains("permission") || text.contains("authorization") {
        ErrorKind::Auth
    } else {
        ErrorKind::Other
    };
    let out = err(kind, what).with_source(e);
    if kind == ErrorKind::Timeout {
        out.temporary()
    } else {
        out
    }
}
