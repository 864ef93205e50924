//! A look at a request's bytes without parsing it: what a stateless refusal needs (RFC
//! 3261 8.2.7), so that refusing a new call under overload costs a scan of its header
//! lines instead of a full parse, and the ACK of such a refusal is recognised the same way.
//!
//! Written by hand: it is not a parser but a conservative filter over ours (`parse`
//! remains the only reader of what is admitted). Anything unusual (folded lines, a Via
//! with several values or an IPv6 sent-by, repeated or missing headers, a To that might
//! carry a tag, bytes that are not UTF-8) gives `None`, and the caller takes the full path.

use std::net::IpAddr;

/// Header lines of a request, as they came, that a response copies (RFC 3261 8.2.6.2).
#[derive(Debug)]
pub struct Peek<'a> {
    /// The method of the request line (`INVITE`, `ACK`, ...).
    pub method: &'a str,
    /// The Call-ID's value, trimmed as the parser trims it.
    pub call_id: &'a str,
    /// The To header's tag (`None`: certainly no tag).
    pub to_tag: Option<&'a str>,
    /// The top Via's branch, sent-by host (lower case as written) and port.
    pub branch: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    /// The top Via asks for `rport` (RFC 3581) without a value.
    pub rport: bool,
    vias: Vec<&'a str>,
    from: &'a str,
    to: &'a str,
    call_id_line: &'a str,
    cseq: &'a str,
}

/// The request line and the header lines of `data` up to the blank line, or None.
///
/// One pass over the bytes, as this look runs on every INVITE and ACK while new calls are
/// refused (issue 15): lines end in CRLF only (a bare CR or LF is the parser's business),
/// and there are no other control characters.
fn head_lines(data: &[u8]) -> Option<(&str, HeadLines<'_>)> {
    let end = memchr::memmem::find(data, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..end]).ok()?;
    let bytes = head.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b < 0x20 || b == 0x7f {
            let fine = match b {
                b'\t' => true,
                b'\r' => bytes.get(i + 1) == Some(&b'\n'),
                b'\n' => i > 0 && bytes[i - 1] == b'\r',
                _ => false,
            };
            if !fine {
                return None;
            }
        }
    }
    let mut lines = HeadLines { head, at: 0 };
    let first = lines.next()?;
    Some((first, lines))
}

/// The CRLF-separated lines of a head already checked by [`head_lines`] (every LF follows
/// a CR), found with the parser's near-byte search rather than a substring searcher.
struct HeadLines<'a> {
    head: &'a str,
    at: usize,
}

impl<'a> Iterator for HeadLines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let head = self.head;
        if self.at > head.len() {
            return None;
        }
        let start = self.at;
        match crate::sip::lex::find_byte_near(head.as_bytes(), start, b'\n') {
            Some(lf) => {
                self.at = lf + 1;
                Some(&head[start..lf - 1])
            }
            None => {
                self.at = head.len() + 1;
                Some(&head[start..])
            }
        }
    }
}

/// Compares a header name with its long and compact forms, case-insensitively.
fn is_header(name: &str, long: &str, compact: Option<&str>) -> bool {
    name.eq_ignore_ascii_case(long) || compact.is_some_and(|c| name.eq_ignore_ascii_case(c))
}

/// Sets `slot` to `line` if it is empty; false if it was already set (a repeated header).
fn once<'a>(slot: &mut Option<&'a str>, line: &'a str) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(line);
    true
}

