//! Fast-ingest batch publishing (ADR-50, nats-server 2.14+, stream `allow_batched`).
//!
//! No headers: the server reads the batch from the **reply subject** of every message,
//! `<prefix>.<batch id>.<flow>.<gap mode>.<batch seq>.<op>.$FI`, with op `0` (start, seq 1),
//! `1` (append), `3` (commit at end of batch: an empty message that is not stored). Messages are
//! stored as they arrive (a fast batch is not atomic); the server replies on the same subjects:
//!
//! - `{"type":"ack","seq":N,"msgs":M}`: flow control, messages 1..=N were persisted;
//! - `{"type":"gap",...}` / `{"type":"err","seq":N,"error":{...}}`: a gap, or message N refused;
//! - a pub ack with `"batch"` and `"count":C` once the batch is committed: with gap mode
//!   `fail` (ours) exactly messages 1..=C are stored, and every later one was dropped;
//! - a plain error pub ack when a message is refused before it reaches the batch (stream does
//!   not allow batches, too many batches in flight, message too large, ...). When that happens
//!   to message 1 the batch never starts and nothing of it is stored.
//!
//! We end every batch with the `eob` commit rather than committing on the last data message, so
//! a refusal of the last message still ends in a pub ack whose count says what is stored.

use eventbus_core::{Ack, Error, Outcome, Position};

use crate::error::err;
use crate::sink::{ApiError, api_error};

/// The most messages between two flow-control acks we allow the server to choose. It picks
/// `min(this, 500 / batches in flight on the stream)`, starting at 1 when several are in flight.
pub(crate) const FLOW: u16 = 500;

/// Batch operation in the reply subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Start = 0,
    Append = 1,
    CommitEob = 3,
}

/// Write the reply subject of batch message `seq` (from 1) into `out`.
pub(crate) fn reply(out: &mut String, prefix: &str, id: &str, seq: u64, op: Op) {
    use std::fmt::Write;
    out.clear();
    let _ = write!(out, "{prefix}.{id}.{FLOW}.fail.{seq}.{}.$FI", op as u8);
}

/// Batch sequence and operation from the tail of a fast-batch reply subject
/// (`<id>.<flow>.<gap>.<seq>.<op>.$FI`).
pub(crate) fn parse_tail(tail: &str) -> Option<(u64, u8)> {
    let mut it = tail.rsplit('.');
    if it.next()? != "$FI" {
        return None;
    }
    let op = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    Some((seq, op))
}

#[derive(serde::Deserialize)]
struct Reply<'a> {
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    stream: Option<&'a str>,
    seq: Option<u64>,
    batch: Option<&'a str>,
    count: Option<u64>,
    error: Option<ApiError>,
}

/// What one server reply on a fast batch's subjects means.
#[derive(Debug)]
pub(crate) enum Event {
    /// Flow control or a gap notice: informational (the commit's count is authoritative).
    Progress,
    /// Message `seq` was refused with this error (not stored).
    Refused {
        seq: u64,
        error: Error,
        scope: Scope,
    },
    /// The batch is committed: messages 1..=count are stored, the last at stream `last`.
    Committed {
        stream: String,
        last: u64,
        count: u64,
    },
    /// A plain pub ack for one message: a server that does not know fast batches stored it
    /// as an ordinary publish.
    Single {
        stream: String,
        sequence: u64,
    },
    Unreadable,
}

/// Interpret a reply to message `seq` of a fast batch.
pub(crate) fn parse(seq: u64, payload: &[u8]) -> Event {
    let Ok(r) = serde_json::from_slice::<Reply<'_>>(payload) else {
        return Event::Unreadable;
    };
    match (r.kind, r.error) {
        (Some("err"), Some(e)) => Event::Refused {
            seq: r.seq.unwrap_or(seq),
            error: api_error(&e),
            scope: match Scope::of(e.err_code()) {
                Scope::Elsewhere => Scope::Elsewhere,
                _ => Scope::Message,
            },
        },
        (Some(_), _) => Event::Progress,
        (None, Some(e)) => Event::Refused {
            seq,
            scope: Scope::of(e.err_code()),
            error: api_error(&e),
        },
        (None, None) => match (r.stream, r.seq, r.batch, r.count) {
            (Some(stream), Some(last), Some(_), Some(count)) => Event::Committed {
                stream: stream.to_owned(),
                last,
                count,
            },
            (Some(stream), Some(sequence), None, _) => Event::Single {
                stream: stream.to_owned(),
                sequence,
            },
            _ => Event::Unreadable,
        },
    }
}

