//! One mapping function per rdkafka error site. Messages carry codes, never payloads or secrets.

use eventbus_core::{Error, ErrorKind, Outcome};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

pub(crate) const BACKEND: &str = "kafka";

pub(crate) fn err(kind: ErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(kind, msg).with_backend(BACKEND)
}

fn code(e: &KafkaError) -> Option<C> {
    e.rdkafka_error_code()
}

/// `send` refused the message: it never entered librdkafka's queue.
pub(crate) fn enqueue(e: KafkaError) -> Outcome {
    let kind = match code(&e) {
        Some(C::QueueFull) => ErrorKind::Overloaded,
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => ErrorKind::TooLarge,
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => ErrorKind::Rejected,
        Some(C::InvalidTopic) => ErrorKind::InvalidMessage,
        _ => ErrorKind::Other,
    };
    let mut error = err(
        kind,
        format!("librdkafka refused the message: {}", short(&e)),
    );
    if kind == ErrorKind::Overloaded {
        error = error.temporary();
    }
    Outcome::Failed(error.with_source(e))
}

/// A failed delivery report.
pub(crate) fn delivery(e: &KafkaError) -> Outcome {
    let text = short(e);
    match code(e) {
        // librdkafka's "possibly persisted": the broker may have stored it.
        Some(C::MessageTimedOut | C::RequestTimedOut) => Outcome::Unknown(
            err(
                ErrorKind::Timeout,
                format!("no delivery report in time; may be stored ({text})"),
            )
            .temporary(),
        ),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => {
            Outcome::Failed(err(ErrorKind::TooLarge, text))
        }
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => {
            Outcome::Failed(err(ErrorKind::Rejected, text))
        }
        Some(C::InvalidTopic) => Outcome::Failed(err(ErrorKind::InvalidMessage, text)),
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => {
            Outcome::Failed(err(ErrorKind::Auth, text))
        }
        Some(C::PurgeQueue) => Outcome::Failed(err(ErrorKind::Closed, "purged before it was sent")),
        _ => Outcome::Unknown(err(
            ErrorKind::Other,
            format!("delivery failed, may be stored ({text})"),
        )),
    }
}

pub(crate) fn other(what: &'static str, e: KafkaError) -> Error {
    // librdkafka's configuration errors quote the option's value (a password, say): name the
    // property only, and keep the error itself out of the source chain.
    match &e {
        KafkaError::ClientConfig(_, _, key, _) => {
            return err(
                ErrorKind::Config,
                format!("{what}: librdkafka refused property `{key}` (value not shown)"),
            )
            .permanent();
        }
        KafkaError::ClientCreation(_) => {
            return err(
                ErrorKind::Config,
                format!(
                    "{what}: librdkafka refused the configuration (its text may quote option values, not shown)"
                ),
            )
            .permanent();
        }
        _ => {}
    }
    let kind = match code(&e) {
        Some(C::BrokerTransportFailure | C::AllBrokersDown) => ErrorKind::Connect,
        Some(C::OperationTimedOut | C::RequestTimedOut) => ErrorKind::Timeout,
        Some(C::SaslAuthenticationFailed | C::Authentication) => ErrorKind::Auth,
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::GroupAuthorizationFailed,
        ) => ErrorKind::Auth,
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => ErrorKind::Rejected,
        Some(C::InvalidTopic) => ErrorKind::InvalidMessage,
        _ => ErrorKind::Other,
    };
    let out = err(kind, what).with_source(e);
    if matches!(kind, ErrorKind::Connect | ErrorKind::Timeout) {
        out.temporary()
    } else {
        out
    }
}

fn short(e: &KafkaError) -> String {
    match code(e) {
        Some(c) => format!("{c:?}"),
        None => "client error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_never_show_values() {
        let Err(e) = rdkafka::ClientConfig::new()
            .set("security.protocol", "pw-secret-value")
            .create::<rdkafka::consumer::BaseConsumer>()
        else {
            panic!("an invalid security.protocol was accepted");
        };
        let mapped = other("could not create the Kafka consumer", e);
        let text = format!("{mapped} {mapped:?}");
        assert!(!text.contains("pw-secret-value"), "{text}");
        assert!(text.contains("security.protocol"), "{text}");
        assert_eq!(mapped.kind(), ErrorKind::Config);
        assert!(std::error::Error::source(&mapped).is_none());
    }
}
