//! A message as the table's columns and back: id, topic, key, headers (a JSON array of
//! `[name, value]` pairs, in order) and payload, byte for byte.

use eventbus_core::{Error, ErrorKind, Headers, Message};

/// The columns of one message.
pub(crate) struct Columns {
    pub(crate) id: String,
    pub(crate) topic: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: String,
    pub(crate) payload: Vec<u8>,
}

pub(crate) fn encode(m: &Message) -> Columns {
    let pairs: Vec<[&str; 2]> = m.headers().iter().map(|(n, v)| [n, v]).collect();
    Columns {
        id: m.id().to_string(),
        topic: m.topic().as_str().to_owned(),
        key: m.key().map(|k| k.to_vec()),
        headers: serde_json::to_string(&pairs).expect("strings serialize"),
        payload: m.payload().to_vec(),
    }
}

pub(crate) fn decode(c: Columns) -> Result<Message, Error> {
    let pairs: Vec<[String; 2]> = serde_json::from_str(&c.headers).map_err(|_| {
        Error::new(ErrorKind::Storage, "outbox row: unreadable headers column").permanent()
    })?;
    let mut headers = Headers::new();
    for [n, v] in pairs {
        headers.append(n, v);
    }
    let mut m = Message::new(c.topic, c.payload)
        .with_id(c.id)
        .with_headers(headers);
    if let Some(k) = c.key {
        m = m.with_key(k);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_comes_back_as_it_went_in() {
        let m = Message::new("orders.created", vec![0u8, 1, 255])
            .with_key(vec![7u8, 0])
            .with_header("a", "1")
            .with_header("a", "2")
            .with_header("traceparent", "00-abc-def-01");
        let back = decode(encode(&m)).expect("decodes");
        assert_eq!(back.id(), m.id());
        assert_eq!(back.topic(), m.topic());
        assert_eq!(back.key(), m.key());
        assert_eq!(back.payload(), m.payload());
        let h = |m: &Message| -> Vec<(String, String)> {
            m.headers()
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect()
        };
        assert_eq!(h(&back), h(&m));
    }
}
