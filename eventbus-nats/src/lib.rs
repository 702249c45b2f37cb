#![doc = include_str!("../README.md")]

mod config;
mod denied;
mod error;
mod headers;
mod lookup;
mod retry;
mod rules;
mod sink;
mod stream;
mod subscriber;

use std::time::Duration;

use async_nats::jetstream;
use eventbus_core::{Capabilities, Error, TopicSpec};

pub use config::{ENV_VARS, NatsAuth, NatsConfig};
pub use headers::{HEADER_ORDER, KEY as KEY_HEADER, KEY_HEX as KEY_HEX_HEADER};
pub use rules::SUBJECT_RULES;
pub use sink::{
    ATOMIC_MAX_IN_FLIGHT, ATOMIC_MAX_MESSAGES, FAST_MAX_IN_FLIGHT, NatsSink, PublishMode,
    SinkOptions,
};
pub use stream::{StorageKind, StreamSpec, StreamState};
pub use subscriber::NatsSubscriber;

impl eventbus_core::ops::HealthCheck for NatsBackend {
    /// Up when the connection is established and JetStream answers an account-info request
    /// within `timeout`.
    fn health(
        &self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = eventbus_core::ops::Health> + Send {
        use eventbus_core::ops::Health;
        let (client, js) = (self.client.clone(), self.js.clone());
        async move {
            let start = std::time::Instant::now();
            let state = client.connection_state();
            if state != async_nats::connection::State::Connected {
                return Health::down(
                    error::BACKEND,
                    start.elapsed(),
                    format!("connection {state}"),
                );
            }
            match tokio::time::timeout(timeout, js.query_account()).await {
                Ok(Ok(_)) => Health::up(
                    error::BACKEND,
                    start.elapsed(),
                    format!(
                        "connected, JetStream answered (server {})",
                        client.server_info().version
                    ),
                ),
                Ok(Err(e)) => Health::down(
                    error::BACKEND,
                    start.elapsed(),
                    format!(
                        "JetStream did not answer: {}",
                        error::other("account info", e)
                    ),
                ),
                Err(_) => Health::down(error::BACKEND, start.elapsed(), "JetStream timed out"),
            }
        }
    }
}

impl eventbus_core::Backend for NatsBackend {
    type Sink = NatsSink;
    type Subscriber = NatsSubscriber;
    fn name(&self) -> &'static str {
        error::BACKEND
    }

    /// A publishing sink as the config says ([`NatsConfig::publish_mode`], by default fast
    /// ingest; [`NatsConfig::dedup`], by default on: every message carries its id in
    /// `Nats-Msg-Id`, so the stream de-duplicates retries within its duplicate window). Wrap it
    /// in `eventbus_batch::Batcher`.
    async fn sink(&self) -> Result<NatsSink, Error> {
        self.sink_with(self.publish).await
    }

    fn subscriber(&self) -> NatsSubscriber {
        NatsSubscriber {
            js: self.js.clone(),
        }
    }

    /// Streams have replicas and an age limit, no partitions (a consumer group's members share
    /// a stream message by message); the broker de-duplicates ids when [`NatsConfig::dedup`]
    /// is on.
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with_replicas(true)
            .with_max_age(true)
            .with_broker_dedup(self.publish.dedup)
    }

    /// Make sure the topic has a stream: a file stream named after it (`.` becomes `_`, e.g.
    /// `orders_created`) capturing `topic` and `topic.>`, with the spec's replicas (default
    /// [`NatsConfig::stream_replicas`]) and age limit, and what the configured publish mode
    /// needs (`allow_atomic` for [`PublishMode::Atomic`]), unless a stream of that name exists
    /// (left as it is). More than one partition is refused, and so is an age under 100 ms;
    /// an age under the default 2-minute duplicate window shortens the window to the age.
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), Error> {
        let topic = spec.name();
        eventbus_core::validate::topic(topic, &SUBJECT_RULES)?;
        spec.check(&self.capabilities(), error::BACKEND)?;
        let replicas = spec
            .get_replicas()
            .map_or(self.stream_replicas, |n| n as usize);
        let mut stream = StreamSpec::new(
            topic.replace('.', "_"),
            [topic.to_owned(), format!("{topic}.>")],
        )
        .replicas(replicas)
        .allow_atomic(self.publish.mode == PublishMode::Atomic);
        if let Some(age) = spec.get_max_age() {
            // A stream's duplicate window may not be longer than its age: the window shrinks
            // to the age (ids are kept no longer than messages).
            let window = stream.duplicate_window.min(age);
            stream = stream.max_age(age).duplicate_window(window);
        }
        self.ensure_stream(&stream).await
    }
}

