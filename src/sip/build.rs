//! Building messages: responses to requests (RFC 3261 8.2.6), tags, branches, Call-IDs,
//! and the standard reason phrases.

use super::header::{CSeq, NameAddr, Via};
use super::header::{Headers, BRANCH_COOKIE};
use super::message::{BaseHeaders, ParseError, Request, Response};
use bytes::Bytes;
use rand::Rng;

/// The default reason phrase of a status code.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        204 => "No Notification",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        412 => "Conditional Request Failed",
        413 => "Request Entity Too Large",
        414 => "Request-URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        421 => "Extension Required",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        485 => "Ambiguous",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        493 => "Undecipherable",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => match status / 100 {
            1 => "Trying",
            2 => "OK",
            3 => "Redirect",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

fn random_hex(out: &mut String, bytes: usize) {
    // By hand rather than `write!("{:02x}")` per byte: a call makes a dozen tags and
    // branches, and the formatter cost ~150 instructions a byte (issue 14).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut rng = rand::rng();
    for _ in 0..bytes {
        let b: u8 = rng.random();
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// A fresh tag for From or To (RFC 3261 19.3: at least 32 bits of randomness).
pub fn new_tag() -> String {
    let mut s = String::with_capacity(16);
    random_hex(&mut s, 8);
    s
}

/// A fresh RFC 3261 branch, starting with the magic cookie (8.1.1.7).
pub fn new_branch() -> String {
    let mut s = String::with_capacity(BRANCH_COOKIE.len() + 20);
    s.push_str(BRANCH_COOKIE);
    random_hex(&mut s, 10);
    s
}

/// A fresh Call-ID, globally unique (RFC 3261 8.1.1.4).
pub fn new_call_id(host: &str) -> String {
    let mut s = String::with_capacity(40);
    random_hex(&mut s, 12);
    s.push('@');
    s.push_str(host);
    s
}

impl Request {
    /// A response to this request (RFC 3261 8.2.6.2): Via, From, To, Call-ID and CSeq
    /// copied. The caller adds the To tag where one is needed (`Response::set_to_tag`).
    pub fn response(&self, status: u16) -> Response {
        self.base.response(status)
    }
}

impl BaseHeaders {
    /// A response to the request these are the headers of (see [`Request::response`]).
    pub fn response(&self, status: u16) -> Response {
        Response {
            status,
            reason: reason_phrase(status).to_owned(),
            base: self.clone(),
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }
}

impl Response {
    pub fn with_reason(mut self, reason: impl Into<String>) -> Response {
        self.reason = reason.into();
        self
    }
    /// Adds a To tag unless the request already had one (in-dialog).
    pub fn set_to_tag(&mut self, tag: &str) {
        if self.base.to.tag().is_none() {
            self.base.to.set_tag(tag);
        }
    }
}

/// The answer to a request that failed to parse (RFC 3261 8.2 / RFC 4475 3.1.2): a 400 (or
/// 505) naming the defect, when the top Via and the other base headers can be copied.
/// `None` means the message cannot be answered and is to be dropped.
pub fn error_response(err: &ParseError) -> Option<Response> {
    let head = err.head.as_ref()?;
    let h = &head.headers;
    let via = h.get("Via").and_then(|v| {
        Via::parse_list(v).ok().or_else(|| {
            // A broken Via (RFC 4475 3.1.2.1: `192.0.2.15;;,;,,`) still names where the
            // 400 goes when its sent-protocol and sent-by read: answer with those alone.
            let sent_by = v.split([';', ',']).next()?;
            Via::parse(sent_by).ok().map(|via| vec![via])
        })
    })?;
    // Copy what can be read; a response needs From, To, Call-ID and CSeq, so fall back to
    // neutral values where the request's own are missing or broken.
    let from = h
        .get("From")
        .and_then(|v| NameAddr::parse(v).ok())
        .or_else(|| NameAddr::parse("<sip:invalid@invalid>").ok())?;
    let to = h
        .get("To")
        .and_then(|v| NameAddr::parse(v).ok())
        .or_else(|| NameAddr::parse("<sip:invalid@invalid>").ok())?;
    let call_id = h
        .get("Call-ID")
        .filter(|v| super::message::is_valid_call_id(v))
        .unwrap_or("invalid")
        .to_owned();
    let cseq = h
        .get("CSeq")
        .and_then(|v| CSeq::parse(v).ok())
        .unwrap_or(CSeq {
            seq: 0,
            method: super::Method::from_token(&head.method),
        });
    let status = err.status();
    let mut to = to;
    if to.tag().is_none() {
        to.set_tag(&new_tag());
    }
    Some(Response {
        status,
        reason: if status == 400 {
            err.kind.to_string()
        } else {
            reason_phrase(status).to_owned()
        },
        base: BaseHeaders {
            via,
            from,
            to,
            call_id,
            cseq,
        },
        headers: Headers::new(),
        body: Bytes::new(),
    })
}
