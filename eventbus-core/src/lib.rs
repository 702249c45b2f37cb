#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod envelope;
mod error;
mod message;
mod outcome;
mod publisher;
mod router;
mod sink;
mod subscriber;
pub mod validate;

pub use envelope::{Envelope, names as envelope_headers};
pub use error::{Error, ErrorKind, Result, Retry};
pub use message::{Headers, Message, MessageId, Topic};
pub use outcome::{Ack, AckSender, Outcome, PendingAck, Position};
pub use publisher::{CloseReport, Publisher};
pub use router::{BatchOutcomes, OutcomeRouter};
pub use sink::{BatchSink, SinkLimits};
pub use subscriber::{
    AckHandle, Acker, Delivery, DeliveryInfo, Feed, StartFrom, SubscribeSpec, Subscriber,
    Subscription,
};
pub use validate::TopicRules;

/// Re-exported so backends and users name the same `Bytes`.
pub use bytes::Bytes;
