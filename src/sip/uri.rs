//! SIP URIs (RFC 3261 19.1) with IPv6 references (RFC 5118), parameters and hosts.
//!
//! Our own parser: rsip 0.4 rejects every IPv6 reference (`sip:bob@[2001:db8::10]`), so the
//! URI is one of the places where it could not be made right.

use super::lex::{find_any, find_byte, is_param_text, is_ws, split_once_byte, trim_ws};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("missing URI scheme")]
    NoScheme,
    #[error("empty host")]
    EmptyHost,
    #[error("bad IPv6 reference")]
    BadIpv6,
    #[error("bad host")]
    BadHost,
    #[error("bad port")]
    BadPort,
    #[error("bad URI parameter")]
    BadParam,
    #[error("white space in URI")]
    Whitespace,
    #[error("bad character in URI")]
    BadChar,
}

/// `;name[=value]` parameters, in order, names compared case-insensitively.
///
/// Kept as their canonical text (`;a=b;c`, white space around `;` and `=` dropped), one
/// string for all of them, and read by scanning it: a message's Vias, From, To and URIs
/// each carry a parameter or two, and a vector of owned name and value strings was three
/// allocations for one `;tag=...` (issue 14). The text is only ever made by [`Params::parse`]
/// (validated) or [`Params::set`], so the scan need not check it again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(String);

impl Params {
    pub fn new() -> Params {
        Params(String::new())
    }
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
    /// The value of `name`, when present with a value.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).flatten()
    }
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    /// Sets `name` (replacing its value where it is, else appended). `name` and `value`
    /// must be parameter text (a token, or a quoted string for the value): callers pass
    /// names and values they made or parsed.
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        if self.has(name) {
            let mut text = String::with_capacity(self.0.len() + value.map_or(0, str::len));
            for (n, v) in self.iter() {
                let v = if n.eq_ignore_ascii_case(name) {
                    value
                } else {
                    v
                };
                push_param(&mut text, n, v);
            }
            self.0 = text;
        } else {
            push_param(&mut self.0, name, value);
        }
    }
    pub fn remove(&mut self, name: &str) {
        if !self.has(name) {
            return;
        }
        let mut text = String::with_capacity(self.0.len());
        for (n, v) in self.iter().filter(|(n, _)| !n.eq_ignore_ascii_case(name)) {
            push_param(&mut text, n, v);
        }
        self.0 = text;
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        ParamIter { rest: &self.0 }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses `;a=b;c` (the input starts at the first `;`, LWS allowed around `;` and `=`).
    /// Values may be quoted strings (kept with their quotes).
    pub fn parse(s: &str) -> Result<Params, UriError> {
        let s = trim_ws(s);
        if s.is_empty() {
            return Ok(Params::new());
        }
        // The text is kept as it came when it has no white space to drop (the usual case:
        // one copy, one allocation), after a check that jumps from `=` to `;` (no fold
        // without an early exit: vectorised).
        let canonical = !s
            .bytes()
            .fold(false, |ws, c| ws | (c == b' ') | (c == b'\t'));
        if canonical {
            check_canonical_params(s)?;
            return Ok(Params(s.to_owned()));
        }
        let mut rest = s;
        let mut spans: smallvec::SmallVec<[(&str, Option<&str>); 4]> = smallvec::SmallVec::new();
        loop {
            rest = trim_ws(rest);
            if rest.is_empty() {
                break;
            }
            rest = rest.strip_prefix(';').ok_or(UriError::BadParam)?;
            rest = trim_ws(rest);
            let name_end =
                find_any(rest, |c| matches!(c, b'=' | b';' | b' ' | b'\t')).unwrap_or(rest.len());
            let name = &rest[..name_end];
            if name.is_empty() || !is_param_text(name) {
                return Err(UriError::BadParam);
            }
            rest = trim_ws(&rest[name_end..]);
            let value = if let Some(after) = rest.strip_prefix('=') {
                let after = trim_ws(after);
                let end = if after.starts_with('"') {
                    // A quoted value may hold white space of its own: kept as written.
                    super::lex::quoted_end(after).ok_or(UriError::BadParam)?
                } else if after.starts_with('[') {
                    find_byte(after, b']').ok_or(UriError::BadParam)? + 1
                } else {
                    find_any(after, |c| matches!(c, b';' | b' ' | b'\t')).unwrap_or(after.len())
                };
                let v = &after[..end];
                if v.is_empty() || !(v.starts_with('"') || is_param_text(v)) {
                    return Err(UriError::BadParam);
                }
                rest = &after[end..];
                Some(v)
            } else {
                None
            };
            spans.push((name, value));
        }
        let mut text = String::with_capacity(s.len());
        for (n, v) in spans {
            push_param(&mut text, n, v);
        }
        Ok(Params(text))
    }
}

