//! Parser conformance on message corpora, without a server: RFC 4475 and RFC 5118 (read in
//! place from ../shared/conformance; skipped with a note where a clone has no ../shared)
//! and our own corpus in tests/corpus (RFC 5118 IPv6 cases, compact forms, framing edge
//! cases). tests/rsip_diff.rs and tests/rsip_gaps.rs compare rsip on the same messages.

mod conformance;

use conformance::{corpus_dir, messages, read_index};
use strowger::sip::{error_response, parse, SipMessage};
use strowger::uas::validate;

/// What our stack does with one datagram, as the server would: a request refused by the
/// parser or by the UAS core's checks gets a status (and its reason phrase), an accepted
/// request or a response goes on, and what cannot be answered is dropped.
#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted,
    Response,
    Refused(u16, String),
    Dropped(String),
}

fn outcome(bytes: &[u8]) -> Outcome {
    match parse(bytes) {
        Ok((SipMessage::Request(r), _)) => match validate(&r) {
            Ok(()) => Outcome::Accepted,
            Err(resp) => Outcome::Refused(resp.status, resp.reason),
        },
        Ok((SipMessage::Response(_), _)) => Outcome::Response,
        Err(e) => match error_response(&e) {
            Some(resp) => Outcome::Refused(resp.status, resp.reason),
            None => Outcome::Dropped(e.to_string()),
        },
    }
}

#[test]
fn rfc4475_parse_outcomes() {
    let Some(dir) = corpus_dir("rfc4475") else {
        return;
    };
    let mut failures = Vec::new();
    let index = read_index(&dir);
    assert_eq!(index.len(), 49, "RFC 4475 has 49 messages");
    for ((name, bytes), row) in messages(&dir).into_iter().zip(&index) {
        let (class, expect) = (&row["class"], &row["expect"]);
        let got = outcome(&bytes);
        let good = match expect.as_str() {
            "answer-not-400" => !matches!(got, Outcome::Refused(400, _) | Outcome::Dropped(_)),
            // The corpus allows a drop where a message cannot be answered; every invalid
            // request of RFC 4475 can be (the README promises 400 with the reason), so
            // here a drop is a failure.
            "4xx-or-drop" => matches!(got, Outcome::Refused(400..=499, _)),
            "505-or-drop" => matches!(got, Outcome::Refused(505, _)),
            "answer-415" => matches!(got, Outcome::Refused(415, _)),
            "answer-416" => matches!(got, Outcome::Refused(416, _)),
            "answer-420" => matches!(got, Outcome::Refused(420, _)),
            "no-crash" => true,
            other => panic!("unknown expectation {other}"),
        };
        if !good {
            failures.push(format!("{name} ({class}, {expect}): got {got:?}"));
        }
        if let Some((_, why)) = conformance::ANSWERED_WITH_REASON
            .iter()
            .find(|(n, _)| *n == name)
        {
            match &got {
                Outcome::Refused(400, reason) if reason.starts_with(why) => {}
                _ => failures.push(format!("{name}: expected 400 \"{why}...\", got {got:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}

#[test]
fn rfc5118_parse_outcomes() {
    let Some(dir) = corpus_dir("rfc5118") else {
        return;
    };
    let index = read_index(&dir);
    assert_eq!(index.len(), 12, "RFC 5118 has 12 messages");
    let mut failures = Vec::new();
    for ((name, bytes), row) in messages(&dir).into_iter().zip(&index) {
        let got = outcome(&bytes);
        // "valid": parsed and past the UAS core's checks; the one invalid message
        // (4.2, an IPv6 Request-URI without brackets) gets 400.
        let good = match row["class"].as_str() {
            "valid" => got == Outcome::Accepted,
            "invalid" => matches!(got, Outcome::Refused(400, _)),
            other => panic!("unknown class {other}"),
        };
        if !good {
            failures.push(format!("{name} ({}): got {got:?}", row["class"]));
        }
    }
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}

#[test]
fn rfc5118_3_colons_reads_as_the_2_colon_form() {
    let Some(dir) = corpus_dir("rfc5118") else {
        return;
    };
    let ruri = |file: &str| match parse(&std::fs::read(dir.join(file)).unwrap()) {
        Ok((SipMessage::Request(r), _)) => r.uri,
        other => panic!("{file}: {other:?}"),
    };
    assert_eq!(
        ruri("ipv6-bug-abnf-3-colons.dat"),
        ruri("ipv6-correct-abnf-2-colons.dat")
    );
}

#[test]
fn own_corpus() {
    let mut failures = Vec::new();
    for (row, bytes) in conformance::own_corpus() {
        let (name, expect, note) = (&row["name"], &row["expect"], &row["note"]);
        let parsed = parse(&bytes);
        let good = match expect.as_str() {
            "valid" => matches!(&parsed, Ok((SipMessage::Request(_), _))),
            "valid-response" => matches!(&parsed, Ok((SipMessage::Response(_), _))),
            "invalid" => parsed.is_err(),
            other => panic!("unknown expectation {other}"),
        };
        if !good {
            failures.push(format!(
                "{name} ({note}): expected {expect}, got {parsed:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}
