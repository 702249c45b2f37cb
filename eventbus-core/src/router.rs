//! Gathering per-message outcomes that arrive out of band (JetStream acks on an inbox, Kafka
//! delivery reports) into one result vector per batch, for [`BatchSink`](crate::BatchSink)
//! implementations.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::error::{Error, ErrorKind};
use crate::outcome::Outcome;

struct Pending {
    outcomes: Vec<Option<Outcome>>,
    remaining: usize,
    done: oneshot::Sender<Vec<Outcome>>,
}

impl Pending {
    /// Hand a complete batch its outcomes.
    fn finish(self) {
        let _ = self.done.send(
            self.outcomes
                .into_iter()
                .map(|o| o.expect("all settled"))
                .collect(),
        );
    }
}

/// Routes outcomes to batches: one map lookup per outcome, no per-message channel or future.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use eventbus_core::spi::OutcomeRouter;
/// use eventbus_core::{Ack, Outcome, Position};
/// let router = Arc::new(OutcomeRouter::new("demo"));
/// let (batch, outcomes) = router.register(2);
/// router.settle(batch, 1, Outcome::Acked(Ack { position: Position::Offset(1) }));
/// router.settle(batch, 0, Outcome::Acked(Ack { position: Position::Offset(0) }));
/// assert!(outcomes.await.iter().all(Outcome::is_acked));
/// # }
/// ```
pub struct OutcomeRouter {
    backend: &'static str,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
}

impl std::fmt::Debug for OutcomeRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeRouter")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl OutcomeRouter {
    /// A router for `backend` (used in error messages).
    pub fn new(backend: &'static str) -> Self {
        OutcomeRouter {
            backend,
            next: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Register a batch of `n` messages. Returns its id and a future that resolves once every
    /// message is settled. Dropping the future forgets the batch (later outcomes are ignored).
    pub fn register(self: &Arc<Self>, n: usize) -> (u64, BatchOutcomes) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        if n > 0 {
            self.pending.lock().insert(
                id,
                Pending {
                    outcomes: (0..n).map(|_| None).collect(),
                    remaining: n,
                    done,
                },
            );
        } else {
            let _ = done.send(Vec::new());
        }
        (
            id,
            BatchOutcomes {
                rx,
                n,
                router: Arc::clone(self),
                id,
                backend: self.backend,
            },
        )
    }

    /// Settle message `index` of batch `batch`. The first outcome for a message wins; outcomes
    /// for unknown batches (timed out, dropped) are ignored.
    pub fn settle(&self, batch: u64, index: usize, outcome: Outcome) {
        let done = {
            let mut map = self.pending.lock();
            Self::settle_locked(&mut map, batch, index, outcome)
        };
        if let Some(p) = done {
            p.finish();
        }
    }

    /// Settle many messages, of any batches, under one lock: what a sink does when one reply
    /// answers for many messages (a committed fast batch, a produce response). Same rules as
    /// [`settle`](Self::settle); completed batches are handed their outcomes after the lock is
    /// released.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use eventbus_core::spi::OutcomeRouter;
    /// use eventbus_core::{Ack, Outcome, Position};
    /// let router = Arc::new(OutcomeRouter::new("demo"));
    /// let (a, first) = router.register(1);
    /// let (b, second) = router.register(2);
    /// let acked = |n| Outcome::Acked(Ack { position: Position::Offset(n) });
    /// router.settle_all([(a, 0, acked(0)), (b, 0, acked(1)), (b, 1, acked(2))]);
    /// assert_eq!(first.await.len() + second.await.len(), 3);
    /// # }
    /// ```
    pub fn settle_all(&self, outcomes: impl IntoIterator<Item = (u64, usize, Outcome)>) {
        let mut done = Vec::new();
        {
            let mut map = self.pending.lock();
            for (batch, index, outcome) in outcomes {
                done.extend(Self::settle_locked(&mut map, batch, index, outcome));
            }
        }
        for p in done {
            p.finish();
        }
    }

    /// Record one outcome; the batch, taken out of the map, once it is complete.
    fn settle_locked(
        map: &mut HashMap<u64, Pending>,
        batch: u64,
        index: usize,
        outcome: Outcome,
    ) -> Option<Pending> {
        let p = map.get_mut(&batch)?;
        let slot = p.outcomes.get_mut(index)?;
        if slot.is_none() {
            *slot = Some(outcome);
            p.remaining -= 1;
        }
        if p.remaining == 0 {
            map.remove(&batch)
        } else {
            None
        }
    }

    /// Whether batch `batch` still waits for outcomes (registered, not complete, not dropped).
    pub fn is_pending(&self, batch: u64) -> bool {
        self.pending.lock().contains_key(&batch)
    }

    /// The messages of batch `batch` that have no outcome yet, in input order; `None` when the
    /// batch no longer waits (complete, timed out or dropped). A sink that sends a message
    /// again after a silence uses it to skip the ones already settled.
    pub fn unsettled(&self, batch: u64) -> Option<Vec<usize>> {
        let map = self.pending.lock();
        let p = map.get(&batch)?;
        Some(
            p.outcomes
                .iter()
                .enumerate()
                .filter_map(|(i, o)| o.is_none().then_some(i))
                .collect(),
        )
    }

    /// Batches still waiting for outcomes.
    pub fn pending_batches(&self) -> usize {
        self.pending.lock().len()
    }
}

