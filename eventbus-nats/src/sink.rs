//! The publishing side: an ordered writer task feeding pipelined JetStream publishes.

use std::future::Future;

use async_nats::jetstream::{self, context::PublishAckFuture};
use eventbus_core::{BatchSink, Error, Message, Outcome, SinkLimits, TopicRules};
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::error::{self, BACKEND};
use crate::headers;

type Sent = Vec<Result<PublishAckFuture, Outcome>>;

struct Job {
    batch: Vec<Message>,
    reply: oneshot::Sender<Sent>,
}

/// Publishes batches to JetStream (mode `async`): every message is its own JetStream publish,
/// written in order on one connection, with all acks outstanding at once (bounded by the
/// engine's ACK window). Wrap it in `eventbus_batch::Batcher`.
#[derive(Clone, Debug)]
pub struct NatsSink {
    tx: mpsc::UnboundedSender<Job>,
    limits: SinkLimits,
}

impl NatsSink {
    pub(crate) fn new(js: jetstream::Context, max_payload: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(js, rx));
        // Leave room for the headers we add (Nats-Msg-Id, key) and the NATS/1.0 header line.
        let max_message_bytes = max_payload.saturating_sub(headers::OVERHEAD);
        NatsSink {
            tx,
            limits: SinkLimits::none().max_message_bytes(max_message_bytes),
        }
    }
}

async fn writer(js: jetstream::Context, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = rx.recv().await {
        let mut sent = Vec::with_capacity(job.batch.len());
        for msg in job.batch {
            let (subject, payload, hdrs) = headers::encode(msg);
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload)
                .headers(hdrs);
            sent.push(
                js.send_publish(subject, publish)
                    .await
                    .map_err(error::send_failed),
            );
        }
        let _ = job.reply.send(sent);
    }
}

impl BatchSink for NatsSink {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> SinkLimits {
        self.limits
    }

    fn validate(&self, msg: &Message) -> Result<(), Error> {
        eventbus_core::validate::message(msg, TopicRules::Nats, self.limits.max_message_bytes)
    }

    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        let n = batch.len();
        let (reply, rx) = oneshot::channel();
        // Queued synchronously: the writer publishes batches in call order.
        let queued = self.tx.send(Job { batch, reply }).is_ok();
        async move {
            if !queued {
                return vec![
                    Outcome::Failed(
                        Error::closed("NATS writer stopped").with_backend(BACKEND)
                    );
                    n
                ];
            }
            match rx.await {
                Ok(sent) => {
                    join_all(sent.into_iter().map(|s| async move {
                        match s {
                            Ok(ack) => error::ack_result(ack.await),
                            Err(o) => o,
                        }
                    }))
                    .await
                }
                // The writer died mid-batch: some messages may have been written.
                Err(_) => vec![
                    Outcome::Unknown(
                        Error::new(
                            eventbus_core::ErrorKind::Connect,
                            "NATS writer stopped mid-batch"
                        )
                        .with_backend(BACKEND)
                    );
                    n
                ],
            }
        }
    }
}
