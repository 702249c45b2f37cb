//! Order: per key, in a live tail, through a cut connection, in the handler runtime.

use super::*;

/// The handler runtime (`eventbus_core::handler`): strict order per key while keys run in
/// parallel, failed and panicking runs retried in place, everything acked exactly once. The
/// concurrency limit is twice the number of keys, so only per-key serialization keeps at most
/// one handler per key running; later messages are faster, so without it they would overtake.
pub async fn handler_orders_per_key_and_retries<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, Backoff, HandlerConfig, HandlerError};
    use std::sync::Mutex;
    const KEYS: usize = 4;
    const PER: usize = 30;
    let topic = h.topic("handler").await;
    let p = publisher(h, BatchConfig::default()).await;
    let mut msgs = Vec::new();
    for i in 0..PER {
        for k in 0..KEYS {
            msgs.push(Message::new(&topic, format!("{k}:{i}")).with_key(format!("key-{k}")));
        }
    }
    assert_all_acked(&publish_all(&p, msgs).await);
    let sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .prefetch(64)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    /// What the handler saw, shared by every invocation.
    #[derive(Default)]
    struct Probe {
        log: Mutex<Vec<(usize, usize)>>,
        attempts: Mutex<HashMap<String, u32>>,
        /// Handlers running per key, and the most ever seen at once for any key / in total.
        running: Mutex<HashMap<usize, usize>>,
        peak_per_key: AtomicUsize,
        peak_total: AtomicUsize,
        all_done: tokio::sync::Notify,
    }
    let probe = Arc::new(Probe::default());
    let handler = {
        let probe = Arc::clone(&probe);
        move |msg: Message, _info| {
            let probe = Arc::clone(&probe);
            async move {
                let text = String::from_utf8(msg.payload().to_vec()).expect("utf8");
                let (k, i) = text.split_once(':').expect("k:i");
                let (k, i): (usize, usize) = (k.parse().expect("k"), i.parse().expect("i"));
                {
                    let mut r = probe.running.lock().unwrap();
                    *r.entry(k).or_insert(0) += 1;
                    probe.peak_per_key.fetch_max(r[&k], Ordering::SeqCst);
                    probe
                        .peak_total
                        .fetch_max(r.values().sum(), Ordering::SeqCst);
                }
                // Earlier messages take longer: unordered handling would let later ones pass.
                tokio::time::sleep(Duration::from_millis(1 + ((PER - i) % 4) as u64 * 2)).await;
                let n = {
                    let mut a = probe.attempts.lock().unwrap();
                    let n = a.entry(text.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                *probe.running.lock().unwrap().get_mut(&k).expect("running") -= 1;
                if i % 7 == 3 && n == 1 {
                    return Err(HandlerError::new("first attempt fails"));
                }
                if i % 11 == 5 && n == 1 {
                    panic!("first attempt panics (expected by the test)");
                }
                let mut l = probe.log.lock().unwrap();
                l.push((k, i));
                if l.len() == KEYS * PER {
                    probe.all_done.notify_one();
                }
                Ok(())
            }
        }
    };
    let cfg = HandlerConfig::default()
        .concurrency(KEYS * 2)
        .retry(Backoff::default().initial(Duration::from_millis(5)));
    let done = Arc::clone(&probe);
    let report = timeout(
        Duration::from_secs(60),
        handler::run(
            sub,
            cfg,
            handler,
            async move { done.all_done.notified().await },
        ),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "handler run did not finish: {} of {} handled",
            probe.log.lock().unwrap().len(),
            KEYS * PER
        )
    });
    let log = probe.log.lock().unwrap().clone();
    for k in 0..KEYS {
        let seen: Vec<usize> = log
            .iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(
            seen,
            (0..PER).collect::<Vec<_>>(),
            "key {k}: order or completeness"
        );
    }
    let per_key = probe.peak_per_key.load(Ordering::SeqCst);
    let total = probe.peak_total.load(Ordering::SeqCst);
    assert_eq!(per_key, 1, "two handlers of one key ran at once");
    assert!(
        total >= 2,
        "different keys never ran in parallel (peak {total})"
    );
    let failing = (0..PER).filter(|i| i % 7 == 3).count() * KEYS;
    let panicking = (0..PER).filter(|i| i % 11 == 5).count() * KEYS;
    assert_eq!(report.acked as usize, KEYS * PER, "{report:?}");
    assert_eq!(report.failures as usize, failing + panicking, "{report:?}");
    assert_eq!(report.panics as usize, panicking, "{report:?}");
    assert_eq!(report.gave_up, 0, "{report:?}");
}

