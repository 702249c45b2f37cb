//! Publish outcomes: acked, failed, or unknown, and the future that delivers them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::error::{Error, ErrorKind};

/// Where the broker stored a message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Position {
    /// A JetStream stream sequence.
    Stream {
        /// Stream name, shared where many positions name one stream (a batch's acks, a
        /// subscription's deliveries).
        stream: Arc<str>,
        /// Sequence number in the stream.
        sequence: u64,
        /// The broker recognised the message id as a duplicate of one it already stored.
        duplicate: bool,
    },
    /// In a JetStream stream, written by a fast-ingest batch (ADR-50), whose server ack names
    /// only the batch's last stream sequence. The message's own sequence is at most
    /// `last_sequence - (count - index)`, exactly that when nothing else wrote to the stream
    /// during the batch. Within one sink and stream, `(last_sequence, index)` orders messages
    /// as the stream stored them.
    StreamBatch {
        /// Stream name, shared where many positions name one stream (a batch's acks, a
        /// subscription's deliveries).
        stream: Arc<str>,
        /// Stream sequence of the batch's last stored message.
        last_sequence: u64,
        /// The message's place in its batch, from 1.
        index: u64,
        /// Messages the batch stored.
        count: u64,
    },
    /// A Kafka partition and offset.
    Partition {
        /// Partition number.
        partition: i32,
        /// Offset within the partition.
        offset: i64,
    },
    /// An offset in an in-memory topic log.
    Offset(u64),
}

/// `stream/sequence`, `partition/offset` or `offset`; a fast-ingest batch's message shows its
/// sequence's upper bound, `stream/<=sequence`. The dead-letter header
/// [`dead_letter::POSITION`](crate::dead_letter::POSITION) carries this form.
impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Partition { partition, offset } => write!(f, "{partition}/{offset}"),
            Position::Stream {
                stream, sequence, ..
            } => write!(f, "{stream}/{sequence}"),
            Position::StreamBatch {
                stream,
                last_sequence,
                index,
                count,
            } => write!(
                f,
                "{stream}/<={}",
                last_sequence.saturating_sub(count.saturating_sub(*index))
            ),
            Position::Offset(o) => write!(f, "{o}"),
        }
    }
}

/// A positive acknowledgement: the broker stored the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Where it was stored.
    pub position: Position,
}

/// The three-valued result of one publish.
///
/// `Unknown` is never collapsed into `Failed` or `Acked`: it means the message may or may not
/// be stored (timeout, connection lost after sending, cancelled while in flight). Retrying an
/// unknown outcome with the same [`MessageId`](crate::MessageId) is safe on backends that
/// de-duplicate.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Stored by the broker.
    Acked(Ack),
    /// Definitely not stored.
    Failed(Error),
    /// May or may not be stored.
    Unknown(Error),
}

impl Outcome {
    /// `true` for [`Outcome::Acked`].
    pub fn is_acked(&self) -> bool {
        matches!(self, Outcome::Acked(_))
    }

    /// `true` for [`Outcome::Unknown`].
    pub fn is_unknown(&self) -> bool {
        matches!(self, Outcome::Unknown(_))
    }

    /// `true` for [`Outcome::Failed`].
    pub fn is_failed(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }

    /// The ack, or the error of a failed or unknown outcome.
    pub fn into_result(self) -> Result<Ack, Error> {
        match self {
            Outcome::Acked(a) => Ok(a),
            Outcome::Failed(e) | Outcome::Unknown(e) => Err(e),
        }
    }

    /// The error, if not acked.
    pub fn error(&self) -> Option<&Error> {
        match self {
            Outcome::Acked(_) => None,
            Outcome::Failed(e) | Outcome::Unknown(e) => Some(e),
        }
    }
}

/// Resolves to the [`Outcome`] of one published message.
///
/// Dropping it is fine: the message stays in flight and its window slot is released when the
/// broker answers or its deadline passes.
#[must_use = "a PendingAck does nothing unless awaited; drop it explicitly to ignore the outcome"]
#[derive(Debug)]
pub struct PendingAck {
    inner: PendingInner,
}

#[derive(Debug)]
enum PendingInner {
    Waiting(oneshot::Receiver<Outcome>),
    Ready(Option<Outcome>),
}

/// The sending half of a [`PendingAck`]; held by whoever resolves the message.
///
/// If it is dropped without [`AckSender::send`], the `PendingAck` resolves as
/// [`Outcome::Unknown`]: the message might have been sent.
#[derive(Debug)]
pub struct AckSender(oneshot::Sender<Outcome>);

impl AckSender {
    /// Resolve the message. Returns `false` when nobody is waiting any more (not an error).
    pub fn send(self, outcome: Outcome) -> bool {
        self.0.send(outcome).is_ok()
    }

    /// `true` once the `PendingAck` has been dropped.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl PendingAck {
    /// A linked pair: resolve the `PendingAck` through the `AckSender`.
    pub fn channel() -> (AckSender, PendingAck) {
        let (tx, rx) = oneshot::channel();
        (
            AckSender(tx),
            PendingAck {
                inner: PendingInner::Waiting(rx),
            },
        )
    }

    /// An already-resolved `PendingAck`.
    pub fn ready(outcome: Outcome) -> PendingAck {
        PendingAck {
            inner: PendingInner::Ready(Some(outcome)),
        }
    }
}

impl Future for PendingAck {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match &mut self.inner {
            PendingInner::Ready(o) => Poll::Ready(o.take().unwrap_or_else(|| {
                Outcome::Unknown(Error::new(
                    ErrorKind::Contract,
                    "PendingAck polled after completion",
                ))
            })),
            PendingInner::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Outcome::Unknown(Error::new(
                        ErrorKind::Closed,
                        "publisher dropped the message before its outcome was known",
                    ))
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_display_where_to_find_the_message() {
        let batch = Position::StreamBatch {
            stream: "ORDERS".into(),
            last_sequence: 110,
            index: 3,
            count: 10,
        };
        // Message 3 of 10, the last stored at 110: at most 103 (exactly, if nothing else wrote).
        assert_eq!(batch.to_string(), "ORDERS/<=103");
        let one = Position::Stream {
            stream: "ORDERS".into(),
            sequence: 7,
            duplicate: false,
        };
        assert_eq!(one.to_string(), "ORDERS/7");
        let p = Position::Partition {
            partition: 2,
            offset: 41,
        };
        assert_eq!(p.to_string(), "2/41");
        assert_eq!(Position::Offset(5).to_string(), "5");
    }

    #[tokio::test]
    async fn dropped_sender_is_unknown_not_failed() {
        let (tx, rx) = PendingAck::channel();
        drop(tx);
        let o = rx.await;
        assert!(o.is_unknown());
        assert_eq!(o.error().unwrap().kind(), ErrorKind::Closed);
    }

    #[tokio::test]
    async fn ready_and_channel() {
        let ack = Ack {
            position: Position::Offset(3),
        };
        assert!(
            PendingAck::ready(Outcome::Acked(ack.clone()))
                .await
                .is_acked()
        );
        let (tx, rx) = PendingAck::channel();
        assert!(tx.send(Outcome::Acked(ack.clone())));
        assert_eq!(rx.await.into_result().unwrap(), ack);
    }
}
