//! Checks run before any I/O. Each returns a typed [`ErrorKind::InvalidMessage`] or
//! [`ErrorKind::TooLarge`] error and never echoes payload bytes.

use crate::error::{Error, ErrorKind};
use crate::message::{Message, Topic, truncate};

/// Which naming rules a backend applies to topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicRules {
    /// NATS subjects: dot-separated non-empty tokens, no wildcards (`*`, `>`), no whitespace or
    /// control characters.
    Nats,
    /// Kafka topics: `[A-Za-z0-9._-]`, 1..=249 characters, not `.` or `..`.
    Kafka,
    /// Valid under both sets of rules, so code tested against one backend runs on the other.
    Portable,
}

/// Check a topic name against `rules`.
pub fn topic(name: &str, rules: TopicRules) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidMessage,
            format!("invalid topic {:?}: {why}", truncate(name, 80)),
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    match rules {
        TopicRules::Nats => {
            if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad("contains whitespace or a control character");
            }
            if name.split('.').any(|t| t.is_empty()) {
                return bad("empty token (leading, trailing or double '.')");
            }
            if name.split('.').any(|t| t == "*" || t == ">") || name.contains(['*', '>']) {
                return bad("wildcards cannot be published to");
            }
            Ok(())
        }
        TopicRules::Kafka => {
            if name.len() > 249 {
                return bad("longer than 249 characters");
            }
            if name == "." || name == ".." {
                return bad("'.' and '..' are reserved");
            }
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return bad("only [A-Za-z0-9._-] allowed");
            }
            Ok(())
        }
        TopicRules::Portable => {
            topic(name, TopicRules::Kafka)?;
            topic(name, TopicRules::Nats)
        }
    }
}

/// Check a subscription filter: like [`topic`] with [`TopicRules::Nats`], except that a whole
/// token may be `*` and the last token may be `>`.
pub fn subscription_filter(name: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidMessage,
            format!("invalid subject filter {:?}: {why}", truncate(name, 80)),
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace or a control character");
    }
    let tokens: Vec<&str> = name.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return bad("empty token");
        }
        if *t != "*" && *t != ">" && t.contains(['*', '>']) {
            return bad("wildcards must be whole tokens");
        }
        if *t == ">" && i + 1 != tokens.len() {
            return bad("'>' must be the last token");
        }
    }
    Ok(())
}

/// Like [`topic`], but remembers a success inside the shared [`Topic`], so a reused `Topic` is
/// checked once per set of rules.
pub fn topic_cached(t: &Topic, rules: TopicRules) -> Result<(), Error> {
    let bit = match rules {
        TopicRules::Nats => 1,
        TopicRules::Kafka => 2,
        TopicRules::Portable => 4,
    };
    if t.known_valid(bit) {
        return Ok(());
    }
    topic(t.as_str(), rules)?;
    t.mark_valid(bit);
    Ok(())
}

/// Check a whole message: topic, headers, and encoded size against `max_message_bytes`.
pub fn message(
    msg: &Message,
    rules: TopicRules,
    max_message_bytes: Option<usize>,
) -> Result<(), Error> {
    topic_cached(msg.topic(), rules)?;
    msg.headers().validate()?;
    if let Some(max) = max_message_bytes {
        let len = msg.encoded_len();
        if len > max {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("message of {len} bytes exceeds the limit of {max} bytes"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_rules() {
        for ok in ["a", "a.b", "orders.created.v1", "a-b_c"] {
            topic(ok, TopicRules::Nats).unwrap();
        }
        for bad in [
            "", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a\r\nb", "a\tb", "x*",
        ] {
            assert_eq!(
                topic(bad, TopicRules::Nats).unwrap_err().kind(),
                ErrorKind::InvalidMessage,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn kafka_rules() {
        topic("a.b-c_D9", TopicRules::Kafka).unwrap();
        topic(&"x".repeat(249), TopicRules::Kafka).unwrap();
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(250)] {
            assert!(topic(bad, TopicRules::Kafka).is_err(), "{bad:?}");
        }
        // Portable excludes what either side rejects.
        assert!(topic("a..b", TopicRules::Portable).is_err());
        assert!(topic("a/b", TopicRules::Portable).is_err());
    }

    #[test]
    fn subscription_filters() {
        for ok in ["a", "a.*", "a.>", "*.b.>", ">"] {
            subscription_filter(ok).unwrap();
        }
        for bad in ["", "a.>.b", "a*", "a..b", "a b", "a.b>"] {
            assert!(subscription_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cached_validation_agrees() {
        let good = Topic::new("a.b");
        let bad = Topic::new("a..b");
        for _ in 0..2 {
            assert!(topic_cached(&good, TopicRules::Nats).is_ok());
            assert!(topic_cached(&bad, TopicRules::Nats).is_err());
        }
        let slash = Topic::new("a/b");
        assert!(topic_cached(&slash, TopicRules::Nats).is_ok());
        assert!(
            topic_cached(&slash, TopicRules::Kafka).is_err(),
            "cache is per rule set"
        );
    }

    #[test]
    fn size_limit() {
        let m = Message::new("t", vec![0u8; 100]);
        assert!(message(&m, TopicRules::Portable, Some(1000)).is_ok());
        let e = message(&m, TopicRules::Portable, Some(50)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
    }
}
