//! One delivery and the handle that settles it.

use std::fmt;
use std::sync::Arc;
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

/// Settles the deliveries of one subscription from the state they share, each named by an
/// [`AckToken`]: the receive path's form without an allocation per delivery
/// ([`Acker::shared`]), for backends whose settling is bookkeeping in the client (an offset
/// to commit later, an entry to drop) rather than a request to the broker.
///
/// The methods run on the handler's task: they must not block beyond a short lock.
pub trait SharedAck: Send + Sync + 'static {
    /// Processed: never deliver again. See [`AckHandle::ack`].
    fn ack(&self, token: AckToken) -> Result<(), Error>;
    /// Not processed: deliver again after `delay`. See [`AckHandle::nack`].
    fn nack(&self, token: AckToken, delay: Duration) -> Result<(), Error>;
    /// Never deliver again, without processing. See [`AckHandle::term`].
    fn term(&self, token: AckToken) -> Result<(), Error>;
}

/// Which delivery a [`SharedAck`] settles: three words whose meaning the backend chooses (for
/// example a partition and delivery round, an offset, an assignment epoch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AckToken(pub [u64; 3]);

/// Settles one delivery: a backend's [`AckHandle`], or a token into its [`SharedAck`].
pub struct Acker(Inner);

enum Inner {
    Handle(Box<dyn AckHandle>),
    Shared(Arc<dyn SharedAck>, AckToken),
}

impl Acker {
    /// Wrap a backend's handle (one allocation per delivery).
    pub fn new(h: impl AckHandle) -> Self {
        Acker(Inner::Handle(Box::new(h)))
    }
    /// A delivery settled through `state` as `token`: no allocation, and settling is a plain
    /// call rather than a boxed future.
    pub fn shared(state: Arc<dyn SharedAck>, token: AckToken) -> Self {
        Acker(Inner::Shared(state, token))
    }
    /// See [`AckHandle::ack`].
    pub async fn ack(self) -> Result<(), Error> {
        match self.0 {
            Inner::Handle(h) => h.ack().await,
            Inner::Shared(s, t) => s.ack(t),
        }
    }
    /// See [`AckHandle::nack`].
    pub async fn nack(self, delay: Duration) -> Result<(), Error> {
        match self.0 {
            Inner::Handle(h) => h.nack(delay).await,
            Inner::Shared(s, t) => s.nack(t, delay),
        }
    }
    /// See [`AckHandle::term`].
    pub async fn term(self) -> Result<(), Error> {
        match self.0 {
            Inner::Handle(h) => h.term().await,
            Inner::Shared(s, t) => s.term(t),
        }
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
