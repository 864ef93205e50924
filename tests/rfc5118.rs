//! Sends the twelve RFC 5118 (IPv6 torture) messages, read in place from
//! ../shared/conformance/rfc5118 (skipped with a note where a clone has no ../shared), to a
//! running server over UDP and checks each outcome against INDEX.tsv: every valid message
//! is answered, and not with 400 (RFC 5118 asks to be liberal: 4.5 `received` with or
//! without brackets, 4.10 three colons before a dotted IPv4 tail); the invalid one (4.2, an
//! IPv6 Request-URI without brackets) gets 400. As in tests/rfc4475.rs, the top Via's
//! sent-by port is set, in the test's own copy, to a port the test bound at run time.

mod common;
mod conformance;
#[path = "conformance/exchange.rs"]
mod exchange;

use common::*;
use conformance::{corpus_dir, messages, read_index};
use exchange::{corpus_server, exchange, finals};

#[tokio::test]
async fn ipv6_torture_messages_get_the_expected_outcomes() {
    let Some(dir) = corpus_dir("rfc5118") else {
        return;
    };
    let index = read_index(&dir);
    assert_eq!(index.len(), 12, "RFC 5118 has 12 messages");
    let s = corpus_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let mut failures = Vec::new();
    for ((name, bytes), row) in messages(&dir).into_iter().zip(&index) {
        let got = exchange(&s, &peer, &bytes)
            .await
            .unwrap_or_else(|| panic!("server stopped answering after {name}"));
        let finals = finals(&got);
        eprintln!("{name}: {got:?}");
        let ok = match row["class"].as_str() {
            "valid" => !finals.is_empty() && !finals.contains(&400),
            "invalid" => finals == [400],
            other => panic!("unknown class {other}"),
        };
        // 4.10: "parse, process OPTIONS": the server answers an OPTIONS itself, so the
        // tolerated form gets the 200 its two-colon twin gets.
        let ok = ok
            && match name.as_str() {
                "ipv6-bug-abnf-3-colons" | "ipv6-correct-abnf-2-colons" => finals == [200],
                _ => true,
            };
        if !ok {
            failures.push(format!(
                "{name} ({}: {}): got {got:?}",
                row["class"], row["expected_server_behaviour"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}

/// RFC 4475 3.3.4 (unksm2): a REGISTER whose To is no SIP URI (`isbn:...`) is refused as
/// an address of record this registrar does not serve, with a phrase that says so; the
/// phrase was once built from the URI's (empty) host: "404  Not Served Here".
#[tokio::test]
async fn register_with_a_non_sip_to_gets_a_sensible_phrase() {
    let s = corpus_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let msg = request(
        "REGISTER",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("unksm2"),
        "",
        "",
    )
    .replace("To: <sip:bob@strowger.test>", "To: isbn:2983792873");
    let got = exchange(&s, &peer, msg.as_bytes()).await.expect("answered");
    assert_eq!(finals(&got), [404], "{got:?}");
    for (_, reason) in &got {
        assert_eq!(reason, "Address of record is not a SIP or SIPS URI");
    }
}
