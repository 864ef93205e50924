//! Test helpers shared by the transaction tests: sample requests and responses.
//!
//! Owns: fixtures only. Must not touch: anything outside tests.

use crate::sip::{parse, Request, Response, SipMessage};

pub(crate) fn request(text: &str) -> Request {
    match parse(text.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        other => panic!("fixture does not parse: {other:?}"),
    }
}

/// An INVITE from a UA behind a proxy (two Vias, a Route, a Contact).
pub(crate) fn invite() -> Request {
    request(
        "INVITE sip:bob@b.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKinv1\r\n\
         Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKorig\r\n\
         From: <sip:alice@a.example>;tag=fromtag\r\n\
         To: <sip:bob@b.example>\r\n\
         Call-ID: call1@a.example\r\n\
         CSeq: 1 INVITE\r\n\
         Max-Forwards: 70\r\n\
         Route: <sip:proxy.example;lr>\r\n\
         Contact: <sip:alice@192.0.2.9>\r\n\
         Content-Length: 0\r\n\r\n",
    )
}

pub(crate) fn options() -> Request {
    request(
        "OPTIONS sip:bob@b.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKopt1\r\n\
         From: <sip:alice@a.example>;tag=fromtag\r\n\
         To: <sip:bob@b.example>\r\n\
         Call-ID: call2@a.example\r\n\
         CSeq: 7 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n",
    )
}

/// A response to `req` carrying the To tag "totag" (but 100).
pub(crate) fn response_to(req: &Request, status: u16) -> Response {
    let mut r = req.response(status);
    if status > 100 {
        r.set_to_tag("totag");
    }
    r
}
