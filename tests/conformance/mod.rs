//! The conformance corpora of `../shared/conformance` (RFC 4475, RFC 5118), read in place,
//! and what the tests that use them share.
//!
//! A clone of the repository has no `../shared` beside it: a test that needs a corpus then
//! says it is skipped and why, and passes. Where the directory is there (CI, the project's
//! own checkouts) it runs in full, and a missing or broken file in it is a failure.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

/// `../shared/conformance/<name>`, or None (with a note on stderr) when this checkout has
/// no such directory.
pub fn corpus_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance")
        .join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: ../shared/conformance/{name} not found (a clone without ../shared); \
             the {name} messages are not checked"
        );
        None
    }
}

/// One row of an INDEX.tsv, by column name.
pub type Row = HashMap<String, String>;

/// The rows of `<dir>/INDEX.tsv` (tab-separated, first line the column names).
pub fn read_index(dir: &std::path::Path) -> Vec<Row> {
    let path = dir.join("INDEX.tsv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let names: Vec<&str> = lines
        .next()
        .expect("INDEX.tsv header")
        .split('\t')
        .collect();
    lines
        .map(|l| {
            names
                .iter()
                .zip(l.split('\t'))
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The message file of an index row: RFC 4475's INDEX names messages without `.dat`,
/// RFC 5118's with it.
pub fn message_path(dir: &std::path::Path, name: &str) -> PathBuf {
    if name.ends_with(".dat") {
        dir.join(name)
    } else {
        dir.join(format!("{name}.dat"))
    }
}

/// Every message of a corpus as (name, bytes), in index order.
pub fn messages(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    read_index(dir)
        .into_iter()
        .map(|row| {
            let name = row["name"].clone();
            let path = message_path(dir, &name);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name.trim_end_matches(".dat").to_owned(), bytes)
        })
        .collect()
}

/// The messages of our own corpus, tests/corpus, as sent on the wire (CRLF line ends,
/// except `lf-only`, which is about bare LF), with their index rows.
pub fn own_corpus() -> Vec<(Row, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    read_index(&dir)
        .into_iter()
        .map(|row| {
            let name = &row["name"];
            let text = std::fs::read_to_string(dir.join(format!("{name}.sip"))).unwrap();
            let bytes = if name == "lf-only" {
                text.into_bytes()
            } else {
                text.replace('\n', "\r\n").into_bytes()
            };
            (row, bytes)
        })
        .collect()
}

fn is_lws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// A copy of `msg` whose top Via's sent-by port is `port` (replaced, or added when the
/// Via has none), every other octet as it was. Responses to a request go to its source
/// address at the sent-by port (RFC 3261 18.2.2), so a test that sends a corpus message
/// from a port of its own sees the answers there instead of at 5060.
///
/// Reads the header lines as written, folding and white space around `/` included (RFC
/// 4475's wsinv); a message without a readable Via comes back unchanged.
pub fn with_sent_by_port(msg: &[u8], port: u16) -> Vec<u8> {
    let head_end = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(msg.len());
    let mut line_start = match msg[..head_end].iter().position(|&c| c == b'\n') {
        Some(i) => i + 1,
        None => return msg.to_vec(),
    };
    while line_start < head_end {
        let line_end = msg[line_start..head_end]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(head_end, |i| line_start + i);
        let line = &msg[line_start..line_end];
        if let Some(colon) = line.iter().position(|&c| c == b':') {
            let name = String::from_utf8_lossy(&line[..colon]);
            let name = name.trim();
            if !line.starts_with(b" ")
                && !line.starts_with(b"\t")
                && (name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v"))
            {
                return rewrite_port_at(msg, line_start + colon + 1, head_end, port)
                    .unwrap_or_else(|| msg.to_vec());
            }
        }
        line_start = line_end + 1;
    }
    msg.to_vec()
}

/// `value` is where a Via value starts; finds its sent-by and sets the port.
fn rewrite_port_at(msg: &[u8], value: usize, end: usize, port: u16) -> Option<Vec<u8>> {
    let mut i = value;
    // sent-protocol: name / version / transport.
    for _ in 0..2 {
        i += msg[i..end].iter().position(|&c| c == b'/')? + 1;
    }
    let skip_lws = |mut i: usize| {
        while i < end && is_lws(msg[i]) {
            i += 1;
        }
        i
    };
    i = skip_lws(i);
    while i < end && !is_lws(msg[i]) {
        i += 1;
    }
    i = skip_lws(i);
    // sent-by: host [ ":" port ].
    let host_end = if msg.get(i) == Some(&b'[') {
        i + msg[i..end].iter().position(|&c| c == b']')? + 1
    } else {
        i + msg[i..end]
            .iter()
            .position(|&c| matches!(c, b':' | b';' | b',') || is_lws(c))
            .unwrap_or(end - i)
    };
    if host_end == i {
        return None;
    }
    let mut out = Vec::with_capacity(msg.len() + 6);
    let after_host = skip_lws(host_end);
    if msg.get(after_host) == Some(&b':') {
        let digits = skip_lws(after_host + 1);
        let digits_end = digits
            + msg[digits..end]
                .iter()
                .position(|c| !c.is_ascii_digit())
                .unwrap_or(end - digits);
        out.extend_from_slice(&msg[..digits]);
        out.extend_from_slice(port.to_string().as_bytes());
        out.extend_from_slice(&msg[digits_end..]);
    } else {
        out.extend_from_slice(&msg[..host_end]);
        out.extend_from_slice(format!(":{port}").as_bytes());
        out.extend_from_slice(&msg[host_end..]);
    }
    Some(out)
}

#[test]
fn sent_by_port_is_set_in_the_top_via_only() {
    let cases: [(&str, &str); 5] = [
        (
            "OPTIONS sip:a@b SIP/2.0\r\nTo: x\r\nVia: SIP/2.0/UDP h.example;branch=1\r\nVia: SIP/2.0/UDP k:7\r\n\r\n",
            "Via: SIP/2.0/UDP h.example:4000;branch=1\r\nVia: SIP/2.0/UDP k:7\r\n",
        ),
        (
            "OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP [2001:db8::9:1]:6050;branch=1\r\n\r\n",
            "v: SIP/2.0/UDP [2001:db8::9:1]:4000;branch=1\r\n",
        ),
        (
            "OPTIONS sip:a@b SIP/2.0\r\nVia  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=3\r\n\r\n",
            " /UDP\r\n    192.0.2.2:4000;branch=3\r\n",
        ),
        (
            "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.15;;,;,,\r\n\r\n",
            "Via: SIP/2.0/UDP 192.0.2.15:4000;;,;,,\r\n",
        ),
        (
            "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP [2001:db8::9:1];received=x\r\n\r\n",
            "Via: SIP/2.0/UDP [2001:db8::9:1]:4000;received=x\r\n",
        ),
    ];
    for (msg, want) in cases {
        let got = String::from_utf8(with_sent_by_port(msg.as_bytes(), 4000)).unwrap();
        assert!(got.contains(want), "{got:?} lacks {want:?}");
        assert_eq!(
            got.len(),
            msg.len() + 5 - usize::from(msg.contains(":6050")) * 5
        );
    }
}

/// RFC 4475 3.1.2.1, 3.1.2.8-10: invalid requests the server once dropped; each must be
/// answered with a 400 whose reason names the defect.
#[allow(dead_code)] // not every test file that includes this module reads it
pub const ANSWERED_WITH_REASON: &[(&str, &str)] = &[
    ("badinv01", "Bad Via header"),
    (
        "lwsruri",
        "Malformed Request-Line (white space in the Request-URI)",
    ),
    (
        "lwsstart",
        "Malformed Request-Line (more than one SP between elements)",
    ),
    ("trws", "Malformed Request-Line (SP at the end)"),
];