/// The outcomes of one registered batch, in input order.
pub struct BatchOutcomes {
    rx: oneshot::Receiver<Vec<Outcome>>,
    n: usize,
    router: Arc<OutcomeRouter>,
    id: u64,
    backend: &'static str,
}

impl std::fmt::Debug for BatchOutcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchOutcomes")
            .field("id", &self.id)
            .field("n", &self.n)
            .finish()
    }
}

impl Future for BatchOutcomes {
    type Output = Vec<Outcome>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Outcome>> {
        let n = self.n;
        let backend = self.backend;
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                let e = Error::new(
                    ErrorKind::Other,
                    "outcome routing stopped; the message may be stored",
                )
                .with_backend(backend);
                vec![Outcome::Unknown(e); n]
            })
        })
    }
}

impl Drop for BatchOutcomes {
    fn drop(&mut self) {
        self.router.pending.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ack, Position};

    #[tokio::test]
    async fn settles_in_order_first_wins_and_forgets_dropped() {
        let r = Arc::new(OutcomeRouter::new("t"));
        let (b, fut) = r.register(3);
        assert_eq!(r.unsettled(b), Some(vec![0, 1, 2]));
        for i in [2usize, 0, 0, 1] {
            if i == 1 {
                assert_eq!(r.unsettled(b), Some(vec![1]), "settled slots are skipped");
            }
            r.settle(
                b,
                i,
                Outcome::Acked(Ack {
                    position: Position::Offset(i as u64),
                }),
            );
        }
        assert_eq!(r.unsettled(b), None, "a complete batch no longer waits");
        let out = fut.await;
        let offs: Vec<_> = out
            .into_iter()
            .map(|o| o.into_result().unwrap().position)
            .collect();
        assert_eq!(
            offs,
            vec![
                Position::Offset(0),
                Position::Offset(1),
                Position::Offset(2)
            ]
        );
        let (b2, fut2) = r.register(1);
        drop(fut2);
        assert_eq!(r.pending_batches(), 0);
        r.settle(
            b2,
            0,
            Outcome::Acked(Ack {
                position: Position::Offset(9),
            }),
        ); // ignored
        assert!(r.register(0).1.await.is_empty());
    }

    #[tokio::test]
    async fn settle_all_keeps_first_outcome_and_completes_each_batch() {
        let r = Arc::new(OutcomeRouter::new("t"));
        let at = |n| {
            Outcome::Acked(Ack {
                position: Position::Offset(n),
            })
        };
        let (a, fa) = r.register(2);
        let (b, fb) = r.register(1);
        let (c, _fc) = r.register(2);
        r.settle_all([(a, 1, at(1)), (b, 0, at(5)), (a, 1, at(99)), (c, 0, at(7))]);
        assert_eq!(r.unsettled(a), Some(vec![0]));
        assert_eq!(
            r.unsettled(c),
            Some(vec![1]),
            "a partly settled batch still waits"
        );
        r.settle_all([(a, 0, at(0)), (a + 100, 0, at(3))]);
        let a_out: Vec<_> = fa
            .await
            .into_iter()
            .map(|o| o.into_result().unwrap().position)
            .collect();
        assert_eq!(
            a_out,
            vec![Position::Offset(0), Position::Offset(1)],
            "first outcome wins"
        );
        assert_eq!(fb.await.len(), 1);
        assert_eq!(r.pending_batches(), 1);
    }
}
