//! Engine throughput against a no-op sink: publish + ack of 108-byte messages, with one
//! publisher task and with five. The engine must never be the bottleneck (target: 2M msg/s on
//! a 2-core machine).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use eventbus_batch::{BatchConfig, Batcher};
use eventbus_core::{
    Ack, BatchSink, Bytes, Error, Message, Outcome, Position, Publisher, SinkLimits, Topic,
};

struct NoopSink;

impl BatchSink for NoopSink {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn limits(&self) -> SinkLimits {
        SinkLimits::none().max_message_bytes(1 << 20)
    }
    fn validate(&self, msg: &Message) -> Result<(), Error> {
        eventbus_core::validate::message(msg, &eventbus_core::validate::PORTABLE, Some(1 << 20))
    }
    fn send_batch(
        &self,
        batch: Vec<Message>,
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'static {
        let out = (0..batch.len())
            .map(|i| {
                Outcome::Acked(Ack {
                    position: Position::Offset(i as u64),
                })
            })
            .collect();
        std::future::ready(out)
    }
}

const PER_ITER: u64 = 200_000;

async fn run(publishers: u64, n: u64) -> Duration {
    let p = Batcher::new(NoopSink, BatchConfig::default()).unwrap();
    let topic = Topic::new("bench.engine");
    let payload = Bytes::from(vec![b'x'; 108]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (p, topic, payload) = (p.clone(), topic.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            // Await acks on a second task, as a real service would.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let acker = tokio::spawn(async move {
                let mut acked = 0u64;
                while let Some(a) = rx.recv().await {
                    let a: eventbus_core::PendingAck = a;
                    if a.await.is_acked() {
                        acked += 1;
                    }
                }
                acked
            });
            for _ in 0..n / publishers {
                tx.send(
                    p.publish(Message::new(&topic, payload.clone()))
                        .await
                        .unwrap(),
                )
                .unwrap();
            }
            drop(tx);
            acker.await.unwrap()
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    assert_eq!(acked, n / publishers * publishers);
    start.elapsed()
}

fn engine(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("engine_noop_sink_108B");
    g.throughput(Throughput::Elements(PER_ITER));
    g.sample_size(10);
    for publishers in [1u64, 5] {
        g.bench_function(format!("publishers_{publishers}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(run(publishers, PER_ITER));
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
