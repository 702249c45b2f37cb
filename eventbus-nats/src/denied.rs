//! Subjects the server refused to let this connection publish to.
//!
//! NATS reports a publish permission violation asynchronously
//! (`-ERR 'Permissions Violation for Publish to "SUBJECT"'`) and never answers the publish, so
//! without this the message would wait out its ack deadline. The connection's event callback
//! records the subject here; for the next [`TTL`] a publish to it fails at once with
//! [`ErrorKind::Auth`](eventbus_core::ErrorKind::Auth), before anything is sent. (The message
//! that triggered the violation itself still resolves at its deadline, as `Unknown`.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

/// How long a refusal is remembered (permissions can change on a server reload).
pub(crate) const TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct Denied {
    any: AtomicBool,
    subjects: RwLock<HashMap<String, Instant>>,
}

impl Denied {
    /// Record the subject named in a server error, if it is a publish permission violation.
    pub(crate) fn observe(&self, server_error: &str) {
        let Some(rest) = server_error
            .to_ascii_lowercase()
            .find("permissions violation for publish to")
            .map(|i| &server_error[i + "permissions violation for publish to".len()..])
        else {
            return;
        };
        let subject = rest.trim().trim_matches(|c| c == '"' || c == '\'').trim();
        if subject.is_empty() {
            return;
        }
        tracing::warn!(subject, "NATS server refused publishing: no permission");
        self.subjects
            .write()
            .insert(subject.to_owned(), Instant::now());
        self.any.store(true, Ordering::Release);
    }

    /// Was publishing to `subject` refused within the last [`TTL`]?
    pub(crate) fn contains(&self, subject: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        self.subjects
            .read()
            .get(subject)
            .is_some_and(|t| t.elapsed() < TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_subject_of_a_publish_violation() {
        let d = Denied::default();
        assert!(!d.contains("secret.x"));
        d.observe("Permissions Violation for Subscription to \"secret.x\"");
        assert!(!d.contains("secret.x"), "subscribe violations do not count");
        d.observe("Permissions Violation for Publish to \"secret.x\"");
        assert!(d.contains("secret.x"));
        assert!(!d.contains("secret.y"));
    }
}
