//! SIP messages: the parsing front stage (framing, unfolding, compact names) and the
//! typed message model with base headers parsed once, and serialization.

use super::header::{named, BaseName, CSeq, Header, HeaderError, Headers, Via};
use super::lex::{find_byte, find_byte_near, is_token, split_once_byte, trim_ws};
use super::method::Method;
use super::party::PartyAddr;
use super::uri::{Uri, UriError};
use bytes::Bytes;
use std::borrow::Cow;

/// The headers every request and response carries, parsed once when the message is read
/// (RFC 3261 8.1.1). They are kept out of `Headers` so that they cannot disagree with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseHeaders {
    /// Every Via, topmost first.
    pub via: Vec<Via>,
    pub from: PartyAddr,
    pub to: PartyAddr,
    pub call_id: String,
    pub cseq: CSeq,
}

impl BaseHeaders {
    pub fn top_via(&self) -> Option<&Via> {
        self.via.first()
    }
    /// The top Via's branch, or "" when there is none (RFC 2543 peers).
    pub fn branch(&self) -> &str {
        self.via.first().and_then(Via::branch).unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub uri: Uri,
    /// The version of the request line ("2.0" for every request we accept).
    pub version: Cow<'static, str>,
    pub base: BaseHeaders,
    pub max_forwards: Option<u32>,
    /// Every other header, in order.
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub base: BaseHeaders,
    pub headers: Headers,
    pub body: Bytes,
}

impl Response {
    pub fn is_provisional(&self) -> bool {
        self.status < 200
    }
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SipMessage {
    Request(Request),
    Response(Response),
}

impl SipMessage {
    pub fn base(&self) -> &BaseHeaders {
        match self {
            SipMessage::Request(r) => &r.base,
            SipMessage::Response(r) => &r.base,
        }
    }
    pub fn headers(&self) -> &Headers {
        match self {
            SipMessage::Request(r) => &r.headers,
            SipMessage::Response(r) => &r.headers,
        }
    }
    pub fn to_bytes(&self) -> Bytes {
        match self {
            SipMessage::Request(r) => r.to_bytes(),
            SipMessage::Response(r) => r.to_bytes(),
        }
    }
}

/// Why a message could not be parsed; its `Display` is the reason phrase of the 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("Empty message")]
    Empty,
    #[error("Header section not terminated")]
    Incomplete,
    #[error("Header section is not UTF-8")]
    NotUtf8,
    #[error("Malformed start line")]
    StartLine,
    #[error("Malformed Request-Line ({0})")]
    RequestLine(&'static str),
    #[error("Bad Request-URI ({0})")]
    RequestUri(UriError),
    #[error("Malformed status line")]
    StatusLine,
    #[error("SIP version not supported")]
    Version,
    #[error("Malformed header line")]
    HeaderLine,
    #[error("Missing {0} header")]
    Missing(&'static str),
    #[error("Multiple {0} headers")]
    Multiple(&'static str),
    #[error("Bad {0} header ({1})")]
    BadHeader(&'static str, HeaderError),
    #[error("Bad {0} header")]
    BadValue(&'static str),
    #[error("Content-Length larger than message")]
    ShortBody,
}

/// A message that could not be parsed. For a request whose header lines could be read,
/// `head` keeps them so that a 400 can still copy Via, From, To, Call-ID and CSeq.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    pub kind: ParseErrorKind,
    pub head: Option<Box<RequestHead>>,
}

impl ParseError {
    fn bare(kind: ParseErrorKind) -> ParseError {
        ParseError { kind, head: None }
    }
    /// The status the answer should carry (505 for a version we do not speak).
    pub fn status(&self) -> u16 {
        match self.kind {
            ParseErrorKind::Version => 505,
            _ => 400,
        }
    }
}

/// The raw header lines of a request that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub headers: Headers,
}

/// Parses one message from `buf`. For a datagram `buf` is the whole datagram: the body is
/// Content-Length octets (RFC 3261 18.3; trailing octets are ignored) or, without
/// Content-Length, the rest. Returns the message and the octets it used.
pub fn parse(buf: &[u8]) -> Result<(SipMessage, usize), ParseError> {
    // RFC 3261 7.5: CRLFs before the start line are ignored.
    let start = buf
        .iter()
        .position(|&c| c != b'\r' && c != b'\n')
        .ok_or(ParseError::bare(ParseErrorKind::Empty))?;
    let buf_tail = &buf[start..];
    let (head_len, body_start) =
        find_head_end(buf_tail).ok_or(ParseError::bare(ParseErrorKind::Incomplete))?;
    let head = std::str::from_utf8(&buf_tail[..head_len])
        .map_err(|_| ParseError::bare(ParseErrorKind::NotUtf8))?;
    let body_avail = &buf_tail[body_start..];
    let head = head.strip_suffix('\n').unwrap_or(head);
    let head = head.strip_suffix('\r').unwrap_or(head);

    let mut lines = split_lines(head).map(|l| l.strip_suffix('\r').unwrap_or(l));
    let start_line = lines.next().unwrap_or("");
    let headers = read_headers(lines)?;

    if let Some(status_line) = start_line.strip_prefix("SIP/") {
        let (status, reason) = parse_status_line(status_line)?;
        let (base, others, content_length) =
            take_base(headers, body_avail.len(), false).map_err(|(k, _)| ParseError::bare(k))?;
        let body_len = content_length.unwrap_or(body_avail.len());
        let msg = Response {
            status,
            reason: reason.to_owned(),
            base,
            headers: others,
            body: Bytes::copy_from_slice(&body_avail[..body_len]),
        };
        return Ok((SipMessage::Response(msg), start + body_start + body_len));
    }

    // Request-Line = Method SP Request-URI SP SIP-Version (RFC 3261 25.1). A start line
    // that begins with a method token is a request, and its header lines were read: a
    // defect in the rest of the line gets a 400 that names it (RFC 4475 3.1.2.8-10), not
    // silence.
    // Byte searches here and below: `str`'s char searches cost ~100 instructions each
    // (issue 14, callgrind).
    let method = split_once_byte(start_line, b' ').map_or(start_line, |(m, _)| m);
    if !is_token(method) {
        return Err(ParseError::bare(ParseErrorKind::StartLine));
    }
    let with_head = |kind, headers: Vec<RawHeader<'_>>| ParseError {
        kind,
        head: Some(Box::new(RequestHead {
            method: method.to_owned(),
            headers: owned(headers),
        })),
    };
    let (uri, version) = match split_request_line(&start_line[method.len()..]) {
        Ok(t) => t,
        Err(why) => return Err(with_head(ParseErrorKind::RequestLine(why), headers)),
    };
    let version = match version.strip_prefix("SIP/") {
        Some(v) if is_version(v) => v,
        _ => {
            return Err(with_head(
                ParseErrorKind::RequestLine("bad SIP-Version"),
                headers,
            ))
        }
    };
    if version != "2.0" {
        return Err(with_head(ParseErrorKind::Version, headers));
    }
    let uri = match Uri::parse(uri) {
        Ok(u) => u,
        Err(e) => return Err(with_head(ParseErrorKind::RequestUri(e), headers)),
    };
    let max_forwards = match others_single(&headers, BaseName::MaxForwards, "Max-Forwards") {
        Err(k) => return Err(with_head(k, headers)),
        Ok(None) => None,
        Ok(Some(v)) => match parse_small_uint(v, 255) {
            Some(n) => Some(n),
            None => return Err(with_head(ParseErrorKind::BadValue("Max-Forwards"), headers)),
        },
    };
    let (base, others, content_length) = match take_base(headers, body_avail.len(), true) {
        Ok(t) => t,
        Err((kind, headers)) => return Err(with_head(kind, headers)),
    };
    let body_len = content_length.unwrap_or(body_avail.len());
    let req = Request {
        method: Method::from_token(method),
        uri,
        // Every version accepted is "2.0" (checked above): not copied.
        version: Cow::Borrowed("2.0"),
        base,
        max_forwards,
        headers: others,
        body: Bytes::copy_from_slice(&body_avail[..body_len]),
    };
    Ok((SipMessage::Request(req), start + body_start + body_len))
}

/// Splits what follows the method in a Request-Line into Request-URI and SIP-Version:
/// exactly one SP between elements and none at the end (RFC 3261 25.1; RFC 4475 3.1.2.8
/// embedded LWS in the Request-URI, 3.1.2.9 several SP, 3.1.2.10 SP at the end). The error
/// says which, for the reason phrase.
fn split_request_line(rest: &str) -> Result<(&str, &str), &'static str> {
    let rest = rest.strip_prefix(' ').ok_or("no SP after the method")?;
    if rest.ends_with([' ', '\t']) {
        return Err("SP at the end");
    }
    let b = rest.as_bytes();
    if b.first() == Some(&b' ') || memchr::memchr_iter(b' ', b).any(|i| b.get(i + 1) == Some(&b' '))
    {
        return Err("more than one SP between elements");
    }
    match split_once_byte(rest, b' ') {
        Some((_, version)) if find_byte(version, b' ').is_some() => {
            Err("white space in the Request-URI")
        }
        Some((uri, version)) if !uri.is_empty() => Ok((uri, version)),
        _ => Err("Request-URI or SIP-Version missing"),
    }
}

/// Finds the blank line ending the header section; returns (header octets, body offset).
/// Bare LF line ends are tolerated (RFC 3261 7 asks for CRLF, but be liberal).
pub fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    // One searcher over the whole buffer: a search per line costs its set-up each time.
    for nl in memchr::memchr_iter(b'\n', buf) {
        let next = &buf[nl + 1..];
        if next.starts_with(b"\r\n") {
            return Some((nl + 1, nl + 3));
        }
        if next.starts_with(b"\n") {
            return Some((nl + 1, nl + 2));
        }
    }
    None
}

/// `text.split('\n')`, each line's end found eight bytes at a time from its start
/// (`find_byte_near`; issue 14: line and colon searches were ~7% of a call's
/// instructions, and memchr's set-up per line more than such a near search).
fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut from = 0;
    std::iter::from_fn(move || {
        if from > text.len() {
            return None;
        }
        let end = find_byte_near(text.as_bytes(), from, b'\n').unwrap_or(text.len());
        // '\n' is ASCII: both ends are character boundaries.
        let line = &text[from..end];
        from = end + 1;
        Some(line)
    })
}

