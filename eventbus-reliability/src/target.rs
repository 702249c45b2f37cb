//! The brokers under test: a real broker process, optionally behind a [`FaultProxy`], and the
//! backend's sink and subscriber connected through it.

use std::net::SocketAddr;
use std::time::Duration;

use eventbus_core::{BatchSink, Error, Subscriber};

use crate::proxy::FaultProxy;

/// Process-level faults of the broker.
pub trait Broker {
    /// `kill -9`; the store survives.
    fn kill(&mut self);
    /// Start again on the same port and store.
    fn restart(&mut self) -> std::io::Result<()>;
    /// SIGSTOP.
    fn pause(&self) -> std::io::Result<()>;
    /// SIGCONT.
    fn resume(&self) -> std::io::Result<()>;
}

/// One backend on one real broker.
pub trait Target: Broker + Send + Sync {
    /// The publishing sink.
    type Sink: BatchSink;
    /// The subscriber.
    type Sub: Subscriber;
    /// `"nats"` or `"kafka"`.
    fn name(&self) -> &'static str;
    /// Create `n` topics for run `run` and return them with a subscription filter matching all
    /// of them (`drain` reads the filter).
    fn provision(
        &self,
        run: &str,
        n: usize,
    ) -> impl Future<Output = Result<(Vec<String>, String), Error>> + Send;
    /// A new sink (its own connection, through the proxy when there is one).
    fn sink(&self) -> impl Future<Output = Result<Self::Sink, Error>> + Send;
    /// A subscriber.
    fn subscriber(&self) -> Self::Sub;
    /// How many messages the broker says it holds for run `run`, when it can tell.
    fn stored(&self, run: &str) -> impl Future<Output = Option<u64>> + Send;
    /// The proxy in front of the broker, if started with one.
    fn proxy(&self) -> Option<&FaultProxy>;
    /// The first panic in the broker's log, if it crashed (a broker bug, told apart from ours).
    fn broker_panic(&self) -> Option<String>;
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// NATS JetStream on a real nats-server (file storage).
#[cfg(feature = "nats")]
pub mod nats {
    use super::*;
    use eventbus_brokers::{NatsOptions, NatsServer};
    use eventbus_nats::{NatsBackend, NatsConfig, NatsSink, NatsSubscriber, StreamSpec};

    /// nats-server with an optional proxy; the sink connects through the proxy, the subscriber
    /// directly.
    #[derive(Debug)]
    pub struct Nats {
        server: NatsServer,
        proxy: Option<FaultProxy>,
        direct: NatsBackend,
        config: NatsConfig,
    }

    impl Nats {
        /// Start a server (with `args`), a proxy if `proxied`, and connect.
        pub async fn start(args: Vec<String>, proxied: bool) -> Result<Nats, String> {
            let server = NatsServer::start_with(NatsOptions {
                args,
                ..NatsOptions::default()
            })
            .map_err(|e| format!("start nats-server: {e}"))?;
            let proxy = if proxied {
                Some(
                    FaultProxy::start(loopback(server.port()))
                        .await
                        .map_err(|e| format!("proxy: {e}"))?,
                )
            } else {
                None
            };
            let url = match &proxy {
                Some(p) => format!("nats://{}", p.addr()),
                None => server.url(),
            };
            let config = NatsConfig::new(url).ack_timeout(Duration::from_secs(2));
            let direct = NatsBackend::connect(NatsConfig::new(server.url()))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(Nats {
                server,
                proxy,
                direct,
                config,
            })
        }

        /// The server process.
        pub fn server(&self) -> &NatsServer {
            &self.server
        }
    }

    fn stream_name(run: &str) -> String {
        format!("REL_{}", run.replace('-', "_"))
    }

    impl Broker for Nats {
        fn kill(&mut self) {
            self.server.kill();
        }
        fn restart(&mut self) -> std::io::Result<()> {
            self.server.restart()
        }
        fn pause(&self) -> std::io::Result<()> {
            self.server.pause()
        }
        fn resume(&self) -> std::io::Result<()> {
            self.server.resume()
        }
    }