/// What [`Params::parse`] checks, for text without white space: `;name[=value]` repeated,
/// names and unquoted values parameter text, quoted values closed, `[...]` values closed.
fn check_canonical_params(s: &str) -> Result<(), UriError> {
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.strip_prefix(';').ok_or(UriError::BadParam)?;
        // Names are a few bytes long: a plain scan (memchr2's set-up costs more).
        let name_end = rest
            .bytes()
            .position(|c| c == b'=' || c == b';')
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() || !is_param_text(name) {
            return Err(UriError::BadParam);
        }
        rest = &rest[name_end..];
        if let Some(after) = rest.strip_prefix('=') {
            let end = if after.starts_with('"') {
                super::lex::quoted_end(after).ok_or(UriError::BadParam)?
            } else if after.starts_with('[') {
                find_byte(after, b']').ok_or(UriError::BadParam)? + 1
            } else {
                find_byte(after, b';').unwrap_or(after.len())
            };
            let v = &after[..end];
            if v.is_empty() || !(v.starts_with('"') || is_param_text(v)) {
                return Err(UriError::BadParam);
            }
            rest = &after[end..];
        }
    }
    Ok(())
}

/// For parameter text without white space (`;a=b;c`): checks it as [`Params::parse`]
/// would, and gives where the value of the first parameter called `name` (any case) is
/// in `s`, when it has one. Nothing is copied (a From or To read for its tag alone).
pub(super) fn find_param_value(s: &str, name: &str) -> Result<Option<Range<usize>>, UriError> {
    check_canonical_params(s)?;
    let found = ParamIter { rest: s }
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v);
    // `v` is a slice of `s`: its offset is the distance between their starts.
    Ok(found.map(|v| {
        let at = v.as_ptr() as usize - s.as_ptr() as usize;
        at..at + v.len()
    }))
}

fn push_param(text: &mut String, name: &str, value: Option<&str>) {
    // At most one reallocation (four pushes into a text of exact size could take two).
    text.reserve(2 + name.len() + value.map_or(0, str::len));
    text.push(';');
    text.push_str(name);
    if let Some(v) = value {
        text.push('=');
        text.push_str(v);
    }
}

/// Reads canonical parameter text (see [`Params`]): `;name[=value]` after `;name[=value]`.
struct ParamIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for ParamIter<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.rest.strip_prefix(';')?;
        let name_end = find_any(s, |c| matches!(c, b'=' | b';')).unwrap_or(s.len());
        let name = &s[..name_end];
        let after = &s[name_end..];
        let Some(v) = after.strip_prefix('=') else {
            self.rest = after;
            return Some((name, None));
        };
        let end = if v.starts_with('"') {
            super::lex::quoted_end(v).unwrap_or(v.len())
        } else if v.starts_with('[') {
            find_byte(v, b']').map_or(v.len(), |i| i + 1)
        } else {
            find_byte(v, b';').unwrap_or(v.len())
        };
        self.rest = &v[end..];
        Some((name, Some(&v[..end])))
    }
}