/// Call-ID = word [ "@" word ] (RFC 3261 25.1): printable ASCII without white space.
pub fn is_valid_call_id(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|c| c > b' ' && c < 0x7f)
}

fn is_version(v: &str) -> bool {
    match split_once_byte(v, b'.') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

fn parse_status_line(rest: &str) -> Result<(u16, &str), ParseError> {
    let err = || ParseError::bare(ParseErrorKind::StatusLine);
    let (version, rest) = split_once_byte(rest, b' ').ok_or_else(err)?;
    if version != "2.0" {
        return Err(err());
    }
    let (code, reason) = split_once_byte(rest, b' ').unwrap_or((rest, ""));
    if code.len() != 3 || !code.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err());
    }
    let status: u16 = code.parse().map_err(|_| err())?;
    if !(100..700).contains(&status) {
        return Err(err());
    }
    Ok((status, reason))
}

/// Reads header lines, undoing folding (RFC 3261 7.3.1: a line starting with SP or HT
/// continues the previous one) and expanding compact names.
fn read_headers<'a>(
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<RawHeader<'a>>, ParseError> {
    // Room for a usual message's headers: one allocation, given back with the message.
    let mut out: Vec<RawHeader<'a>> = Vec::with_capacity(16);
    for line in lines {
        if line.starts_with([' ', '\t']) {
            match out.last_mut() {
                Some(h) => {
                    let cont = trim_ws(line);
                    if !cont.is_empty() {
                        let value = h.value.to_mut();
                        if !value.is_empty() {
                            value.push(' ');
                        }
                        value.push_str(cont);
                    }
                    continue;
                }
                None => return Err(ParseError::bare(ParseErrorKind::HeaderLine)),
            }
        }
        // The colon is a short name away from the line's start.
        let colon = find_byte_near(line.as_bytes(), 0, b':')
            .ok_or(ParseError::bare(ParseErrorKind::HeaderLine))?;
        // ':' is ASCII: a character boundary.
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let name = trim_ws(name);
        if !is_token(name) {
            return Err(ParseError::bare(ParseErrorKind::HeaderLine));
        }
        let (name, base) = named(name);
        out.push(RawHeader {
            name,
            base,
            value: Cow::Borrowed(trim_ws(value)),
        });
    }
    Ok(out)
}

