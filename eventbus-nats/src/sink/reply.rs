//! The reply side: one task reads every reply off the ack inbox and routes it by subject
//! (`<inbox>.<batch>.<slot>` is a message's own pub ack, anything else goes to the mode's
//! [`Protocol::route`]), JetStream pub acks and errors are parsed here for every mode, and
//! what heard nothing for too long is sent again (see [`crate::retry`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::StatusCode;
use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{Ack, Error, ErrorKind, Message, Outcome, Position};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::Protocol;
use super::fast::LaneDone;
use super::writer::{Groups, Job, stopped};
use crate::error::err;
use crate::retry::Kept;

#[derive(serde::Deserialize)]
struct ApiAck<'a> {
    #[serde(borrow)]
    stream: Option<&'a str>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    /// Atomic batches: messages committed.
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
pub(super) struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

impl ApiError {
    pub(super) fn err_code(&self) -> u16 {
        self.err_code
    }
}

/// The typed error for a JetStream API error reply.
pub(super) fn api_error(e: &ApiError) -> Error {
    let kind = match (e.code, e.err_code) {
        (_, 10054 | 10003) => ErrorKind::TooLarge, // message / payload size exceeded
        (401 | 403, _) => ErrorKind::Auth,
        // 503, and batches in flight over the server's limit: try again later.
        (503 | 429, _) | (_, 10211) => ErrorKind::Overloaded,
        _ => ErrorKind::Rejected,
    };
    let error = err(
        kind,
        format!(
            "JetStream refused the message: {} (code {}, err_code {})",
            e.description, e.code, e.err_code
        ),
    );
    if kind == ErrorKind::Overloaded || e.err_code == DUPLICATE_IN_PROCESS {
        error.temporary()
    } else {
        error
    }
}

/// JetStream's "system temporarily unavailable" (code 503): no meta or stream leader yet.
const TEMPORARILY_UNAVAILABLE: u16 = 10008;

/// JetStream's "duplicate message id is in process" (code 409): a publish with the same
/// `Nats-Msg-Id` is being stored right now (a resend overtook its original, which the stream
/// leader is still replicating). Asked again a moment later the stream answers "duplicate".
pub(super) const DUPLICATE_IN_PROCESS: u16 = 10158;

/// Why a publish is asked again (see [`Reply::again`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Again {
    /// "No responders" or "temporarily unavailable": no stream leader (or no stream).
    NoLeader,
    /// "Duplicate message id is in process": another publish of it is being stored.
    InProcess,
}

/// What a JetStream reply says.
pub(super) enum Reply<'a> {
    Stored {
        stream: &'a str,
        seq: u64,
        duplicate: bool,
        count: Option<u64>,
    },
    /// Refused for a reason of its own: nothing stored, and asking again would not help.
    Refused(Error),
    /// "No responders" or "temporarily unavailable": nothing stored, and a moment later the
    /// stream may have a leader again (JetStream starting, a clustered stream electing one).
    Unavailable(Error),
    /// Another publish with the same message id is being stored (a resend raced its
    /// original): this one stored nothing, and the other decides.
    InProcess(Error),
    /// An empty reply (the first message of an atomic batch was accepted).
    Empty,
    Unreadable,
}

impl Reply<'_> {
    /// Why to publish the message again later, if the reply says that may help.
    fn again(&self) -> Option<Again> {
        match self {
            Reply::Unavailable(_) => Some(Again::NoLeader),
            Reply::InProcess(_) => Some(Again::InProcess),
            _ => None,
        }
    }

    /// The outcome of a message published on its own.
    pub(super) fn outcome(self) -> Outcome {
        match self {
            Reply::Stored {
                stream,
                seq,
                duplicate,
                ..
            } => Outcome::Acked(Ack {
                position: Position::Stream {
                    stream: stream.into(),
                    sequence: seq,
                    duplicate,
                },
            }),
            Reply::Refused(e) | Reply::Unavailable(e) => Outcome::Failed(e),
            // The message may well be stored, by the other publish.
            Reply::InProcess(e) => Outcome::Unknown(e),
            Reply::Empty | Reply::Unreadable => unreadable(),
        }
    }
}

