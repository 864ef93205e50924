//! Sends all 49 RFC 4475 torture messages, read in place from ../shared/conformance/rfc4475
//! (skipped with a note where a clone has no ../shared), to a running server over UDP and
//! checks each outcome against INDEX.tsv.
//!
//! The corpus routes responses by its top Via: to the sender's address and the sent-by
//! port, 5060 when none is given. So each message is sent as written except for that one
//! port, which the test sets (in its own copy, never in the files) to a port it bound at
//! run time; nothing needs 127.0.0.1:5060.

mod common;
mod conformance;
#[path = "conformance/exchange.rs"]
mod exchange;

use common::*;
use conformance::{corpus_dir, messages, read_index};
use exchange::{corpus_server, exchange, finals};

#[tokio::test]
async fn torture_messages_get_the_expected_outcomes() {
    let Some(dir) = corpus_dir("rfc4475") else {
        return;
    };
    let index = read_index(&dir);
    assert_eq!(index.len(), 49, "RFC 4475 has 49 messages");
    let s = corpus_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let mut failures = Vec::new();
    for ((name, bytes), row) in messages(&dir).into_iter().zip(&index) {
        let expect = row["expect"].as_str();
        let got = exchange(&s, &peer, &bytes)
            .await
            .unwrap_or_else(|| panic!("server stopped answering after {name}"));
        let finals = finals(&got);
        eprintln!("{name}: {got:?}");
        let ok = match expect {
            "answer-not-400" => !finals.is_empty() && !finals.contains(&400),
            // The corpus allows a drop where a message cannot be answered; every invalid
            // request of RFC 4475 can be (the README promises 400 with the reason), so
            // here a drop is a failure.
            "4xx-or-drop" => !finals.is_empty() && finals.iter().all(|c| (400..500).contains(c)),
            "505-or-drop" => finals == [505],
            "answer-415" => finals == [415],
            "answer-416" => finals == [416],
            "answer-420" => finals == [420],
            "no-crash" => true,
            other => panic!("unknown expectation {other}"),
        };
        if !ok {
            failures.push(format!("{name}: expected {expect}, got {got:?}"));
        }
        if let Some((_, why)) = conformance::ANSWERED_WITH_REASON
            .iter()
            .find(|(n, _)| *n == name)
        {
            if finals != [400] || !got.iter().all(|(_, r)| r.starts_with(why)) {
                failures.push(format!("{name}: expected 400 \"{why}...\", got {got:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}
