//! [`Subscription`], the stream users read, and [`Feed`], the backend's end of it.
//!
//! One subscription is one bounded buffer, however many topics it reads: every part (one
//! backend consumer per topic) hands deliveries into the same channel, so at most `prefetch`
//! wait ahead of the handler. The steps core adds (the max-deliveries limit, de-duplication)
//! look at each delivery as the stream is polled, on the reader's task, with no buffer of
//! their own; only the settling they decide on (a dead letter's publish, a duplicate's ack)
//! runs as a task beside the stream.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::SubscribeSpec;
use super::delivery::Delivery;
use super::limit::{DeadLetters, Limit};
use crate::backend::BoxFuture;
use crate::error::Error;

type Item = Result<Delivery, Error>;

/// A step every delivery of a subscription passes before it is handed over.
pub(crate) trait Layer: Send + Sync + 'static {
    /// Hand `d` over, or settle it aside.
    fn step(&mut self, d: Delivery) -> Step;
}

/// What a [`Layer`] does with a delivery.
pub(crate) enum Step {
    /// Hand it over.
    Pass(Delivery),
    /// This future settles it, beside the stream; [`Subscription::close`] waits for it.
    Aside(BoxFuture<'static, ()>),
}

/// A stream of deliveries. Close it with [`Subscription::close`]: buffered, unhandled deliveries
/// are then handed back for immediate redelivery (dropping it does the same in the background).
///
/// Like any stream it does its work as it is read: a delivery past
/// [`SubscribeSpec::max_deliveries`] is moved out (or given up on), and a duplicate skipped,
/// when reading reaches it.
pub struct Subscription {
    rx: mpsc::Receiver<Item>,
    /// One per backend consumer feeding `rx`.
    parts: Vec<Part>,
    layers: Vec<Box<dyn Layer>>,
    /// Deliveries a layer is settling (dead letters being published, duplicates being acked).
    aside: JoinSet<()>,
    /// The runtime the subscription was made on, where aside work runs (the stream itself may
    /// be polled from anywhere).
    rt: Option<tokio::runtime::Handle>,
    closed: bool,
    /// Handed to a task by `Drop`: if that task is dropped unrun (its runtime is shutting
    /// down), stop here rather than spawn again.
    orphan: bool,
}

/// The subscription's hold on one backend consumer.
struct Part {
    /// Dropped to ask the consumer to stop.
    stop: Option<oneshot::Sender<()>>,
    /// Resolves when the consumer dropped its [`Feed`]; `None` once seen.
    done: Option<oneshot::Receiver<()>>,
}

/// The backend's end of a [`Subscription`].
pub struct Feed {
    tx: mpsc::Sender<Item>,
    stop: oneshot::Receiver<()>,
    /// `stop` has resolved (a oneshot receiver must not be polled again after that).
    stopped: bool,
    _done: oneshot::Sender<()>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("parts", &self.parts.len())
            .field("buffered", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl Part {
    fn new(tx: mpsc::Sender<Item>) -> (Part, Feed) {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        (
            Part {
                stop: Some(stop_tx),
                done: Some(done_rx),
            },
            Feed {
                tx,
                stop: stop_rx,
                stopped: false,
                _done: done_tx,
            },
        )
    }
}

impl Subscription {
    fn with_parts(rx: mpsc::Receiver<Item>, parts: Vec<Part>) -> Subscription {
        Subscription {
            rx,
            parts,
            layers: Vec::new(),
            aside: JoinSet::new(),
            rt: tokio::runtime::Handle::try_current().ok(),
            closed: false,
            orphan: false,
        }
    }

    /// A linked pair; `prefetch` bounds the deliveries buffered in between. No limit is
    /// applied: a backend that reads what [`SubscribeSpec`] asks for uses
    /// [`Subscription::per_topic`].
    pub fn channel(prefetch: usize) -> (Subscription, Feed) {
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let (part, feed) = Part::new(tx);
        (Subscription::with_parts(rx, vec![part]), feed)
    }

    /// What every backend's [`Subscriber::subscribe`](crate::Subscriber::subscribe) returns:
    /// `one` starts a consumer of one topic of `spec` (see [`SubscribeSpec::split`]) feeding
    /// the [`Feed`] it is given; all of them share one buffer of `spec.prefetch` deliveries.
    /// The subscription enforces `spec.max_deliveries` itself, so `one` only has to keep
    /// redelivering with an honest delivery count: a delivery past the limit is moved out
    /// through `letters` ([`DeadLetters::for_spec`]'s answer) or, without a dead-letter topic,
    /// terminated with a warning. If one topic fails, the consumers started so far are closed
    /// and its error is returned.
    pub async fn per_topic<F, Fut>(
        spec: SubscribeSpec,
        letters: Option<DeadLetters>,
        mut one: F,
    ) -> Result<Subscription, Error>
    where
        F: FnMut(SubscribeSpec, Feed) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let limit = Limit::for_spec(&spec, letters)?;
        let (tx, rx) = mpsc::channel(spec.prefetch.max(1));
        let mut sub = Subscription::with_parts(rx, Vec::new());
        for s in spec.split() {
            let (part, feed) = Part::new(tx.clone());
            sub.parts.push(part);
            if let Err(e) = one(s, feed).await {
                drop(tx);
                sub.close().await;
                return Err(e);
            }
        }
        if let Some(limit) = limit {
            sub.layers.push(Box::new(limit));
        }
        Ok(sub)
    }

    /// Deliveries waiting in the buffer.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.rx.len()
    }

    /// This subscription with `layer` after the ones it has.
    pub(crate) fn layer(mut self, layer: impl Layer) -> Subscription {
        self.layers.push(Box::new(layer));
        self
    }

