//! Engine tests against a scripted sink: the test decides when each batch is acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher, OnFull};
use eventbus_core::{
    Ack, BatchSink, Error, ErrorKind, Message, Outcome, Position, Publisher, SinkLimits,
};
use tokio::sync::{mpsc, oneshot};

struct Sent {
    batch: Vec<Message>,
    reply: oneshot::Sender<Vec<Outcome>>,
}

impl Sent {
    fn ack_all(self) {
        let n = self.batch.len();
        let _ = self.reply.send((0..n).map(|i| acked(i as u64)).collect());
    }
}

fn acked(i: u64) -> Outcome {
    Outcome::Acked(Ack {
        position: Position::Offset(i),
    })
}

struct ScriptedSink {
    tx: mpsc::UnboundedSender<Sent>,
    limits: SinkLimits,
}

impl BatchSink for ScriptedSink {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn limits(&self) -> SinkLimits {
        self.limits
    }
    fn validate(&self, msg: &Message) -> Result<(), Error> {
        eventbus_core::validate::message(
            msg,
            &eventbus_core::validate::PORTABLE,
            self.limits.max_message_bytes,
        )
    }
    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Sent { batch, reply });
        async move {
            match rx.await {
                Ok(o) => o,
                // The test dropped the reply: the broker never answers.
                Err(_) => std::future::pending().await,
            }
        }
    }
}

fn scripted(cfg: BatchConfig) -> (Batcher<ScriptedSink>, mpsc::UnboundedReceiver<Sent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = ScriptedSink {
        tx,
        limits: SinkLimits::none().max_message_bytes(10_000),
    };
    (Batcher::new(sink, cfg).unwrap(), rx)
}

fn msg(i: usize) -> Message {
    Message::new("t", format!("{i:04}"))
}

async fn no_batch(rx: &mut mpsc::UnboundedReceiver<Sent>, within: Duration) {
    if let Ok(Some(s)) = tokio::time::timeout(within, rx.recv()).await {
        panic!("unexpected batch of {}", s.batch.len());
    }
}

#[tokio::test(start_paused = true)]
async fn linger_triggers_after_linger() {
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .linger(Duration::from_millis(10))
            .max_messages(100),
    );
    let acks: Vec<_> = futures_util::future::join_all((0..3).map(|i| p.publish(msg(i)))).await;
    no_batch(&mut rx, Duration::from_millis(9)).await;
    let s = tokio::time::timeout(Duration::from_millis(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.batch.len(), 3);
    s.ack_all();
    for a in acks {
        assert!(a.unwrap().await.is_acked());
    }
}

#[tokio::test(start_paused = true)]
async fn count_triggers_at_once() {
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .linger(Duration::from_secs(3600))
            .max_messages(5),
    );
    let mut acks = Vec::new();
    for i in 0..12 {
        acks.push(p.publish(msg(i)).await.unwrap());
    }
    for _ in 0..2 {
        let s = tokio::time::timeout(Duration::from_millis(1), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.batch.len(), 5);
        s.ack_all();
    }
    // The remaining two wait for linger, or flush.
    no_batch(&mut rx, Duration::from_secs(10)).await;
    let flush = tokio::spawn({
        let p = p.clone();
        async move { p.flush().await }
    });
    let s = rx.recv().await.unwrap();
    assert_eq!(s.batch.len(), 2);
    assert!(!flush.is_finished());
    s.ack_all();
    flush.await.unwrap().unwrap();
    for a in acks {
        assert!(a.await.is_acked());
    }
}

#[tokio::test(start_paused = true)]
async fn bytes_trigger_and_batches_respect_max_bytes() {
    // Each message is 1 (topic) + 40 bytes.
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .linger(Duration::from_secs(3600))
            .max_bytes(100),
    );
    for i in 0..3 {
        drop(
            p.publish(Message::new("t", vec![i as u8; 40]))
                .await
                .unwrap(),
        );
    }
    let s = tokio::time::timeout(Duration::from_millis(1), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.batch.len(),
        2,
        "two messages fit in 100 bytes, three do not"
    );
    assert!(s.batch.iter().map(Message::encoded_len).sum::<usize>() <= 100);
}

