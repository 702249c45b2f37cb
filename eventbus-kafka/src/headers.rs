//! Kafka record -> Message.

use eventbus_core::{Bytes, Headers, Message, MessageId, Topic};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};

use crate::sink::ID_HEADER;

/// Bytes reserved below `message.max.bytes` for record overhead and our id header.
pub(crate) const OVERHEAD: usize = 512;

/// Kafka headers for a record: the id header first (unless `with_id` is off), then the user
/// headers. `None` when there is nothing to send. `scratch` is reused for the id text.
pub(crate) fn encode(
    id: &MessageId,
    headers: &Headers,
    with_id: bool,
    scratch: &mut String,
) -> Option<OwnedHeaders> {
    if !with_id && headers.is_empty() {
        return None;
    }
    let mut h = OwnedHeaders::new_with_capacity(headers.len() + 1);
    if with_id {
        scratch.clear();
        id.write_to(scratch);
        h = h.insert(Header {
            key: ID_HEADER,
            value: Some(scratch.as_bytes()),
        });
    }
    for (n, v) in headers.iter() {
        h = h.insert(Header {
            key: n,
            value: Some(v.as_bytes()),
        });
    }
    Some(h)
}

/// Convert a consumed record. Header values that are not UTF-8 are skipped (eventbus headers are
/// text); the id header becomes the message id. A record without one (written by another
/// producer) gets an id derived from where it is stored, `kafka:<topic>:<partition>:<offset>`:
/// the same for every consumer group and on every redelivery.
pub fn decode(m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    decode_reusing(m, &mut None)
}

/// [`decode`], naming the message's topic with `last` when it is the same topic (a `Topic` is
/// shared, so a consumer reading one topic does not allocate its name per message); `last`
/// then holds this message's topic.
pub(crate) fn decode_reusing(
    m: &rdkafka::message::BorrowedMessage<'_>,
    last: &mut Option<Topic>,
) -> Message {
    let topic = Topic::reusing(last, m.topic());
    let mut headers = Headers::new();
    let mut id = None;
    if let Some(h) = m.headers() {
        for hdr in h.iter() {
            let Some(v) = hdr.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                continue;
            };
            if hdr.key == ID_HEADER {
                id = Some(MessageId::custom(v));
            } else {
                headers.append(hdr.key, v);
            }
        }
    }
    Message::from_parts(
        id.unwrap_or_else(|| {
            MessageId::custom_fmt(format_args!(
                "kafka:{}:{}:{}",
                m.topic(),
                m.partition(),
                m.offset()
            ))
        }),
        topic,
        m.key().map(Bytes::copy_from_slice),
        headers,
        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
    )
}