/// What a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The message itself (too large, stream full, ...).
    Message,
    /// The batch (not enabled on the stream, too many in flight, no responders).
    Batch,
    /// Neither: the batch is unknown because it never started or already ended.
    Consequence,
    /// Another publish with the same message id is being stored ("duplicate message id is in
    /// process"): that publish decides, and the message is sent again on its own to learn
    /// its fate, like one a gap cut off.
    Elsewhere,
}

impl Scope {
    fn of(err_code: u16) -> Scope {
        match err_code {
            // Batch publish not enabled, too many in flight, invalid batch id.
            10174 | 10211 | 10179 => Scope::Batch,
            // Batch id unknown.
            10208 => Scope::Consequence,
            crate::sink::DUPLICATE_IN_PROCESS => Scope::Elsewhere,
            _ => Scope::Message,
        }
    }
}

/// What becomes of one message of a fast batch once the server has had its say.
#[derive(Debug)]
pub(crate) enum Fate {
    Settle(Outcome),
    /// Definitely not stored, through no fault of its own (the batch ended early or never
    /// started): publish it again on its own, once.
    Resend,
}

/// How a fast batch ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Committed with messages 1..=count stored, the last at stream sequence `last`.
    Committed {
        stream: String,
        last: u64,
        count: u64,
    },
    /// The commit was refused.
    CommitRefused(Error),
}

/// One fast batch in flight.
#[derive(Debug, Default)]
pub(crate) struct FastState {
    /// Messages refused for reasons of their own, by batch sequence (not stored).
    refused: Vec<(u64, Error)>,
    /// Message 1 was refused: the batch never started and nothing of it is stored.
    never_started: bool,
    /// Messages already settled one by one (a server without fast batches).
    singles: usize,
}

impl FastState {
    pub(crate) fn refuse(&mut self, seq: u64, e: Error, scope: Scope) {
        if seq == 1 {
            self.never_started = true;
        }
        if scope == Scope::Message {
            self.refused.push((seq, e));
        }
    }

    fn refusal(&self, seq: u64) -> Option<&Error> {
        self.refused.iter().find(|(s, _)| *s == seq).map(|(_, e)| e)
    }

    pub(crate) fn single(&mut self) -> usize {
        self.singles += 1;
        self.singles
    }

    /// What becomes of message `seq` (from 1) once the batch ended.
    pub(crate) fn fate(&self, seq: u64, end: &End) -> Fate {
        match end {
            End::Committed {
                stream,
                last,
                count,
            } => self.committed(seq, stream, *last, *count),
            End::CommitRefused(e) => self.commit_refused(seq, e),
        }
    }

    /// What becomes of message `seq` (from 1) once the batch committed with `count` stored.
    /// With `gap=fail`, messages after `count` were dropped: refused ones fail with the
    /// server's reason, the others (cut off by a gap) are sent again.
    pub(crate) fn committed(&self, seq: u64, stream: &str, last: u64, count: u64) -> Fate {
        if seq <= count {
            return Fate::Settle(Outcome::Acked(Ack {
                position: Position::StreamBatch {
                    stream: stream.to_owned(),
                    last_sequence: last,
                    index: seq,
                    count,
                },
            }));
        }
        match self.refusal(seq) {
            Some(e) => Fate::Settle(Outcome::Failed(e.clone())),
            None => Fate::Resend,
        }
    }

