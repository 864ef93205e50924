//! Parser conformance on message corpora, without a server: RFC 4475 (read in place from
//! ../shared/conformance/rfc4475) and our own corpus in tests/corpus (RFC 5118 IPv6 cases,
//! compact forms, framing edge cases). Also measures rsip 0.4 on the same messages, which
//! is why the message model is our own (see src/sip/mod.rs).

use std::path::PathBuf;
use strowger::sip::{parse, SipMessage};
use strowger::uas::validate;

fn rfc4475_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/rfc4475")
}

fn read_index(path: &std::path::Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            (
                f.next().unwrap().to_owned(),
                f.next().unwrap_or("").to_owned(),
                f.next().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// What our stack does with a message: parsed and accepted, refused with a status, or
/// unparseable.
fn outcome(bytes: &[u8]) -> Result<Option<u16>, String> {
    match parse(bytes) {
        Ok((SipMessage::Request(r), _)) => Ok(validate(&r).err().map(|resp| resp.status)),
        Ok((SipMessage::Response(_), _)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn rfc4475_parse_outcomes() {
    let dir = rfc4475_dir();
    let mut failures = Vec::new();
    let mut rsip_ok = 0;
    let mut ours_ok = 0;
    let index = read_index(&dir.join("INDEX.tsv"));
    assert_eq!(index.len(), 49, "RFC 4475 has 49 messages");
    for (name, class, expect) in &index {
        let bytes = std::fs::read(dir.join(format!("{name}.dat"))).unwrap();
        let got = outcome(&bytes);
        let good = match expect.as_str() {
            "answer-not-400" => !matches!(got, Ok(Some(400)) | Err(_)),
            "4xx-or-drop" => matches!(got, Err(_) | Ok(Some(400..=499))),
            "505-or-drop" => matches!(got, Err(_) | Ok(Some(505))),
            "answer-415" => got == Ok(Some(415)),
            "answer-416" => got == Ok(Some(416)),
            "answer-420" => got == Ok(Some(420)),
            "no-crash" => true,
            other => panic!("unknown expectation {other}"),
        };
        if !good {
            failures.push(format!("{name} ({class}, {expect}): got {got:?}"));
        }
        if class == "valid" {
            ours_ok += usize::from(parse(&bytes).is_ok());
            rsip_ok += usize::from(rsip::SipMessage::try_from(&bytes[..]).is_ok());
        }
    }
    eprintln!("valid RFC 4475 messages parsed: ours {ours_ok}, rsip 0.4 {rsip_ok}");
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}

#[test]
fn own_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut failures = Vec::new();
    for (name, expect, note) in read_index(&dir.join("INDEX.tsv")) {
        let text = std::fs::read_to_string(dir.join(format!("{name}.sip"))).unwrap();
        let bytes = if name == "lf-only" {
            text.into_bytes()
        } else {
            text.replace('\n', "\r\n").into_bytes()
        };
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

/// The gaps of rsip 0.4 that made us write our own parser; if a new rsip closes them, this
/// test tells us to reconsider.
#[test]
fn rsip_gaps_measured() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let load = |n: &str| {
        std::fs::read_to_string(dir.join(format!("{n}.sip")))
            .unwrap()
            .replace('\n', "\r\n")
    };
    let mut rsip_fails = Vec::new();
    for n in ["v6-ruri", "folded-many", "unknown-method"] {
        let text = load(n);
        assert!(parse(text.as_bytes()).is_ok(), "ours must parse {n}");
        if rsip::SipMessage::try_from(text.as_str()).is_err() {
            rsip_fails.push(n);
        }
    }
    eprintln!("rsip 0.4 fails on: {rsip_fails:?}");
    assert!(
        !rsip_fails.is_empty(),
        "rsip now handles every gap: reconsider src/sip"
    );
}
