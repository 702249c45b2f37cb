//! Message <-> NATS headers. The key and id travel as headers; user headers pass through.

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use eventbus_core::{Bytes, Headers, Message, MessageId, Topic};

/// Header carrying the message key (UTF-8 keys as is).
pub const KEY: &str = "Eventbus-Key";
/// Header carrying the message key hex-encoded (keys that are not header-safe text).
pub const KEY_HEX: &str = "Eventbus-Key-Hex";

/// Header carrying the order of the user's header names when a message has several distinct
/// ones (async-nats keeps headers in a hash map); the subscriber restores the order from it and
/// strips it.
pub const HEADER_ORDER: &str = "Eventbus-Header-Order";

/// [`KEY`], [`KEY_HEX`] and [`HEADER_ORDER`] as header names, built once: a name from a `&str`
/// is validated and copied on every use.
const KEY_NAME: HeaderName = HeaderName::from_static(KEY);
const KEY_HEX_NAME: HeaderName = HeaderName::from_static(KEY_HEX);
const HEADER_ORDER_NAME: HeaderName = HeaderName::from_static(HEADER_ORDER);

/// Atomic batch headers (ADR-50).
pub(crate) const BATCH_ID: &str = "Nats-Batch-Id";
pub(crate) const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
pub(crate) const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// Bytes reserved below `max_payload` for headers the backend adds.
pub(crate) const OVERHEAD: usize = 256;

pub(crate) fn encode(msg: Message, with_id: bool) -> (String, Bytes, HeaderMap) {
    encode_ref(&msg, with_id)
}

/// Like [`encode`], leaving the message to the caller (the payload is shared, not copied).
pub(crate) fn encode_ref(msg: &Message, with_id: bool) -> (String, Bytes, HeaderMap) {
    let mut h = HeaderMap::new();
    for (n, v) in msg.headers().iter() {
        h.append(n, v);
    }
    if let Some(order) = order_of(msg.headers()) {
        h.insert(HEADER_ORDER_NAME, order);
    }
    if with_id {
        let mut ids = String::with_capacity(32);
        msg.id().write_to(&mut ids);
        // The string itself becomes the value (a `&str` would be copied again).
        h.insert(NATS_MESSAGE_ID, ids);
    }
    if let Some(k) = msg.key() {
        match std::str::from_utf8(k) {
            Ok(s) if !s.contains(['\r', '\n']) => h.insert(KEY_NAME, s),
            _ => h.insert(KEY_HEX_NAME, hex(k)),
        }
    }
    (msg.topic().as_str().to_owned(), msg.payload().clone(), h)
}

/// The names of `headers` in order, comma-joined, when the order would otherwise be lost:
/// async-nats keeps headers in a hash map (values of one name stay in order, names do not).
/// `None` for fewer than two distinct names, or a name that contains a comma.
fn order_of(headers: &Headers) -> Option<String> {
    let mut names = headers.iter().map(|(n, _)| n);
    let first = names.next()?;
    if names.all(|n| n == first) {
        return None;
    }
    let mut order = String::with_capacity(headers.encoded_len());
    for (i, (n, _)) in headers.iter().enumerate() {
        if n.contains(',') {
            return None;
        }
        if i > 0 {
            order.push(',');
        }
        order.push_str(n);
    }
    Some(order)
}

/// A message read from a stream. `fallback_id` names it when it carries no `Nats-Msg-Id`
/// (published by another client): derived from where it is stored, so every consumer and
/// every redelivery sees the same id.
pub(crate) fn decode(
    topic: Topic,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    fallback_id: impl FnOnce() -> MessageId,
) -> Message {
    let mut out = Headers::new();
    let mut id = None;
    let mut key = None;
    let mut order = None;
    let mut user: Vec<(&str, std::collections::VecDeque<&str>)> = Vec::new();
    if let Some(h) = headers {
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            if name == HEADER_ORDER {
                order = values.first().map(|v| v.as_str());
                continue;
            }
            let mut kept = std::collections::VecDeque::new();
            for v in values {
                let v = v.as_str();
                if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    id = Some(MessageId::custom(v));
                } else if name.starts_with("Nats-Batch-") {
                    // Transport framing of atomic batches, not user headers.
                } else if name == KEY {
                    key = Some(Bytes::copy_from_slice(v.as_bytes()));
                } else if name == KEY_HEX {
                    key = unhex(v).map(Bytes::from);
                } else {
                    kept.push_back(v);
                }
            }
            if !kept.is_empty() {
                user.push((name, kept));
            }
        }
    }
    // Publish order first (from the order header), then whatever it does not list.
    for name in order.into_iter().flat_map(|o| o.split(',')) {
        if let Some((n, values)) = user.iter_mut().find(|(n, _)| *n == name)
            && let Some(v) = values.pop_front()
        {
            out.append(*n, v);
        }
    }
    for (n, values) in user {
        for v in values {
            out.append(n, v);
        }
    }
    Message::from_parts(id.unwrap_or_else(fallback_id), topic, key, out, payload)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_binary_and_text_keys() {
        for key in [&b"customer-7"[..], &[0u8, 255, 10, 13][..]] {
            let m = Message::new("a.b", "p")
                .with_key(key.to_vec())
                .with_header("x", "1");
            let id = m.id().to_string();
            let (subject, payload, h) = encode(m, true);
            let back = decode(Topic::new(&subject), Some(&h), payload, MessageId::generate);
            assert_eq!(back.key().map(|k| &k[..]), Some(key));
            assert_eq!(back.id().to_string(), id);
            assert_eq!(back.headers().get("x"), Some("1"));
            assert_eq!(back.headers().len(), 1, "internal headers are stripped");
        }
    }

    #[test]
    fn header_order_and_repeats_survive() {
        let mut sent = Headers::new();
        for (n, v) in [("b", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("a", "5")] {
            sent.append(n, v);
        }
        let m = Message::new("a.b", "p").with_headers(sent.clone());
        let (subject, payload, h) = encode(m, false);
        let back = decode(Topic::new(&subject), Some(&h), payload, || {
            MessageId::custom("fallback")
        });
        let got: Vec<_> = back.headers().iter().collect();
        let want: Vec<_> = sent.iter().collect();
        assert_eq!(got, want);
        assert_eq!(back.id().to_string(), "fallback");
    }
}
