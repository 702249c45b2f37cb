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
