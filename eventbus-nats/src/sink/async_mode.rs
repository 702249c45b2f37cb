//! Mode [`PublishMode::Async`](super::PublishMode::Async): each message of batch `B` gets the
//! reply subject `<inbox>.B.<i>`; a router task reads the JetStream acks off the inbox and fills
//! the batch's outcome slots. That is one map lookup per ack and no per-message future, channel
//! or timer: the engine's deadline covers lost acks.
//!
//! That single publish ([`Writer::publish_one`], its ack read by the reply task) is also how
//! every mode sends a message on its own, so this mode adds nothing but the loop over the batch.

use std::convert::Infallible;
use std::sync::Arc;

use eventbus_core::Message;

use super::Protocol;
use super::reply::Router;
use super::writer::Writer;

/// Pipelined publishes, one ack per message.
pub(super) struct Async;

impl Protocol for Async {
    /// No batches in flight of its own: every message is acked by itself.
    type State = Infallible;

    async fn send(&mut self, w: &mut Writer<Infallible>, id: u64, batch: Vec<Message>) {
        let batch: Arc<[Message]> = batch.into();
        w.kept.keep_batch(id, Arc::clone(&batch));
        let mut reply = String::with_capacity(w.inbox.len() + 24);
        for (i, msg) in batch.iter().enumerate() {
            w.publish_one(id, i, msg, &mut reply).await;
        }
        w.kept.sent(id);
    }

    /// Every reply of this mode is a message's own pub ack.
    fn route(_: &Router<Infallible>, _: u64, _: &str, _: &async_nats::Message) {}
}