pub(super) fn parse_reply(m: &async_nats::Message) -> Reply<'_> {
    if m.status == Some(StatusCode::NO_RESPONDERS) {
        // Nothing stored. Usually no stream covers the subject (retrying will not help), but
        // a restarting server answers the same until JetStream is up again: say both.
        return Reply::Unavailable(
            err(
                ErrorKind::Rejected,
                "no JetStream responder: no stream covers the subject, or JetStream is not ready \
                 yet (server starting or restarting)",
            )
            .temporary(),
        );
    }
    if m.payload.is_empty() {
        return Reply::Empty;
    }
    match serde_json::from_slice::<ApiAck<'_>>(&m.payload) {
        Ok(ApiAck { error: Some(e), .. }) if e.err_code == DUPLICATE_IN_PROCESS => {
            Reply::InProcess(api_error(&e))
        }
        // Other 503 errors (a full stream, ...) are answers about the message.
        Ok(ApiAck { error: Some(e), .. }) if e.err_code == TEMPORARILY_UNAVAILABLE => {
            Reply::Unavailable(api_error(&e))
        }
        Ok(ApiAck { error: Some(e), .. }) => Reply::Refused(api_error(&e)),
        Ok(ApiAck {
            stream: Some(stream),
            seq: Some(seq),
            duplicate,
            count,
            ..
        }) => Reply::Stored {
            stream,
            seq,
            duplicate,
            count,
        },
        _ => Reply::Unreadable,
    }
}

fn unreadable() -> Outcome {
    Outcome::Unknown(err(
        ErrorKind::Other,
        "unreadable JetStream ack; the message may be stored",
    ))
}

/// Routes the server's replies to what waits for them: the engine's batches (`router`), the
/// mode's groups in flight, and messages kept for a resend; owned by the reply task.
pub(super) struct Router<S> {
    pub(super) router: Arc<OutcomeRouter>,
    pub(super) groups: Groups<S>,
    pub(super) kept: Arc<Kept>,
    /// Messages carry `Nats-Msg-Id`: one that may be stored can be sent again safely.
    pub(super) dedup: bool,
    pub(super) resend: mpsc::WeakUnboundedSender<Job>,
}

impl<S: Send + 'static> Router<S> {
    /// Hand messages of batch `b` back to the writer to publish again with their ids:
    /// `maybe_stored` when an earlier attempt may be stored (no ack came), otherwise they
    /// were definitely not stored.
    pub(super) fn send_again(
        &self,
        b: u64,
        items: Vec<(usize, Message)>,
        verify: bool,
        maybe_stored: bool,
    ) {
        let items = match self.resend.upgrade() {
            Some(tx) => match tx.send(Job::Resend {
                id: b,
                items,
                verify,
                maybe_stored,
            }) {
                Ok(()) => return,
                Err(mpsc::error::SendError(Job::Resend { items, .. })) => items,
                Err(_) => return,
            },
            None => items,
        };
        // The sink is gone: not sent again.
        for (i, _) in items {
            if maybe_stored {
                self.router.settle(
                    b,
                    i,
                    Outcome::Unknown(err(
                        ErrorKind::Closed,
                        "NATS writer stopped before sending again; an earlier attempt may be stored",
                    )),
                );
            } else {
                self.kept.settle(b, i, stopped());
            }
        }
    }

    /// Hand an ended lane batch back to the writer, after `wait` (a backoff: the lane stays
    /// busy until then). If the sink is gone, what was to be sent again is settled.
    pub(super) fn lane_done(&self, done: LaneDone, wait: Duration) {
        if done.resending() > 0 {
            self.kept.count_resent(done.resending());
        }
        let Some(tx) = self.resend.upgrade() else {
            done.stopped(&self.router);
            return;
        };
        if wait.is_zero() {
            if let Err(mpsc::error::SendError(Job::Lane(done))) = tx.send(Job::Lane(done)) {
                done.stopped(&self.router);
            }
            return;
        }
        drop(tx);
        let resend = self.resend.clone();
        let router = Arc::clone(&self.router);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let sent = match resend.upgrade() {
                Some(tx) => tx.send(Job::Lane(done)).map_err(|e| e.0),
                None => Err(Job::Lane(done)),
            };
            if let Err(Job::Lane(done)) = sent {
                done.stopped(&router);
            }
        });
    }

    /// A pub ack (or refusal) for message `i` of batch `b`. "No responders" and 503 are tried
    /// again with backoff while the engine waits for the message (see [`crate::retry`]).
    fn single(self: &Arc<Self>, b: u64, i: usize, m: &async_nats::Message) {
        let reply = parse_reply(m);
        if let Some(why) = reply.again()
            && let Some(attempt) = self.kept.retry(b, i)
        {
            // "In process" says the subject is covered: no stream check for it.
            let verify = attempt.verify && why == Again::NoLeader;
            let me = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(attempt.wait).await;
                me.send_again(b, vec![(i, attempt.msg)], verify, false);
            });
            return;
        }
        self.kept.settle(b, i, reply.outcome());
    }
}