#[tokio::test(start_paused = true)]
async fn window_full_waits_then_admits() {
    let (p, mut rx) = scripted(BatchConfig::default().max_in_flight(4));
    let mut acks = Vec::new();
    for i in 0..4 {
        acks.push(p.publish(msg(i)).await.unwrap());
    }
    assert_eq!(p.stats().in_flight, 4);
    let fifth = tokio::spawn({
        let p = p.clone();
        async move { p.publish(msg(4)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !fifth.is_finished(),
        "the fifth publish must wait for window room"
    );
    while let Ok(s) = rx.try_recv() {
        s.ack_all();
    }
    let a5 = fifth.await.unwrap().unwrap();
    rx.recv().await.unwrap().ack_all();
    assert!(a5.await.is_acked());
}

/// A full window ends the linger: the queued messages cannot be joined by more until they are
/// acked, so the engine sends them at once instead of waiting out a long linger.
#[tokio::test(start_paused = true)]
async fn full_window_sends_without_waiting_for_linger() {
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .max_in_flight(3)
            .linger(Duration::from_secs(3600))
            .max_messages(100),
    );
    let mut acks = Vec::new();
    for i in 0..3 {
        acks.push(p.publish(msg(i)).await.unwrap());
    }
    no_batch(&mut rx, Duration::from_secs(60)).await; // lingering, window not yet contended
    let fourth = tokio::spawn({
        let p = p.clone();
        async move { p.publish(msg(3)).await }
    });
    let s = tokio::time::timeout(Duration::from_millis(1), rx.recv())
        .await
        .expect("a blocked publisher ends the linger")
        .unwrap();
    assert_eq!(s.batch.len(), 3);
    s.ack_all();
    let a4 = fourth.await.unwrap().unwrap();
    for a in acks {
        assert!(a.await.is_acked());
    }
    // The fourth lingers normally (the window has room again) until flushed.
    let flush = tokio::spawn({
        let p = p.clone();
        async move { p.flush().await }
    });
    let s = rx.recv().await.unwrap();
    assert_eq!(s.batch.len(), 1);
    s.ack_all();
    flush.await.unwrap().unwrap();
    assert!(a4.await.is_acked());
}

#[tokio::test(start_paused = true)]
async fn window_full_wait_for_then_overloaded() {
    let (p, _rx) = scripted(
        BatchConfig::default()
            .max_in_flight(1)
            .on_full(OnFull::WaitFor(Duration::from_millis(30))),
    );
    let _held = p.publish(msg(0)).await.unwrap();
    let started = tokio::time::Instant::now();
    let e = p.publish(msg(1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    assert!(e.is_retryable());
    assert!(started.elapsed() >= Duration::from_millis(30));
}

#[tokio::test(start_paused = true)]
async fn window_counts_bytes_too() {
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .max_in_flight_bytes(100)
            .on_full(OnFull::Error),
    );
    let _a = p.publish(Message::new("t", vec![0u8; 59])).await.unwrap(); // 60 bytes
    let e = p
        .publish(Message::new("t", vec![0u8; 59]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    assert_eq!(p.stats().in_flight_bytes, 60);
    rx.recv().await.unwrap().ack_all();
    p.flush().await.unwrap();
    assert_eq!(p.stats().in_flight_bytes, 0);
    let _b = p.publish(Message::new("t", vec![0u8; 59])).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deadline_resolves_unknown_and_frees_slot() {
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .ack_timeout(Duration::from_secs(1))
            .max_in_flight(2),
    );
    let a = p.publish(msg(0)).await.unwrap();
    let s = rx.recv().await.unwrap();
    std::mem::forget(s.reply); // the broker never answers, and the sink future never ends
    let o = a.await;
    assert!(o.is_unknown(), "{o:?}");
    assert_eq!(o.error().unwrap().kind(), ErrorKind::Timeout);
    assert_eq!(p.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn contract_violation_is_unknown() {
    let (p, mut rx) = scripted(BatchConfig::default());
    let a = p.publish(msg(0)).await.unwrap();
    let b = p.publish(msg(1)).await.unwrap();
    let mut batches = Vec::new();
    while batches.iter().map(|s: &Sent| s.batch.len()).sum::<usize>() < 2 {
        batches.push(rx.recv().await.unwrap());
    }
    for s in batches {
        let _ = s.reply.send(vec![]); // wrong count
    }
    for o in [a.await, b.await] {
        assert!(o.is_unknown());
        assert_eq!(o.error().unwrap().kind(), ErrorKind::Contract);
    }
}

#[tokio::test(start_paused = true)]
async fn close_deadline_reports_unresolved_and_refuses_publishes() {
    let (p, mut rx) = scripted(BatchConfig::default());
    let acks: Vec<_> = futures_util::future::join_all((0..5).map(|i| p.publish(msg(i)))).await;
    let mut held = Vec::new();
    while held.iter().map(|s: &Sent| s.batch.len()).sum::<usize>() < 5 {
        held.push(rx.recv().await.unwrap());
    }
    let r = p.close(Duration::from_millis(100)).await.unwrap();
    assert_eq!(r.unresolved, 5);
    for a in acks {
        let o = a.unwrap().await;
        assert!(
            o.is_unknown(),
            "sent but unanswered must be unknown, not failed: {o:?}"
        );
    }
    assert_eq!(
        p.publish(msg(9)).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(p.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn close_wakes_publishers_waiting_for_room() {
    let (p, _rx) = scripted(
        BatchConfig::default()
            .max_in_flight(1)
            .ack_timeout(Duration::from_secs(3600)),
    );
    let _held = p.publish(msg(0)).await.unwrap();
    let waiting = tokio::spawn({
        let p = p.clone();
        async move { p.publish(msg(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let _ = p.close(Duration::from_millis(10)).await.unwrap();
    assert_eq!(
        waiting.await.unwrap().unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_publish_future_leaks_no_slot() {
    let (p, mut rx) = scripted(BatchConfig::default().max_in_flight(1));
    let first = p.publish(msg(0)).await.unwrap();
    // Waits for room, then is dropped by the timeout.
    assert!(
        tokio::time::timeout(Duration::from_millis(10), p.publish(msg(1)))
            .await
            .is_err()
    );
    rx.recv().await.unwrap().ack_all();
    assert!(first.await.is_acked());
    assert_eq!(p.stats().in_flight, 0);
    // The whole window is usable again.
    let again = p.publish(msg(2)).await.unwrap();
    rx.recv().await.unwrap().ack_all();
    assert!(again.await.is_acked());
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_still_sends_queued_messages() {
    let (p, mut rx) = scripted(BatchConfig::default().linger(Duration::from_secs(3600)));
    let a = p.publish(msg(0)).await.unwrap();
    drop(p);
    let s = rx.recv().await.unwrap();
    assert_eq!(s.batch.len(), 1);
    s.ack_all();
    assert!(a.await.is_acked());
}

#[tokio::test(start_paused = true)]
async fn oversize_and_invalid_take_no_slot() {
    let (p, _rx) = scripted(
        BatchConfig::default()
            .max_in_flight(1)
            .on_full(OnFull::Error),
    );
    assert_eq!(
        p.publish(Message::new("t", vec![0u8; 20_000]))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::TooLarge
    );
    assert_eq!(
        p.publish(Message::new("bad topic", "x"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidMessage
    );
    assert_eq!(p.stats().in_flight, 0);
    let _ok = p.publish(msg(0)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn batches_in_flight_are_bounded() {
    let (p, mut rx) = scripted(
        BatchConfig::default()
            .max_messages(1)
            .max_in_flight_batches(3),
    );
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(p.publish(msg(i)).await.unwrap());
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(rx.recv().await.unwrap());
    }
    no_batch(&mut rx, Duration::from_millis(50)).await;
    assert_eq!(p.stats().batches_in_flight, 3);
    held.remove(0).ack_all();
    let next = rx.recv().await.unwrap();
    assert_eq!(
        next.batch[0].payload(),
        &b"0003"[..],
        "batches stay in admission order"
    );
}

/// Property: under random configs and random broker behaviour, every message resolves
/// exactly once with the outcome the broker gave it, batches respect the limits and the window
/// is never exceeded.
mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct Case {
        sizes: Vec<usize>,
        max_messages: usize,
        max_bytes: usize,
        window: usize,
        linger_us: u64,
        fail_every: usize,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            proptest::collection::vec(0usize..300, 1..300),
            1usize..20,
            50usize..2_000,
            1usize..40,
            0u64..2_000,
            2usize..9,
        )
            .prop_map(
                |(sizes, max_messages, max_bytes, window, linger_us, fail_every)| Case {
                    sizes,
                    max_messages,
                    max_bytes,
                    window,
                    linger_us,
                    fail_every,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn invariants(c in case()) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(check(c));
        }
    }

    async fn check(c: Case) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = ScriptedSink {
            tx,
            limits: SinkLimits::none(),
        };
        let cfg = BatchConfig::default()
            .max_messages(c.max_messages)
            .max_bytes(c.max_bytes)
            .max_in_flight(c.window)
            .linger(Duration::from_micros(c.linger_us));
        let p = Batcher::new(sink, cfg).unwrap();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        // The broker: answers each batch after a short random delay, failing some messages.
        let broker = tokio::spawn({
            let (outstanding, peak) = (Arc::clone(&outstanding), Arc::clone(&peak));
            let (max_messages, max_bytes, fail_every) = (c.max_messages, c.max_bytes, c.fail_every);
            async move {
                let mut seen = 0usize;
                while let Some(s) = rx.recv().await {
                    let n = s.batch.len();
                    assert!(n >= 1 && n <= max_messages, "batch of {n} > {max_messages}");
                    let bytes: usize = s.batch.iter().map(Message::encoded_len).sum();
                    assert!(
                        n == 1 || bytes <= max_bytes,
                        "batch of {bytes} bytes > {max_bytes}"
                    );
                    let now = outstanding.fetch_add(n, Ordering::SeqCst) + n;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let outcomes: Vec<Outcome> = s
                        .batch
                        .iter()
                        .map(|m| {
                            let i: usize = std::str::from_utf8(&m.payload()[..8])
                                .unwrap()
                                .parse()
                                .unwrap();
                            if i.is_multiple_of(fail_every) {
                                Outcome::Failed(Error::new(ErrorKind::Rejected, "scripted"))
                            } else {
                                acked(i as u64)
                            }
                        })
                        .collect();
                    seen += n;
                    let outstanding = Arc::clone(&outstanding);
                    let delay = Duration::from_micros((seen as u64 * 37) % 500);
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        outstanding.fetch_sub(n, Ordering::SeqCst);
                        let _ = s.reply.send(outcomes);
                    });
                }
            }
        });
        let mut acks = Vec::new();
        for (i, size) in c.sizes.iter().enumerate() {
            let mut payload = format!("{i:08}").into_bytes();
            payload.resize(8 + size, b'x');
            acks.push((i, p.publish(Message::new("t", payload)).await.unwrap()));
            assert!(p.stats().in_flight <= c.window);
        }
        for (i, a) in acks {
            let o = a.await;
            if i % c.fail_every == 0 {
                assert!(o.is_failed(), "{i}: {o:?}");
            } else {
                assert_eq!(
                    o.into_result().unwrap().position,
                    Position::Offset(i as u64)
                );
            }
        }
        let r = p.close(Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.unresolved, 0);
        assert!(
            peak.load(Ordering::SeqCst) <= c.window,
            "peak {} > window {}",
            peak.load(Ordering::SeqCst),
            c.window
        );
        assert_eq!(p.stats().in_flight, 0);
        drop(p);
        broker.await.unwrap();
    }
}

/// The backlog watch calls back once when the window use crosses the threshold upwards and once
/// when the acks bring it back down, and stops when the engine is gone.
#[tokio::test(start_paused = true)]
async fn backlog_watch_reports_crossings_both_ways() {
    use eventbus_batch::BacklogEvent;
    let (p, mut rx) = scripted(BatchConfig::default().max_in_flight(100));
    let (etx, mut erx) = mpsc::unbounded_channel();
    let watch = p.watch_backlog(Duration::from_millis(10), 10, move |e| {
        let _ = etx.send(e);
    });
    let mut acks = Vec::new();
    for i in 0..9 {
        acks.push(p.publish(msg(i)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(erx.try_recv().is_err(), "9 in flight is below 10");
    for i in 9..12 {
        acks.push(p.publish(msg(i)).await.unwrap());
    }
    match tokio::time::timeout(Duration::from_secs(1), erx.recv()).await {
        Ok(Some(BacklogEvent::Above(s))) => assert_eq!(s.in_flight, 12),
        other => panic!("expected Above, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(erx.try_recv().is_err(), "no repeat while it stays above");
    while let Ok(s) = rx.try_recv() {
        s.ack_all();
    }
    for a in acks {
        assert!(a.await.is_acked());
    }
    match tokio::time::timeout(Duration::from_secs(1), erx.recv()).await {
        Ok(Some(BacklogEvent::Below(s))) => assert_eq!(s.in_flight, 0),
        other => panic!("expected Below, got {other:?}"),
    }
    // The watch does not keep the engine alive: after close and drop it ends on its own.
    p.close(Duration::from_secs(1)).await.unwrap();
    drop(p);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        erx.recv().await.is_none(),
        "the watch ended: its callback (and sender) was dropped"
    );
    drop(watch);
}