/// Reads a request's request line and the header lines a response copies. `None` when
/// anything is not of the plain, common shape (see the module doc).
pub fn peek_request<'a>(data: &'a [u8]) -> Option<Peek<'a>> {
    let (first, lines) = head_lines(data)?;
    let mut parts = first.split(' ');
    let method = parts.next()?;
    let _uri = parts.next()?;
    if parts.next()? != "SIP/2.0" || parts.next().is_some() || method.is_empty() {
        return None;
    }
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    let mut vias = Vec::with_capacity(2);
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return None; // folded: the full parser unfolds
        }
        let (name, _) = crate::sip::lex::split_once_byte(line, b':')?;
        let name = name.trim_end_matches([' ', '\t']);
        let ok = if is_header(name, "Via", Some("v")) {
            vias.push(line);
            true
        } else if is_header(name, "From", Some("f")) {
            once(&mut from, line)
        } else if is_header(name, "To", Some("t")) {
            once(&mut to, line)
        } else if is_header(name, "Call-ID", Some("i")) {
            once(&mut call_id, line)
        } else if is_header(name, "CSeq", None) {
            once(&mut cseq, line)
        } else {
            true
        };
        if !ok {
            return None;
        }
    }
    let (from, to, call_id_line, cseq) = (from?, to?, call_id?, cseq?);
    let value = |line: &'a str| -> &'a str {
        crate::sip::lex::split_once_byte(line, b':').map_or("", |(_, v)| v.trim())
    };
    let call_id = value(call_id_line);
    if call_id.is_empty() || call_id.contains([' ', '\t']) {
        return None;
    }
    // CSeq: a number and the request's own method.
    let (seq, cseq_method) = value(cseq).split_once([' ', '\t'])?;
    if seq.parse::<u32>().is_err() || cseq_method.trim() != method {
        return None;
    }
    let to_tag = to_tag(value(to))?;
    let (branch, host, port, rport) = top_via(value(vias.first()?))?;
    Some(Peek {
        method,
        call_id,
        to_tag,
        branch,
        host,
        port,
        rport,
        vias,
        from,
        to,
        call_id_line,
        cseq,
    })
}

/// The To tag: `Some(None)` when the value cannot hold one (no `tag` in it at all),
/// `Some(Some(tag))` for a plain `;tag=` after the address, `None` when unsure.
fn to_tag(to: &str) -> Option<Option<&str>> {
    let Some(at) = find_ignore_case(to, "tag") else {
        return Some(None);
    };
    let params = match to.rfind('>') {
        Some(gt) if gt < at => &to[gt + 1..],
        Some(_) => return None,
        None => to,
    };
    let mut tag = None;
    for p in params.split(';').skip(1) {
        let (name, v) = p.split_once('=').unwrap_or((p, ""));
        if name.trim().eq_ignore_ascii_case("tag") {
            let v = v.trim();
            if tag.is_some() || v.is_empty() || !crate::sip::is_token(v) {
                return None;
            }
            tag = Some(v);
        }
    }
    tag.map(Some)
}

fn find_ignore_case(hay: &str, needle: &str) -> Option<usize> {
    hay.as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Branch (with the RFC 3261 magic cookie), host, port and a bare `rport` of a Via value
/// holding one plain `SIP/2.0/<transport> host[:port];params` entry.
fn top_via(v: &str) -> Option<(&str, &str, Option<u16>, bool)> {
    if v.contains([',', '"', '[']) {
        return None;
    }
    let (proto, rest) = v.split_once([' ', '\t'])?;
    if !proto
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("SIP/2.0/"))
    {
        return None;
    }
    let mut params = rest.trim_start().split(';');
    let sent_by = params.next()?.trim();
    let (host, port) = match sent_by.split_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h, Some(p.parse::<u16>().ok()?))
        }
        Some(_) => return None,
        None => (sent_by, None),
    };
    if host.is_empty() || host.contains([' ', '\t']) {
        return None;
    }
    let (mut branch, mut rport) = (None, false);
    for p in params {
        let (name, val) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (p.trim(), None),
        };
        if name.eq_ignore_ascii_case("branch") {
            if branch.is_some() {
                return None; // a repeated branch: which one counts is the parser's call
            }
            branch = Some(val?);
        } else if name.eq_ignore_ascii_case("rport") {
            if val.is_some() {
                return None;
            }
            rport = true;
        } else if name.eq_ignore_ascii_case("received") {
            return None; // the response's `received` is ours to write
        }
    }
    let branch = branch.filter(|b| b.starts_with(crate::sip::BRANCH_COOKIE))?;
    Some((branch, host, port, rport))
}

