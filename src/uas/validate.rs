//! Request validation of the UAS core (RFC 3261 8.2), applied to every request that opens
//! a server transaction before any call logic sees it.

use crate::sip::{Method, Request, Response, Scheme};

/// Option tags we understand in Require (RFC 3261 8.2.2.3), also what OPTIONS answers
/// list in Supported. Not `timer`: RFC 4028 session timers are not implemented (a
/// Session-Expires is not relayed), so a request that requires them gets 420.
pub const SUPPORTED_OPTIONS: &[&str] = &["100rel", "replaces", "timer"];

/// Body types the server itself interprets (RFC 3261 8.2.3). Bodies of other methods
/// (MESSAGE, INFO, NOTIFY, PUBLISH...) are relayed without being read, so any type goes.
pub const ACCEPTED_SDP_TYPES: &[&str] = &[
    "application/sdp",
    "multipart/mixed",
    "multipart/alternative",
];

/// Whether the server reads this method's body (and so must understand its type).
fn reads_body(method: &Method) -> bool {
    matches!(
        method,
        Method::Invite | Method::Ack | Method::Update | Method::Prack
    )
}

/// Checks a request against RFC 3261 8.2.1-8.2.3 in the RFC's order, returning the error
/// response to send when it fails.
pub fn validate(req: &Request) -> Result<(), Box<Response>> {
    check(req).map_err(Box::new)
}

// Private and boxed once by `validate`: the error path is the rare one.
#[allow(clippy::result_large_err)]
fn check(req: &Request) -> Result<(), Response> {
    // RFC 3261 8.1.1.5: the CSeq method matches the request method. Checked before the
    // method itself so that a mismatched unknown method gets 400, not 501 (RFC 4475 3.1.2.18).
    if req.base.cseq.method != req.method {
        return Err(req
            .response(400)
            .with_reason("CSeq method does not match Request-Line"));
    }
    // RFC 3261 8.2.1: an unknown method gets 501 with Allow.
    if !req.method.is_known() {
        let mut r = req.response(501);
        r.headers.push("Allow", Method::allow_list());
        return Err(r);
    }
    // RFC 3261 8.2.2.1: a Request-URI scheme we cannot handle gets 416.
    if !matches!(req.uri.scheme, Scheme::Sip | Scheme::Sips | Scheme::Tel) {
        return Err(req.response(416));
    }
    // RFC 3261 19.1.5: headers are not allowed in a Request-URI (RFC 4475 3.1.2.11).
    if req.uri.headers.is_some() {
        return Err(req
            .response(400)
            .with_reason("Request-URI must not contain headers"));
    }
    // RFC 3261 8.2.2.3: Require is ignored for CANCEL and ACK; any option tag we do not
    // know gets 420 listing the unknown tags in Unsupported. As a B2BUA we also play the
    // proxy's part, so Proxy-Require is checked the same way (RFC 4475 3.3.5).
    if !matches!(req.method, Method::Ack | Method::Cancel) {
        let unsupported: Vec<String> = req
            .headers
            .list("Require")
            .into_iter()
            .chain(req.headers.list("Proxy-Require"))
            .filter(|t| !SUPPORTED_OPTIONS.iter().any(|s| s.eq_ignore_ascii_case(t)))
            .collect();
        if !unsupported.is_empty() {
            let mut r = req.response(420);
            r.headers.push("Unsupported", unsupported.join(", "));
            return Err(r);
        }
    }
    // RFC 3261 20.15: a body needs a Content-Type; 8.2.3: one we do not understand gets
    // 415 with Accept.
    if !req.body.is_empty() {
        let Some(ct) = req.headers.get("Content-Type") else {
            return Err(req.response(400).with_reason("Missing Content-Type header"));
        };
        let media = ct.split(';').next().unwrap_or("").trim();
        if reads_body(&req.method)
            && !ACCEPTED_SDP_TYPES
                .iter()
                .any(|t| t.eq_ignore_ascii_case(media))
        {
            let mut r = req.response(415);
            r.headers.push("Accept", ACCEPTED_SDP_TYPES.join(", "));
            return Err(r);
        }
        if let Some(enc) = req.headers.get("Content-Encoding") {
            if !enc.trim().eq_ignore_ascii_case("identity") {
                let mut r = req.response(415);
                r.headers.push("Accept-Encoding", "identity");
                return Err(r);
            }
        }
    }
    // RFC 3261 16.3 step 3 / 8.2: Max-Forwards 0 means the request may go no further.
    // OPTIONS is exempt: the server answers it itself (RFC 3261 11, RFC 4475 3.3.11).
    if req.max_forwards == Some(0) && req.method != Method::Options {
        return Err(req.response(483));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, SipMessage};

    fn req(text: &str) -> Request {
        match parse(text.replace('\n', "\r\n").as_bytes()).unwrap().0 {
            SipMessage::Request(r) => r,
            SipMessage::Response(_) => panic!("not a request"),
        }
    }

    const BASE: &str = "METHOD sip:bob@example.com SIP/2.0\n\
        Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\n\
        From: <sip:a@example.com>;tag=1\n\
        To: <sip:bob@example.com>\n\
        Call-ID: v1\n\
        CSeq: 1 METHOD\n\
        Max-Forwards: 70\n\
        EXTRA\
        Content-Length: 0\n\n";

    fn make(method: &str, extra: &str) -> Request {
        req(&BASE.replace("METHOD", method).replace("EXTRA", extra))
    }

    fn status(r: &Request) -> u16 {
        validate(r).err().map(|r| r.status).unwrap_or(0)
    }

    #[test]
    fn rfc_8_2_checks() {
        assert_eq!(status(&make("OPTIONS", "")), 0);
        assert_eq!(status(&make("FOO", "")), 501);
        let mut r = make("INVITE", "");
        r.base.cseq.method = Method::Bye;
        assert_eq!(status(&r), 400);
        assert_eq!(status(&make("OPTIONS", "Require: 100rel, foo\n")), 420);
        assert_eq!(status(&make("INVITE", "Require: 100rel, replaces\n")), 0);
        // RFC 4028 session timers are understood (the B2BUA refuses them with 420 when
        // `call.session_expires_s` is 0).
        assert_eq!(status(&make("INVITE", "Require: timer\n")), 0);
        let e = validate(&make("INVITE", "Proxy-Require: bar\n")).unwrap_err();
        assert_eq!(e.headers.get("Unsupported"), Some("bar"));
        assert_eq!(
            status(&make(
                "INVITE",
                "Max-Forwards: 0\n".replace("Max", "X-Max").as_str()
            )),
            0
        );
        let mut r = make("INVITE", "");
        r.max_forwards = Some(0);
        assert_eq!(status(&r), 483);
        let mut r = make("OPTIONS", "");
        r.max_forwards = Some(0);
        assert_eq!(status(&r), 0);
        let mut r = make("INVITE", "Content-Type: application/unknownformat\n");
        r.body = bytes::Bytes::from_static(b"x");
        assert_eq!(status(&r), 415);
        let mut r = make("MESSAGE", "Content-Type: text/plain\n");
        r.body = bytes::Bytes::from_static(b"x");
        assert_eq!(status(&r), 0);
        let mut r = make("MESSAGE", "");
        r.body = bytes::Bytes::from_static(b"x");
        assert_eq!(status(&r), 400);
        let mut r = make("INVITE", "");
        r.uri = crate::sip::Uri::parse("foo:bar").unwrap();
        assert_eq!(status(&r), 416);
    }
}
