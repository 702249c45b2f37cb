//! Mode [`PublishMode::Atomic`](super::PublishMode::Atomic) (ADR-50, server 2.12+, stream
//! `allow_atomic`): the messages of batch `B` that go to one stream form atomic batch `k`, sent
//! with `Nats-Batch-Id`, `Nats-Batch-Sequence` and, on the last, `Nats-Batch-Commit: 1`. Only the
//! first (reply `<inbox>.B.a<k>.s`, an empty ack or an early error) and the last
//! (`<inbox>.B.a<k>.c`, the batch's pub ack) ask for replies: one ack per batch. The batch is
//! stored whole or not at all, and its messages hold consecutive stream sequences ending at the
//! acked one.

use std::sync::Arc;

use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{Ack, Error, ErrorKind, Message, Outcome, Position, SinkLimits};

use super::reply::{Reply, Router, parse_reply};
use super::writer::{Groups, Writer, not_queued};
use super::{ATOMIC_MAX_IN_FLIGHT, ATOMIC_MAX_MESSAGES, Protocol};
use crate::error::err;
use crate::headers;

/// What the writer keeps for atomic batches.
pub(super) struct Atomic {
    /// Unique per sink; batch ids are `<prefix><engine batch>_<k>`.
    batch_prefix: String,
}

impl Atomic {
    pub(super) fn new(batch_prefix: String) -> Self {
        Atomic { batch_prefix }
    }
}

/// One atomic batch in flight. Its messages are not kept: the commit's reply decides, and is
/// waited for.
#[derive(Default)]
pub(super) struct AtomicBatch {
    /// An error reply to the first message (e.g. atomic publish not enabled).
    early: Option<Error>,
}

impl Protocol for Atomic {
    type State = AtomicBatch;

    fn limits(limits: SinkLimits) -> SinkLimits {
        limits
            .max_batch_messages(ATOMIC_MAX_MESSAGES)
            .max_inflight_batches(ATOMIC_MAX_IN_FLIGHT)
    }

    async fn send(&mut self, w: &mut Writer<AtomicBatch>, job_id: u64, batch: Vec<Message>) {
        let (order, unknown) = w.group_by_stream(job_id, &batch).await;
        // An atomic batch needs its stream: without it nothing is sent, and a retry may succeed.
        for i in unknown {
            w.router.settle(
                job_id,
                i,
                Outcome::Failed(
                    err(
                        ErrorKind::Timeout,
                        "could not look up the subject's stream; nothing was sent",
                    )
                    .temporary(),
                ),
            );
        }
        for (k, (_, indices)) in order.into_iter().enumerate() {
            let k = k as u32;
            let batch_id = format!("{}{job_id}_{k}", self.batch_prefix);
            let n = indices.len();
            w.track(job_id, k, indices.clone(), AtomicBatch::default());
            for (seq, &i) in indices.iter().enumerate() {
                let (subject, payload, mut hdrs) = headers::encode_ref(&batch[i], w.dedup);
                hdrs.insert(headers::BATCH_ID, batch_id.as_str());
                hdrs.insert(headers::BATCH_SEQUENCE, (seq + 1).to_string().as_str());
                let last = seq + 1 == n;
                if last {
                    hdrs.insert(headers::BATCH_COMMIT, "1");
                }
                let r = if last {
                    let reply = format!("{}.{job_id}.a{k}.c", w.inbox);
                    w.client
                        .publish_with_reply_and_headers(subject, reply, hdrs, payload)
                        .await
                } else if seq == 0 {
                    let reply = format!("{}.{job_id}.a{k}.s", w.inbox);
                    w.client
                        .publish_with_reply_and_headers(subject, reply, hdrs, payload)
                        .await
                } else {
                    w.client.publish_with_headers(subject, hdrs, payload).await
                };
                if let Err(e) = r {
                    // The batch cannot commit without every message: fail it whole. Messages
                    // already written are abandoned by the server (never committed).
                    let o = not_queued(e);
                    w.settle_group(job_id, k, |_| o.clone());
                    break;
                }
            }
        }
    }

    /// `a<k>.s` or `a<k>.c`: a reply for atomic batch `k`.
    fn route(r: &Router<AtomicBatch>, b: u64, tail: &str, m: &async_nats::Message) {
        if let Some(atomic) = tail.strip_prefix('a')
            && let Some((k, kind)) = atomic.split_once('.')
            && let Ok(k) = k.parse::<u32>()
        {
            route_atomic(&r.router, &r.groups, b, k, kind, m);
        }
    }
}

/// A reply for atomic batch `k` of engine batch `b`: `s` (first message) or `c` (commit).
fn route_atomic(
    router: &OutcomeRouter,
    groups: &Groups<AtomicBatch>,
    b: u64,
    k: u32,
    kind: &str,
    m: &async_nats::Message,
) {
    let reply = parse_reply(m);
    if kind == "s" {
        if let Reply::Refused(e) | Reply::Unavailable(e) = reply
            && let Some(g) = groups.lock().get_mut(&(b, k))
        {
            g.state.early = Some(e);
        }
        return;
    }
    let Some(g) = groups.lock().remove(&(b, k)) else {
        return;
    };
    let n = g.indices.len();
    match reply {
        Reply::Stored {
            stream,
            seq,
            duplicate,
            count,
        } if count.is_none_or(|c| c == n as u64) && seq >= n as u64 => {
            // Committed under the stream lock: consecutive sequences ending at `seq`.
            let first = seq + 1 - n as u64;
            let stream: Arc<str> = stream.into();
            for (j, i) in g.indices.into_iter().enumerate() {
                router.settle(
                    b,
                    i,
                    Outcome::Acked(Ack {
                        position: Position::Stream {
                            stream: Arc::clone(&stream),
                            sequence: first + j as u64,
                            duplicate,
                        },
                    }),
                );
            }
        }
        Reply::Refused(e) | Reply::Unavailable(e) => {
            // All or nothing: the whole batch was not stored.
            let e = g.state.early.unwrap_or(e);
            for i in g.indices {
                router.settle(b, i, Outcome::Failed(e.clone()));
            }
        }
        Reply::InProcess(e) => {
            // A batch with one of these ids is being stored: this one may be, too.
            for i in g.indices {
                router.settle(b, i, Outcome::Unknown(e.clone()));
            }
        }
        _ => {
            let o = Outcome::Unknown(err(
                ErrorKind::Contract,
                "atomic batch ack does not match the batch; it may be stored",
            ));
            for i in g.indices {
                router.settle(b, i, o.clone());
            }
        }
    }
}
