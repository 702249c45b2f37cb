//! Messages kept for another attempt when JetStream answers "no responders" or "temporarily
//! unavailable" (503): nothing was stored, and while a server restarts or a clustered stream
//! elects a new leader that is what every publish gets. The sink tries again with the same
//! message id (so a retry never stores a duplicate) and backoff, for as long as the engine
//! still waits for the message (its `ack_timeout`); past [`RETRIES`] attempts it first checks
//! that a stream covers the subject, so an unroutable subject still fails fast.
//!
//! The same messages are also sent again after a silence: a publish whose ack does not come
//! within the connection's `ack_timeout` (the node that leads the stream died with it, or the
//! connection dropped it) goes out once more with its id, then after twice that wait, and so
//! on while the engine waits for it. With `Nats-Msg-Id` on, the stream stores it at most once
//! (fast batches honour it too), so a leader lost mid-publish reaches the caller as `Acked`
//! (its position then says `duplicate` when the first attempt had been stored) instead of
//! `Unknown`. That holds while the stream's duplicate window covers the engine's
//! `ack_timeout` (JetStream's default window is 2 minutes, the engine's default deadline
//! 30 s). A message sent again after a silence is never reported `Failed`: its first attempt
//! may be stored. Without ids a resend could store a duplicate, and the sink does not send
//! again after a silence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::spi::OutcomeRouter;
use eventbus_core::{Message, Outcome};
use parking_lot::Mutex;

/// Attempts after which a retry first checks that a stream covers the subject; the waits up to
/// here are 100, 200, 400 and 800 ms (1.5 s), later ones 1 s each.
pub(crate) const RETRIES: u8 = 4;

pub(crate) fn backoff(attempt: u8) -> Duration {
    Duration::from_millis((100u64 << attempt.saturating_sub(1).min(4)).min(1_000))
}

/// The next attempt for a kept message.
pub(crate) struct Attempt {
    /// The message.
    pub(crate) msg: Message,
    /// How long to wait before it.
    pub(crate) wait: Duration,
    /// Check that a stream covers the subject before sending it (see the module docs).
    pub(crate) verify: bool,
}

/// What is known of one slot that was sent on its own (a resend or a retry).
#[derive(Default)]
struct Slot {
    /// Attempts after "no responders" / 503 / 10158 so far.
    tries: u8,
    /// When it was last sent (or, for a retry waiting out its backoff, will be).
    sent: Option<Instant>,
    /// Resends after a silence so far: the next waits `silence * 2^silences`.
    silences: u8,
    /// Sent again after a silence: an earlier attempt may be stored, so it is never reported
    /// `Failed` (see [`Kept::settle`]).
    maybe_stored: bool,
}

#[derive(Default)]
struct Entry {
    /// A whole engine batch, by slot.
    batch: Option<Arc<[Message]>>,
    /// Single messages sent again (slot -> message).
    single: HashMap<usize, Message>,
    /// Slots sent on their own.
    slots: HashMap<usize, Slot>,
    /// When the whole batch was handed to the connection (slots without their own send time
    /// count from here).
    since: Option<Instant>,
}

/// Messages of unresolved batches, by engine batch id.
pub(crate) struct Kept {
    router: Arc<OutcomeRouter>,
    batches: Mutex<HashMap<u64, Entry>>,
    /// Messages sent again so far, for any reason (see [`NatsSink::resent`](crate::NatsSink::resent)).
    resent: std::sync::atomic::AtomicU64,
}

