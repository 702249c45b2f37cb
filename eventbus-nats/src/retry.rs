//! Messages kept for another attempt when JetStream answers "no responders": nothing was
//! stored, and right after a server (re)start that is what every publish gets until JetStream
//! is up, so the sink tries again a few times with backoff before reporting the failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Message, OutcomeRouter};
use parking_lot::Mutex;

/// Further attempts after a "no responders" answer; the waits between them are 100, 200, 400
/// and 800 ms (1.5 s in all, well inside the engine's default 30 s deadline).
pub(crate) const RETRIES: u8 = 4;

fn backoff(attempt: u8) -> Duration {
    Duration::from_millis(100 << (attempt.saturating_sub(1)).min(6))
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

    /// The next attempt for slot `i` of batch `b` after "no responders": the message and how
    /// long to wait, or `None` when it is not kept or out of attempts.
    pub(crate) fn retry(&self, b: u64, i: usize) -> Option<(Message, Duration)> {
        let mut map = self.batches.lock();
        let e = map.get_mut(&b)?;
        let msg = e
            .single
            .get(&i)
            .or_else(|| e.batch.as_ref().and_then(|m| m.get(i)))?
            .clone();
        let tries = e.tries.entry(i).or_insert(0);
        if *tries >= RETRIES {
            return None;
        }
        *tries += 1;
        Some((msg, backoff(*tries)))
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
        let waits: Vec<Duration> =
            std::iter::from_fn(|| kept.retry(b, 1).map(|(_, d)| d)).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800].map(Duration::from_millis).to_vec()
        );
        assert!(kept.retry(b, 0).is_some(), "slots count separately");
        assert!(kept.retry(b, 2).is_none(), "no such slot");
        kept.forget(b);
        assert!(kept.retry(b, 0).is_none());
        kept.keep_one(9, 3, Message::new("a.b", "x"));
        assert_eq!(&kept.retry(9, 3).expect("kept").0.payload()[..], b"x");
    }
}
