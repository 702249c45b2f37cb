//! Checks run before any I/O. Each returns a typed [`ErrorKind::InvalidMessage`] or
//! [`ErrorKind::TooLarge`] error and never echoes payload bytes.

use crate::error::{Error, ErrorKind};
use crate::message::{Message, Topic, truncate};

/// Naming rules for topics, checked before any I/O. Each backend declares its own as a
/// `static` (`eventbus_nats::SUBJECT_RULES`, `eventbus_kafka::TOPIC_RULES`); [`PORTABLE`] is
/// what every backend accepts.
///
/// ```
/// use eventbus_core::{spi::TopicRules, validate};
///
/// /// Lower-case names only (a backend of your own, say).
/// static LOWER: TopicRules = TopicRules::new("lower-case topic", |name| {
///     if name.bytes().all(|b| b.is_ascii_lowercase() || b == b'.') {
///         Ok(())
///     } else {
///         Err("only a-z and '.' allowed")
///     }
/// });
/// assert!(validate::topic("orders.created", &LOWER).is_ok());
/// assert!(validate::topic("Orders", &LOWER).is_err());
/// ```
#[derive(Debug)]
pub struct TopicRules {
    name: &'static str,
    check: fn(&str) -> Result<(), &'static str>,
}

impl TopicRules {
    /// Rules called `name` (in error messages), where `check` says why a non-empty name is
    /// refused. Declare them as a `static`, not a `const`: [`topic_cached`] remembers a pass by
    /// the rules' address, which only a `static` keeps the same at every use (a `const` still
    /// validates correctly, but is checked every time).
    pub const fn new(name: &'static str, check: fn(&str) -> Result<(), &'static str>) -> Self {
        TopicRules { name, check }
    }

    /// What the rules are called.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Valid on every backend: 1..=249 characters of `[A-Za-z0-9._-]` in dot-separated non-empty
/// tokens, so code tested against one backend runs on another.
pub static PORTABLE: TopicRules = TopicRules::new("portable topic", |name| {
    if name.len() > 249 {
        return Err("longer than 249 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only [A-Za-z0-9._-] allowed");
    }
    if name.split('.').any(str::is_empty) {
        return Err("empty token (leading, trailing or double '.')");
    }
    Ok(())
});

/// Check a topic name against `rules`.
pub fn topic(name: &str, rules: &TopicRules) -> Result<(), Error> {
    let why = if name.is_empty() {
        "empty"
    } else {
        match (rules.check)(name) {
            Ok(()) => return Ok(()),
            Err(why) => why,
        }
    };
    Err(Error::new(
        ErrorKind::InvalidMessage,
        format!(
            "invalid topic {:?}: {why} ({})",
            truncate(name, 80),
            rules.name
        ),
    ))
}

/// Check a NATS subject filter: dot-separated non-empty tokens without whitespace, where a
/// whole token may be `*` and the last token `>`.
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
/// checked once while it is used with one set of rules (it remembers the last set it passed).
pub fn topic_cached(t: &Topic, rules: &'static TopicRules) -> Result<(), Error> {
    if t.known_valid(rules) {
        return Ok(());
    }
    topic(t.as_str(), rules)?;
    t.mark_valid(rules);
    Ok(())
}

/// Check a whole message: topic, headers, and encoded size against `max_message_bytes`.
pub fn message(
    msg: &Message,
    rules: &'static TopicRules,
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
    fn portable_rules() {
        topic("a.b-c_D9", &PORTABLE).unwrap();
        topic(&"x".repeat(249), &PORTABLE).unwrap();
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            ".a",
            "a.",
            "a.*",
            "a.>",
            "a/b",
            "a b",
            "a\r\nb",
            "ü",
            &"x".repeat(250),
        ] {
            let e = topic(bad, &PORTABLE).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{bad:?}");
        }
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

    static SLASHES: TopicRules = TopicRules::new("slashes allowed", |name| {
        if name.contains(' ') {
            Err("no spaces")
        } else {
            Ok(())
        }
    });

    #[test]
    fn cached_validation_agrees() {
        let good = Topic::new("a.b");
        let bad = Topic::new("a..b");
        for _ in 0..2 {
            assert!(topic_cached(&good, &PORTABLE).is_ok());
            assert!(topic_cached(&bad, &PORTABLE).is_err());
        }
        let slash = Topic::new("a/b");
        for _ in 0..2 {
            assert!(topic_cached(&slash, &SLASHES).is_ok());
            assert!(
                topic_cached(&slash, &PORTABLE).is_err(),
                "a pass under one set of rules is no pass under another"
            );
        }
    }

    #[test]
    fn errors_name_the_rules() {
        let e = topic("a b", &SLASHES).unwrap_err();
        assert!(e.to_string().contains("no spaces (slashes allowed)"), "{e}");
    }

    #[test]
    fn size_limit() {
        let m = Message::new("t", vec![0u8; 100]);
        assert!(message(&m, &PORTABLE, Some(1000)).is_ok());
        let e = message(&m, &PORTABLE, Some(50)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
    }
}