    /// The next delivery; `None` once the backend ended the subscription. Each delivery is the
    /// DEBUG event `eventbus.deliver` (fields `id`, `topic`, `delivery`, and the message's W3C
    /// `traceparent` if it carries one), on every backend.
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        let next = std::future::poll_fn(|cx| self.poll_item(cx)).await;
        if let Some(Ok(d)) = &next
            && tracing::enabled!(tracing::Level::DEBUG)
        {
            let m = d.message();
            tracing::debug!(
                id = %m.id(),
                topic = %m.topic(),
                delivery = d.info().delivery_count,
                traceparent = crate::trace::TraceParent::extract(m).map(|p| p.to_string()),
                "eventbus.deliver"
            );
        }
        next
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        while self.aside.try_join_next().is_some() {}
        // A topic that ended is said at once, even while the others keep the buffer full.
        if let Some(e) = self.ended(Some(cx)) {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(d))) => {
                    if let Some(d) = self.through_layers(d) {
                        return Poll::Ready(Some(Ok(d)));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                // Every consumer is gone: say which ended on their own, then end.
                Poll::Ready(None) => return Poll::Ready(self.ended(None).map(Err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// `d` through every layer; `None` if one set it aside.
    fn through_layers(&mut self, mut d: Delivery) -> Option<Delivery> {
        for layer in &mut self.layers {
            match layer.step(d) {
                Step::Pass(next) => d = next,
                Step::Aside(work) => {
                    match &self.rt {
                        Some(rt) => self.aside.spawn_on(work, rt),
                        None => self.aside.spawn(work),
                    };
                    return None;
                }
            }
        }
        Some(d)
    }

    /// With several parts, the error for one that ended on its own (its consumer is gone while
    /// the others go on), once per part: polled with `cx`, or taken at once (`None`) when every
    /// part is gone. One part ending is the stream's end instead.
    fn ended(&mut self, mut cx: Option<&mut Context<'_>>) -> Option<Error> {
        if self.parts.len() < 2 {
            return None;
        }
        for part in &mut self.parts {
            let Some(done) = &mut part.done else { continue };
            let gone = match cx.as_deref_mut() {
                Some(cx) => Pin::new(done).poll(cx).is_ready(),
                None => true,
            };
            if gone {
                part.done = None;
                return Some(Error::closed("the subscription of one of the topics ended"));
            }
        }
        None
    }

    /// Stop receiving, finish what the layers set aside, hand back buffered deliveries for
    /// redelivery, and wait for every backend consumer to finish.
    pub async fn close(mut self) {
        // Aside work settles through the consumers: finish it while they still run.
        while self.aside.join_next().await.is_some() {}
        for part in &mut self.parts {
            part.stop.take();
        }
        self.rx.close();
        while let Some(d) = self.rx.recv().await {
            if let Ok(d) = d {
                let _ = d.nack(Duration::ZERO).await;
            }
        }
        for part in &mut self.parts {
            if let Some(done) = part.done.take() {
                let _ = done.await;
            }
        }
        self.closed = true;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        // What `close` does, in a task: the aside work (a dead letter half published) finishes
        // while the consumers still run, then the buffer is handed back.
        let rt = self
            .rt
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
            .filter(|_| !self.orphan);
        if let Some(rt) = rt {
            let (_, rx) = mpsc::channel(1);
            let orphan = Subscription {
                rx: std::mem::replace(&mut self.rx, rx),
                parts: std::mem::take(&mut self.parts),
                layers: Vec::new(),
                aside: std::mem::take(&mut self.aside),
                rt: None,
                closed: false,
                orphan: true,
            };
            rt.spawn(orphan.close());
            return;
        }
        // No runtime to finish on: stop the consumers; what they handed over is redelivered
        // after its ack wait.
        for part in &mut self.parts {
            part.stop.take();
        }
        self.rx.close();
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<Delivery, Error>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl Feed {
    /// Hand a delivery to the subscriber, waiting for buffer room. Returns the delivery back
    /// when the subscription is closed, so the backend can release it.
    pub async fn send(&mut self, d: Item) -> Result<(), Item> {
        if self.stopped {
            return Err(d);
        }
        tokio::select! {
            biased;
            _ = &mut self.stop => {
                self.stopped = true;
                Err(d)
            }
            permit = self.tx.reserve() => match permit {
                Ok(p) => { p.send(d); Ok(()) }
                Err(_) => Err(d),
            },
        }
    }

    /// Hand a delivery over without waiting, for backends that poll from a plain thread.
    /// On failure the delivery comes back with the reason.
    #[expect(
        clippy::result_large_err,
        reason = "the delivery comes back by value: no allocation when the buffer is full"
    )]
    pub fn try_send(&self, d: Item) -> Result<(), TrySend> {
        match self.tx.try_reserve() {
            Ok(p) => {
                p.send(d);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(TrySend::Full(d)),
            Err(mpsc::error::TrySendError::Closed(())) => Err(TrySend::Closed(d)),
        }
    }

    /// Resolves when the subscriber closed or dropped the subscription.
    pub async fn stopped(&mut self) {
        if !self.stopped {
            let _ = (&mut self.stop).await;
            self.stopped = true;
        }
    }

    /// `true` once the subscriber is gone (closing or dropping a subscription closes its
    /// buffer, which every part's feed shares).
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Why [`Feed::try_send`] did not hand a delivery over; the delivery comes back.
#[derive(Debug)]
pub enum TrySend {
    /// The subscriber's buffer is full (`prefetch` deliveries waiting): try again later.
    Full(Item),
    /// The subscription was closed or dropped: release the delivery.
    Closed(Item),
}
