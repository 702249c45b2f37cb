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
//! on while the engine waits for it. With `Nats-Msg-Id` on, the stream stores it at most once,
//! so a leader lost mid-publish reaches the caller as `Acked` instead of `Unknown`. Without
//! ids a resend could store a duplicate, and the sink does not send again after a silence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{Message, OutcomeRouter};
use parking_lot::Mutex;

/// Attempts after which a retry first checks that a stream covers the subject; the waits up to
/// here are 100, 200, 400 and 800 ms (1.5 s), later ones 1 s each.
pub(crate) const RETRIES: u8 = 4;

fn backoff(attempt: u8) -> Duration {
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

#[derive(Default)]
struct Entry {
    /// A whole engine batch, by slot.
    batch: Option<Arc<[Message]>>,
    /// Single messages sent again (slot -> message).
    single: HashMap<usize, Message>,
    /// Attempts so far, by slot.
    tries: HashMap<usize, u8>,
    /// When the batch (or its last resend after a silence) was sent.
    since: Option<Instant>,
    /// Resends after a silence so far: the next waits `ack_timeout * 2^silences`.
    silences: u32,
}

impl Entry {
    fn touch(&mut self) -> &mut Self {
        self.since.get_or_insert_with(Instant::now);
        self
    }
}

/// Messages of unresolved batches, by engine batch id.
pub(crate) struct Kept {
    router: Arc<OutcomeRouter>,
    batches: Mutex<HashMap<u64, Entry>>,
}

impl Kept {
    /// Kept messages for the batches of `router`.
    pub(crate) fn new(router: Arc<OutcomeRouter>) -> Self {
        Kept {
            router,
            batches: Mutex::default(),
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

    /// Keep a whole batch until [`Kept::forget`].
    pub(crate) fn keep_batch(&self, b: u64, msgs: Arc<[Message]>) {
        let mut map = self.batches.lock();
        self.entry(&mut map, b).touch().batch = Some(msgs);
    }

    /// Keep one message (slot `i` of batch `b`) that is being sent again.
    pub(crate) fn keep_one(&self, b: u64, i: usize, msg: Message) {
        let mut map = self.batches.lock();
        self.entry(&mut map, b).touch().single.insert(i, msg);
    }

    /// The batch resolved: nothing more to retry.
    pub(crate) fn forget(&self, b: u64) {
        self.batches.lock().remove(&b);
    }

    /// The unsettled messages of every batch that has heard nothing for `wait` (doubled after
    /// each silence of that batch) at `now`, by batch: to be sent again with their ids.
    pub(crate) fn silent(&self, now: Instant, wait: Duration) -> Vec<(u64, Vec<(usize, Message)>)> {
        let mut out = Vec::new();
        let mut map = self.batches.lock();
        for (b, e) in map.iter_mut() {
            let Some(since) = e.since else { continue };
            if now.saturating_duration_since(since) < wait * (1 << e.silences.min(4)) {
                continue;
            }
            let Some(open) = self.router.unsettled(*b) else {
                continue;
            };
            let items: Vec<(usize, Message)> = open
                .into_iter()
                .filter_map(|i| {
                    let m = e.single.get(&i).or_else(|| e.batch.as_ref()?.get(i))?;
                    Some((i, m.clone()))
                })
                .collect();
            e.since = Some(now);
            e.silences += 1;
            if !items.is_empty() {
                out.push((*b, items));
            }
        }
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
        let tries = e.tries.entry(i).or_insert(0);
        *tries = tries.saturating_add(1);
        Some(Attempt {
            msg,
            wait: backoff(*tries),
            verify: *tries > RETRIES,
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
        kept.keep_one(b2, 3, Message::new("a.b", "x"));
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
    fn silent_batches_are_sent_again_with_doubling_waits() {
        let router = Arc::new(OutcomeRouter::new("t"));
        let (b, _outcomes) = router.register(3);
        let kept = Kept::new(Arc::clone(&router));
        let msgs: Arc<[Message]> = (0..3).map(|i| Message::new("a.b", i.to_string())).collect();
        kept.keep_batch(b, Arc::clone(&msgs));
        let t0 = Instant::now();
        let wait = Duration::from_secs(1);
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
        kept.forget(b);
        assert!(kept.silent(t0 + 100 * wait, wait).is_empty());
    }
}
