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
        self.clone().into_response(status)
    }
    /// The same, from headers that are not needed any more.
    pub fn into_response(self, status: u16) -> Response {
        Response {
            status,
            reason: reason_phrase(status).to_owned(),
            base: self,
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }
}

/// A response written straight from the headers of the request it answers, borrowed: Via,
/// From, To, Call-ID and CSeq are copied into the bytes sent (RFC 3261 8.2.6.2) without
/// first being cloned into a [`Response`]. Issue 14: the clone and its drop were ~1,700
/// instructions each, and every call made four of them for answers that were written out
/// at once (the 100 Trying, the 180 and 200 to the caller, the 200 to the BYE).
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    pub status: u16,
    pub reason: &'a str,
    /// The request's headers.
    pub base: &'a BaseHeaders,
    /// The To tag to add: ignored when the request's To has one already (in-dialog).
    pub to_tag: Option<&'a str>,
    /// Headers after the copied ones.
    pub headers: &'a Headers,
    pub body: &'a Bytes,
}

static NO_HEADERS: Headers = Headers::new();
static NO_BODY: Bytes = Bytes::new();

impl<'a> Reply<'a> {
    /// `status` with its default reason, no To tag added, no other header, no body.
    pub fn new(base: &'a BaseHeaders, status: u16) -> Reply<'a> {
        Reply {
            status,
            reason: reason_phrase(status),
            base,
            to_tag: None,
            headers: &NO_HEADERS,
            body: &NO_BODY,
        }
    }
    /// The tag of the To header sent: the request's own, or the one added.
    pub fn sent_to_tag(&self) -> Option<&'a str> {
        self.base.to.tag().or(self.to_tag)
    }
    /// The message as sent: one allocation of its exact size.
    pub fn to_bytes(&self) -> Bytes {
        let added = if self.base.to.tag().is_none() {
            self.to_tag
        } else {
            None
        };
        super::message::serialize(self.body, |s| {
            s.push_str("SIP/2.0 ");
            s.push_str(itoa::Buffer::new().format(self.status));
            s.push(' ');
            s.push_str(self.reason);
            s.push_str("\r\n");
            super::message::write_common(s, self.base, added, None, self.headers);
        })
    }
}

impl Request {
    /// A response to this request to be written at once (see [`Reply`]).
    pub fn reply(&self, status: u16) -> Reply<'_> {
        Reply::new(&self.base, status)
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
            from: from.into(),
            to: to.into(),
            call_id,
            cseq,
        },
        headers: Headers::new(),
        body: Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, SipMessage};

    fn request(to: &str) -> Request {
        let text = format!(
            "INVITE sip:bob@example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n\
             Via: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK0;received=192.0.2.8\r\n\
             From: \"Alice\" <sip:alice@example.com>;tag=a1\r\n\
             To: {to}\r\n\
             Call-ID: c1@192.0.2.1\r\n\
             CSeq: 7 INVITE\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let (SipMessage::Request(r), _) = parse(text.as_bytes()).unwrap() else {
            panic!("a request");
        };
        r
    }

    /// A `Reply` writes what the `Response` made from the same request writes, byte for
    /// byte: the To tag added only when the request's To has none (RFC 3261 8.2.6.2).
    #[test]
    fn a_reply_is_the_response_it_replaces() {
        let mut extra = Headers::new();
        extra.push("Contact", "<sip:b2b@192.0.2.2>");
        let body = Bytes::from_static(b"v=0\r\n");
        for to in ["<sip:bob@example.com>", "<sip:bob@example.com>;tag=b2"] {
            let req = request(to);
            let mut resp = req.response(180).with_reason("Ringing Here");
            resp.set_to_tag("ours");
            resp.headers.push("Contact", "<sip:b2b@192.0.2.2>");
            resp.body = body.clone();
            let mut reply = req.reply(180);
            reply.reason = "Ringing Here";
            reply.to_tag = Some("ours");
            reply.headers = &extra;
            reply.body = &body;
            assert_eq!(reply.to_bytes(), resp.to_bytes(), "{to}");
            assert_eq!(reply.sent_to_tag(), resp.base.to.tag(), "{to}");
            assert_eq!(resp.as_reply().to_bytes(), resp.to_bytes());
        }
        // Nothing added: the defaults of `Request::response`.
        let req = request("<sip:bob@example.com>");
        assert_eq!(req.reply(100).to_bytes(), req.response(100).to_bytes());
        assert_eq!(req.reply(100).sent_to_tag(), None);
    }
}