/// A header line as read (folding undone, name canonical): its value borrowed from the
/// message (owned only when folded lines were joined). The base headers are parsed from
/// these and never copied; the others become [`Headers`] (issue 14: every header value of
/// every message was first copied into a string of its own).
struct RawHeader<'a> {
    name: Cow<'static, str>,
    /// Which base header this is, if one.
    base: Option<BaseName>,
    value: Cow<'a, str>,
}

/// Every header, owned: what an error answer (a 400 naming the fault) is built from.
fn owned(raw: Vec<RawHeader<'_>>) -> Headers {
    let mut out = Headers::with_capacity(raw.len());
    for h in raw {
        out.push_header(Header {
            name: h.name,
            value: h.value.into_owned(),
        });
    }
    out
}

fn parse_small_uint(v: &str, max: u32) -> Option<u32> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = v.parse().ok()?;
    (n <= max as u64).then_some(n as u32)
}

fn others_single<'a>(
    h: &'a [RawHeader<'_>],
    which: BaseName,
    name: &'static str,
) -> Result<Option<&'a str>, ParseErrorKind> {
    let mut it = h
        .iter()
        .filter(|h| h.base == Some(which))
        .map(|h| &*h.value);
    let first = it.next();
    if it.next().is_some() {
        return Err(ParseErrorKind::Multiple(name));
    }
    Ok(first)
}

