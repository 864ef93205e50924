//! The gaps of rsip 0.4 that made us write our own SIP parser (see src/sip/mod.rs),
//! measured and asserted as they are: rsip is a dev-dependency for this test, the
//! differential test tests/rsip_diff.rs and benches/parse.rs. Each test here states one gap;
//! when a newer rsip closes it, that test fails and tells us to reconsider (the cause of
//! the failure is the good news, not a regression: update the gap, and src/sip/mod.rs).
//!
//! Messages come from tests/corpus (always there) and, for the count over RFC 4475, from
//! ../shared/conformance (skipped with a note where a clone has no ../shared).

mod conformance;

use conformance::{corpus_dir, messages, own_corpus, read_index};
use rsip::prelude::*;
use strowger::sip::{parse, SipMessage};

/// Our corpus message `name`, as sent on the wire; ours must parse it.
fn corpus_message(name: &str) -> Vec<u8> {
    let (_, bytes) = own_corpus()
        .into_iter()
        .find(|(row, _)| row["name"] == name)
        .unwrap_or_else(|| panic!("tests/corpus/{name}.sip"));
    assert!(parse(&bytes).is_ok(), "our parser must read {name}");
    bytes
}

fn rsip_parses(bytes: &[u8]) -> bool {
    rsip::SipMessage::try_from(bytes).is_ok()
}

#[test]
fn rsip_rejects_ipv6_references_in_uris() {
    // RFC 5118 4.1: `sip:[2001:db8::10]`, the Request-URI of every IPv6 call.
    for name in ["v6-ruri", "v6-port-ambiguous", "v6-contact-port"] {
        assert!(
            !rsip_parses(&corpus_message(name)),
            "rsip now reads {name}: the IPv6 gap is closed"
        );
    }
}

#[test]
fn rsip_rejects_folded_header_lines() {
    // RFC 3261 7.3.1: a header value may continue on lines that start with SP or HT.
    assert!(
        !rsip_parses(&corpus_message("folded-many")),
        "rsip now reads folded headers"
    );
}

#[test]
fn rsip_rejects_unknown_methods() {
    // RFC 3261 8.2.1 answers an unknown method 501; rsip's Method is a closed enum, so the
    // message cannot even be read to be answered.
    assert!(
        !rsip_parses(&corpus_message("unknown-method")),
        "rsip now reads extension methods"
    );
}

#[test]
fn rsip_does_not_read_compact_header_names() {
    // RFC 3261 7.3.3: `i:` is Call-ID, `l:` Content-Length... rsip parses the message but
    // keeps them as unknown headers, so its typed accessors miss them and the body runs
    // past Content-Length.
    let bytes = corpus_message("compact-all");
    let m = rsip::SipMessage::try_from(&bytes[..]).expect("rsip parses compact-all");
    assert!(
        m.call_id_header().is_err(),
        "rsip now reads the compact i: as Call-ID"
    );
    assert!(
        m.via_header().is_err(),
        "rsip now reads the compact v: as Via"
    );
    assert_ne!(m.body().len(), 5, "rsip now reads the compact l:");
}

#[test]
fn rsip_parses_fewer_rfc4475_messages_than_we_answer_correctly() {
    let Some(dir) = corpus_dir("rfc4475") else {
        return;
    };
    let index = read_index(&dir);
    let mut ours = 0;
    let mut theirs = 0;
    let mut rsip_misses = Vec::new();
    for ((name, bytes), row) in messages(&dir).into_iter().zip(&index) {
        if row["class"] != "valid" {
            continue;
        }
        let ok = matches!(parse(&bytes), Ok((SipMessage::Request(_), _)));
        ours += usize::from(ok);
        if rsip_parses(&bytes) {
            theirs += 1;
        } else {
            rsip_misses.push(name);
        }
    }
    eprintln!(
        "valid RFC 4475 requests read: ours {ours}, rsip 0.4 {theirs}; rsip misses {rsip_misses:?}"
    );
    assert!(
        theirs < ours,
        "rsip now reads as many valid RFC 4475 requests as we do ({theirs} of {ours})"
    );
}
