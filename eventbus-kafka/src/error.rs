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
    // property and the variable that sets it only, and keep the error itself out of the source
    // chain.
    match &e {
        KafkaError::ClientConfig(_, _, key, _) => {
            return err(
                ErrorKind::Config,
                format!(
                    "{what}: librdkafka refused {} (value not shown)",
                    crate::config::named(key)
                ),
            )
            .permanent();
        }
        KafkaError::ClientCreation(text) => {
            let named: Vec<String> = properties_in(text).map(crate::config::named).collect();
            let which = if named.is_empty() {
                "the configuration".to_owned()
            } else {
                named.join(", ")
            };
            return err(
                ErrorKind::Config,
                format!(
                    "{what}: librdkafka refused {which} (its text may quote values, not shown)"
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

/// The librdkafka properties a client-creation error text names, among those a user sets
/// through [`crate::config::ENV_VARS`] (its security settings). librdkafka names the property
/// at the start of the reason (`ssl.ca.location failed: ...`, `ssl.key.location failed: ...`)
/// or inside it (`... sasl.mechanism ...`).
fn properties_in(text: &str) -> impl Iterator<Item = &'static str> + '_ {
    crate::config::env_options()
        .map(|(_, p)| p)
        .filter(move |p| text.contains(p))
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

    /// What librdkafka refuses when it creates the client (a file it cannot read, say) is
    /// reported by the variable that set it, without the value.
    #[cfg(feature = "ssl")]
    #[test]
    fn creation_errors_name_the_variable_not_the_value() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("no-such-ca-3f9c.pem");
        let garbage = dir.path().join("not-a-key-3f9c.pem");
        std::fs::write(&garbage, "not a key").expect("write");
        let pki = eventbus_brokers::tls::Pki::new("error-test");
        let (cert, _key) = pki.leaf("client", &["client"]);
        let path = |p: &std::path::Path| p.display().to_string();
        for (var, vars) in [
            (
                "EVENTBUS_KAFKA_SSL_CA",
                vec![
                    ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
                    ("EVENTBUS_KAFKA_SSL_CA", path(&missing)),
                ],
            ),
            (
                "EVENTBUS_KAFKA_SSL_CERT",
                vec![
                    ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
                    ("EVENTBUS_KAFKA_SSL_CERT", path(&garbage)),
                    ("EVENTBUS_KAFKA_SSL_KEY", path(&missing)),
                ],
            ),
            (
                "EVENTBUS_KAFKA_SSL_KEY",
                vec![
                    ("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
                    ("EVENTBUS_KAFKA_SSL_CERT", path(&cert)),
                    ("EVENTBUS_KAFKA_SSL_KEY", path(&missing)),
                ],
            ),
        ] {
            let config = crate::KafkaConfig::new("127.0.0.1:1")
                .with_vars(vars)
                .expect("valid shapes");
            let Err(e) = config
                .client_config()
                .create::<rdkafka::consumer::BaseConsumer>()
            else {
                panic!("{var}: librdkafka accepted a file that does not exist");
            };
            let mapped = other("invalid Kafka client configuration", e);
            let text = format!("{mapped} {mapped:?}");
            assert!(text.contains(var), "{var} not named: {text}");
            assert!(!text.contains("3f9c"), "a value in the error: {text}");
            assert_eq!(mapped.kind(), ErrorKind::Config);
            assert!(!mapped.is_retryable());
        }
    }
}