    impl Target for Nats {
        type Sink = NatsSink;
        type Sub = NatsSubscriber;
        fn name(&self) -> &'static str {
            "nats"
        }
        async fn provision(&self, run: &str, n: usize) -> Result<(Vec<String>, String), Error> {
            let filter = format!("rel.{run}.>");
            self.direct
                .ensure_stream(&StreamSpec::new(stream_name(run), [filter.clone()]))
                .await?;
            Ok(((0..n).map(|i| format!("rel.{run}.t{i}")).collect(), filter))
        }
        async fn sink(&self) -> Result<NatsSink, Error> {
            NatsBackend::connect(self.config.clone())
                .await?
                .sink()
                .await
        }
        fn subscriber(&self) -> NatsSubscriber {
            self.direct.subscriber()
        }
        async fn stored(&self, run: &str) -> Option<u64> {
            self.direct
                .stream_state(&stream_name(run))
                .await
                .ok()
                .map(|s| s.messages)
        }
        fn proxy(&self) -> Option<&FaultProxy> {
            self.proxy.as_ref()
        }
        fn broker_panic(&self) -> Option<String> {
            eventbus_brokers::panic_in_log(self.server.log_path())
        }
    }
}

/// Kafka protocol on a real tansu process (SQLite storage, which survives a restart, or memory).
#[cfg(feature = "kafka")]
pub mod kafka {
    use super::*;
    use eventbus_brokers::Tansu;
    pub use eventbus_brokers::TansuStorage;
    use eventbus_kafka::{KafkaBackend, KafkaConfig, KafkaSink, KafkaSubscriber};

    /// tansu with an optional proxy. With a proxy, tansu advertises the proxy's port, so every
    /// client connection (sink and subscriber) goes through it.
    #[derive(Debug)]
    pub struct Kafka {
        broker: Tansu,
        proxy: Option<FaultProxy>,
        backend: KafkaBackend,
    }

    /// Partitions per topic.
    pub const PARTITIONS: i32 = 4;

    impl Kafka {
        /// Start tansu on `storage` (SQLite survives a restart; memory serves a deep backlog
        /// faster), a proxy if `proxied`, and connect.
        pub async fn start(storage: TansuStorage, proxied: bool) -> Result<Kafka, String> {
            let proxy_port = if proxied {
                Some(eventbus_brokers::free_port().map_err(|e| e.to_string())?)
            } else {
                None
            };
            let broker = Tansu::start_advertising(storage, proxy_port)
                .map_err(|e| format!("start tansu: {e}"))?;
            let proxy = match proxy_port {
                Some(p) => Some(
                    FaultProxy::start_on(p, loopback(broker.port()))
                        .await
                        .map_err(|e| format!("proxy: {e}"))?,
                ),
                None => None,
            };
            let bootstrap = match &proxy {
                Some(p) => p.addr().to_string(),
                None => broker.bootstrap(),
            };
            // The SDK's default message timeout (30 s), longer than every fault here (the longest,
            // stall-memory, holds the broker 20 s). A timeout
            // shorter than a blackhole makes librdkafka bump the idempotent producer's epoch
            // (KIP-360), and tansu 0.6.0 then panics in its idempotence check ("more or less
            // than one row", storage/src/lite.rs:503) and stops serving: a broker bug, shown by
            // `broker_panic` if it happens.
            let config = KafkaConfig::new(bootstrap).connect_timeout(Duration::from_secs(10));
            let backend = KafkaBackend::connect(config)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(Kafka {
                broker,
                proxy,
                backend,
            })
        }
    }

    impl Broker for Kafka {
        fn kill(&mut self) {
            self.broker.kill();
        }
        fn restart(&mut self) -> std::io::Result<()> {
            self.broker.restart()
        }
        fn pause(&self) -> std::io::Result<()> {
            self.broker.pause()
        }
        fn resume(&self) -> std::io::Result<()> {
            self.broker.resume()
        }
    }

    impl Target for Kafka {
        type Sink = KafkaSink;
        type Sub = KafkaSubscriber;
        fn name(&self) -> &'static str {
            "kafka"
        }
        async fn provision(&self, run: &str, _n: usize) -> Result<(Vec<String>, String), Error> {
            // One topic; producers are told apart by key (-> partition) and headers.
            let topic = format!("rel-{run}");
            self.backend.ensure_topic(&topic, PARTITIONS).await?;
            Ok((vec![topic.clone()], topic))
        }
        async fn sink(&self) -> Result<KafkaSink, Error> {
            self.backend.sink()
        }
        fn subscriber(&self) -> KafkaSubscriber {
            self.backend.subscriber()
        }
        async fn stored(&self, run: &str) -> Option<u64> {
            let w = self.backend.watermarks(&format!("rel-{run}")).await.ok()?;
            Some(w.iter().map(|(_, lo, hi)| (hi - lo).max(0) as u64).sum())
        }
        fn proxy(&self) -> Option<&FaultProxy> {
            self.proxy.as_ref()
        }
        fn broker_panic(&self) -> Option<String> {
            eventbus_brokers::panic_in_log(self.broker.log_path())
        }
    }
}
