//! `validate::PORTABLE` is defined on its own; this checks it is exactly what both brokers'
//! rules accept, over every short name from characters each set treats differently.

use eventbus_core::validate::{self, PORTABLE};
use eventbus_kafka::TOPIC_RULES;
use eventbus_nats::SUBJECT_RULES;

fn agree(name: &str) {
    let portable = validate::topic(name, &PORTABLE).is_ok();
    let both = validate::topic(name, &TOPIC_RULES).is_ok()
        && validate::topic(name, &SUBJECT_RULES).is_ok();
    assert_eq!(
        portable, both,
        "{name:?}: portable {portable}, NATS and Kafka {both}"
    );
}

#[test]
fn portable_is_what_both_brokers_accept() {
    const ALPHABET: [char; 12] = ['a', 'Z', '0', '.', '-', '_', '*', '>', ' ', '/', 'ü', '\t'];
    let mut names = vec![String::new()];
    let mut checked = 0;
    for _ in 0..4 {
        let mut longer = Vec::with_capacity(names.len() * ALPHABET.len());
        for n in &names {
            for c in ALPHABET {
                let mut m = n.clone();
                m.push(c);
                agree(&m);
                checked += 1;
                longer.push(m);
            }
        }
        names = longer;
    }
    agree("");
    for len in [248, 249, 250] {
        agree(&"x".repeat(len));
        agree(&format!("{}.y", "x".repeat(len - 2)));
    }
    assert_eq!(checked, 12 + 144 + 1_728 + 20_736);
}