/// Moves the base headers out of `headers`, parsing each once. Returns the base headers,
/// the remaining headers (Max-Forwards, read separately, dropped) and the Content-Length if
/// one was given. On error the headers come back untouched, for the 400.
#[allow(clippy::type_complexity)]
fn take_base<'a>(
    headers: Vec<RawHeader<'a>>,
    body_avail: usize,
    is_request: bool,
) -> Result<(BaseHeaders, Headers, Option<usize>), (ParseErrorKind, Vec<RawHeader<'a>>)> {
    match read_base(&headers, body_avail, is_request) {
        Ok((base, content_length)) => {
            let rest = headers.iter().filter(|h| h.base.is_none()).count();
            let mut others = Headers::with_capacity(rest);
            for h in headers {
                if h.base.is_none() {
                    others.push_header(Header {
                        name: h.name,
                        value: h.value.into_owned(),
                    });
                }
            }
            Ok((base, others, content_length))
        }
        Err(k) => Err((k, headers)),
    }
}

fn read_base(
    headers: &[RawHeader<'_>],
    body_avail: usize,
    is_request: bool,
) -> Result<(BaseHeaders, Option<usize>), ParseErrorKind> {
    let mut via = Vec::new();
    let mut from = None;
    let mut to = None;
    let mut call_id = None;
    let mut cseq = None;
    let mut content_length = None;
    fn once<T>(slot: &mut Option<T>, v: T, name: &'static str) -> Result<(), ParseErrorKind> {
        if slot.is_some() {
            return Err(ParseErrorKind::Multiple(name));
        }
        *slot = Some(v);
        Ok(())
    }
    for h in headers.iter() {
        let Some(base) = h.base else { continue };
        match base {
            BaseName::Via => Via::parse_list_into(&h.value, &mut via)
                .map_err(|e| ParseErrorKind::BadHeader("Via", e))?,
            BaseName::From => once(&mut from, &*h.value, "From")?,
            BaseName::To => once(&mut to, &*h.value, "To")?,
            BaseName::CallId => {
                let v = &*h.value;
                if !is_valid_call_id(v) {
                    return Err(ParseErrorKind::BadValue("Call-ID"));
                }
                once(&mut call_id, v.to_owned(), "Call-ID")?
            }
            BaseName::CSeq => once(
                &mut cseq,
                CSeq::parse(&h.value).map_err(|e| ParseErrorKind::BadHeader("CSeq", e))?,
                "CSeq",
            )?,
            BaseName::ContentLength => {
                let n = parse_small_uint(&h.value, u32::MAX)
                    .ok_or(ParseErrorKind::BadValue("Content-Length"))?;
                once(&mut content_length, n as usize, "Content-Length")?
            }
            // Read with the request line (`others_single`).
            BaseName::MaxForwards => {}
        }
    }
    if via.is_empty() {
        return Err(ParseErrorKind::Missing("Via"));
    }
    let (from, to) = (
        from.ok_or(ParseErrorKind::Missing("From"))?,
        to.ok_or(ParseErrorKind::Missing("To"))?,
    );
    // A response or an in-dialog request is read for its tags, the rest parsed when used
    // (`PartyAddr`); a request outside a dialog (no To tag) is parsed whole, so that a
    // malformed From or To gets its 400 before any state is made for it.
    let to = PartyAddr::read_lazily(to).map_err(|e| ParseErrorKind::BadHeader("To", e))?;
    let whole = is_request && to.tag().is_none();
    let (from, to) = if whole {
        (
            PartyAddr::parse(from).map_err(|e| ParseErrorKind::BadHeader("From", e))?,
            to.into_parsed()
                .map_err(|e| ParseErrorKind::BadHeader("To", e))?,
        )
    } else {
        (
            PartyAddr::read_lazily(from).map_err(|e| ParseErrorKind::BadHeader("From", e))?,
            to,
        )
    };
    let base = BaseHeaders {
        via,
        from,
        to,
        call_id: call_id.ok_or(ParseErrorKind::Missing("Call-ID"))?,
        cseq: cseq.ok_or(ParseErrorKind::Missing("CSeq"))?,
    };
    if let Some(n) = content_length {
        if n > body_avail {
            return Err(ParseErrorKind::ShortBody);
        }
    }
    Ok((base, content_length))
}

/// Via, From, To (with `to_tag` added), Call-ID, CSeq, Max-Forwards and `headers`.
pub(super) fn write_common(
    out: &mut String,
    base: &BaseHeaders,
    to_tag: Option<&str>,
    max_forwards: Option<u32>,
    headers: &Headers,
) {
    // Writing into a String cannot fail.
    for v in &base.via {
        out.push_str("Via: ");
        let _ = v.write_to(out);
        out.push_str("\r\n");
    }
    out.push_str("From: ");
    let _ = base.from.write_to(out);
    out.push_str("\r\nTo: ");
    let _ = base.to.write_to(out);
    if let Some(tag) = to_tag {
        out.push_str(";tag=");
        out.push_str(tag);
    }
    out.push_str("\r\n");
    out.push_str("Call-ID: ");
    out.push_str(&base.call_id);
    out.push_str("\r\nCSeq: ");
    out.push_str(itoa::Buffer::new().format(base.cseq.seq));
    out.push(' ');
    out.push_str(base.cseq.method.as_str());
    out.push_str("\r\n");
    if let Some(mf) = max_forwards {
        out.push_str("Max-Forwards: ");
        out.push_str(itoa::Buffer::new().format(mf));
        out.push_str("\r\n");
    }
    // Plain appends: most of a message is copied header text, and `write!` costs a
    // formatter round per piece.
    for h in headers.iter() {
        out.push_str(&h.name);
        out.push_str(": ");
        out.push_str(&h.value);
        out.push_str("\r\n");
    }
}

thread_local! {
    /// Where messages are written before they are copied out at their exact size: a sent
    /// message is often kept (for retransmission, 64*T1), and a buffer grown while writing
    /// would keep its slack (issue 14: ~300 bytes of each one).
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Writes a message's head with `write_head`, then Content-Length and the body; one
/// allocation of the exact size.
pub(super) fn serialize(body: &Bytes, write_head: impl FnOnce(&mut String)) -> Bytes {
    SCRATCH.with_borrow_mut(|head| {
        head.clear();
        write_head(head);
        head.push_str("Content-Length: ");
        head.push_str(itoa::Buffer::new().format(body.len()));
        head.push_str("\r\n\r\n");
        let mut out = Vec::with_capacity(head.len() + body.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(body);
        // A huge message (a 64 KiB TCP one) does not keep its buffer for every later one.
        if head.capacity() > 16 * 1024 {
            *head = String::new();
        }
        Bytes::from(out)
    })
}

impl Request {
    pub fn to_bytes(&self) -> Bytes {
        serialize(&self.body, |s| {
            // Pieces appended: `write!` runs the formatter's dynamic calls for each part of
            // the URI (issue 14).
            s.push_str(self.method.as_str());
            s.push(' ');
            let _ = self.uri.write_to(s);
            s.push_str(" SIP/2.0\r\n");
            write_common(s, &self.base, None, self.max_forwards, &self.headers);
        })
    }
}

impl Response {
    pub fn to_bytes(&self) -> Bytes {
        self.as_reply().to_bytes()
    }
    /// The same response, borrowed (to be written or sent as a [`Reply`](super::Reply)).
    pub fn as_reply(&self) -> super::Reply<'_> {
        super::Reply {
            status: self.status,
            reason: &self.reason,
            base: &self.base,
            to_tag: None,
            headers: &self.headers,
            body: &self.body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_lines_is_split_on_newline() {
        for text in [
            "",
            "a",
            "a\n",
            "\n",
            "a\nb",
            "a\r\nb\r\n",
            "\n\n",
            "é\nü\n\nx",
        ] {
            let ours: Vec<&str> = split_lines(text).collect();
            let core: Vec<&str> = text.split('\n').collect();
            assert_eq!(ours, core, "{text:?}");
        }
    }

    const INVITE: &str = "INVITE sip:bob@[2001:db8::10] SIP/2.0\r\n\
        v: SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKa1\r\n\
        f: <sip:alice@a.example>;tag=1\r\n\
        t: <sip:bob@b.example>\r\n\
        i: abc@host\r\n\
        CSeq: 1 INVITE\r\n\
        Max-Forwards: 70\r\n\
        Subject: folded\r\n line\r\n\
        l: 5\r\n\r\nv=0\r\nXX";

    #[test]
    fn compact_folded_ipv6() {
        let (m, used) = parse(INVITE.as_bytes()).unwrap();
        let SipMessage::Request(r) = m else { panic!() };
        assert_eq!(used, INVITE.len() - 2);
        assert_eq!(r.method, Method::Invite);
        assert_eq!(r.base.call_id, "abc@host");
        assert_eq!(r.base.branch(), "z9hG4bKa1");
        assert_eq!(r.headers.get("subject"), Some("folded line"));
        assert_eq!(&r.body[..], b"v=0\r\n");
        // Round trip.
        let (m2, _) = parse(&r.to_bytes()).unwrap();
        assert_eq!(m2, SipMessage::Request(r));
    }

    #[test]
    fn errors_keep_the_head() {
        let bad = INVITE.replace("i: abc@host\r\n", "");
        let e = parse(bad.as_bytes()).unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::Missing("Call-ID"));
        assert!(e.head.is_some());
        assert_eq!(e.to_string(), "Missing Call-ID header");
        let bad = INVITE.replace("SIP/2.0\r\nv:", "SIP/3.0\r\nv:");
        assert_eq!(parse(bad.as_bytes()).unwrap_err().status(), 505);
        let bad = INVITE.replace("l: 5", "l: 50");
        assert_eq!(
            parse(bad.as_bytes()).unwrap_err().kind,
            ParseErrorKind::ShortBody
        );
        // RFC 4475 3.1.2.8-10: a broken Request-Line still gets its 400 (the head is
        // kept for it), with the defect in the reason phrase.
        for (from, to, why) in [
            (
                "INVITE sip",
                "INVITE  sip",
                "more than one SP between elements",
            ),
            ("10] SIP", "10]; lr SIP", "white space in the Request-URI"),
            ("SIP/2.0\r\nv:", "SIP/2.0 \r\nv:", "SP at the end"),
        ] {
            let e = parse(INVITE.replace(from, to).as_bytes()).unwrap_err();
            assert_eq!(e.kind, ParseErrorKind::RequestLine(why), "{to}");
            let resp = crate::sip::error_response(&e).expect("answered");
            assert_eq!(resp.status, 400);
            assert_eq!(resp.reason, format!("Malformed Request-Line ({why})"));
        }
    }
}
