//! Typed payloads: publish and handle `serde` types. [`Json`] is the default codec; implement
//! [`Codec`] for another format (the content type travels in the `content-type` header).
//!
//! ```
//! use eventbus_core::{Json, Message};
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct OrderCreated { id: u64, total_cents: i64 }
//!
//! let m = Message::encode("orders.created", &OrderCreated { id: 42, total_cents: 1299 })?;
//! assert_eq!(m.headers().get("content-type"), Some("application/json"));
//! let back: OrderCreated = m.decode()?;
//! assert_eq!(back, OrderCreated { id: 42, total_cents: 1299 });
//! // A payload that is not an OrderCreated is a typed, permanent error, never a panic.
//! let bad = Message::new("orders.created", "{\"id\":\"not a number\"}");
//! let e = bad.decode::<OrderCreated>().unwrap_err();
//! assert_eq!(e.kind(), eventbus_core::ErrorKind::InvalidMessage);
//! assert!(!e.is_retryable());
//! assert!(!e.to_string().contains("not a number"), "payload bytes stay out of errors");
//! # Ok::<(), eventbus_core::Error>(())
//! ```

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind};
use crate::message::{Message, Topic};

/// The header that names a payload's encoding.
pub const CONTENT_TYPE: &str = "content-type";

/// A payload format.
pub trait Codec: Send + Sync + 'static {
    /// The `content-type` header value this codec writes.
    fn content_type(&self) -> &'static str;
    /// Encode `value`. Errors are `InvalidMessage` and never quote the value.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, Error>;
    /// Decode `bytes` as a `T`. Errors are `InvalidMessage`, permanent (the same bytes never
    /// decode on retry) and never quote the payload.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, Error>;
}

/// JSON through `serde_json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Json;

impl Codec for Json {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, Error> {
        serde_json::to_vec(value).map(Bytes::from).map_err(|e| {
            Error::new(
                ErrorKind::InvalidMessage,
                format!(
                    "could not encode a {} as JSON ({})",
                    std::any::type_name::<T>(),
                    category(&e)
                ),
            )
            .permanent()
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's own text quotes the offending value: only its category and position.
            Error::new(
                ErrorKind::InvalidMessage,
                format!(
                    "payload does not decode as {} from JSON ({} at line {}, column {})",
                    std::any::type_name::<T>(),
                    category(&e),
                    e.line(),
                    e.column()
                ),
            )
            .permanent()
        })
    }
}

fn category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong shape or type",
        serde_json::error::Category::Eof => "unexpected end",
    }
}

impl Message {
    /// A message whose payload is `value` encoded as JSON (`content-type: application/json`).
    pub fn encode<T: Serialize + ?Sized>(
        topic: impl Into<Topic>,
        value: &T,
    ) -> Result<Message, Error> {
        Message::encode_with(&Json, topic, value)
    }

    /// A message whose payload is `value` encoded with `codec`.
    pub fn encode_with<C: Codec, T: Serialize + ?Sized>(
        codec: &C,
        topic: impl Into<Topic>,
        value: &T,
    ) -> Result<Message, Error> {
        Ok(Message::new(topic, codec.encode(value)?)
            .with_header(CONTENT_TYPE, codec.content_type()))
    }

    /// Decode the payload as JSON.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Json.decode(self.payload())
    }

    /// Decode the payload with `codec`.
    pub fn decode_with<C: Codec, T: DeserializeOwned>(&self, codec: &C) -> Result<T, Error> {
        codec.decode(self.payload())
    }
}
