//! The publishing side (mode `async`): core NATS publishes with a reply subject on one shared
//! inbox subscription, written in order by one writer task, with every ack of every batch
//! outstanding at once (bounded by the engine's ACK window).
//!
//! Each message of batch `B` gets the reply subject `<inbox>.B.<i>`; a router task reads the
//! JetStream acks off the inbox and fills the batch's outcome slots. That is one map lookup per
//! ack and no per-message future, channel or timer: the engine's deadline covers lost acks.

use std::future::Future;
use std::sync::Arc;

use async_nats::{Client, StatusCode};
use eventbus_core::{
    Ack, BatchSink, Error, ErrorKind, Message, Outcome, OutcomeRouter, Position, SinkLimits,
    TopicRules,
};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::{BACKEND, err};
use crate::headers;

struct Job {
    id: u64,
    batch: Vec<Message>,
}

/// Publishes batches to JetStream. Wrap it in `eventbus_batch::Batcher`.
#[derive(Clone)]
pub struct NatsSink {
    tx: mpsc::UnboundedSender<Job>,
    router: Arc<OutcomeRouter>,
    limits: SinkLimits,
    dedup: bool,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("limits", &self.limits)
            .field("dedup", &self.dedup)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    pub(crate) async fn new(client: Client, dedup: bool) -> Result<Self, Error> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            err(ErrorKind::Connect, "could not subscribe to the ack inbox")
                .temporary()
                .with_source(e)
        })?;
        let router = Arc::new(OutcomeRouter::new(BACKEND));
        tokio::spawn(route(sub, inbox.len() + 1, Arc::clone(&router)));
        let (tx, rx) = mpsc::unbounded_channel();
        // Leave room for the headers we add (Nats-Msg-Id, key) and the NATS/1.0 header line.
        let max = client
            .server_info()
            .max_payload
            .saturating_sub(headers::OVERHEAD);
        tokio::spawn(writer(client, inbox, rx, Arc::clone(&router), dedup));
        Ok(NatsSink {
            tx,
            router,
            limits: SinkLimits::none().max_message_bytes(max),
            dedup,
        })
    }
}

async fn writer(
    client: Client,
    inbox: String,
    mut rx: mpsc::UnboundedReceiver<Job>,
    router: Arc<OutcomeRouter>,
    dedup: bool,
) {
    let mut reply = String::with_capacity(inbox.len() + 24);
    while let Some(job) = rx.recv().await {
        for (i, msg) in job.batch.into_iter().enumerate() {
            let (subject, payload, hdrs) = headers::encode(msg, dedup);
            reply.clear();
            use std::fmt::Write;
            let _ = write!(reply, "{inbox}.{}.{i}", job.id);
            if let Err(e) = client
                .publish_with_reply_and_headers(subject, reply.clone(), hdrs, payload)
                .await
            {
                // Not handed to the connection: definitely not sent.
                router.settle(
                    job.id,
                    i,
                    Outcome::Failed(
                        err(ErrorKind::Connect, "could not queue the publish")
                            .temporary()
                            .with_source(e),
                    ),
                );
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct ApiAck<'a> {
    #[serde(borrow)]
    stream: Option<&'a str>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

fn parse_ack(m: &async_nats::Message) -> Outcome {
    if m.status == Some(StatusCode::NO_RESPONDERS) {
        return Outcome::Failed(err(
            ErrorKind::Rejected,
            "no JetStream stream covers the subject (no responders)",
        ));
    }
    match serde_json::from_slice::<ApiAck<'_>>(&m.payload) {
        Ok(ApiAck { error: Some(e), .. }) => {
            let kind = match (e.code, e.err_code) {
                (_, 10054 | 10003) => ErrorKind::TooLarge, // message / payload size exceeded
                (401 | 403, _) => ErrorKind::Auth,
                (503, _) => ErrorKind::Overloaded,
                _ => ErrorKind::Rejected,
            };
            let mut error = err(
                kind,
                format!(
                    "JetStream refused the message: {} (code {}, err_code {})",
                    e.description, e.code, e.err_code
                ),
            );
            if kind == ErrorKind::Overloaded {
                error = error.temporary();
            }
            Outcome::Failed(error)
        }
        Ok(ApiAck {
            stream: Some(stream),
            seq: Some(seq),
            duplicate,
            ..
        }) => Outcome::Acked(Ack {
            position: Position::Stream {
                stream: stream.to_owned(),
                sequence: seq,
                duplicate,
            },
        }),
        _ => Outcome::Unknown(err(
            ErrorKind::Other,
            "unreadable JetStream ack; the message may be stored",
        )),
    }
}

async fn route(mut sub: async_nats::Subscriber, skip: usize, router: Arc<OutcomeRouter>) {
    while let Some(m) = sub.next().await {
        let Some(rest) = m.subject.as_str().get(skip..) else {
            continue;
        };
        let Some((b, i)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(b), Ok(i)) = (b.parse::<u64>(), i.parse::<usize>()) else {
            continue;
        };
        router.settle(b, i, parse_ack(&m));
    }
    // The connection is gone for good: pending batches resolve through the engine's deadline.
    tracing::debug!("NATS ack inbox closed");
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
        let (id, outcomes) = self.router.register(n);
        // Queued synchronously: the writer publishes batches in call order.
        let queued = self.tx.send(Job { id, batch }).is_ok();
        async move {
            if !queued {
                return vec![
                    Outcome::Failed(
                        Error::closed("NATS writer stopped").with_backend(BACKEND)
                    );
                    n
                ];
            }
            outcomes.await
        }
    }
}
