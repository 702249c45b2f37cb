//! One mapping function per async-nats error type. Messages are built from kinds and codes only:
//! never payloads, subjects' data or credentials.

use eventbus_core::{Error, ErrorKind};

pub(crate) const BACKEND: &str = "nats";

pub(crate) fn err(kind: ErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(kind, msg).with_backend(BACKEND)
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
        K::Tls => (
            ErrorKind::Connect,
            "TLS handshake or configuration failed (untrusted certificate, wrong host name, \
             missing client certificate?)",
        ),
        K::Io => (ErrorKind::Connect, "could not connect"),
        K::MaxReconnects => (ErrorKind::Connect, "gave up reconnecting"),
    };
    // async-nats reports a refused TLS handshake (unknown CA, wrong host name, missing client
    // certificate) as an I/O error carrying the TLS alert: recognise it by its text.
    let text = e.to_string().to_ascii_lowercase();
    let tls = matches!(e.kind(), K::Tls)
        || (matches!(e.kind(), K::Io)
            && ["peer certificate", "fatal alert", "certificate"]
                .iter()
                .any(|t| text.contains(t)));
    let msg = if tls {
        "TLS handshake failed (untrusted certificate, wrong host name, missing client \
         certificate?)"
    } else {
        msg
    };
    let e2 = err(kind, msg).with_source(e);
    // Retrying does not fix credentials, configuration or a TLS setup the peer refuses.
    match kind {
        ErrorKind::Auth | ErrorKind::Config => e2.permanent(),
        _ if tls => e2.permanent(),
        _ => e2.temporary(),
    }
}

/// What an async-nats error kind says about a failed management call or pull.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// No answer in time: the outcome is unknown, asking again may help.
    TimedOut,
    /// The stream, consumer or subject does not exist (or nothing answers for it).
    Missing,
    /// JetStream cannot serve the call now (no leader, no quorum), or the connection could not
    /// carry it: asking again may help.
    Unavailable,
    /// The request could not be sent or was refused in transit: see its source.
    Request,
    /// Anything else.
    Other,
}

/// An async-nats error kind, classified by its variant rather than its text.
pub(crate) trait Classify {
    /// What this kind says.
    fn class(&self) -> Class;
}

/// A JetStream API error by its error code: a missing resource, or a cluster that cannot serve
/// the call yet (no leader, no quorum, an offline stream or consumer); otherwise by its status.
fn api(e: &async_nats::jetstream::Error) -> Class {
    use async_nats::jetstream::ErrorCode as C;
    match e.error_code() {
        C::STREAM_NOT_FOUND
        | C::CONSUMER_NOT_FOUND
        | C::SEQUENCE_NOT_FOUND
        | C::JETSTREAM_NOT_ENABLED
        | C::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT => Class::Missing,
        C::CLUSTER_NOT_AVAILABLE
        | C::CLUSTER_INCOMPLETE
        | C::CLUSTER_NO_PEERS
        | C::CLUSTER_NOT_ACTIVE
        | C::CLUSTER_NOT_ASSIGNED
        | C::CLUSTER_NOT_LEADER
        | C::STREAM_OFFLINE
        | C::CONSUMER_OFFLINE
        | C::STREAM_OFFLINE_REASON
        | C::CONSUMER_OFFLINE_REASON
        | C::CLUSTER_SERVER_MEMBER_CHANGE_INFLIGHT => Class::Unavailable,
        _ => match e.code() {
            404 => Class::Missing,
            408 => Class::TimedOut,
            _ => Class::Other,
        },
    }
}

macro_rules! classify {
    ($($kind:ty => |$k:ident| $body:expr;)*) => {
        $(impl Classify for $kind {
            fn class(&self) -> Class {
                let $k = self;
                $body
            }
        })*
    };
}

