//! The `eventbus.deliver` event: every delivery a subscription hands out is logged at DEBUG
//! with its id, topic, delivery count and W3C `traceparent`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::trace::TraceParent;
use eventbus_core::{Backend as _, Message, Publisher, SubscribeSpec, Subscriber};
use eventbus_memory::{MemoryBroker, MemorySink};

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn each_delivery_is_a_debug_event_with_its_traceparent() {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let w = Arc::clone(&buf);
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || Capture(Arc::clone(&w)))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let bus = MemoryBroker::new();
    let p = Batcher::new(MemorySink::new(&bus), BatchConfig::default()).unwrap();
    let parent = TraceParent::new_root();
    let msg = parent.inject(Message::new("traced", "x"));
    let id = msg.id().to_string();
    assert!(p.publish(msg).await.unwrap().await.is_acked());
    let mut sub = bus
        .subscriber()
        .subscribe(SubscribeSpec::new("traced"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("delivered")
        .expect("open")
        .expect("delivery");
    d.ack().await.unwrap();
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("eventbus.deliver"))
        .unwrap_or_else(|| panic!("no eventbus.deliver event in:\n{text}"));
    assert!(line.contains(&id), "{line}");
    assert!(line.contains("topic=traced"), "{line}");
    assert!(line.contains("delivery=1"), "{line}");
    assert!(line.contains(&parent.to_string()), "{line}");
}