impl Kept {
    /// Kept messages for the batches of `router`.
    pub(crate) fn new(router: Arc<OutcomeRouter>) -> Self {
        Kept {
            router,
            batches: Mutex::default(),
            resent: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The entry of batch `b`. Batches whose outcomes the engine no longer waits for (timed
    /// out or dropped before [`Kept::forget`]) are dropped now and then, so lost replies cannot
    /// grow the map.
    fn entry<'m>(&self, map: &'m mut HashMap<u64, Entry>, b: u64) -> &'m mut Entry {
        if map.len() >= 1_024 {
            map.retain(|b, _| self.router.is_pending(*b));
        }
        map.entry(b).or_default()
    }

    /// Keep a whole batch until [`Kept::forget`]; its silence counts from [`Kept::sent`].
    pub(crate) fn keep_batch(&self, b: u64, msgs: Arc<[Message]>) {
        let mut map = self.batches.lock();
        self.entry(&mut map, b).batch = Some(msgs);
    }

    /// Batch `b` has been handed to the connection in full.
    pub(crate) fn sent(&self, b: u64) {
        if let Some(e) = self.batches.lock().get_mut(&b) {
            e.since = Some(Instant::now());
        }
    }

    /// Keep one message (slot `i` of batch `b`) that is being sent again now; `maybe_stored`
    /// when an earlier attempt of it may be stored (a resend after a silence).
    pub(crate) fn keep_one(&self, b: u64, i: usize, msg: Message, maybe_stored: bool) {
        let mut map = self.batches.lock();
        let e = self.entry(&mut map, b);
        e.single.insert(i, msg);
        let slot = e.slots.entry(i).or_default();
        slot.sent = Some(Instant::now());
        slot.maybe_stored |= maybe_stored;
    }

    /// `n` more messages are being sent again.
    pub(crate) fn count_resent(&self, n: usize) {
        self.resent
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("eventbus_nats_resent_total").increment(n as u64);
    }

    /// Messages sent again so far.
    pub(crate) fn resent(&self) -> u64 {
        self.resent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The batch resolved: nothing more to retry.
    pub(crate) fn forget(&self, b: u64) {
        self.batches.lock().remove(&b);
    }

    /// Settle slot `i` of batch `b` with `o`, except that a message sent again after a
    /// silence is never reported `Failed`: an earlier attempt of it may be stored, so a
    /// refusal of the later one (or a failure to send it) leaves the outcome unknown.
    pub(crate) fn settle(&self, b: u64, i: usize, o: Outcome) {
        let o = match o {
            Outcome::Failed(e) if self.maybe_stored(b, i) => Outcome::Unknown(
                eventbus_core::Error::new(
                    e.kind(),
                    "sent again after no ack came; an earlier attempt may be stored",
                )
                .with_backend(crate::error::BACKEND)
                .with_source(e),
            ),
            o => o,
        };
        self.router.settle(b, i, o);
    }

    fn maybe_stored(&self, b: u64, i: usize) -> bool {
        self.batches
            .lock()
            .get(&b)
            .and_then(|e| e.slots.get(&i))
            .is_some_and(|s| s.maybe_stored)
    }

    /// The unsettled messages that have heard nothing for `wait` (doubled after each silence
    /// of that message) at `now`, by batch: to be sent again with their ids, as messages that
    /// may be stored. Slots not yet handed to the connection, and slots whose retry is
    /// waiting out its backoff, are not silent.
    pub(crate) fn silent(&self, now: Instant, wait: Duration) -> Vec<(u64, Vec<(usize, Message)>)> {
        let mut out = Vec::new();
        // Batches the engine no longer waits for leave the map on the way.
        self.batches.lock().retain(|b, e| {
            let Some(open) = self.router.unsettled(*b) else {
                return false;
            };
            let mut items = Vec::new();
            for i in open {
                let slot = e.slots.get(&i);
                let Some(last) = slot.and_then(|s| s.sent).or(e.since) else {
                    continue;
                };
                let silences = slot.map_or(0, |s| s.silences);
                if now.saturating_duration_since(last) < wait * (1u32 << silences.min(4)) {
                    continue;
                }
                let Some(m) = e.single.get(&i).or_else(|| e.batch.as_ref()?.get(i)) else {
                    continue;
                };
                items.push((i, m.clone()));
                let slot = e.slots.entry(i).or_default();
                slot.silences = slot.silences.saturating_add(1);
                slot.sent = Some(now);
                slot.maybe_stored = true;
            }
            if !items.is_empty() {
                out.push((*b, items));
            }
            true
        });
        out
    }

    /// The next attempt for slot `i` of batch `b` after "no responders", or `None` when it is
    /// not kept or the engine no longer waits for its batch (its deadline passed).
    pub(crate) fn retry(&self, b: u64, i: usize) -> Option<Attempt> {
        if !self.router.is_pending(b) {
            return None;
        }
        let mut map = self.batches.lock();
        let e = map.get_mut(&b)?;
        let msg = e
            .single
            .get(&i)
            .or_else(|| e.batch.as_ref().and_then(|m| m.get(i)))?
            .clone();
        let slot = e.slots.entry(i).or_default();
        slot.tries = slot.tries.saturating_add(1);
        let wait = backoff(slot.tries);
        // Not silent while the retry waits out its backoff.
        slot.sent = Some(Instant::now() + wait);
        Some(Attempt {
            msg,
            wait,
            verify: slot.tries > RETRIES,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_and_back_off() {
        let router = Arc::new(OutcomeRouter::new("t"));
        let (b, _outcomes) = router.register(2);
        let kept = Kept::new(Arc::clone(&router));
        let msgs: Arc<[Message]> = vec![Message::new("a.b", "0"), Message::new("a.b", "1")].into();
        kept.keep_batch(b, msgs);
        let attempts: Vec<(Duration, bool)> = (0..7)
            .map(|_| {
                kept.retry(b, 1)
                    .map(|a| (a.wait, a.verify))
                    .expect("pending")
            })
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(
            attempts,
            [
                (ms(100), false),
                (ms(200), false),
                (ms(400), false),
                (ms(800), false),
                (ms(1000), true),
                (ms(1000), true),
                (ms(1000), true)
            ],
            "backoff capped at 1 s, a stream check past the first four"
        );
        assert!(kept.retry(b, 0).is_some(), "slots count separately");
        assert!(kept.retry(b, 2).is_none(), "no such slot");
        kept.forget(b);
        assert!(kept.retry(b, 0).is_none());
        let (b2, outcomes) = router.register(4);
        kept.keep_one(b2, 3, Message::new("a.b", "x"), false);
        assert_eq!(&kept.retry(b2, 3).expect("kept").msg.payload()[..], b"x");
        drop(outcomes);
        router.settle(
            b2,
            0,
            eventbus_core::Outcome::Unknown(eventbus_core::Error::closed("x")),
        );
        for i in 1..4 {
            router.settle(
                b2,
                i,
                eventbus_core::Outcome::Unknown(eventbus_core::Error::closed("x")),
            );
        }
        assert!(
            kept.retry(b2, 3).is_none(),
            "the engine no longer waits: no retry"
        );
    }

    #[test]
    fn silent_messages_are_sent_again_with_doubling_waits() {
        let router = Arc::new(OutcomeRouter::new("t"));
        let (b, _outcomes) = router.register(3);
        let kept = Kept::new(Arc::clone(&router));
        let msgs: Arc<[Message]> = (0..3).map(|i| Message::new("a.b", i.to_string())).collect();
        kept.keep_batch(b, Arc::clone(&msgs));
        let wait = Duration::from_secs(1);
        let later = Instant::now() + 10 * wait;
        assert!(
            kept.silent(later, wait).is_empty(),
            "not handed to the connection yet: not silent"
        );
        kept.sent(b);
        let t0 = Instant::now();
        assert!(kept.silent(t0, wait).is_empty(), "not silent yet");
        router.settle(
            b,
            1,
            eventbus_core::Outcome::Unknown(eventbus_core::Error::closed("x")),
        );
        let again = kept.silent(t0 + wait, wait);
        assert_eq!(again.len(), 1);
        let (id, items) = &again[0];
        assert_eq!(*id, b);
        let slots: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        assert_eq!(slots, [0, 2], "settled slots are not sent again");
        assert_eq!(items[1].1.id(), msgs[2].id(), "the same message, same id");
        assert!(
            kept.silent(t0 + wait + wait, wait).is_empty(),
            "the second wait is twice as long"
        );
        assert_eq!(kept.silent(t0 + 3 * wait, wait).len(), 1);
        // A retry waiting out its backoff is not silent.
        let attempt = kept.retry(b, 0).expect("pending");
        assert!(
            kept.silent(t0 + 3 * wait, wait)
                .iter()
                .all(|(_, items)| items.iter().all(|(i, _)| *i != 0)),
            "slot 0 is retrying"
        );
        assert!(attempt.wait <= Duration::from_millis(100));
        kept.forget(b);
        assert!(kept.silent(t0 + 100 * wait, wait).is_empty());
    }

    #[tokio::test]
    async fn a_message_sent_again_after_a_silence_is_never_failed() {
        use eventbus_core::{Error, ErrorKind, Outcome};
        let router = Arc::new(OutcomeRouter::new("t"));
        let (b, outcomes) = router.register(2);
        let kept = Kept::new(Arc::clone(&router));
        kept.keep_one(b, 0, Message::new("a.b", "0"), true);
        kept.keep_one(b, 1, Message::new("a.b", "1"), false);
        let refused = || Outcome::Failed(Error::new(ErrorKind::Rejected, "no stream"));
        kept.settle(b, 0, refused());
        kept.settle(b, 1, refused());
        let out = outcomes.await;
        assert!(
            matches!(&out[0], Outcome::Unknown(_)),
            "an earlier attempt may be stored: {:?}",
            out[0]
        );
        assert!(matches!(&out[1], Outcome::Failed(_)), "{:?}", out[1]);
    }
}
