//! Stream provisioning.

use std::time::Duration;

use async_nats::jetstream::stream;
use eventbus_core::{Error, ErrorKind};

use crate::NatsBackend;
use crate::error;

/// Where a stream keeps its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// Files (durable; page cache with periodic fsync, like Kafka's default).
    #[default]
    File,
    /// Memory (lost on restart).
    Memory,
}

/// What stream to ensure.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects it captures (wildcards allowed).
    pub subjects: Vec<String>,
    /// Storage. Default file.
    pub storage: StorageKind,
    /// Replicas. Default 1.
    pub replicas: usize,
    /// Max age (zero: unlimited; else at least 100 ms and at least the duplicate window).
    pub max_age: Duration,
    /// Max bytes (-1: unlimited).
    pub max_bytes: i64,
    /// Max messages (-1: unlimited).
    pub max_messages: i64,
    /// De-duplication window for `Nats-Msg-Id`. Default 2 minutes: it must cover the engine's
    /// `ack_timeout` (every resend of the sink happens within it) plus however long the caller
    /// retries unknown outcomes with the same ids. The server keeps every id for this long
    /// (measured: ~3 GiB of server memory at 100k msg/s for 2 minutes; see the repository's
    /// `docs/bench/dedup-window.md`).
    pub duplicate_window: Duration,
    /// Accept atomic batch publishes (`allow_atomic`, server 2.12+), needed by
    /// [`PublishMode::Atomic`](crate::PublishMode::Atomic). Default `false`.
    pub allow_atomic: bool,
    /// Accept fast-ingest batch publishes (`allow_batched`, server 2.14+), used by
    /// [`PublishMode::Fast`](crate::PublishMode::Fast), the default publish mode. Default `true`;
    /// ignored on older servers.
    pub allow_batched: bool,
}

impl StreamSpec {
    /// A file-backed stream `name` capturing `subjects`.
    pub fn new(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        StreamSpec {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            storage: StorageKind::File,
            replicas: 1,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_messages: -1,
            duplicate_window: Duration::from_secs(120),
            allow_atomic: false,
            allow_batched: true,
        }
    }
    /// Accept atomic batch publishes.
    pub fn allow_atomic(mut self, on: bool) -> Self {
        self.allow_atomic = on;
        self
    }
    /// Accept fast-ingest batch publishes.
    pub fn allow_batched(mut self, on: bool) -> Self {
        self.allow_batched = on;
        self
    }
    /// Set the storage.
    pub fn storage(mut self, s: StorageKind) -> Self {
        self.storage = s;
        self
    }
    /// Set the duplicate window.
    pub fn duplicate_window(mut self, d: Duration) -> Self {
        self.duplicate_window = d;
        self
    }
    /// Set replicas.
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }
    /// Set max age.
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }
}

/// Facts about a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamState {
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// First sequence.
    pub first_sequence: u64,
    /// Last sequence.
    pub last_sequence: u64,
}

impl NatsBackend {
    /// Create the stream if missing, or return the existing one (its config is left as is).
    pub async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), Error> {
        if spec.name.is_empty() || spec.name.contains(['.', '*', '>', ' ']) {
            return Err(error::err(
                ErrorKind::Config,
                "stream name must be non-empty without '.', '*', '>' or spaces",
            ));
        }
        // nats-server's own rules (error 10052), refused typed before the request.
        if !spec.max_age.is_zero() {
            if spec.max_age < Duration::from_millis(100) {
                return Err(error::err(
                    ErrorKind::Config,
                    "max_age must be zero (unlimited) or at least 100 ms",
                ));
            }
            if spec.duplicate_window > spec.max_age {
                return Err(error::err(
                    ErrorKind::Config,
                    "duplicate_window must not be longer than max_age",
                ));
            }
        }
        let cfg = stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            storage: match spec.storage {
                StorageKind::File => stream::StorageType::File,
                StorageKind::Memory => stream::StorageType::Memory,
            },
            num_replicas: spec.replicas,
            max_age: spec.max_age,
            max_bytes: spec.max_bytes,
            max_messages: spec.max_messages,
            duplicate_window: spec.duplicate_window,
            allow_atomic_publish: spec.allow_atomic,
            // Older servers do not know the setting (a strict server would refuse it).
            allow_batch_publish: spec.allow_batched
                && crate::sink::server_version(&self.server_version())
                    .is_some_and(|v| v >= crate::PublishMode::Fast.min_server()),
            ..Default::default()
        };
        self.jetstream()
            .get_or_create_stream(cfg)
            .await
            .map_err(|e| error::other("could not create or look up the stream", e))?;
        Ok(())
    }

    /// Current state of stream `name` (for verification: how many messages it really holds).
    pub async fn stream_state(&self, name: &str) -> Result<StreamState, Error> {
        let mut s = self
            .jetstream()
            .get_stream(name)
            .await
            .map_err(|e| error::other("stream lookup failed", e))?;
        let info = s
            .info()
            .await
            .map_err(|e| error::other("stream info failed", e))?;
        Ok(StreamState {
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
        })
    }

    /// Delete stream `name`.
    pub async fn delete_stream(&self, name: &str) -> Result<(), Error> {
        self.jetstream()
            .delete_stream(name)
            .await
            .map_err(|e| error::other("stream delete failed", e))?;
        Ok(())
    }
}
