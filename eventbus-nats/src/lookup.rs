//! The writer's cache of which stream captures a subject.
//!
//! Subjects like `orders.<id>` are unbounded, so the cache is too: at [`SubjectStreams::CAP`]
//! entries it drops what has expired and, if still full, starts over (a lookup is one JetStream
//! API round trip, so forgetting costs little). A subject no stream captures is remembered for
//! [`SubjectStreams::MISS_TTL`], so a batch of unroutable messages does not ask the server again
//! on every batch, while a stream created later is still found within that time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Subject -> the stream that captures it, or `None` (no stream), with when the answer expires.
#[derive(Debug, Default)]
pub(crate) struct SubjectStreams {
    map: HashMap<String, (Option<String>, Option<Instant>)>,
}

impl SubjectStreams {
    /// Most subjects remembered.
    pub(crate) const CAP: usize = 10_000;
    /// How long "no stream captures this subject" stands.
    pub(crate) const MISS_TTL: Duration = Duration::from_secs(1);

    /// The cached answer for `subject`: `Some(Some(stream))`, `Some(None)` (no stream, recently
    /// asked) or `None` (ask the server).
    pub(crate) fn get(&self, subject: &str, now: Instant) -> Option<Option<String>> {
        match self.map.get(subject) {
            Some((stream, expires)) if expires.is_none_or(|t| now < t) => Some(stream.clone()),
            _ => None,
        }
    }

    /// Remember the server's answer for `subject`.
    pub(crate) fn insert(&mut self, subject: &str, stream: Option<String>, now: Instant) {
        if self.map.len() >= Self::CAP && !self.map.contains_key(subject) {
            self.map
                .retain(|_, (_, expires)| expires.is_none_or(|t| now < t));
            if self.map.len() >= Self::CAP {
                self.map.clear();
            }
        }
        let expires = stream.is_none().then(|| now + Self::MISS_TTL);
        self.map.insert(subject.to_owned(), (stream, expires));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_stay_and_misses_expire() {
        let now = Instant::now();
        let mut c = SubjectStreams::default();
        c.insert("orders.1", Some("ORDERS".into()), now);
        c.insert("nowhere", None, now);
        let later = now + SubjectStreams::MISS_TTL + Duration::from_millis(1);
        assert_eq!(c.get("orders.1", later), Some(Some("ORDERS".into())));
        assert_eq!(c.get("nowhere", now), Some(None));
        assert_eq!(c.get("nowhere", later), None, "a miss is asked again");
        assert_eq!(c.get("unknown", now), None);
    }

    #[test]
    fn never_holds_more_than_the_cap() {
        let now = Instant::now();
        let mut c = SubjectStreams::default();
        for i in 0..SubjectStreams::CAP * 3 + 7 {
            c.insert(&format!("orders.{i}"), Some("ORDERS".into()), now);
            assert!(c.len() <= SubjectStreams::CAP);
        }
        // Expired misses go first, before any hit is forgotten.
        let mut c = SubjectStreams::default();
        for i in 0..SubjectStreams::CAP - 1 {
            c.insert(&format!("miss.{i}"), None, now);
        }
        c.insert("orders.1", Some("ORDERS".into()), now);
        let later = now + SubjectStreams::MISS_TTL * 2;
        c.insert("orders.2", Some("ORDERS".into()), later);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("orders.1", later), Some(Some("ORDERS".into())));
    }
}
