//! W3C trace context (`traceparent`) carried in message headers from publisher to handler.
//!
//! The SDK does not depend on an OpenTelemetry SDK: it carries the header, checks its form,
//! and records it on the `eventbus.handle` span of the [handler runtime](crate::handler), where
//! a tracing-to-OpenTelemetry layer can pick it up as the parent.
//!
//! ```
//! use eventbus_core::{Message, trace::TraceParent};
//! let root = TraceParent::new_root();
//! let msg = root.child().inject(Message::new("orders.created", "{}"));
//! let got = TraceParent::extract(&msg).expect("carried");
//! assert_eq!(got.trace_id(), root.trace_id());
//! assert_ne!(got.parent_id(), root.parent_id());
//! ```

use std::fmt;

use crate::message::Message;

/// The header name, as W3C Trace Context defines it.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent` value: version 00, 16-byte trace id, 8-byte parent (span) id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    /// A new trace (random ids, sampled).
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: nonzero(rand::random()),
            parent_id: nonzero(rand::random()),
            flags: 0x01,
        }
    }

    /// The same trace with a new parent id: what a publisher sends on behalf of its own span.
    pub fn child(&self) -> Self {
        TraceParent {
            parent_id: nonzero(rand::random()),
            ..*self
        }
    }

    /// Parse a header value (`00-<32 hex>-<16 hex>-<2 hex>`); `None` for anything else,
    /// including the all-zero ids the specification forbids.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || version != "00"
            || trace.len() != 32
            || parent.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let hex = |t: &str| {
            t.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !(hex(trace) && hex(parent) && hex(flags)) {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            parent_id: u64::from_str_radix(parent, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.parent_id != 0).then_some(tp)
    }

    /// The `traceparent` header of `msg`, if present and well formed.
    pub fn extract(msg: &Message) -> Option<Self> {
        msg.headers().get(TRACEPARENT).and_then(Self::parse)
    }

    /// `msg` with this `traceparent` header (replacing any).
    pub fn inject(&self, mut msg: Message) -> Message {
        msg.headers_mut().insert(TRACEPARENT, self.to_string());
        msg
    }

    /// The trace id, as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The parent (span) id, as 16 lowercase hex digits.
    pub fn parent_id(&self) -> String {
        format!("{:016x}", self.parent_id)
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

fn nonzero<T: PartialEq + From<u8>>(v: T) -> T {
    if v == T::from(0) { T::from(1) } else { v }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_w3c_example_and_refuses_the_rest() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(s).expect("the spec's example");
        assert_eq!(tp.to_string(), s);
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(tp.sampled());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn inject_and_extract_round_trip() {
        let tp = TraceParent::new_root();
        let m = tp.inject(Message::new("a.b", "x"));
        assert_eq!(TraceParent::extract(&m), Some(tp));
        let child = tp.child();
        assert_eq!(child.trace_id(), tp.trace_id());
        assert_ne!(child.parent_id(), tp.parent_id());
    }
}