/// Send again, with their ids, the messages that heard nothing for `silence` (see
/// [`crate::retry`]): the mode's batches whose flow went quiet ([`Protocol::resend_quiet`]),
/// and, if `singles`, messages published on their own. Runs until every sink handle is gone.
///
/// When the client has connected again, the mode's batches in flight are dealt with at once
/// (within [`RECONNECT_CHECK`]): their replies went to the old connection and will not come.
pub(super) async fn resend_silent<P: Protocol>(
    r: Arc<Router<P::State>>,
    client: async_nats::Client,
    silence: Duration,
    singles: bool,
) {
    use std::sync::atomic::Ordering;
    let tick = (silence / 4).clamp(RECONNECT_CHECK, Duration::from_secs(1));
    let stats = client.statistics();
    drop(client);
    let mut connects = stats.connects.load(Ordering::Relaxed);
    let mut checked = Instant::now();
    let mut next_scan = checked + tick;
    loop {
        tokio::time::sleep(RECONNECT_CHECK).await;
        if r.resend.upgrade().is_none() {
            return;
        }
        let now = Instant::now();
        let c = stats.connects.load(Ordering::Relaxed);
        if c != connects {
            connects = c;
            tracing::debug!("reconnected; batches in flight are sent again");
            // Batches last heard of before the previous check went out on the old connection
            // (or may have); later ones may be on the new one and wait for their silence.
            P::resend_quiet(&r, checked, Duration::ZERO);
        }
        checked = now;
        if now < next_scan {
            continue;
        }
        next_scan = now + tick;
        P::resend_quiet(&r, now, silence);
        if !singles {
            continue;
        }
        for (b, items) in r.kept.silent(now, silence) {
            tracing::debug!(
                messages = items.len(),
                "no ack; sending the messages again with their ids"
            );
            r.send_again(b, items, false, true);
        }
    }
}

/// How often the resend task checks whether the client connected again.
const RECONNECT_CHECK: Duration = Duration::from_millis(50);

/// Read the ack inbox until the connection is gone. `skip`: the length of `<inbox>.`.
pub(super) async fn route<P: Protocol>(
    mut sub: async_nats::Subscriber,
    skip: usize,
    r: Arc<Router<P::State>>,
) {
    while let Some(m) = sub.next().await {
        let Some(rest) = m.subject.as_str().get(skip..) else {
            continue;
        };
        let Some((b, tail)) = rest.split_once('.') else {
            continue;
        };
        let Ok(b) = b.parse::<u64>() else { continue };
        match tail.parse::<usize>() {
            Ok(i) => r.single(b, i, &m),
            Err(_) => P::route(&r, b, tail, &m),
        }
    }
    // The connection is gone for good: pending batches resolve through the engine's deadline.
    tracing::debug!("NATS ack inbox closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::Bytes;

    fn reply(payload: &'static str) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.0.0".into(),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn an_id_in_process_is_unknown_and_asked_again() {
        let m = reply(
            r#"{"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#,
        );
        let o = parse_reply(&m).outcome();
        assert!(
            matches!(&o, Outcome::Unknown(e) if e.is_retryable()),
            "never Failed: the other publish may store it ({o:?})"
        );
        assert_eq!(parse_reply(&m).again(), Some(Again::InProcess));
    }

    #[test]
    fn only_transient_refusals_are_asked_again() {
        let unavailable = reply(
            r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
        );
        assert!(matches!(
            parse_reply(&unavailable).outcome(),
            Outcome::Failed(_)
        ));
        assert_eq!(parse_reply(&unavailable).again(), Some(Again::NoLeader));
        let mut no_responders = reply("");
        no_responders.status = Some(StatusCode::NO_RESPONDERS);
        assert!(matches!(
            parse_reply(&no_responders).outcome(),
            Outcome::Failed(_)
        ));
        assert_eq!(parse_reply(&no_responders).again(), Some(Again::NoLeader));
        let full = reply(
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        );
        assert!(matches!(parse_reply(&full).outcome(), Outcome::Failed(_)));
        assert_eq!(parse_reply(&full).again(), None);
        let stored = reply(r#"{"stream":"S","seq":7}"#);
        assert!(parse_reply(&stored).outcome().is_acked());
        assert_eq!(parse_reply(&stored).again(), None);
        let unreadable = reply("garbage");
        assert_eq!(parse_reply(&unreadable).again(), None);
    }
}