    /// What becomes of message `seq` when the commit itself was refused with `e`.
    pub(crate) fn commit_refused(&self, seq: u64, e: &Error) -> Fate {
        if !self.never_started {
            // The batch started: what arrived may be stored.
            return Fate::Settle(Outcome::Unknown(
                err(
                    e.kind(),
                    "the server refused to commit the fast batch; its messages may be stored",
                )
                .with_source(e.clone()),
            ));
        }
        // Message 1 refused: the batch never started, nothing of it is stored.
        match self.refusal(seq) {
            Some(own) => Fate::Settle(Outcome::Failed(own.clone())),
            None => Fate::Resend,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::ErrorKind;

    #[test]
    fn reply_subject_round_trips() {
        let mut s = String::new();
        reply(&mut s, "_INBOX.x.7.f0", "abc7_0", 12, Op::Append);
        assert_eq!(s, "_INBOX.x.7.f0.abc7_0.500.fail.12.1.$FI");
        assert_eq!(parse_tail("abc7_0.500.fail.12.1.$FI"), Some((12, 1)));
        assert_eq!(parse_tail("abc7_0.500.fail.12.1"), None);
    }

    #[test]
    fn parses_every_reply_kind() {
        assert!(matches!(
            parse(5, br#"{"type":"ack","seq":4,"msgs":2}"#),
            Event::Progress
        ));
        match parse(
            9,
            br#"{"type":"err","seq":3,"error":{"code":400,"err_code":10054,"description":"x"}}"#,
        ) {
            Event::Refused { seq: 3, error, .. } => assert_eq!(error.kind(), ErrorKind::TooLarge),
            e => panic!("{e:?}"),
        }
        match parse(
            1,
            br#"{"stream":"S","error":{"code":400,"err_code":10174,"description":"off"}}"#,
        ) {
            Event::Refused { seq: 1, .. } => {}
            e => panic!("{e:?}"),
        }
        match parse(4, br#"{"stream":"S","seq":42,"batch":"b","count":3}"#) {
            Event::Committed {
                stream,
                last: 42,
                count: 3,
            } => assert_eq!(stream, "S"),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            parse(2, br#"{"stream":"S","seq":8}"#),
            Event::Single { sequence: 8, .. }
        ));
        assert!(matches!(parse(2, b"garbage"), Event::Unreadable));
    }

    #[test]
    fn outcomes_follow_the_committed_count() {
        let mut st = FastState::default();
        st.refuse(3, err(ErrorKind::TooLarge, "too big"), Scope::Message);
        assert!(matches!(st.committed(2, "S", 10, 2), Fate::Settle(o) if o.is_acked()));
        match st.committed(3, "S", 10, 2) {
            Fate::Settle(Outcome::Failed(e)) => assert_eq!(e.kind(), ErrorKind::TooLarge),
            f => panic!("{f:?}"),
        }
        assert!(matches!(st.committed(4, "S", 10, 2), Fate::Resend));
        // Commit refused: unknown unless message 1 was refused (then nothing started).
        let e = err(ErrorKind::Rejected, "sealed");
        assert!(matches!(
            st.commit_refused(2, &e),
            Fate::Settle(Outcome::Unknown(_))
        ));
    }

    #[test]
    fn an_id_in_process_elsewhere_is_sent_again_not_failed() {
        // A resend overtook its original: "duplicate message id is in process" (10158) says
        // nothing was stored by this publish, and the other one may store it.
        let refusal = br#"{"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#;
        let Event::Refused { seq, error, scope } = parse(3, refusal) else {
            panic!("a refusal");
        };
        assert_eq!((seq, scope), (3, Scope::Elsewhere));
        assert!(error.is_retryable());
        let mut st = FastState::default();
        st.refuse(seq, error, scope);
        assert!(matches!(st.committed(3, "S", 10, 2), Fate::Resend));
        // The same refusal as a flow error of the batch.
        let flow = br#"{"type":"err","seq":4,"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#;
        match parse(9, flow) {
            Event::Refused {
                seq: 4,
                scope: Scope::Elsewhere,
                ..
            } => {}
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_batch_that_never_started_is_sent_again() {
        let e = err(ErrorKind::Rejected, "unknown batch");
        // Refused as a batch (e.g. not enabled on the stream): every message again, also the
        // ones refused only because the batch was unknown.
        let mut st = FastState::default();
        st.refuse(1, err(ErrorKind::Rejected, "not enabled"), Scope::of(10174));
        st.refuse(
            2,
            err(ErrorKind::Rejected, "unknown batch"),
            Scope::of(10208),
        );
        assert!(matches!(st.commit_refused(1, &e), Fate::Resend));
        assert!(matches!(st.commit_refused(2, &e), Fate::Resend));
        assert!(matches!(st.commit_refused(5, &e), Fate::Resend));
        // Message 1 refused for itself: it fails, the rest are sent again.
        let mut st = FastState::default();
        st.refuse(1, err(ErrorKind::TooLarge, "too big"), Scope::Message);
        assert!(matches!(
            st.commit_refused(1, &e),
            Fate::Settle(Outcome::Failed(_))
        ));
        assert!(matches!(st.commit_refused(2, &e), Fate::Resend));
    }
}