/// Messages with the same key arrive in publish order.
pub async fn per_key_order<H: Harness>(h: &H) {
    let topic = h.topic("order").await;
    let p = publisher(h, BatchConfig::default().max_messages(7)).await;
    const KEYS: usize = 4;
    const PER: usize = 100;
    let mut msgs = Vec::new();
    for i in 0..PER {
        for k in 0..KEYS {
            msgs.push(Message::new(&topic, format!("{k}:{i}")).with_key(format!("key-{k}")));
        }
    }
    assert_all_acked(&publish_all(&p, msgs).await);
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).prefetch(64)).await;
    let got = take_acked(&mut sub, KEYS * PER).await;
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in got {
        let s = String::from_utf8(m.payload().to_vec()).expect("utf8");
        let (k, i) = s.split_once(':').expect("k:i");
        let i: i64 = i.parse().expect("number");
        let prev = last.insert(k.to_owned(), i).unwrap_or(-1);
        assert_eq!(i, prev + 1, "key {k}: got {i} after {prev}");
    }
}

/// Messages of one key published one at a time to a subscriber that is already reading (a
/// live tail, not a backlog) arrive in publish order. A reader that keeps more than one pull
/// open can get the tail split between them (nats-server hands waiting pulls messages in turn)
/// and must still hand them over in stream order.
pub async fn live_tail_keeps_publish_order<H: Harness>(h: &H) {
    const N: usize = 150;
    let topic = h.topic("livetail").await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic).prefetch(16)).await;
    let p = publisher(h, BatchConfig::default()).await;
    // The subscriber is reading before the first message: wait until a probe arrives.
    let probe = Message::new(&topic, "probe").with_key("k");
    assert_all_acked(&publish_all(&p, vec![probe]).await);
    assert_eq!(
        take_acked(&mut sub, 1).await[0].payload().as_ref(),
        b"probe"
    );
    let publishing = async {
        for i in 0..N {
            let m = Message::new(&topic, format!("{i}")).with_key("k");
            assert_all_acked(&publish_all(&p, vec![m]).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let (got, ()) = tokio::join!(take_acked(&mut sub, N), publishing);
    let got: Vec<usize> = got
        .iter()
        .map(|m| {
            std::str::from_utf8(m.payload())
                .expect("utf8")
                .parse()
                .expect("number")
        })
        .collect();
    let behind = got.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "{behind} deliveries came after a later message"
    );
}

/// A keyed sequence published from one task while the connections to the broker are cut (a
/// blackhole: nothing forwarded, nothing closed, for longer than a NATS sink waits for an ack)
/// and then restored (reset) is acked whole, stored once, and handed to a handler in publish
/// order per key. Harnesses without a fault proxy run the same sequence without the cut.
pub async fn per_key_order_through_a_cut<H: Harness>(h: &H) {
    use eventbus_core::handler::{self, HandlerConfig};
    use std::sync::Mutex;
    const KEYS: usize = 8;
    const PER: usize = 200;
    let topic = h.topic("cutorder").await;
    let p = publisher(
        h,
        BatchConfig::default()
            .linger(Duration::from_millis(2))
            .ack_timeout(Duration::from_secs(60)),
    )
    .await;
    // Publishing takes ~4 s; the cut starts after 0.6 s and lasts 2.5 s.
    let publishing = async {
        let mut acks = Vec::with_capacity(KEYS * PER);
        for i in 0..PER {
            for k in 0..KEYS {
                let m = Message::new(&topic, format!("{k}:{i}")).with_key(format!("key-{k}"));
                acks.push(p.publish(m).await.expect("publish admitted"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        futures_util::future::join_all(acks).await
    };
    let fault = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        if h.cut(true) {
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            h.cut(false);
        }
    };
    let (outcomes, ()) = tokio::join!(publishing, fault);
    assert_all_acked(&outcomes);
    let sub = subscribe(
        h,
        SubscribeSpec::new(&topic)
            .prefetch(64)
            .ack_wait(Duration::from_secs(30)),
    )
    .await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let all = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (log, all) = (Arc::clone(&log), Arc::clone(&all));
        move |msg: Message, _info| {
            let (log, all) = (Arc::clone(&log), Arc::clone(&all));
            async move {
                let text = String::from_utf8(msg.payload().to_vec()).expect("utf8");
                let (k, i) = text.split_once(':').expect("k:i");
                let (k, i): (usize, usize) = (k.parse().expect("k"), i.parse().expect("i"));
                let mut l = log.lock().unwrap();
                l.push((k, i));
                if l.len() == KEYS * PER {
                    all.notify_one();
                }
                Ok::<(), handler::HandlerError>(())
            }
        }
    };
    let cfg = HandlerConfig::default().concurrency(KEYS);
    let done = Arc::clone(&all);
    let handled = timeout(
        Duration::from_secs(60),
        handler::run(sub, cfg, handler, async move { done.notified().await }),
    )
    .await;
    let log = log.lock().unwrap().clone();
    assert!(
        handled.is_ok(),
        "handler run did not finish: {} of {} handled",
        log.len(),
        KEYS * PER
    );
    for k in 0..KEYS {
        let seen: Vec<usize> = log
            .iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, i)| *i)
            .collect();
        let out_of_order = seen.windows(2).filter(|w| w[1] <= w[0]).count();
        assert!(
            seen == (0..PER).collect::<Vec<_>>(),
            "key {k}: {} handled, {out_of_order} behind a later one (stored out of publish order or twice)",
            seen.len()
        );
    }
}