classify! {
    async_nats::jetstream::context::PublishErrorKind => |k| {
        use async_nats::jetstream::context::PublishErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            K::StreamNotFound => Class::Missing,
            // The connection could not carry it, or too many publishes await acks.
            K::BrokenPipe | K::MaxAckPending => Class::Unavailable,
            K::WrongLastMessageId
            | K::WrongLastSequence
            | K::MaxPayloadExceeded
            | K::Other => Class::Other,
        }
    };
    async_nats::jetstream::context::RequestErrorKind => |k| {
        use async_nats::jetstream::context::RequestErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            // Nothing answers the JetStream API: a server still starting, or a node of a cluster
            // that has not caught up (async-nats calls it "JetStream unavailable").
            K::NoResponders => Class::Unavailable,
            K::InvalidSubject => Class::Missing,
            // Sent and failed in transit, or an answer that did not parse: see its source.
            K::Other => Class::Request,
        }
    };
    async_nats::client::RequestErrorKind => |k| {
        use async_nats::client::RequestErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            // The connection could not carry the request, or nothing answered it yet.
            K::NoResponders | K::Other => Class::Unavailable,
            K::InvalidSubject | K::MaxPayloadExceeded => Class::Other,
        }
    };
    async_nats::jetstream::context::GetStreamErrorKind => |k| {
        use async_nats::jetstream::context::GetStreamErrorKind as K;
        match k {
            K::EmptyName | K::InvalidStreamName => Class::Missing,
            K::Request => Class::Request,
            K::JetStream(e) => api(e),
        }
    };
    async_nats::jetstream::context::GetStreamByNameErrorKind => |k| {
        use async_nats::jetstream::context::GetStreamByNameErrorKind as K;
        match k {
            K::NotFound | K::InvalidSubject => Class::Missing,
            K::Request => Class::Request,
            K::JetStream(e) => api(e),
        }
    };
    async_nats::jetstream::context::CreateStreamErrorKind => |k| {
        use async_nats::jetstream::context::CreateStreamErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            K::NotFound => Class::Missing,
            K::JetStreamUnavailable => Class::Unavailable,
            K::JetStream(e) => api(e),
            K::Response => Class::Request,
            K::EmptyStreamName
            | K::InvalidStreamName
            | K::DomainAndExternalSet
            | K::ResponseParse => Class::Other,
        }
    };
    async_nats::jetstream::context::AccountErrorKind => |k| {
        use async_nats::jetstream::context::AccountErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            K::JetStreamUnavailable => Class::Unavailable,
            K::JetStream(e) => api(e),
            K::Other => Class::Request,
        }
    };
    async_nats::jetstream::context::ConsumerInfoErrorKind => |k| {
        use async_nats::jetstream::context::ConsumerInfoErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            K::NotFound | K::StreamNotFound | K::InvalidName => Class::Missing,
            K::NoResponders => Class::Unavailable,
            K::Offline => Class::Unavailable,
            K::Request => Class::Request,
            K::JetStream(e) => api(e),
        }
    };
    async_nats::jetstream::stream::ConsumerErrorKind => |k| {
        use async_nats::jetstream::stream::ConsumerErrorKind as K;
        match k {
            K::TimedOut => Class::TimedOut,
            K::Request => Class::Request,
            K::JetStream(e) => api(e),
            K::InvalidConsumerType | K::InvalidName | K::Other => Class::Other,
        }
    };
    async_nats::jetstream::consumer::pull::BatchErrorKind => |k| {
        use async_nats::jetstream::consumer::pull::BatchErrorKind as K;
        match k {
            // The pull was not sent or not answered: the connection, not the request.
            K::Pull | K::Flush | K::Subscribe => Class::Unavailable,
            _ => Class::Other,
        }
    };
}

/// Any other async-nats error (stream and consumer management, pulls), typed by its kind; a
/// request that failed in transit is typed by the request error it carries.
pub(crate) fn other<K>(what: &'static str, e: async_nats::error::Error<K>) -> Error
where
    K: Classify + Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
{
    let mut class = e.kind().class();
    if class == Class::Request {
        class = request_source(&e).unwrap_or(Class::Other);
    }
    let (kind, temporary) = match class {
        Class::TimedOut => (ErrorKind::Timeout, true),
        Class::Missing => (ErrorKind::Rejected, false),
        Class::Unavailable => (ErrorKind::Connect, true),
        Class::Request | Class::Other => (ErrorKind::Other, false),
    };
    let out = err(kind, what).with_source(e);
    if temporary { out.temporary() } else { out }
}

/// The class of the request error somewhere in `e`'s sources: JetStream's, or, where that
/// only says the request failed, the client's own beneath it. A request that failed for a
/// reason neither names (an answer that did not parse) is `Other`.
fn request_source(e: &(dyn std::error::Error + 'static)) -> Option<Class> {
    use async_nats::client::RequestError as Core;
    use async_nats::jetstream::context::RequestError as Js;
    let mut next = e.source();
    while let Some(s) = next {
        let class = if let Some(r) = s.downcast_ref::<Js>() {
            Some(r.kind().class())
        } else {
            s.downcast_ref::<Core>().map(|r| r.kind().class())
        };
        match class {
            Some(Class::Request) | None => {}
            Some(c) => return Some(c),
        }
        next = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{
        GetStreamByNameError, GetStreamByNameErrorKind, GetStreamError, GetStreamErrorKind,
        RequestError, RequestErrorKind,
    };

    #[test]
    fn management_errors_are_typed_by_kind_not_text() {
        let e = other(
            "lookup",
            GetStreamByNameError::new(GetStreamByNameErrorKind::NotFound),
        );
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert!(!e.is_retryable());

        let e = other("x", RequestError::new(RequestErrorKind::TimedOut));
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());

        // A failed request is typed by the request error it carries.
        let via = |kind| {
            other(
                "lookup",
                GetStreamError::with_source(GetStreamErrorKind::Request, RequestError::new(kind)),
            )
        };
        let e = via(RequestErrorKind::TimedOut);
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());
        // Nothing answers the JetStream API (a node still starting): asking again may help.
        let e = via(RequestErrorKind::NoResponders);
        assert_eq!(e.kind(), ErrorKind::Connect);
        assert!(e.is_retryable());
        // A request that failed in transit, by the client's own error beneath.
        let e = other(
            "lookup",
            GetStreamError::with_source(
                GetStreamErrorKind::Request,
                RequestError::with_source(
                    RequestErrorKind::Other,
                    async_nats::client::RequestError::new(
                        async_nats::client::RequestErrorKind::Other,
                    ),
                ),
            ),
        );
        assert_eq!(e.kind(), ErrorKind::Connect);
        assert!(e.is_retryable());
        assert!(e.to_string().contains("lookup"));
    }
}
