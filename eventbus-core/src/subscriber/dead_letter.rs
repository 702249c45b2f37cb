//! Dead-lettering, the same on every backend: the dead letter is a copy of the message (key,
//! headers, payload) on the dead-letter topic, with a derived id (`dlq-<original id>`, so a
//! stream that de-duplicates by id never mistakes it for the original) and these headers.

use crate::message::{Message, MessageId, Topic};
use crate::outcome::Position;

/// The original message id.
pub const ID: &str = "eventbus-dlq-id";
/// The topic the message was read from.
pub const TOPIC: &str = "eventbus-dlq-topic";
/// Where it was stored there, as [`Position`](crate::Position) displays it.
pub const POSITION: &str = "eventbus-dlq-position";
/// How many times the broker delivered it, counting the delivery that moved it here:
/// normally `max_deliveries + 1`, of which the handler saw `max_deliveries` (more when a
/// refused dead letter was offered again). Kafka counts only since the partition's current
/// owner read it.
pub const DELIVERIES: &str = "eventbus-dlq-deliveries";
/// Why it was dead-lettered.
pub const REASON: &str = "eventbus-dlq-reason";

/// The reason used when `max_deliveries` is exhausted.
pub const MAX_DELIVERIES: &str = "max deliveries exceeded";
/// On a message built by [`replay`]: the id of the original message.
pub const REPLAY_OF: &str = "eventbus-replay-of";

/// Turn a dead letter back into a message for the topic it came from, to publish again once
/// the cause is fixed: same key, payload and headers, minus the dead-letter headers, plus
/// [`REPLAY_OF`]. Its id is `replay-<dead letter id>`: a new id, so a stream that
/// de-duplicates does not drop it as the original, yet replaying the same dead letter twice
/// is de-duplicated like any retry. `None` if `dead` has no [`TOPIC`] header (it is not a
/// dead letter) or it is empty.
///
/// ```
/// use eventbus_core::{Message, Position, Topic, dead_letter};
/// let original = Message::new("orders", "{}").with_key("o-1");
/// let dead = dead_letter::message(&original, &Topic::new("orders.dlq"),
///     &Position::Offset(7), 5, dead_letter::MAX_DELIVERIES);
/// let again = dead_letter::replay(&dead).unwrap();
/// assert_eq!(again.topic().as_str(), "orders");
/// assert_eq!(again.key(), original.key());
/// assert_eq!(again.headers().get(dead_letter::REPLAY_OF), Some(original.id().to_string().as_str()));
/// assert!(again.headers().get(dead_letter::REASON).is_none());
/// ```
pub fn replay(dead: &Message) -> Option<Message> {
    let topic = dead.headers().get(TOPIC)?.to_owned();
    if topic.is_empty() {
        return None;
    }
    let original_id = dead.headers().get(ID).map(str::to_owned);
    let (id, _, key, mut headers, payload) = dead.clone().into_parts();
    for h in [ID, TOPIC, POSITION, DELIVERIES, REASON, REPLAY_OF] {
        headers.remove(h);
    }
    if let Some(orig) = original_id {
        headers.append(REPLAY_OF, orig);
    }
    Some(Message::from_parts(
        MessageId::custom(format!("replay-{id}")),
        Topic::new(topic),
        key,
        headers,
        payload,
    ))
}

/// Build the dead letter for `original`, read at `position` and delivered `deliveries` times.
pub fn message(
    original: &Message,
    to: &Topic,
    position: &Position,
    deliveries: u32,
    reason: &str,
) -> Message {
    let id = original.id().to_string();
    let (_, _, key, headers, payload) = original.clone().into_parts();
    Message::from_parts(
        MessageId::custom(format!("dlq-{id}")),
        to.clone(),
        key,
        headers,
        payload,
    )
    .with_header(ID, id)
    .with_header(TOPIC, original.topic().as_str())
    .with_header(POSITION, position.to_string())
    .with_header(DELIVERIES, deliveries.to_string())
    .with_header(REASON, reason)
}
