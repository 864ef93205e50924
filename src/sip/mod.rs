//! The SIP message layer: parsing, the message model, and message building.
//!
//! Owns: the wire format. Must not touch: sockets, transactions, dialogs.
//!
//! ## Why our own message model, and what rsip is for
//! rsip 0.4 was the chosen message crate. Measured on the corpora (`tests/rsip_gaps.rs`
//! asserts each gap as it is, so that a newer rsip that closes one fails that test and
//! tells us): it rejects every IPv6 reference in a URI (`sip:bob@[2001:db8::10]`),
//! rejects whole messages with folded header lines, rejects unknown methods (its `Method`
//! is closed, so RFC 3261 8.2.1's 501 cannot be given), and leaves compact header names as
//! unknown headers so its typed Via/Call-ID/From accessors miss them (and the body runs
//! past a compact `l:`). Of the 20 valid RFC 4475 requests it reads 14; we read all 20.
//! Patching each gap would have meant a front stage that re-parses most of the message
//! anyway, so the message model is our own: one pass that frames, unfolds, expands compact
//! names and parses the base headers (Via, From, To, Call-ID, CSeq, Max-Forwards,
//! Content-Length) exactly once; other headers stay text until someone asks.
//!
//! rsip is no part of the server: it is a dev-dependency that checks us. On every corpus
//! message both parsers read, `tests/rsip_diff.rs` compares method or status,
//! Request-URI, Call-ID, CSeq, From and To tags, the top Via's branch and the body's
//! length, and asserts the differences are exactly the known ones; `benches/parse.rs`
//! compares speed.

mod build;
mod header;
mod lex;
mod message;
mod method;
mod party;
mod peek;
mod uri;

pub use build::{error_response, new_branch, new_call_id, new_tag, reason_phrase, Reply};
pub use header::{
    canonical_name, CSeq, Header, HeaderError, Headers, NameAddr, Via, BRANCH_COOKIE,
};
pub use lex::{is_token, quoted_end, split_commas};
pub use message::{
    find_head_end, parse, BaseHeaders, ParseError, ParseErrorKind, Request, RequestHead, Response,
    SipMessage,
};
pub use method::Method;
pub use party::PartyAddr;
pub use peek::{peek_request, Peek};
pub use uri::{parse_hostport, Host, Params, Scheme, Uri, UriError};
pub(crate) use uri::{write_ipv4, write_port};

/// The parser's invariants, for the fuzz target and the mutation test: parsing never
/// panics; a parsed message serializes to bytes that parse back to the same message; an
/// error response, when there is one, parses; where the look at a request's bytes
/// (`peek_request`) reads it, it reads what the parser reads (above all: no To tag only
/// when there is none), and its stateless response parses. Panics when an invariant is broken. (The
/// UAS core's checks of a parsed request are added by its own `check_invariants`.)
#[doc(hidden)]
pub fn check_invariants(data: &[u8]) {
    match parse(data) {
        Ok((SipMessage::Request(req), _)) => {
            if let Some(peek) = peek_request(data) {
                check_peek(&req, &peek);
            }
            let bytes = req.to_bytes();
            let (again, _) = parse(&bytes).expect("serialized request re-parses");
            assert_eq!(again, SipMessage::Request(req), "request round trip");
        }
        Ok((SipMessage::Response(resp), _)) => {
            let (again, _) = parse(&resp.to_bytes()).expect("serialized response re-parses");
            assert_eq!(again, SipMessage::Response(resp), "response round trip");
        }
        Err(e) => {
            if let Some(r) = error_response(&e) {
                parse(&r.to_bytes()).expect("error response parses");
            }
        }
    }
}

/// The look at the bytes agrees with the parser on what a stateless refusal relies on.
fn check_peek(req: &Request, peek: &Peek<'_>) {
    assert_eq!(peek.method, req.method.as_str(), "peek: method");
    assert_eq!(peek.call_id, req.base.call_id, "peek: Call-ID");
    assert_eq!(peek.to_tag, req.base.to.tag(), "peek: To tag");
    let top = &req.base.via[0];
    assert_eq!(Some(peek.branch), top.branch(), "peek: branch");
    let sent_by = match top.port {
        Some(p) => format!("{}:{p}", top.host.to_text().to_ascii_lowercase()),
        None => top.host.to_text().to_ascii_lowercase(),
    };
    assert_eq!(peek.sent_by(), sent_by, "peek: sent-by");
    if peek.to_tag.is_some() {
        return; // only requests outside a dialog are answered from a look
    }
    let source = std::net::SocketAddr::from(([192, 0, 2, 1], 5060));
    let bytes = peek.response(503, "Overloaded", "ovl-1", source, "Retry-After: 2\r\n");
    let text = String::from_utf8_lossy(&bytes);
    match parse(&bytes) {
        Ok((SipMessage::Response(resp), _)) => {
            assert_eq!(resp.status, 503);
            assert_eq!(
                resp.base.call_id, req.base.call_id,
                "503: Call-ID in {text}"
            );
            assert_eq!(resp.base.cseq, req.base.cseq, "503: CSeq in {text}");
            assert_eq!(
                resp.base.via.len(),
                req.base.via.len(),
                "503: Vias in {text}"
            );
            assert_eq!(resp.base.to.tag(), Some("ovl-1"), "503: To tag in {text}");
        }
        other => panic!("peek's 503 does not parse: {other:?} in {text}"),
    }
}
