//! What operators watch: consumer lag, health and heartbeat, trace context.

use super::*;

/// Poll `f` until `ok` holds for its result, for at most `limit`; returns the last result.
async fn eventually<T, F, Fut>(limit: Duration, mut f: F, ok: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let start = std::time::Instant::now();
    loop {
        let v = f().await;
        if ok(&v) || start.elapsed() >= limit {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Consumer lag, read from the broker: it grows while a group's consumer does not ack, and
/// falls to zero once it has acked everything. A [`LagWatch`](eventbus_core::ops::LagWatch)
/// reports crossing its threshold both ways.
pub async fn lag_grows_and_shrinks<H: Harness>(h: &H) {
    use eventbus_core::ops::{LagEvent, LagWatch};
    const N: usize = 30;
    let topic = h.topic("lag").await;
    let subscriber = h.subscriber().await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).group("laggards").prefetch(8)).await;
    let p = publisher(h, BatchConfig::default()).await;
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let watch = LagWatch::start(
        h.subscriber().await,
        topic.clone(),
        "laggards",
        Duration::from_millis(100),
        N as u64,
        move |e| seen.lock().expect("events").push(e),
    );
    assert_all_acked(&publish_all(&p, numbered(&topic, N)).await);
    // Nothing acked yet: everything is behind (pending or delivered-but-unacked).
    let lag = eventually(
        Duration::from_secs(10),
        || subscriber.lag(&topic, "laggards"),
        |l| l.as_ref().is_ok_and(|l| l.total() == N as u64),
    )
    .await
    .expect("lag");
    assert_eq!(lag.total(), N as u64, "lag with nothing acked: {lag:?}");
    let events_now = || {
        let e = Arc::clone(&events);
        async move { e.lock().expect("events").clone() }
    };
    let above = eventually(Duration::from_secs(5), events_now, |e| !e.is_empty()).await;
    assert!(
        matches!(above.first(), Some(LagEvent::Above(l)) if l.total() >= N as u64),
        "the watch reports crossing the threshold: {above:?}"
    );
    // Consume and ack everything: the lag drains to zero.
    let got = take_acked(&mut sub, N).await;
    assert_eq!(got.len(), N);
    let lag = eventually(
        Duration::from_secs(15),
        || subscriber.lag(&topic, "laggards"),
        |l| l.as_ref().is_ok_and(|l| l.total() == 0),
    )
    .await
    .expect("lag");
    assert_eq!(lag.total(), 0, "lag after acking everything: {lag:?}");
    let below = eventually(Duration::from_secs(5), events_now, |e| e.len() >= 2).await;
    assert!(
        matches!(below.get(1), Some(LagEvent::Below(l)) if l.total() < N as u64),
        "the watch reports falling below the threshold: {below:?}"
    );
    drop(watch);
    sub.close().await;
    // A group the broker has never seen: an error, or (Kafka) everything pending.
    match subscriber.lag(&topic, "never-subscribed").await {
        Ok(l) => assert_eq!(l.total(), N as u64, "{l:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Rejected, "{e}"),
    }
}

/// The backend's health check reports the broker up, and an end-to-end heartbeat through a
/// real topic comes back within its timeout.
pub async fn health_and_heartbeat<H: Harness>(h: &H) {
    let health = h.health(Duration::from_secs(5)).await;
    assert!(health.up, "{health:?}");
    assert!(health.latency < Duration::from_secs(5), "{health:?}");
    let topic = h.topic("health").await;
    let p = publisher(h, BatchConfig::default()).await;
    let sub = h.subscriber().await;
    let rtt = eventbus_core::ops::heartbeat(&p, &sub, &topic, Duration::from_secs(20))
        .await
        .expect("heartbeat");
    assert!(rtt < Duration::from_secs(20));
    // A second beat on the same topic skips the first.
    eventbus_core::ops::heartbeat(&p, &sub, &topic, Duration::from_secs(20))
        .await
        .expect("second heartbeat");
}

/// A W3C `traceparent` set by the publisher reaches the handler unchanged (the handler runtime
/// also records it on its `eventbus.handle` span).
pub async fn traceparent_reaches_the_handler<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, HandlerConfig};
    use eventbus_core::trace::TraceParent;
    let topic = h.topic("trace").await;
    let sub = subscribe(h, SubscribeSpec::new(&topic).group("tracers")).await;
    let p = publisher(h, BatchConfig::default()).await;
    let sent = TraceParent::new_root().child();
    assert_all_acked(
        &publish_all(
            &p,
            vec![
                sent.inject(Message::new(&topic, "traced")),
                Message::new(&topic, "untraced"),
            ],
        )
        .await,
    );
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = Arc::clone(&seen);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(handler::run(
        sub,
        HandlerConfig::default(),
        move |msg, _info| {
            let got = Arc::clone(&got);
            async move {
                got.lock()
                    .expect("seen")
                    .push((msg.payload().clone(), TraceParent::extract(&msg)));
                Ok(())
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let all = eventually(
        RECV_TIMEOUT,
        || {
            let s = Arc::clone(&seen);
            async move { s.lock().expect("seen").clone() }
        },
        |v| v.len() >= 2,
    )
    .await;
    let _ = stop_tx.send(());
    let _ = run.await;
    assert_eq!(all.len(), 2, "{all:?}");
    for (payload, tp) in all {
        match &payload[..] {
            b"traced" => assert_eq!(tp, Some(sent), "traceparent carried intact"),
            _ => assert_eq!(tp, None, "no traceparent invented"),
        }
    }
}
