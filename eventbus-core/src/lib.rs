#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod codec;
pub mod dedup;
mod envelope;
mod error;
pub mod handler;
mod message;
pub mod ops;
mod outcome;
mod publisher;
mod router;
mod sink;
mod subscriber;
pub mod topic;
pub mod trace;
pub mod validate;

/// What a backend implements and uses to plug into eventbus, kept apart from the API a
/// service programs against (the crate root), as OpenDAL keeps its `raw` module: acks a backend
/// resolves ([`AckSender`](spi::AckSender), [`OutcomeRouter`](spi::OutcomeRouter)), the
/// subscription's backend end ([`Feed`](spi::Feed), [`AckHandle`](spi::AckHandle) or
/// [`SharedAck`](spi::SharedAck),
/// [`DeadLetters`](spi::DeadLetters)), and name rules ([`TopicRules`](spi::TopicRules)).
/// A backend also implements [`Backend`], [`BatchSink`] and [`Subscriber`] from the root.
pub mod spi {
    pub use crate::outcome::AckSender;
    pub use crate::router::{BatchOutcomes, OutcomeRouter};
    pub use crate::subscriber::{AckHandle, AckToken, DeadLetters, Feed, SharedAck, TrySend};
    pub use crate::validate::TopicRules;
}

/// `serde(with = "eventbus_core::serde_millis")`: a `Duration` as integer milliseconds in config
/// files, the one representation every eventbus config uses.
pub mod serde_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    /// Deserialize from milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

pub use backend::Backend;
pub use codec::{Codec, Json};
pub use dedup::DedupConfig;
pub use envelope::{Envelope, names as envelope_headers};
pub use error::{Error, ErrorKind, Result, Retry};
pub use message::{Headers, Message, MessageId, Topic};
pub use outcome::{Ack, Outcome, PendingAck, Position};
pub use publisher::{CloseReport, Publisher};
pub use sink::{BatchSink, SinkLimits};
pub use subscriber::dead_letter;
pub use subscriber::{
    Acker, Delivery, DeliveryInfo, StartFrom, SubscribeSpec, Subscriber, Subscription,
};
pub use topic::{Capabilities, TopicSpec};

/// Re-exported so backends and users name the same `Bytes`.
pub use bytes::Bytes;