/// A connection to a NATS server with JetStream: makes sinks, subscribers and streams.
#[derive(Clone, Debug)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    denied: std::sync::Arc<denied::Denied>,
    /// [`NatsConfig::ack_timeout`].
    ack_timeout: Duration,
    /// [`NatsConfig::publish_mode`] and [`NatsConfig::dedup`].
    publish: SinkOptions,
    /// [`NatsConfig::stream_replicas`].
    stream_replicas: usize,
}

/// How long the initial connect may take in all: async-nats tries every seed once, each within
/// `per_seed` (a seed whose host name resolves to several addresses may take that per address;
/// give IP addresses or one-address names to keep the bound), so a live seed behind silent ones
/// is still reached.
fn connect_limit(per_seed: Duration, seeds: usize) -> Duration {
    per_seed.saturating_mul(u32::try_from(seeds.max(1)).unwrap_or(u32::MAX))
        + Duration::from_secs(1)
}

impl NatsBackend {
    /// Connect. Tries every seed once, each within `connect_timeout`, and fails within
    /// `connect_timeout` x seeds + 1 s with a typed error (`Connect`, `Timeout`, `Auth`,
    /// `Config`): no silent retry loop at start.
    pub async fn connect(config: NatsConfig) -> Result<Self, Error> {
        let mut opts = match &config.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token { token } => async_nats::ConnectOptions::with_token(token.clone()),
            NatsAuth::NKey { seed } => async_nats::ConnectOptions::with_nkey(seed.clone()),
            NatsAuth::CredsFile { path } => {
                async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| {
                        error::err(
                            eventbus_core::ErrorKind::Config,
                            "could not read the creds file",
                        )
                        .with_source(e)
                    })?
            }
        };
        opts = opts
            .name(config.name.clone())
            .connection_timeout(config.connect_timeout)
            // Acks arrive on one inbox subscription: give it room for a full window of acks.
            .subscription_capacity(1 << 20)
            .require_tls(config.tls_required);
        if config.retain_seed_order {
            opts = opts.retain_servers_order();
        }
        let denied = std::sync::Arc::new(denied::Denied::default());
        let d = std::sync::Arc::clone(&denied);
        opts = opts.event_callback(move |event| {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(e)) = &event {
                d.observe(e);
            }
            async {}
        });
        if let Some(ca) = &config.tls_root_certificates {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &config.tls_client_cert {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let servers = config
            .servers()
            .map_err(|e| e.with_backend(error::BACKEND))?;
        let client = tokio::time::timeout(
            connect_limit(config.connect_timeout, servers.len()),
            opts.connect(servers),
        )
        .await
        .map_err(|_| {
            error::err(eventbus_core::ErrorKind::Timeout, "connect timed out").temporary()
        })?
        .map_err(error::connect)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .max_ack_inflight(config.max_ack_inflight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(NatsBackend {
            client,
            js,
            denied,
            ack_timeout: config.ack_timeout,
            publish: SinkOptions::default()
                .mode(config.publish_mode)
                .dedup(config.dedup),
            stream_replicas: config.stream_replicas,
        })
    }

    /// A publishing sink with explicit options (publish mode, de-duplication).
    ///
    /// ```no_run
    /// # async fn demo(nats: eventbus_nats::NatsBackend) -> Result<(), eventbus_core::Error> {
    /// use eventbus_nats::{PublishMode, SinkOptions};
    /// // One ack per batch, all-or-nothing; the stream needs `StreamSpec::allow_atomic(true)`.
    /// let sink = nats.sink_with(SinkOptions::default().mode(PublishMode::Atomic)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn sink_with(&self, opts: SinkOptions) -> Result<NatsSink, Error> {
        NatsSink::new(
            self.client.clone(),
            self.js.clone(),
            opts,
            std::sync::Arc::clone(&self.denied),
            self.ack_timeout,
        )
        .await
    }

    /// A sink that does not send `Nats-Msg-Id`: no server-side de-duplication, slightly less
    /// work per message. Retries of unknown outcomes may then store duplicates.
    pub async fn sink_without_dedup(&self) -> Result<NatsSink, Error> {
        self.sink_with(self.publish.dedup(false)).await
    }

    /// The server's `max_payload` in bytes.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// The server version string.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// The underlying async-nats client (escape hatch).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (escape hatch).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}