impl Peek<'_> {
    /// The transaction key's sent-by, as `ServerKey::of` writes it.
    pub fn sent_by(&self) -> String {
        let host = self.host.to_ascii_lowercase();
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }

    /// A stateless response (RFC 3261 8.2.7) to a request without a To tag: the Via lines as they came, with the top
    /// one given `received` and `rport` as 18.2.1 and RFC 3581 4 say for a request from
    /// `source`; From, To (given `to_tag`), Call-ID and CSeq; then `extra` header lines
    /// (each ending in CRLF) and an empty body.
    pub fn response(
        &self,
        status: u16,
        reason: &str,
        to_tag: &str,
        source: std::net::SocketAddr,
        extra: &str,
    ) -> Vec<u8> {
        let mut out = String::with_capacity(512);
        out.push_str("SIP/2.0 ");
        out.push_str(&status.to_string());
        out.push(' ');
        out.push_str(reason);
        out.push_str("\r\n");
        let ip = source.ip().to_canonical();
        // The top Via: its bare `rport` filled in with the source port, and `received`.
        let (top, rest) = self.vias.split_first().unwrap_or((&"", &[]));
        for (j, part) in top.split(';').enumerate() {
            if j > 0 {
                out.push(';');
            }
            if j > 0 && part.trim().eq_ignore_ascii_case("rport") {
                out.push_str("rport=");
                out.push_str(&source.port().to_string());
            } else {
                out.push_str(part);
            }
        }
        let same_host = self.host.parse::<IpAddr>().ok().map(|h| h.to_canonical()) == Some(ip);
        if self.rport || !same_host {
            out.push_str(";received=");
            out.push_str(&ip.to_string());
        }
        out.push_str("\r\n");
        for via in rest {
            out.push_str(via);
            out.push_str("\r\n");
        }
        out.push_str(self.from);
        out.push_str("\r\n");
        out.push_str(self.to);
        out.push_str(";tag=");
        out.push_str(to_tag);
        out.push_str("\r\n");
        for line in [self.call_id_line, self.cseq] {
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str(extra);
        out.push_str("Content-Length: 0\r\n\r\n");
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, SipMessage};

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK-1\r\n\
        v: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK-0\r\n\
        Max-Forwards: 70\r\n\
        f: \"Alice\" <sip:alice@example.com>;tag=a1\r\n\
        To: <sip:bob@example.com>\r\n\
        Call-ID:  c1@192.0.2.1 \r\n\
        CSeq: 1 INVITE\r\n\
        Content-Length: 0\r\n\r\n";

    #[test]
    fn a_plain_invite_is_read_and_answered_as_the_parser_would() {
        let p = peek_request(INVITE.as_bytes()).unwrap();
        assert_eq!(
            (p.method, p.call_id, p.to_tag, p.branch),
            ("INVITE", "c1@192.0.2.1", None, "z9hG4bK-1")
        );
        assert_eq!(p.sent_by(), "192.0.2.1:5070");
        let source = "192.0.2.9:4000".parse().unwrap();
        let bytes = p.response(503, "Overloaded", "ovl-1", source, "Retry-After: 2\r\n");
        let Ok((SipMessage::Response(resp), _)) = parse(&bytes) else {
            panic!("{}", String::from_utf8_lossy(&bytes));
        };
        let Ok((SipMessage::Request(req), _)) = parse(INVITE.as_bytes()) else {
            panic!()
        };
        assert_eq!(resp.status, 503);
        assert_eq!(resp.base.call_id, req.base.call_id);
        assert_eq!(resp.base.cseq, req.base.cseq);
        assert_eq!(resp.base.from, req.base.from);
        assert_eq!(resp.base.to.tag(), Some("ovl-1"));
        assert_eq!(resp.base.via.len(), 2);
        // Another host than the source: `received` (RFC 3261 18.2.1).
        assert_eq!(
            resp.base.via[0].params.get("received"),
            Some(Some("192.0.2.9"))
        );
        assert_eq!(resp.headers.get("Retry-After"), Some("2"));
    }

    #[test]
    fn rport_is_filled_and_the_response_goes_to_the_source_port() {
        let msg = INVITE.replace("branch=z9hG4bK-1", "rport;branch=z9hG4bK-1");
        let p = peek_request(msg.as_bytes()).unwrap();
        assert!(p.rport);
        let bytes = p.response(
            503,
            "Overloaded",
            "t",
            "192.0.2.1:4000".parse().unwrap(),
            "",
        );
        let Ok((SipMessage::Response(resp), _)) = parse(&bytes) else {
            panic!()
        };
        assert_eq!(resp.base.via[0].params.get("rport"), Some(Some("4000")));
        assert_eq!(
            resp.base.via[0].params.get("received"),
            Some(Some("192.0.2.1"))
        );
    }

    #[test]
    fn a_to_tag_is_seen_and_anything_unsure_is_left_to_the_parser() {
        let tagged = INVITE.replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com> ;Tag=x9",
        );
        assert_eq!(peek_request(tagged.as_bytes()).unwrap().to_tag, Some("x9"));
        for (from, to) in [
            // A tag-like text inside the address: unsure.
            (
                "To: <sip:bob@example.com>",
                "To: <sip:bob@example.com;tag=1>",
            ),
            // Folded lines, repeated headers, a Via list, IPv6, no cookie, CSeq mismatch.
            ("CSeq: 1 INVITE\r\n", "CSeq: 1\r\n INVITE\r\n"),
            ("Max-Forwards: 70\r\n", "Call-ID: other\r\n"),
            ("branch=z9hG4bK-1", "branch=z9hG4bK-1, SIP/2.0/UDP h"),
            ("192.0.2.1:5070", "[2001:db8::1]:5070"),
            ("branch=z9hG4bK-1", "branch=1"),
            ("branch=z9hG4bK-1", "branch=z9hG4bK-1;branch=z9hG4bK-2"),
            ("192.0.2.1:5070", "192.0.2.1:+5070"),
            ("Max-Forwards: 70", "Max-Forwards: 70\x0b"),
            ("CSeq: 1 INVITE", "CSeq: 1 BYE"),
            ("Call-ID:  c1@192.0.2.1 ", "Call-ID: "),
            ("SIP/2.0\r\nVia", "SIP/2.0 x\r\nVia"),
        ] {
            let msg = INVITE.replacen(from, to, 1);
            assert_ne!(msg, INVITE, "{from}");
            assert!(peek_request(msg.as_bytes()).is_none(), "{msg}");
        }
        // Bare CR or LF line ends are the parser's business.
        for (from, to) in [
            ("Max-Forwards: 70\r\n", "Max-Forwards: 70\n"),
            ("70\r\n", "70\r\r\n"),
        ] {
            let msg = INVITE.replacen(from, to, 1);
            assert!(peek_request(msg.as_bytes()).is_none(), "{msg:?}");
        }
        assert!(peek_request(b"INVITE sip:x SIP/2.0\r\n").is_none());
        assert!(peek_request(&[0xff, b' ', b'\r', b'\n', b'\r', b'\n']).is_none());
    }

    #[test]
    fn head_lines_are_the_crlf_separated_lines() {
        for head in ["", "a", "a\r\nb", "INVITE x SIP/2.0\r\n\r\nVia: y", "a\r\n"] {
            let data = format!("{head}\r\n\r\n");
            let Some((first, rest)) = head_lines(data.as_bytes()) else {
                panic!("{head:?}")
            };
            let got: Vec<&str> = std::iter::once(first).chain(rest).collect();
            let want: Vec<&str> = data[..data.find("\r\n\r\n").unwrap()]
                .split("\r\n")
                .collect();
            assert_eq!(got, want, "{head:?}");
        }
    }
}
