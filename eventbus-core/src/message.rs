//! Messages: topic, key, headers, payload and a stable id.

use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use bytes::Bytes;

use crate::error::{Error, ErrorKind};

/// A topic (Kafka) or subject (NATS) name. Cheap to clone: build it once and reuse it (a reused
/// `Topic` is also validated once while it is used with one backend's naming rules).
#[derive(Clone)]
pub struct Topic(Arc<TopicInner>);

struct TopicInner {
    /// The last [`TopicRules`](crate::validate::TopicRules) (a `static`) the name passed; null for none.
    valid: AtomicPtr<crate::validate::TopicRules>,
    name: Box<str>,
}

impl PartialEq for Topic {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}
impl Eq for Topic {}
impl std::hash::Hash for Topic {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state)
    }
}
impl PartialOrd for Topic {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Topic {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name.cmp(&other.0.name)
    }
}

impl Topic {
    /// A new topic name. It is validated when published or subscribed, not here.
    pub fn new(name: impl AsRef<str>) -> Self {
        Topic(Arc::new(TopicInner {
            valid: AtomicPtr::new(std::ptr::null_mut()),
            name: name.as_ref().into(),
        }))
    }

    /// `name` as a topic, shared with `last` when that is the same name, else made anew and
    /// kept in `last`: a backend decoding message after message of one topic names it without
    /// an allocation each.
    ///
    /// ```
    /// use eventbus_core::Topic;
    /// let mut last = None;
    /// let a = Topic::reusing(&mut last, "orders");
    /// let b = Topic::reusing(&mut last, "orders");
    /// assert_eq!(a, b);
    /// assert_eq!(Topic::reusing(&mut last, "refunds").as_str(), "refunds");
    /// ```
    pub fn reusing(last: &mut Option<Topic>, name: &str) -> Topic {
        match last {
            Some(t) if t.as_str() == name => t.clone(),
            _ => last.insert(Topic::new(name)).clone(),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0.name
    }

    pub(crate) fn known_valid(&self, rules: &'static crate::validate::TopicRules) -> bool {
        std::ptr::eq(self.0.valid.load(Ordering::Relaxed), rules)
    }

    pub(crate) fn mark_valid(&self, rules: &'static crate::validate::TopicRules) {
        // Only compared by address, never written through.
        self.0
            .valid
            .store(std::ptr::from_ref(rules).cast_mut(), Ordering::Relaxed);
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Topic {
    fn from(s: &str) -> Self {
        Topic::new(s)
    }
}

impl From<String> for Topic {
    fn from(s: String) -> Self {
        Topic::new(s)
    }
}

impl From<&Topic> for Topic {
    fn from(t: &Topic) -> Self {
        t.clone()
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// A stable message id, used by backends for de-duplication (`Nats-Msg-Id`, a Kafka header).
///
/// [`Message::new`] generates one (a random per-process prefix and a counter: unique, cheap, and
/// never reused); callers with their own idempotency key use [`Message::with_id`]. A retry of the
/// same `Message` value carries the same id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MessageId(IdRepr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum IdRepr {
    Generated(u64, u64),
    Custom(Arc<str>),
}

fn process_prefix() -> u64 {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    *PREFIX.get_or_init(rand::random::<u64>)
}

impl MessageId {
    /// A fresh, process-unique id.
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        MessageId(IdRepr::Generated(
            process_prefix(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        ))
    }

    /// An id chosen by the caller (for example an idempotency key from an upstream system).
    ///
    /// Ids are compared by their text form: `custom(generated.to_string()) == generated`.
    pub fn custom(id: impl AsRef<str>) -> Self {
        let s = id.as_ref();
        // The canonical text form of a generated id maps back to the compact representation.
        if let Some((a, b)) = decode_generated(s) {
            return MessageId(IdRepr::Generated(a, b));
        }
        MessageId(IdRepr::Custom(Arc::from(s)))
    }

    /// [`MessageId::custom`] from formatted text, such as an id derived from where a message
    /// is stored, without a `String` per id: the text is written into a buffer kept per
    /// thread, and the id's own allocation is the only one.
    ///
    /// ```
    /// use eventbus_core::MessageId;
    /// let id = MessageId::custom_fmt(format_args!("kafka:{}:{}:{}", "orders", 3, 42));
    /// assert_eq!(id, MessageId::custom("kafka:orders:3:42"));
    /// ```
    pub fn custom_fmt(args: std::fmt::Arguments<'_>) -> Self {
        use std::cell::RefCell;
        use std::fmt::Write as _;
        thread_local! {
            static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
        }
        // The buffer is out of reach when a value being formatted makes an id itself
        // (re-entry) or while the thread's locals are being torn down; a failing `Display`
        // leaves it half written. Each falls back to a `String` of its own, as `format!`.
        let fast = TEXT
            .try_with(|cell| {
                let mut text = cell.try_borrow_mut().ok()?;
                text.clear();
                text.write_fmt(args).ok()?;
                let id = Self::custom(text.as_str());
                // A long id once does not keep its buffer for the thread's life.
                if text.capacity() > 1024 {
                    *text = String::new();
                }
                Some(id)
            })
            .ok()
            .flatten();
        fast.unwrap_or_else(|| Self::custom(std::fmt::format(args)))
    }

    /// Write the id's text form into `out`.
    pub fn write_to(&self, out: &mut String) {
        match &self.0 {
            IdRepr::Generated(a, b) => out.push_str(GeneratedText::new(*a, *b).as_str()),
            IdRepr::Custom(s) => out.push_str(s),
        }
    }
}

/// URL-safe alphabet of generated ids (valid in `Nats-Msg-Id`, Kafka headers and file names).
const ID_DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";

/// A generated id's text form, on the stack: the 64-bit process prefix as 11 base-64 digits, then the counter
/// in as few base-64 digits as it needs (4 for the first 16 million ids of a process). 15-22
/// characters instead of 32 hex digits: the id travels with every message and a de-duplicating
/// broker indexes it, so its length is paid per message.
struct GeneratedText {
    buf: [u8; 22],
    len: usize,
}

impl GeneratedText {
    fn new(prefix: u64, counter: u64) -> Self {
        let mut buf = [0u8; 22];
        for (i, slot) in buf[..11].iter_mut().enumerate() {
            *slot = ID_DIGITS[((prefix >> (6 * (10 - i))) & 63) as usize];
        }
        let digits = (64 - counter.leading_zeros()).div_ceil(6).max(1) as usize;
        for i in 0..digits {
            buf[11 + i] = ID_DIGITS[((counter >> (6 * (digits - 1 - i))) & 63) as usize];
        }
        GeneratedText {
            buf,
            len: 11 + digits,
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("ASCII digits")
    }
}

/// The inverse of [`GeneratedText::new`], for canonical text only (so that every text maps to
/// one id: `decode(s)` is `Some` exactly when `encode(decode(s)) == s`).
fn decode_generated(s: &str) -> Option<(u64, u64)> {
    let b = s.as_bytes();
    if !(12..=22).contains(&b.len()) {
        return None;
    }
    let digit = |c: u8| ID_DIGITS.iter().position(|&d| d == c).map(|v| v as u64);
    let mut prefix = 0u64;
    for &c in &b[..11] {
        prefix = prefix.checked_mul(64)?.checked_add(digit(c)?)?;
    }
    // 11 digits hold 66 bits: the first may only use 4.
    if digit(b[0])? > 15 {
        return None;
    }
    let mut counter = 0u64;
    for &c in &b[11..] {
        counter = counter.checked_mul(64)?.checked_add(digit(c)?)?;
    }
    (GeneratedText::new(prefix, counter).as_str() == s).then_some((prefix, counter))
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            IdRepr::Generated(a, b) => f.write_str(GeneratedText::new(*a, *b).as_str()),
            IdRepr::Custom(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl From<&str> for MessageId {
    fn from(s: &str) -> Self {
        MessageId::custom(s)
    }
}

impl From<String> for MessageId {
    fn from(s: String) -> Self {
        MessageId::custom(&s)
    }
}

/// Ordered message headers (name, value), both UTF-8 text. Names are compared case-sensitively.
///
/// Names must be non-empty and free of control characters, whitespace and `:`; values must not
/// contain CR or LF. [`Headers::validate`] checks this; publishing checks it before any I/O.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Append a header (several values per name are allowed).
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// Replace every value of `name` with `value`.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, value.into()));
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Remove every value of `name`; returns whether any was removed.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(n, _)| n != name);
        before != self.0.len()
    }

    /// Iterate over `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of header entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `true` when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes the headers take on the wire, roughly (`name: value\r\n` per entry).
    pub fn encoded_len(&self) -> usize {
        self.0.iter().map(|(n, v)| n.len() + v.len() + 4).sum()
    }

    /// Check every name and value. Errors name the offending header but never echo its value.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, value) in &self.0 {
            if name.is_empty() {
                return Err(Error::new(ErrorKind::InvalidMessage, "empty header name"));
            }
            if name
                .chars()
                .any(|c| c == ':' || c.is_whitespace() || c.is_control())
            {
                return Err(Error::new(
                    ErrorKind::InvalidMessage,
                    "header name contains ':', whitespace or a control character",
                ));
            }
            if value.contains(['\r', '\n']) {
                return Err(Error::new(
                    ErrorKind::InvalidMessage,
                    format!("value of header {:?} contains CR or LF", truncate(name, 64)),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values can carry tokens; show names only.
        f.debug_set()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        Headers(
            iter.into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        )
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One event: a topic, an optional partitioning key, headers, a payload and a stable id.
///
/// ```
/// use eventbus_core::Message;
/// let m = Message::new("orders.created", &b"{\"id\":1}"[..])
///     .with_key("customer-7")
///     .with_header("content-type", "application/json");
/// assert_eq!(m.topic().as_str(), "orders.created");
/// assert_eq!(m.headers().get("content-type"), Some("application/json"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    id: MessageId,
    topic: Topic,
    key: Option<Bytes>,
    headers: Headers,
    payload: Bytes,
}

impl Message {
    /// A message with a generated id, no key and no headers.
    pub fn new(topic: impl Into<Topic>, payload: impl Into<Bytes>) -> Self {
        Message {
            id: MessageId::generate(),
            topic: topic.into(),
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// Set the partitioning / ordering key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Append a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Replace all headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Use a caller-chosen id instead of the generated one.
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// The message id: generated at creation or set with [`Message::with_id`], and carried to
    /// the broker (it is what de-duplicates a retried publish). A received message another
    /// client wrote without one gets an id derived from where it is stored
    /// (`nats:<stream>:<sequence>`, `kafka:<topic>:<partition>:<offset>`), the same for every
    /// consumer and on every redelivery; see also [`Subscription::dedup`](crate::Subscription::dedup).
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// The topic or subject.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Mutable headers.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Approximate size on the wire: payload, key, headers and topic. Used for the byte limits of
    /// batches and of the ACK window.
    pub fn encoded_len(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.headers.encoded_len()
            + self.topic.as_str().len()
    }

    /// Split into parts: `(id, topic, key, headers, payload)`.
    pub fn into_parts(self) -> (MessageId, Topic, Option<Bytes>, Headers, Bytes) {
        (self.id, self.topic, self.key, self.headers, self.payload)
    }

    /// Build from parts (the inverse of [`Message::into_parts`]); backends use it on receive.
    pub fn from_parts(
        id: MessageId,
        topic: Topic,
        key: Option<Bytes>,
        headers: Headers,
        payload: Bytes,
    ) -> Self {
        Message {
            id,
            topic,
            key,
            headers,
            payload,
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print payload or key bytes: they may be personal data.
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("key_len", &self.key.as_ref().map(Bytes::len))
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_ids_survive_reentry_and_long_text() {
        // A value whose `Display` makes an id itself: the inner call finds the buffer busy.
        struct Nested;
        impl std::fmt::Display for Nested {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let inner = MessageId::custom_fmt(format_args!("in:{}", 1));
                write!(f, "{inner}")
            }
        }
        let id = MessageId::custom_fmt(format_args!("out:{Nested}"));
        assert_eq!(id, MessageId::custom("out:in:1"));
        let long = "x".repeat(5_000);
        assert_eq!(
            MessageId::custom_fmt(format_args!("{long}")),
            MessageId::custom(&long)
        );
        assert_eq!(
            MessageId::custom_fmt(format_args!("a:{}", 2)),
            MessageId::custom("a:2")
        );
    }

    #[test]
    fn generated_ids_are_unique_and_stable_across_clone() {
        let a = Message::new("t", "x");
        let b = Message::new("t", "x");
        assert_ne!(a.id(), b.id());
        assert_eq!(a.clone().id(), a.id());
        assert!((12..=22).contains(&a.id().to_string().len()));
        let mut s = String::new();
        a.id().write_to(&mut s);
        assert_eq!(s, a.id().to_string());
        assert_eq!(
            &MessageId::custom(&s),
            a.id(),
            "parsed text equals the generated id"
        );
        assert_eq!(MessageId::custom("order-1").to_string(), "order-1");
    }

    #[test]
    fn generated_text_form_round_trips_at_the_edges() {
        for (a, b) in [
            (0, 0),
            (u64::MAX, u64::MAX),
            (1 << 63, 63),
            (12345, 64),
            (u64::MAX, 1 << 24),
        ] {
            let id = MessageId(IdRepr::Generated(a, b));
            let text = id.to_string();
            assert!(text.len() <= 22, "{text}");
            assert_eq!(MessageId::custom(&text), id, "{text}");
            assert!(matches!(MessageId::custom(&text).0, IdRepr::Generated(..)));
        }
        // Non-canonical texts stay custom ids with their own text.
        for s in [
            "00000000000",
            "G0000000000A",
            "00000000000001",
            "0000000000:0",
        ] {
            let id = MessageId::custom(s);
            assert!(matches!(id.0, IdRepr::Custom(_)), "{s}");
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn header_validation() {
        let ok: Headers = [("a-b", "v 1")].into_iter().collect();
        assert!(ok.validate().is_ok());
        for (n, v) in [
            ("", "v"),
            ("a:b", "v"),
            ("a b", "v"),
            ("a\r", "v"),
            ("a", "x\ny"),
            ("a", "x\r"),
        ] {
            let h: Headers = [(n, v)].into_iter().collect();
            let e = h.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{n:?}={v:?}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn debug_hides_payload_and_header_values() {
        let m = Message::new("t", "secret-payload")
            .with_header("auth", "token-123")
            .with_key("k");
        let d = format!("{m:?}");
        assert!(!d.contains("secret-payload"));
        assert!(!d.contains("token-123"));
        assert!(d.contains("auth"));
    }

    #[test]
    fn insert_replaces() {
        let mut h = Headers::new();
        h.append("a", "1");
        h.append("a", "2");
        h.insert("a", "3");
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("a"), Some("3"));
        assert!(h.remove("a"));
        assert!(h.is_empty());
    }
}
