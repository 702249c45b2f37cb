//! What a Kafka topic name may be.

use eventbus_core::spi::TopicRules;

/// Kafka topic names: 1..=249 characters of `[A-Za-z0-9._-]`, not `.` or `..` (the broker's own
/// rules, checked before any I/O). The sink, the subscriber and
/// [`KafkaBackend::ensure_topic`](crate::KafkaBackend) check them.
pub static TOPIC_RULES: TopicRules = TopicRules::new("Kafka topic", |name| {
    if name.len() > 249 {
        return Err("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only [A-Za-z0-9._-] allowed");
    }
    Ok(())
});

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::validate;

    #[test]
    fn topic_names() {
        for ok in ["a.b-c_D9", "a..b", ".a", &"x".repeat(249)] {
            validate::topic(ok, &TOPIC_RULES).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", "a*", &"x".repeat(250)] {
            assert!(validate::topic(bad, &TOPIC_RULES).is_err(), "{bad:?}");
        }
    }
}
