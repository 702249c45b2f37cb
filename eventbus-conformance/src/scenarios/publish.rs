//! Publishing: outcomes in order, limits, bad input failing alone, close.

use super::*;

/// Payload, key, headers, id and envelope survive a round trip.
pub async fn roundtrip_intact<H: Harness>(h: &H) {
    let topic = h.topic("roundtrip").await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let p = publisher(h, BatchConfig::default()).await;
    let env = Envelope::new("order.created")
        .event_id("evt-1")
        .aggregate_id("order-42")
        .schema_version(7)
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .trace_id("trace-1")
        .tenant("acme");
    let payload: Vec<u8> = (0..=255u8).collect();
    let sent = env.apply(
        Message::new(&topic, payload.clone())
            .with_key("key-1")
            .with_header("x-custom", "v 1")
            .with_header("x-empty", ""),
    );
    let o = p.publish(sent.clone()).await.expect("admitted").await;
    assert!(o.is_acked(), "{o:?}");
    let got = take_acked(&mut sub, 1).await.remove(0);
    assert_eq!(got.topic(), &topic);
    assert_eq!(&got.payload()[..], &payload[..], "payload");
    assert_eq!(got.key().map(|k| &k[..]), Some(&b"key-1"[..]), "key");
    assert_eq!(got.id(), sent.id(), "message id");
    assert_eq!(got.headers().get("x-custom"), Some("v 1"));
    assert_eq!(got.headers().get("x-empty"), Some(""));
    assert_eq!(
        Envelope::from_headers(got.headers()).expect("envelope"),
        env
    );
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// Headers come back in the order they were added, repeated names included.
pub async fn headers_keep_order_and_repeats<H: Harness>(h: &H) {
    let topic = h.topic("hdr-order").await;
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let p = publisher(h, BatchConfig::default()).await;
    let orders: [&[(&str, &str)]; 3] = [
        &[("b", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("a", "5")],
        &[("z-last", "x"), ("a-first", "y")],
        &[("same", "1"), ("same", "2"), ("same", "3")],
    ];
    let mut sent = Vec::new();
    for (i, pairs) in orders.iter().enumerate() {
        let mut m = Message::new(&topic, format!("{i}"));
        for (n, v) in *pairs {
            m.headers_mut().append(*n, *v);
        }
        sent.push(m);
    }
    assert_all_acked(&publish_all(&p, sent.clone()).await);
    let got = take_acked(&mut sub, sent.len()).await;
    for m in got {
        let i: usize = String::from_utf8_lossy(m.payload()).parse().expect("index");
        let want: Vec<(&str, &str)> = sent[i].headers().iter().collect();
        let have: Vec<(&str, &str)> = m.headers().iter().collect();
        assert_eq!(have, want, "message {i}: header order");
    }
    p.close(Duration::from_secs(5)).await.expect("close");
}

/// Invalid topics, header names and values fail with typed errors before any I/O, and nothing
/// else is affected.
pub async fn invalid_input_typed_errors<H: Harness>(h: &H) {
    let topic = h.topic("invalid").await;
    let p = publisher(h, BatchConfig::default()).await;
    let bad = [
        Message::new("", "x"),
        Message::new("a*b", "x"),
        Message::new("a b", "x"),
        Message::new("a\r\nb", "x"),
        Message::new(&topic, "x").with_header("bad:name", "v"),
        Message::new(&topic, "x").with_header("bad name", "v"),
        Message::new(&topic, "x").with_header("name", "evil\r\nInjected: 1"),
    ];
    for m in bad {
        let shown = format!("{m:?}");
        let err = p
            .publish(m)
            .await
            .expect_err("invalid message must be rejected");
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{shown}: {err}");
        assert!(!err.is_retryable());
        assert!(
            !err.to_string().contains("evil"),
            "error echoes header value: {err}"
        );
    }
    assert_eq!(
        p.stats().in_flight,
        0,
        "rejected messages hold no window slot"
    );
    // A dead-letter topic no publish could reach is refused at subscribe, typed.
    let subscriber = h.subscriber().await;
    for dlq in ["", "a b", "a\r\nb"] {
        let spec = SubscribeSpec::new(&topic)
            .max_deliveries(3)
            .dead_letter(dlq);
        let err = subscriber
            .subscribe(spec)
            .await
            .err()
            .unwrap_or_else(|| panic!("dead-letter topic {dlq:?} accepted"));
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{dlq:?}: {err}");
        assert!(!err.is_retryable());
    }
    let o = p
        .publish(Message::new(&topic, "good"))
        .await
        .expect("admitted")
        .await;
    assert!(o.is_acked(), "{o:?}");
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let got = take_acked(&mut sub, 1).await;
    assert_eq!(&got[0].payload()[..], b"good");
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// `close` sends and resolves everything admitted before it, even with a long linger.
pub async fn close_flushes_everything<H: Harness>(h: &H) {
    let topic = h.topic("closeflush").await;
    let p = publisher(
        h,
        BatchConfig::default()
            .linger(Duration::from_secs(3600))
            .max_messages(1_000_000),
    )
    .await;
    let msgs = numbered(&topic, 300);
    let expected = ids(&msgs);
    let mut acks = Vec::new();
    for m in msgs {
        acks.push(p.publish(m).await.expect("admitted"));
    }
    let report = p.close(Duration::from_secs(30)).await.expect("close");
    assert_eq!(report.unresolved, 0);
    for a in acks {
        let o = a.await;
        assert!(o.is_acked(), "{o:?}");
    }
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    assert_eq!(ids(&take_acked(&mut sub, 300).await), expected);
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// Outcomes come back per message, in order: positions grow with publish order.
pub async fn batch_outcomes_in_order<H: Harness>(h: &H) {
    let topic = h.topic("inorder").await;
    let p = publisher(
        h,
        BatchConfig::default()
            .linger(Duration::from_millis(20))
            .max_messages(50),
    )
    .await;
    let outcomes = publish_all(
        &p,
        (0..200)
            .map(|i| Message::new(&topic, format!("{i}")).with_key("same"))
            .collect(),
    )
    .await;
    let mut prev: Option<(i64, i64, i64)> = None;
    for o in outcomes {
        let ack = o.into_result().expect("acked");
        let k = position_key(&ack.position);
        if let Some(p) = prev {
            assert!(k > p, "position {k:?} after {p:?}");
        }
        prev = Some(k);
    }
}

/// One message the broker refuses, inside a batch of good ones, fails alone.
pub async fn bad_message_fails_alone<H: Harness>(h: &H) {
    let topic = h.topic("partial").await;
    let bad = h.unroutable_topic().await;
    let p = publisher(h, BatchConfig::default().linger(Duration::from_millis(50))).await;
    let mut msgs = numbered(&topic, 10);
    msgs.insert(5, Message::new(&bad, "nowhere"));
    let outcomes = publish_all(&p, msgs).await;
    for (i, o) in outcomes.iter().enumerate() {
        if i == 5 {
            let e = o.error().expect("unroutable message must not be acked");
            assert!(o.is_failed() || o.is_unknown(), "{o:?}");
            assert!(
                matches!(e.kind(), ErrorKind::Rejected | ErrorKind::InvalidMessage),
                "{e}"
            );
        } else {
            assert!(o.is_acked(), "message {i}: {o:?}");
        }
    }
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    take_acked(&mut sub, 10).await;
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// The backend's message size limit (every backend must declare one).
async fn message_limit<H: Harness>(h: &H) -> usize {
    h.sink()
        .await
        .limits()
        .max_message_bytes
        .expect("backend declares a message size limit")
}

/// An oversize message fails with `TooLarge` before it takes a window slot.
pub async fn oversize_rejected_before_window<H: Harness>(h: &H) {
    let topic = h.topic("oversize").await;
    let limit = message_limit(h).await;
    let p = publisher(
        h,
        BatchConfig::default()
            .max_in_flight(1)
            .on_full(OnFull::Error),
    )
    .await;
    let err = p
        .publish(Message::new(&topic, vec![7u8; limit + 1]))
        .await
        .expect_err("oversize must fail");
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert_eq!(p.stats().in_flight, 0);
    // The only window slot is still free.
    let o = p
        .publish(Message::new(&topic, "fits"))
        .await
        .expect("admitted")
        .await;
    assert!(o.is_acked(), "{o:?}");
}

/// The number of admitted, unresolved messages never exceeds the window; `OnFull::Error`
/// fails fast with `Overloaded` when it is full.
pub async fn window_bounds_in_flight<H: Harness>(h: &H) {
    let topic = h.topic("window").await;
    const WINDOW: usize = 8;
    let p = publisher(h, BatchConfig::default().max_in_flight(WINDOW)).await;
    let mut acks = Vec::new();
    let mut peak = 0;
    for m in numbered(&topic, 400) {
        acks.push(p.publish(m).await.expect("admitted"));
        let s = p.stats();
        assert!(
            s.in_flight <= WINDOW,
            "in flight {} > window {WINDOW}",
            s.in_flight
        );
        peak = peak.max(s.in_flight);
    }
    assert!(peak >= 1);
    for a in acks {
        assert!(a.await.is_acked());
    }
    assert_eq!(p.stats().in_flight, 0, "every slot released");
    // Fail fast: fill the window without awaiting acks; at least one publish must be refused
    // or all must fit (if the broker acks faster than we publish); never more than WINDOW.
    let fast = publisher(
        h,
        BatchConfig::default()
            .max_in_flight(WINDOW)
            .on_full(OnFull::Error),
    )
    .await;
    let mut admitted = Vec::new();
    let mut overloaded = 0;
    for m in numbered(&topic, 200) {
        match fast.publish(m).await {
            Ok(a) => admitted.push(a),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
                assert!(e.is_retryable());
                overloaded += 1;
            }
        }
        assert!(fast.stats().in_flight <= WINDOW);
    }
    assert_eq!(admitted.len() + overloaded, 200);
    for a in admitted {
        assert!(a.await.is_acked());
    }
}

/// After `close`, `publish` fails with `Closed`; close is idempotent.
pub async fn publish_after_close_fails<H: Harness>(h: &H) {
    let topic = h.topic("closed").await;
    let p = publisher(h, BatchConfig::default()).await;
    assert_all_acked(&publish_all(&p, numbered(&topic, 3)).await);
    let r = p.close(Duration::from_secs(5)).await.expect("close");
    assert_eq!(r.unresolved, 0);
    let e = p
        .publish(Message::new(&topic, "late"))
        .await
        .expect_err("closed");
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert!(!e.is_retryable());
    p.close(Duration::from_secs(1))
        .await
        .expect("second close is fine");
    p.flush().await.expect("flush after close returns");
}

/// One generated publish for [`fuzzed_bad_input_is_isolated`].
#[derive(Clone, Debug)]
enum Fuzzed {
    /// A valid message: payload length, optional key, a valid header.
    Valid(usize, bool),
    /// A topic with a character no backend accepts (or empty).
    BadTopic(String),
    /// A header name with `:`, whitespace or a control character (or empty).
    BadHeaderName(String),
    /// A header value with CR or LF.
    BadHeaderValue(String),
    /// A payload one byte over the backend's limit.
    Oversize,
}

fn fuzzed_batches() -> Vec<Vec<Fuzzed>> {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let bad_char = prop::sample::select(vec![" ", "\t", "\r", "\n", "*", "\r\n"]);
    let word = "[a-z0-9]{1,8}";
    let bad_topic = prop_oneof![
        Just(String::new()),
        (word, bad_char.clone(), word).prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ];
    let bad_name = prop_oneof![
        Just(String::new()),
        (
            word,
            prop::sample::select(vec![":", " ", "\r", "\n", "\t"]),
            word
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ];
    let bad_value = (
        "[ -~]{0,12}",
        prop::sample::select(vec!["\r", "\n", "\r\n"]),
        "[ -~]{0,12}",
    )
        .prop_map(|(a, c, b)| format!("{a}{c}{b}"));
    let one = prop_oneof![
        6 => (0usize..300, any::<bool>()).prop_map(|(n, k)| Fuzzed::Valid(n, k)),
        1 => bad_topic.prop_map(Fuzzed::BadTopic),
        1 => bad_name.prop_map(Fuzzed::BadHeaderName),
        1 => bad_value.prop_map(Fuzzed::BadHeaderValue),
        1 => Just(Fuzzed::Oversize),
    ];
    let batch = prop::collection::vec(one, 1..12);
    // A fixed seed: every backend sees the same inputs, and a failure names the case.
    let mut runner = TestRunner::deterministic();
    (0..40)
        .map(|_| batch.new_tree(&mut runner).expect("generate").current())
        .collect()
}

/// Generated bad input (proptest, fixed seed) mixed into batches of valid messages: every bad
/// message is refused at `publish` with a typed, non-retryable error that echoes no header value
/// and takes no window slot; every valid message of the same batch is acked; the topic then
/// holds exactly the valid messages. No panic anywhere.
pub async fn fuzzed_bad_input_is_isolated<H: Harness>(h: &H) {
    let topic = h.topic("fuzzed").await;
    let limit = message_limit(h).await;
    let p = publisher(h, BatchConfig::default().linger(Duration::from_millis(5))).await;
    let mut expected = HashSet::new();
    let mut refused = 0usize;
    for (case, batch) in fuzzed_batches().into_iter().enumerate() {
        let mut acks = Vec::new();
        for (i, f) in batch.iter().enumerate() {
            let msg = match f {
                Fuzzed::Valid(n, keyed) => {
                    let m =
                        Message::new(&topic, vec![b'v'; *n]).with_header("case", case.to_string());
                    if *keyed {
                        m.with_key(format!("k{i}"))
                    } else {
                        m
                    }
                }
                Fuzzed::BadTopic(t) => Message::new(t.as_str(), "x"),
                Fuzzed::BadHeaderName(n) => Message::new(&topic, "x").with_header(n.as_str(), "v"),
                Fuzzed::BadHeaderValue(v) => {
                    Message::new(&topic, "x").with_header("h", format!("secret{v}"))
                }
                Fuzzed::Oversize => Message::new(&topic, vec![0u8; limit + 1]),
            };
            let id = msg.id().to_string();
            match (f, p.publish(msg).await) {
                (Fuzzed::Valid(..), Ok(ack)) => {
                    expected.insert(id);
                    acks.push(ack);
                }
                (Fuzzed::Valid(..), Err(e)) => panic!("case {case}: valid {f:?} refused: {e}"),
                (_, Ok(_)) => panic!("case {case}: bad input {f:?} was admitted"),
                (_, Err(e)) => {
                    let want = if matches!(f, Fuzzed::Oversize) {
                        ErrorKind::TooLarge
                    } else {
                        ErrorKind::InvalidMessage
                    };
                    assert_eq!(e.kind(), want, "case {case}: {f:?}: {e}");
                    assert!(!e.is_retryable(), "case {case}: {f:?}: {e}");
                    assert!(
                        !e.to_string().contains("secret"),
                        "error echoes a header value: {e}"
                    );
                    refused += 1;
                }
            }
        }
        for (i, a) in acks.into_iter().enumerate() {
            let o = a.await;
            assert!(
                o.is_acked(),
                "case {case}: valid message {i} of {batch:?}: {o:?}"
            );
        }
        assert_eq!(
            p.stats().in_flight,
            0,
            "case {case}: a refused message holds a slot"
        );
    }
    assert!(
        refused > 0 && !expected.is_empty(),
        "the generator produced both kinds"
    );
    let mut sub = subscribe(h, SubscribeSpec::new(&topic)).await;
    let mut got = HashSet::new();
    ack_until_all_seen(&mut sub, &mut got, &expected, "fuzzed valid messages").await;
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    p.close(Duration::from_secs(5)).await.expect("close");
}