/// Whether `s` has a byte outside the visible ASCII range (0x21 to 0x7e) or one of `<`, `>`,
/// `"`. Without an early exit, so that the compiler vectorises it: a clean URI is scanned
/// many bytes at a time.
fn has_byte_outside_uri_text(s: &[u8]) -> bool {
    s.iter().fold(false, |bad, &c| {
        bad | !(0x21..0x7f).contains(&c) | (c == b'<') | (c == b'>') | (c == b'"')
    })
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Params {
    /// Writes `;name=value...` into any writer; into a `String` directly, without the
    /// formatter's dynamic calls per piece (see [`Uri::write_to`]).
    pub fn write_to<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Domain(String),
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
}

impl Host {
    /// Parses a host: a bracketed IPv6 reference, an IPv4 address or a domain name.
    pub fn parse(s: &str) -> Result<Host, UriError> {
        if s.is_empty() {
            return Err(UriError::EmptyHost);
        }
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(UriError::BadIpv6)?;
            return parse_ipv6(inner).map(Host::Ipv6).ok_or(UriError::BadIpv6);
        }
        if let Some(v4) = parse_ipv4(s) {
            return Ok(Host::Ipv4(v4));
        }
        // hostname = *( domainlabel "." ) toplabel [ "." ] (RFC 3261 25.1); we accept
        // labels of alphanumerics, '-' and '_' (seen in the wild).
        if s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
            && !s.starts_with('.')
            && !s.starts_with('-')
        {
            Ok(Host::Domain(s.to_owned()))
        } else {
            Err(UriError::BadHost)
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ipv4(a) => Some(IpAddr::V4(*a)),
            Host::Ipv6(a) => Some(IpAddr::V6(*a)),
            Host::Domain(_) => None,
        }
    }

    /// Case-insensitive host comparison (RFC 3261 19.1.4).
    pub fn matches(&self, other: &Host) -> bool {
        match (self, other) {
            (Host::Domain(a), Host::Domain(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Host {
        match ip {
            IpAddr::V4(a) => Host::Ipv4(a),
            IpAddr::V6(a) => Host::Ipv6(a),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Host {
    /// The host as text (`to_string` without the formatter).
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(24);
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the host as a URI has it (see [`Uri::write_to`]).
    pub fn write_to<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::Ipv4(a) => write_ipv4(f, *a),
            Host::Ipv6(a) => write!(f, "[{a}]"),
        }
    }
}

/// Dotted-decimal IPv4, accepting exactly what `Ipv4Addr::from_str` accepts (four
/// decimal octets up to 255, no leading zeros), by hand: core's parser is general and
/// costs ~3,000 instructions per call here (issue 14).
fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    let b = s.as_bytes();
    if b.len() < 7 || b.len() > 15 {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (n, octet) in octets.iter_mut().enumerate() {
        if n > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut v: u32 = 0;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            v = v * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        let len = i - start;
        if len == 0 || v > 255 || (len > 1 && b[start] == b'0') {
            return None;
        }
        *octet = v as u8;
    }
    (i == b.len()).then(|| Ipv4Addr::from(octets))
}

/// Writes `a` in dotted decimal. `Ipv4Addr`'s own `Display` honours width and padding
/// and costs ~1,200 instructions an address; the URIs and Vias of one call print dozens
/// (issue 14: 8% of the instructions per call, callgrind).
pub(crate) fn write_ipv4<W: fmt::Write + ?Sized>(f: &mut W, a: Ipv4Addr) -> fmt::Result {
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, octet) in a.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    // SAFETY: only ASCII digits and dots were written to `buf[..n]`, so it is UTF-8.
    // `from_utf8`'s check was ~80 instructions an address, ~55 addresses a call (1.3% of
    // the instructions per call, callgrind).
    f.write_str(unsafe { std::str::from_utf8_unchecked(&buf[..n]) })
}

/// Writes `:port` (see [`write_ipv4`] for why not `write!`).
pub(crate) fn write_port<W: fmt::Write + ?Sized>(f: &mut W, port: u16) -> fmt::Result {
    f.write_str(":")?;
    f.write_str(itoa::Buffer::new().format(port))
}

/// An IPv6 address, also in the three-colon form before a dotted IPv4 tail
/// (`2001:db8:::192.0.2.1`) that RFC 3261's ABNF lets through by mistake: RFC 5118 4.10
/// asks implementations to tolerate it, and it means the same as the two-colon form.
fn parse_ipv6(s: &str) -> Option<Ipv6Addr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let (head, v4) = s.split_once(":::")?;
    if !v4.contains('.') || v4.parse::<Ipv4Addr>().is_err() {
        return None;
    }
    format!("{head}::{v4}").parse().ok()
}

/// Splits `host[:port]` where host may be a bracketed IPv6 reference.
pub fn parse_hostport(s: &str) -> Result<(Host, Option<u16>), UriError> {
    let (host, port) = if s.starts_with('[') {
        let close = find_byte(s, b']').ok_or(UriError::BadIpv6)?;
        let rest = &s[close + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return Err(UriError::BadIpv6),
        };
        (&s[..=close], port)
    } else {
        match split_once_byte(s, b':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
                return Err(UriError::BadPort);
            }
            Some(p.parse::<u16>().map_err(|_| UriError::BadPort)?)
        }
        None => None,
    };
    Ok((Host::parse(host)?, port))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scheme {
    Sip,
    Sips,
    Tel,
    Other(Box<str>),
}

impl Scheme {
    pub fn as_str(&self) -> &str {
        match self {
            Scheme::Sip => "sip",
            Scheme::Sips => "sips",
            Scheme::Tel => "tel",
            Scheme::Other(s) => s,
        }
    }
    pub fn is_sip(&self) -> bool {
        matches!(self, Scheme::Sip | Scheme::Sips)
    }
}

/// A URI. `sip:` and `sips:` URIs are parsed into their parts; any other scheme (tel:,
/// im:, an unknown one) keeps its text after the colon in `opaque`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub scheme: Scheme,
    /// The user part as written (escapes kept).
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Params,
    /// The `?headers` part, without the `?`.
    pub headers: Option<String>,
    /// The whole text after `scheme:` for schemes other than sip and sips.
    pub opaque: Option<String>,
}

impl Uri {
    /// A `sip:` URI to `user@host:port`.
    pub fn sip(user: Option<&str>, host: Host, port: Option<u16>) -> Uri {
        Uri {
            scheme: Scheme::Sip,
            user: user.map(str::to_owned),
            password: None,
            host,
            port,
            params: Params::new(),
            headers: None,
            opaque: None,
        }
    }

    pub fn parse(s: &str) -> Result<Uri, UriError> {
        // One pass that answers both character checks below for a clean URI (the usual
        // case); the checks themselves run only when it finds something (issue 14: two
        // byte-at-a-time scans of every URI).
        let clean = !has_byte_outside_uri_text(s.as_bytes());
        if !clean && s.bytes().any(|c| is_ws(c) || c == b'\r' || c == b'\n') {
            return Err(UriError::Whitespace);
        }
        let colon = find_byte(s, b':').ok_or(UriError::NoScheme)?;
        let scheme = &s[..colon];
        let b = scheme.as_bytes();
        if b.is_empty()
            || !b[0].is_ascii_alphabetic()
            || !b
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
        {
            return Err(UriError::NoScheme);
        }
        let rest = &s[colon + 1..];
        let scheme = if scheme.eq_ignore_ascii_case("sip") {
            Scheme::Sip
        } else if scheme.eq_ignore_ascii_case("sips") {
            Scheme::Sips
        } else {
            let scheme = if scheme.eq_ignore_ascii_case("tel") {
                Scheme::Tel
            } else {
                Scheme::Other(scheme.into())
            };
            if rest.is_empty()
                || (!clean && rest.bytes().any(|c| c < 0x21 || c == b'<' || c == b'>'))
            {
                return Err(UriError::BadChar);
            }
            return Ok(Uri {
                scheme,
                user: None,
                password: None,
                host: Host::Domain(String::new()),
                port: None,
                params: Params::new(),
                headers: None,
                opaque: Some(rest.to_owned()),
            });
        };
        if !clean
            && rest
                .bytes()
                .any(|c| !(0x21..0x7f).contains(&c) || matches!(c, b'<' | b'>' | b'"'))
        {
            return Err(UriError::BadChar);
        }
        // userinfo ends at the first '@': none of the characters after it may be '@'.
        let (user, password, hostpart) = match find_byte(rest, b'@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let (u, p) = match split_once_byte(userinfo, b':') {
                    Some((u, p)) => (u, Some(p.to_owned())),
                    None => (userinfo, None),
                };
                (Some(u.to_owned()), p, &rest[at + 1..])
            }
            None => (None, None, rest),
        };
        let (before_headers, headers) = match split_once_byte(hostpart, b'?') {
            Some((a, h)) => (a, Some(h.to_owned())),
            None => (hostpart, None),
        };
        let (hostport, params) = match find_byte(before_headers, b';') {
            Some(i) => (&before_headers[..i], Params::parse(&before_headers[i..])?),
            None => (before_headers, Params::new()),
        };
        let (host, port) = parse_hostport(hostport)?;
        Ok(Uri {
            scheme,
            user,
            password,
            host,
            port,
            params,
            headers,
            opaque: None,
        })
    }

    /// `user@host` (or just the host), the address-of-record form.
    pub fn aor(&self) -> String {
        match &self.user {
            Some(u) => format!("{}:{}@{}", self.scheme.as_str(), u, self.host),
            None => format!("{}:{}", self.scheme.as_str(), self.host),
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Uri {
    /// The URI as text (`to_string` without the formatter).
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(48);
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the URI into any writer. Into a `String` (serialization) each piece is a
    /// plain append: through `Display` every piece is a dynamic call into the formatter
    /// (issue 14: ~5% of a call's instructions, callgrind).
    pub fn write_to<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        f.write_str(self.scheme.as_str())?;
        f.write_str(":")?;
        if let Some(o) = &self.opaque {
            return f.write_str(o);
        }
        if let Some(u) = &self.user {
            f.write_str(u)?;
            if let Some(p) = &self.password {
                write!(f, ":{p}")?;
            }
            f.write_str("@")?;
        }
        self.host.write_to(f)?;
        if let Some(p) = self.port {
            write_port(f, p)?;
        }
        self.params.write_to(f)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector of owned pairs `Params` was before it became one text: the reference
    /// its parse, look-ups, writing, `set` and `remove` are compared with.
    fn model_parse(mut s: &str) -> Result<Vec<(String, Option<String>)>, UriError> {
        let mut out = Vec::new();
        loop {
            s = trim_ws(s);
            if s.is_empty() {
                return Ok(out);
            }
            s = s.strip_prefix(';').ok_or(UriError::BadParam)?;
            s = trim_ws(s);
            let name_end =
                find_any(s, |c| matches!(c, b'=' | b';' | b' ' | b'\t')).unwrap_or(s.len());
            let name = &s[..name_end];
            if name.is_empty() || !is_param_text(name) {
                return Err(UriError::BadParam);
            }
            s = trim_ws(&s[name_end..]);
            let value = if let Some(rest) = s.strip_prefix('=') {
                let rest = trim_ws(rest);
                let end = if rest.starts_with('"') {
                    crate::sip::lex::quoted_end(rest).ok_or(UriError::BadParam)?
                } else if rest.starts_with('[') {
                    find_byte(rest, b']').ok_or(UriError::BadParam)? + 1
                } else {
                    find_any(rest, |c| matches!(c, b';' | b' ' | b'\t')).unwrap_or(rest.len())
                };
                let v = &rest[..end];
                if v.is_empty() || !(v.starts_with('"') || is_param_text(v)) {
                    return Err(UriError::BadParam);
                }
                s = &rest[end..];
                Some(v.to_owned())
            } else {
                None
            };
            out.push((name.to_owned(), value));
        }
    }

    fn model_text(m: &[(String, Option<String>)]) -> String {
        m.iter()
            .map(|(n, v)| match v {
                Some(v) => format!(";{n}={v}"),
                None => format!(";{n}"),
            })
            .collect()
    }

    fn assert_same(p: &Params, m: &[(String, Option<String>)], what: &str) {
        let got: Vec<(String, Option<String>)> = p
            .iter()
            .map(|(n, v)| (n.to_owned(), v.map(str::to_owned)))
            .collect();
        assert_eq!(got, m, "{what}");
        assert_eq!(p.to_string(), model_text(m), "{what}");
        assert_eq!(p.is_empty(), m.is_empty(), "{what}");
        for name in ["tag", "TAG", "lr", "a", "b", "maddr", "x", "branch"] {
            let want = m
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_deref());
            assert_eq!(p.get(name), want, "{what}: get {name}");
        }
    }

    /// The one-pass scan says "clean" only where both character checks of `Uri::parse`
    /// would pass: every byte value, at the start, middle and end of a URI.
    #[test]
    fn uri_text_scan_matches_the_byte_checks() {
        for b in 0..=255u8 {
            for at in [0, 4, 9, 14] {
                let mut v = b"sip:alice@host".to_vec();
                v.insert(at, b);
                let direct = v
                    .iter()
                    .any(|&c| !(0x21..0x7f).contains(&c) || matches!(c, b'<' | b'>' | b'"'));
                assert_eq!(has_byte_outside_uri_text(&v), direct, "byte {b} at {at}");
            }
        }
        assert_eq!(Uri::parse("sip:a b@h"), Err(UriError::Whitespace));
        assert_eq!(Uri::parse("sip:a\"b@h"), Err(UriError::BadChar));
        assert_eq!(Uri::parse("tel:<1>"), Err(UriError::BadChar));
        let tel = Uri::parse("tel:+1\"2").expect("a quote is allowed in other schemes");
        assert_eq!(tel.opaque.as_deref(), Some("+1\"2"));
        assert!(Uri::parse("sip:alice@host;lr").is_ok());
    }

    #[test]
    fn params_text_behaves_as_the_pairs_it_replaced() {
        let inputs = [
            "",
            "  ",
            ";tag=abc",
            " ; tag = abc ; lr ",
            ";branch=z9hG4bK-1;rport;received=10.0.0.1",
            ";a=\"x; y\";b",
            ";a = \"x ; y\" ;b",
            ";maddr=[::1];lr",
            ";maddr=[2001:db8::1]",
            ";A=1;b=2;a=3",
            ";transport=TCP;lr;user=phone",
            ";bad;",
            ";=x",
            ";a=",
            ";a=\"open",
            ";a=[::1",
            "tag=x",
            ";a=b c",
            ";a b",
            ";a=\"x\"y",
            ";a=\"x\";b",
            ";a=[::1]x",
            ";a=[::1];b",
            ";a;;b",
            ";a=b=c",
            ";;",
            ";a=\"\"",
            ";a=x\"",
            ";a=<x>",
        ];
        for input in inputs {
            let (got, want) = (Params::parse(input), model_parse(input));
            match (got, want) {
                (Ok(p), Ok(m)) => {
                    assert_same(&p, &m, input);
                    for (op, name, value) in [
                        ("set", "tag", Some("new")),
                        ("set", "LR", None),
                        ("set", "x", Some("\"q;r\"")),
                        ("remove", "a", None),
                        ("remove", "lr", None),
                        ("set", "maddr", Some("[::2]")),
                        ("remove", "nothing", None),
                    ] {
                        let (mut p, mut m) = (p.clone(), m.clone());
                        if op == "set" {
                            p.set(name, value);
                            match m.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                                Some(slot) => slot.1 = value.map(str::to_owned),
                                None => m.push((name.to_owned(), value.map(str::to_owned))),
                            }
                        } else {
                            p.remove(name);
                            m.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                        }
                        assert_same(&p, &m, &format!("{input} {op} {name}"));
                    }
                }
                (Err(g), Err(w)) => assert_eq!(g, w, "{input}"),
                (g, w) => panic!("{input:?}: {g:?} vs {w:?}"),
            }
        }
    }

    #[test]
    fn ipv4_hosts_and_ports_print_as_core_prints_them() {
        for a in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.0.255",
            "127.0.0.1",
            "192.168.100.9",
            "255.255.255.255",
        ] {
            let ip: Ipv4Addr = a.parse().unwrap();
            let mut out = String::new();
            write_ipv4(&mut out, ip).unwrap();
            assert_eq!(out, ip.to_string());
        }
        for p in [0u16, 9, 10, 5060, 65535] {
            let mut out = String::new();
            write_port(&mut out, p).unwrap();
            assert_eq!(out, format!(":{p}"));
        }
        let u = Uri::parse("sip:bob@192.0.2.10:5070;transport=udp").unwrap();
        assert_eq!(u.to_string(), "sip:bob@192.0.2.10:5070;transport=udp");
    }

    #[test]
    fn ipv4_parses_exactly_as_core_parses() {
        let mut cases: Vec<String> = [
            "0.0.0.0",
            "1.2.3.4",
            "255.255.255.255",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.",
            ".1.2.3.4",
            "1..2.3",
            "1.2.3.04",
            "1.2.3.4.5",
            "1234.1.1.1",
            "1.2.3.4a",
            "",
            "....",
            "10.0.0.255",
            "192.168.100.9",
            "1.2.3.400",
            "0.00.0.0",
            "9.9.9.9",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 17) as usize;
            let text: String = (0..len)
                .map(|k| b"0123456789..2501"[((seed >> (k * 3 % 60)) % 16) as usize] as char)
                .collect();
            cases.push(text);
            // And dotted quads of likely and unlikely octets.
            const PARTS: [&str; 10] =
                ["0", "7", "25", "199", "255", "256", "01", "300", "1234", ""];
            let quad: Vec<&str> = (0..4)
                .map(|k| PARTS[((seed >> (k * 8)) % 10) as usize])
                .collect();
            cases.push(quad.join("."));
        }
        let mut valid = 0;
        for c in &cases {
            let core = c.parse::<Ipv4Addr>().ok();
            assert_eq!(parse_ipv4(c), core, "{c:?}");
            valid += usize::from(core.is_some());
        }
        // The random texts must reach addresses too, not only rejections.
        assert!(valid > 100, "only {valid} valid addresses among the cases");
    }

    #[test]
    fn written_text_is_the_text_that_was_parsed() {
        for text in [
            "sip:bob@192.0.2.10:5070;transport=udp",
            "sips:alice:secret@example.com;lr?subject=hi",
            "sip:[2001:db8::10]:5070;maddr=10.0.0.1",
            "tel:+15551234567",
            "sip:10.0.0.255",
        ] {
            let u = Uri::parse(text).unwrap();
            assert_eq!(u.to_text(), text);
            assert_eq!(u.host.to_text(), u.host.to_string());
            let addr = format!("\"Bob\" <{text}>;tag=1;x");
            let n = crate::sip::NameAddr::parse(&addr).unwrap();
            assert_eq!(n.to_text(), addr);
        }
    }

    #[test]
    fn ipv6_references() {
        let u = Uri::parse("sip:bob@[2001:db8::10]:5070;transport=tcp").unwrap();
        assert_eq!(u.host, Host::Ipv6("2001:db8::10".parse().unwrap()));
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.params.value("transport"), Some("tcp"));
        assert_eq!(u.to_string(), "sip:bob@[2001:db8::10]:5070;transport=tcp");
        let u = Uri::parse("sip:[::1]:5060").unwrap();
        assert_eq!(u.host, Host::Ipv6(Ipv6Addr::LOCALHOST));
        // RFC 5118 4.4: IPv4-mapped form is fine.
        assert!(Uri::parse("sip:a@[::ffff:192.0.2.1]").is_ok());
        // Unbracketed IPv6 and bad references are refused.
        assert!(Uri::parse("sip:a@2001:db8::10").is_err());
        assert!(Uri::parse("sip:a@[2001:db8:::10]").is_err());
        // RFC 5118 4.10: three colons before a dotted IPv4 tail are tolerated, as the
        // address the two-colon form names.
        let u = Uri::parse("sip:user@[2001:db8:::192.0.2.1]").unwrap();
        assert_eq!(u.host, Host::Ipv6("2001:db8::192.0.2.1".parse().unwrap()));
        assert!(Uri::parse("sip:a@[2001:db8::::192.0.2.1]").is_err());
        assert!(Uri::parse("sip:a@[:::192.0.2.1]").is_ok());
        assert!(Uri::parse("sip:a@[2001:db8::10").is_err());
    }

    #[test]
    fn user_with_semicolons_and_escapes() {
        let u = Uri::parse("sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
        assert_eq!(u.host, Host::Domain("example.com".into()));
    }

    #[test]
    fn other_schemes_and_errors() {
        let u = Uri::parse("tel:+1-555-1234").unwrap();
        assert_eq!(u.scheme, Scheme::Tel);
        assert_eq!(u.to_string(), "tel:+1-555-1234");
        assert!(matches!(
            Uri::parse("nobodyKnowsThisScheme:x").unwrap().scheme,
            Scheme::Other(_)
        ));
        assert!(Uri::parse("<sip:a@b>").is_err());
        assert!(Uri::parse("sip:a@b c").is_err());
        assert!(Uri::parse("sip:a@b:99999").is_err());
        let u = Uri::parse("sip:a@b?Route=%3Csip:x%3E").unwrap();
        assert_eq!(u.headers.as_deref(), Some("Route=%3Csip:x%3E"));
    }
}
