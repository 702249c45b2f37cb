//! Test messages that can be checked after the fact: every message carries its producer id, its
//! sequence number and a hash of its payload, in headers; its id is stable (`<run>-p<producer>-s<seq>`)
//! so a retry after an unknown outcome reuses it.

use eventbus_core::Message;

/// Header carrying the producer id.
pub const PRODUCER: &str = "rel-producer";
/// Header carrying the sequence number within the producer.
pub const SEQ: &str = "rel-seq";
/// Header carrying the FNV-1a 64 hash of the payload, in hex.
pub const HASH: &str = "rel-hash";

/// Identifies one test message: (producer, sequence).
pub type Key = (u32, u64);

/// Keys per producer: message `(producer, seq)` carries key `p<producer>-k<seq % KEYS>`, so a
/// producer's sequence interleaves this many keys, each in publish order (the keyed load of
/// an event-sourced service: many aggregates per producer).
pub const KEYS: u64 = 64;

/// The message key of `(producer, seq)`, as (producer, key number).
pub fn key_of((producer, seq): Key) -> (u32, u64) {
    (producer, seq % KEYS)
}

/// FNV-1a, 64 bit: a fixed, dependency-free payload fingerprint (not cryptographic; it only has
/// to catch truncation and corruption on the wire).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The deterministic payload of message `(producer, seq)`, `len` bytes.
pub fn payload(producer: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut x = fnv1a(&[producer.to_le_bytes().as_slice(), &seq.to_le_bytes()].concat()) | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap and varied, so a shifted or spliced payload changes the hash.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// Build test message `(producer, seq)` on `topic` for run `run`, keyed by [`key_of`].
pub fn message(run: &str, topic: &str, producer: u32, seq: u64, len: usize) -> Message {
    let body = payload(producer, seq, len);
    let hash = fnv1a(&body);
    Message::new(topic, body)
        .with_id(format!("{run}-p{producer}-s{seq}"))
        .with_key(format!("p{producer}-k{}", seq % KEYS))
        .with_header(PRODUCER, producer.to_string())
        .with_header(SEQ, seq.to_string())
        .with_header(HASH, format!("{hash:016x}"))
}

/// What a consumer saw of one test message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// (producer, sequence).
    pub key: Key,
    /// The payload hash matches the header (and the payload is the one that was sent).
    pub intact: bool,
    /// Where the broker stored it, `(partition, offset)` (a NATS stream: partition 0 and the
    /// stream sequence), when the reader says: the checker orders reads by it, so a message
    /// redelivered after later ones is not counted as stored out of order.
    pub stored_at: Option<(i64, u64)>,
}

/// `(partition, offset)` of a stored position (see [`Read::stored_at`]).
pub fn stored_at(p: &eventbus_core::Position) -> Option<(i64, u64)> {
    use eventbus_core::Position;
    match p {
        Position::Stream { sequence, .. } => Some((0, *sequence)),
        Position::Partition { partition, offset } => {
            Some((i64::from(*partition), u64::try_from(*offset).ok()?))
        }
        _ => None,
    }
}

/// Parse a delivered test message; `None` if it is not one (missing or bad headers).
pub fn read(m: &Message) -> Option<Read> {
    let h = m.headers();
    read_with(|n| h.get(n).map(str::to_owned), m.payload())
}

/// [`read`] for a delivery of the SDK's subscriber, with where it is stored.
pub fn read_delivery(d: &eventbus_core::Delivery) -> Option<Read> {
    let mut r = read(d.message())?;
    r.stored_at = stored_at(&d.info().position);
    Some(r)
}

/// [`read`] for a message of a raw client: `header` looks a header's value up by name.
pub fn read_with(header: impl Fn(&str) -> Option<String>, body: &[u8]) -> Option<Read> {
    let producer: u32 = header(PRODUCER)?.parse().ok()?;
    let seq: u64 = header(SEQ)?.parse().ok()?;
    let hash = u64::from_str_radix(&header(HASH)?, 16).ok()?;
    let intact = fnv1a(body) == hash && body == payload(producer, seq, body.len()).as_slice();
    Some(Read {
        key: (producer, seq),
        intact,
        stored_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let m = message("r1", "t.x", 3, 42, 100);
        assert_eq!(m.id().to_string(), "r1-p3-s42");
        let r = read(&m).expect("parse");
        assert_eq!(r.key, (3, 42));
        assert!(r.intact);
        let mut body = m.payload().to_vec();
        body[10] ^= 1;
        let bad = Message::new("t.x", body)
            .with_header(PRODUCER, "3")
            .with_header(SEQ, "42")
            .with_header(HASH, m.headers().get(HASH).unwrap_or_default().to_owned());
        assert!(!read(&bad).expect("parse").intact);
        assert_ne!(payload(3, 42, 100), payload(3, 43, 100));
    }
}
