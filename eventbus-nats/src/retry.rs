//! Messages kept for another attempt when JetStream answers "no responders" or "temporarily
//! unavailable" (503): nothing was stored, and while a server restarts or a clustered stream
//! elects a new leader that is what every publish gets. The sink tries again with the same
//! message id (so a retry never stores a duplicate) and backoff, for as long as the engine
//! still waits for the message (its `ack_timeout`); past [`RETRIES`] attempts it first checks
//! that a stream covers the subject, so an unroutable subject still fails fast.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
        self.entry(&mut map, b).batch = Some(msgs);
    }

    /// Keep one message (slot `i` of batch `b`) that is being sent again.
    pub(crate) fn keep_one(&self, b: u64, i: usize, msg: Message) {
        let mut map = self.batches.lock();
        self.entry(&mut map, b).single.insert(i, msg);
    }

    /// The batch resolved: nothing more to retry.
    pub(crate) fn forget(&self, b: u64) {
        self.batches.lock().remove(&b);
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
}
