//! One delivery and the handle that settles it.

use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::message::Message;
use crate::outcome::Position;

/// Settles one delivery. Backends implement it; users call it through [`Delivery`].
#[async_trait::async_trait]
pub trait AckHandle: Send + Sync + 'static {
    /// Processed: never deliver again.
    async fn ack(self: Box<Self>) -> Result<(), Error>;
    /// Not processed: deliver again after `delay`.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), Error>;
    /// Never deliver again, without processing (poison message).
    async fn term(self: Box<Self>) -> Result<(), Error>;
}

/// A boxed [`AckHandle`].
pub struct Acker(Box<dyn AckHandle>);

impl Acker {
    /// Wrap a backend's handle.
    pub fn new(h: impl AckHandle) -> Self {
        Acker(Box::new(h))
    }
    /// See [`AckHandle::ack`].
    pub async fn ack(self) -> Result<(), Error> {
        self.0.ack().await
    }
    /// See [`AckHandle::nack`].
    pub async fn nack(self, delay: Duration) -> Result<(), Error> {
        self.0.nack(delay).await
    }
    /// See [`AckHandle::term`].
    pub async fn term(self) -> Result<(), Error> {
        self.0.term().await
    }
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acker")
    }
}

/// Broker-side facts about a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryInfo {
    /// 1 on first delivery, then 2, 3, ...
    pub delivery_count: u32,
    /// Where the message is stored.
    pub position: Position,
}

impl DeliveryInfo {
    /// New info.
    pub fn new(delivery_count: u32, position: Position) -> Self {
        DeliveryInfo {
            delivery_count,
            position,
        }
    }
}

/// A received message and the handle to settle it.
#[derive(Debug)]
pub struct Delivery {
    message: Message,
    info: DeliveryInfo,
    acker: Acker,
}

impl Delivery {
    /// Assemble a delivery (backends).
    pub fn new(message: Message, info: DeliveryInfo, acker: Acker) -> Self {
        Delivery {
            message,
            info,
            acker,
        }
    }
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }
    /// Delivery facts.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }
    /// Acknowledge.
    pub async fn ack(self) -> Result<(), Error> {
        self.acker.ack().await
    }
    /// Ask for redelivery after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), Error> {
        self.acker.nack(delay).await
    }
    /// Terminate: never redeliver.
    pub async fn term(self) -> Result<(), Error> {
        self.acker.term().await
    }
    /// Take the parts, e.g. to move the message into a handler and ack later.
    pub fn split(self) -> (Message, DeliveryInfo, Acker) {
        (self.message, self.info, self.acker)
    }
}
