//! What a NATS subject may be.

use eventbus_core::spi::TopicRules;

/// NATS subjects: dot-separated non-empty tokens, no wildcards (`*`, `>`: they cannot be
/// published to), no whitespace or control characters. The sink, the subscriber's
/// dead-letter topic and [`NatsBackend::ensure_topic`](crate::NatsBackend) check them.
pub static SUBJECT_RULES: TopicRules = TopicRules::new("NATS subject", |name| {
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or a control character");
    }
    if name.split('.').any(str::is_empty) {
        return Err("empty token (leading, trailing or double '.')");
    }
    if name.contains(['*', '>']) {
        return Err("wildcards cannot be published to");
    }
    Ok(())
});

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::{ErrorKind, validate};

    #[test]
    fn subjects() {
        for ok in ["a", "a.b", "orders.created.v1", "a-b_c", "a/b", "ü.x"] {
            validate::topic(ok, &SUBJECT_RULES).unwrap();
        }
        for bad in [
            "", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a\r\nb", "a\tb", "x*",
        ] {
            assert_eq!(
                validate::topic(bad, &SUBJECT_RULES).unwrap_err().kind(),
                ErrorKind::InvalidMessage,
                "{bad:?}"
            );
        }
    }
}
