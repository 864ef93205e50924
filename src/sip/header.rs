//! Header fields: canonical names (compact forms expanded), the ordered header list,
//! and the typed base headers (Via, From/To/Contact name-addrs, CSeq).

use super::lex::{find_any, find_byte, is_token, quoted_end, split_commas, trim_ws};
use super::method::Method;
use super::uri::{parse_hostport, Host, Params, Uri, UriError};
use std::borrow::Cow;
use std::fmt;

/// Known header names in their canonical spelling, with compact forms (RFC 3261 7.3.3 and
/// the IANA registry). Looking a name up here makes later lookups exact comparisons. The
/// headers a parse reads itself come first, in the order of [`BaseName`].
const KNOWN: &[(&str, Option<u8>)] = &[
    ("Via", Some(b'v')),
    ("From", Some(b'f')),
    ("To", Some(b't')),
    ("Call-ID", Some(b'i')),
    ("CSeq", None),
    ("Max-Forwards", None),
    ("Content-Length", Some(b'l')),
    ("Contact", Some(b'm')),
    ("Content-Type", Some(b'c')),
    ("Content-Encoding", Some(b'e')),
    ("Subject", Some(b's')),
    ("Supported", Some(b'k')),
    ("Event", Some(b'o')),
    ("Refer-To", Some(b'r')),
    ("Referred-By", Some(b'b')),
    ("Allow-Events", Some(b'u')),
    ("Session-Expires", Some(b'x')),
    ("Accept-Contact", Some(b'a')),
    ("Reject-Contact", Some(b'j')),
    ("Request-Disposition", Some(b'd')),
    ("Identity", Some(b'y')),
    ("Route", None),
    ("Record-Route", None),
    ("Require", None),
    ("Proxy-Require", None),
    ("Unsupported", None),
    ("Allow", None),
    ("Accept", None),
    ("Accept-Encoding", None),
    ("Accept-Language", None),
    ("Expires", None),
    ("Min-Expires", None),
    ("Authorization", None),
    ("Proxy-Authorization", None),
    ("WWW-Authenticate", None),
    ("Proxy-Authenticate", None),
    ("User-Agent", None),
    ("Server", None),
    ("RSeq", None),
    ("RAck", None),
    ("Replaces", None),
    ("Subscription-State", None),
    ("SIP-ETag", None),
    ("SIP-If-Match", None),
    ("Retry-After", None),
    ("Timestamp", None),
    ("Date", None),
    ("Warning", None),
    ("Reason", None),
];

/// The headers a message's parse reads itself (RFC 3261 8.1.1 and Content-Length, Max-
/// Forwards), named by their place in `KNOWN`: the parse tells them apart by number, not
/// by comparing names again (issue 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    ContentLength,
}

impl BaseName {
    const ALL: [BaseName; 7] = [
        BaseName::Via,
        BaseName::From,
        BaseName::To,
        BaseName::CallId,
        BaseName::CSeq,
        BaseName::MaxForwards,
        BaseName::ContentLength,
    ];
}

/// Returns the canonical name of a header: compact forms expanded, known names in their
/// usual case; an unknown name is kept as written.
pub fn canonical_name(name: &str) -> std::borrow::Cow<'static, str> {
    named(name).0
}

/// [`canonical_name`], and which base header it is.
pub(crate) fn named(name: &str) -> (std::borrow::Cow<'static, str>, Option<BaseName>) {
    let found = known_index(name);
    match found {
        Some(i) => (
            std::borrow::Cow::Borrowed(KNOWN[i].0),
            BaseName::ALL.get(i).copied(),
        ),
        None => (std::borrow::Cow::Owned(name.to_owned()), None),
    }
}

fn known_index(name: &str) -> Option<usize> {
    if name.len() == 1 {
        let c = name.as_bytes()[0].to_ascii_lowercase();
        return KNOWN.iter().position(|(_, k)| *k == Some(c));
    }
    // Fast path: most peers write the canonical spelling, and an exact comparison checks
    // the length first.
    KNOWN.iter().position(|(n, _)| *n == name).or_else(|| {
        KNOWN
            .iter()
            .position(|(n, _)| n.len() == name.len() && n.eq_ignore_ascii_case(name))
    })
}

/// One header line (folding undone), its name canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: std::borrow::Cow<'static, str>,
    pub value: String,
}

/// The header fields of a message other than its base headers, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    pub const fn new() -> Headers {
        Headers(Vec::new())
    }
    /// Empty, with room for `n` headers.
    pub fn with_capacity(n: usize) -> Headers {
        Headers(Vec::with_capacity(n))
    }
    /// The first value of `name` (canonical names compare exactly; others ignore case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0[..]
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
    /// Every comma-separated element of every `name` header (for list headers such as
    /// Require, Supported, Allow, Contact, Route).
    pub fn list(&self, name: &str) -> Vec<String> {
        self.get_all(name)
            .flat_map(|v| split_commas(v).unwrap_or_default())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
    /// The first element of [`Headers::list`] without making the list (a dialog's remote
    /// target is the first Contact, read for each dialog made).
    pub fn first_item<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.get_all(name).find_map(|v| {
            if !v.bytes().any(|c| c == b',' || c == b'"') {
                let one = trim_ws(v);
                return (!one.is_empty()).then_some(one);
            }
            split_commas(v)
                .unwrap_or_default()
                .into_iter()
                .find(|s| !s.is_empty())
        })
    }
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.0.push(Header {
            name: canonical_name(name),
            value: value.into(),
        });
    }
    /// Replaces every `name` header with one of this value.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.remove(name);
        self.push(name, value);
    }
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }
    pub fn iter(&self) -> impl Iterator<Item = &Header> + Clone {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(crate) fn push_header(&mut self, h: Header) {
        self.0.push(h);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad URI: {0}")]
    Uri(#[from] UriError),
    #[error("unterminated quoted string")]
    OpenQuote,
    #[error("missing '>'")]
    OpenAngle,
    #[error("bad display name")]
    DisplayName,
    #[error("bad parameters")]
    Params,
    #[error("bad sent-protocol")]
    SentProtocol,
    #[error("bad CSeq")]
    CSeq,
    #[error("empty value")]
    Empty,
}

/// `[display-name] <uri> *(;param)` or `addr-spec *(;param)` (From, To, Contact,
/// Route, Record-Route, Refer-To...). Without angle brackets, `;` parameters belong to the
/// header, not the URI (RFC 3261 20.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// The display name as written (quotes kept when it was quoted).
    pub display: Option<String>,
    pub uri: Uri,
    pub params: Params,
}

impl NameAddr {
    pub fn new(uri: Uri) -> NameAddr {
        NameAddr {
            display: None,
            uri,
            params: Params::new(),
        }
    }

    pub fn tag(&self) -> Option<&str> {
        self.params.value("tag")
    }

    pub fn set_tag(&mut self, tag: &str) {
        self.params.set("tag", Some(tag));
    }

    pub fn parse(s: &str) -> Result<NameAddr, HeaderError> {
        let s = trim_ws(s);
        if s.is_empty() {
            return Err(HeaderError::Empty);
        }
        let (display, rest) = if s.starts_with('"') {
            let end = quoted_end(s).ok_or(HeaderError::OpenQuote)?;
            let rest = trim_ws(&s[end..]);
            if !rest.starts_with('<') {
                return Err(HeaderError::DisplayName);
            }
            (Some(s[..end].to_owned()), rest)
        } else if let Some(lt) = find_byte(s, b'<') {
            let d = trim_ws(&s[..lt]);
            // An unquoted display name is a run of tokens separated by LWS.
            if !d.is_empty() && !d.split([' ', '\t']).filter(|w| !w.is_empty()).all(is_token) {
                return Err(HeaderError::DisplayName);
            }
            ((!d.is_empty()).then(|| d.to_owned()), &s[lt..])
        } else {
            (None, s)
        };
        if let Some(inner) = rest.strip_prefix('<') {
            let gt = find_byte(inner, b'>').ok_or(HeaderError::OpenAngle)?;
            let uri = Uri::parse(&inner[..gt])?;
            let params = Params::parse(&inner[gt + 1..]).map_err(|_| HeaderError::Params)?;
            Ok(NameAddr {
                display,
                uri,
                params,
            })
        } else {
            // addr-spec: the URI ends at the first ';' (its own parameters would be
            // ambiguous) or white space.
            let end = find_any(rest, |c| matches!(c, b';' | b' ' | b'\t')).unwrap_or(rest.len());
            let uri = Uri::parse(&rest[..end])?;
            let params = Params::parse(&rest[end..]).map_err(|_| HeaderError::Params)?;
            Ok(NameAddr {
                display,
                uri,
                params,
            })
        }
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl NameAddr {
    /// Writes the value into any writer (see [`Uri::write_to`]). Pieces one by one:
    /// `write!` goes through core::fmt's argument machinery for each (issue 14).
    pub fn write_to<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        self.write_head(f)?;
        self.params.write_to(f)
    }

    /// The value without its tag parameter (a dialog's local and remote URI, RFC 3261
    /// 12.1.1), written directly rather than from an edited copy.
    pub fn to_text_without_tag(&self) -> String {
        let mut out = String::with_capacity(64);
        // Writing into a String cannot fail.
        let _ = self.write_head(&mut out);
        for (name, value) in self.params.iter() {
            if name.eq_ignore_ascii_case("tag") {
                continue;
            }
            out.push(';');
            out.push_str(name);
            if let Some(v) = value {
                out.push('=');
                out.push_str(v);
            }
        }
        out
    }

    /// `[display ]<uri>`: everything but the header parameters.
    fn write_head<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        if let Some(d) = &self.display {
            f.write_str(d)?;
            f.write_str(" ")?;
        }
        f.write_str("<")?;
        self.uri.write_to(f)?;
        f.write_str(">")
    }

    /// The value as text (`to_string` without the formatter).
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(64);
        let _ = self.write_to(&mut out);
        out
    }
}

/// One Via value (RFC 3261 20.42): `SIP/2.0/transport sent-by *(;param)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// The protocol version of the sent-protocol (normally "2.0").
    pub version: Cow<'static, str>,
    /// Transport in upper case: UDP, TCP, TLS, SCTP, WS, WSS or an extension.
    pub transport: Cow<'static, str>,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Params,
}

/// The Via transports of RFC 3261 20.42 and RFC 7118 (WebSocket), in upper case.
const KNOWN_TRANSPORTS: [&str; 6] = ["UDP", "TCP", "TLS", "SCTP", "WS", "WSS"];

/// The magic cookie of RFC 3261 branches (8.1.1.7).
pub const BRANCH_COOKIE: &str = "z9hG4bK";

impl Via {
    pub fn branch(&self) -> Option<&str> {
        self.params.value("branch")
    }
    pub fn received(&self) -> Option<&str> {
        self.params.value("received")
    }
    /// `Some(None)` when `rport` is present without a value (RFC 3581 asks for it).
    pub fn rport(&self) -> Option<Option<u16>> {
        self.params
            .get("rport")
            .map(|v| v.and_then(|p| p.parse().ok()))
    }

    /// Parses one comma-separated Via header value into its vias.
    pub fn parse_list(value: &str) -> Result<Vec<Via>, HeaderError> {
        let mut out = Vec::new();
        Via::parse_list_into(value, &mut out)?;
        Ok(out)
    }

    /// [`Via::parse_list`] appending to `out` (a message's Vias, header after header).
    pub(crate) fn parse_list_into(value: &str, out: &mut Vec<Via>) -> Result<(), HeaderError> {
        // One Via a header (the usual case): no list to make first.
        if !value.bytes().any(|c| c == b',' || c == b'"') {
            out.push(Via::parse(value)?);
            return Ok(());
        }
        for part in split_commas(value).ok_or(HeaderError::OpenQuote)? {
            out.push(Via::parse(part)?);
        }
        Ok(())
    }

    pub fn parse(s: &str) -> Result<Via, HeaderError> {
        let s = trim_ws(s);
        let (version, transport, rest) = match sent_protocol_as_usual(s) {
            Some(t) => t,
            None => sent_protocol(s)?,
        };
        let rest = trim_ws(rest);
        let end = find_any(rest, |c| matches!(c, b';' | b' ' | b'\t')).unwrap_or(rest.len());
        let (host, port) = parse_hostport(&rest[..end])?;
        let params = Params::parse(&rest[end..]).map_err(|_| HeaderError::Params)?;
        Ok(Via {
            // The usual values are not copied (issue 14: two allocations a Via).
            version: if version == "2.0" {
                Cow::Borrowed("2.0")
            } else {
                Cow::Owned(version.to_owned())
            },
            transport: match KNOWN_TRANSPORTS
                .iter()
                .find(|t| t.eq_ignore_ascii_case(transport))
            {
                Some(t) => Cow::Borrowed(*t),
                None => Cow::Owned(transport.to_ascii_uppercase()),
            },
            host,
            port,
            params,
        })
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Via {
    /// Writes the value into any writer (see [`Uri::write_to`]).
    pub fn write_to<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        f.write_str("SIP/")?;
        f.write_str(&self.version)?;
        f.write_str("/")?;
        f.write_str(&self.transport)?;
        f.write_str(" ")?;
        self.host.write_to(f)?;
        if let Some(p) = self.port {
            super::uri::write_port(f, p)?;
        }
        self.params.write_to(f)
    }
}

/// `SIP/2.0/<transport> ` as nearly every peer writes it (canonical case, no white space
/// around the slashes, a known transport): version, transport and what follows, without
/// the general scan of [`sent_protocol`] (issue 14: ~400 instructions a Via).
fn sent_protocol_as_usual(s: &str) -> Option<(&str, &str, &str)> {
    let rest = s.strip_prefix("SIP/2.0/")?;
    let end = rest.bytes().position(|c| c == b' ' || c == b'\t')?;
    let transport = KNOWN_TRANSPORTS.iter().find(|t| **t == &rest[..end])?;
    Some(("2.0", transport, trim_ws(&rest[end..])))
}

/// sent-protocol: name / version / transport, LWS allowed around '/' (RFC 3261 20.42):
/// version, transport and what follows.
fn sent_protocol(s: &str) -> Result<(&str, &str, &str), HeaderError> {
    let mut rest = s;
    let mut fields = [""; 3];
    for (i, field) in fields.iter_mut().enumerate() {
        rest = trim_ws(rest);
        let end = rest
            .bytes()
            .position(|c| matches!(c, b'/' | b' ' | b'\t'))
            .unwrap_or(rest.len());
        *field = &rest[..end];
        rest = trim_ws(&rest[end..]);
        if i < 2 {
            rest = rest.strip_prefix('/').ok_or(HeaderError::SentProtocol)?;
        }
    }
    let [name, version, transport] = fields;
    if !name.eq_ignore_ascii_case("SIP") || !is_token(version) || !is_token(transport) {
        return Err(HeaderError::SentProtocol);
    }
    Ok((version, transport, rest))
}

/// CSeq (RFC 3261 20.16): a sequence number below 2^31 and the method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    pub fn parse(s: &str) -> Result<CSeq, HeaderError> {
        let s = trim_ws(s);
        let (num, method) = s.split_once([' ', '\t']).ok_or(HeaderError::CSeq)?;
        let method = trim_ws(method);
        if num.is_empty() || num.len() > 10 || !num.bytes().all(|c| c.is_ascii_digit()) {
            return Err(HeaderError::CSeq);
        }
        let seq: u64 = num.parse().map_err(|_| HeaderError::CSeq)?;
        if seq >= 1 << 31 || !is_token(method) {
            return Err(HeaderError::CSeq);
        }
        Ok(CSeq {
            seq: seq as u32,
            method: Method::from_token(method),
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(itoa::Buffer::new().format(self.seq))?;
        f.write_str(" ")?;
        fmt::Display::fmt(&self.method, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `BaseName` numbers the first names of `KNOWN`: the two lists must stay in step.
    #[test]
    fn base_names_are_the_first_known_names() {
        let names = [
            "Via",
            "From",
            "To",
            "Call-ID",
            "CSeq",
            "Max-Forwards",
            "Content-Length",
        ];
        for (b, n) in BaseName::ALL.iter().zip(names) {
            assert_eq!(named(n), (Cow::Borrowed(n), Some(*b)), "{n}");
            assert_eq!(named(&n.to_ascii_lowercase()).1, Some(*b), "{n}");
        }
        for compact in ["v", "f", "t", "i", "l"] {
            assert!(named(compact).1.is_some(), "{compact}");
        }
        assert_eq!(named("Contact").1, None);
        assert_eq!(named("X-Custom"), (Cow::Owned("X-Custom".to_owned()), None));
    }

    #[test]
    fn first_item_is_the_lists_first() {
        for values in [
            vec!["<sip:a@b>"],
            vec!["<sip:a@b>, <sip:c@d>", "<sip:e@f>"],
            vec!["", " ", "\"x,y\" <sip:a@b>;q=1"],
            vec![" , <sip:a@b>"],
            vec![],
            vec!["\"open"],
        ] {
            let mut h = Headers::new();
            for v in &values {
                h.push("Contact", *v);
            }
            assert_eq!(
                h.first_item("Contact"),
                h.list("Contact").first().map(String::as_str),
                "{values:?}"
            );
        }
    }

    /// The usual sent-protocol's short cut gives what the general scan gives, and steps
    /// aside for everything else.
    #[test]
    fn the_usual_sent_protocol_reads_as_the_general_scan() {
        for v in [
            "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1",
            "SIP/2.0/TCP h\t;rport",
            "SIP/2.0/WSS x.invalid",
            "SIP/2.0/udp h",
            "sip/2.0/UDP h",
            "SIP / 2.0 / UDP h",
            "SIP/2.0/UDP",
            "SIP/2.0/XYZ h",
            "SIP/3.0/UDP h",
        ] {
            let usual = sent_protocol_as_usual(v);
            if let Some(u) = usual {
                assert_eq!(Ok(u), sent_protocol(v), "{v}");
            }
            let expect_usual = v.starts_with("SIP/2.0/")
                && !v.contains("udp")
                && !v.contains("XYZ")
                && v.len() > "SIP/2.0/UDP".len();
            assert_eq!(usual.is_some(), expect_usual, "{v}");
        }
    }

    /// Known transports and version 2.0 are borrowed, not copied; others are kept (the
    /// transport upper-cased) as before.
    #[test]
    fn via_protocol_fields() {
        let v = Via::parse("SIP/2.0/udp 10.0.0.1:5060;branch=z9hG4bK-1").unwrap();
        assert_eq!((&*v.version, &*v.transport), ("2.0", "UDP"));
        assert!(matches!(v.transport, Cow::Borrowed(_)) && matches!(v.version, Cow::Borrowed(_)));
        let v = Via::parse("SIP / 3.0 / xyz h").unwrap();
        assert_eq!((&*v.version, &*v.transport), ("3.0", "XYZ"));
        let v = Via::parse("SIP/2.0/Wss h;rport").unwrap();
        assert_eq!(&*v.transport, "WSS");
        assert_eq!(v.to_string(), "SIP/2.0/WSS h;rport");
    }

    #[test]
    fn compact_names() {
        assert_eq!(canonical_name("v"), "Via");
        assert_eq!(canonical_name("I"), "Call-ID");
        assert_eq!(canonical_name("cAlL-iD"), "Call-ID");
        assert_eq!(canonical_name("X-Custom"), "X-Custom");
        assert_eq!(canonical_name(""), "");
        assert_eq!(canonical_name("1-Odd"), "1-Odd");
    }

    /// Every known name is canonical as written and in any case, and its compact form
    /// expands to it.
    #[test]
    fn every_known_name_is_canonical_in_any_case() {
        for (n, compact) in KNOWN {
            assert!(matches!(canonical_name(n), std::borrow::Cow::Borrowed(b) if b == *n));
            assert_eq!(canonical_name(&n.to_ascii_lowercase()), *n);
            assert_eq!(canonical_name(&n.to_ascii_uppercase()), *n);
            if let Some(c) = compact {
                assert_eq!(canonical_name(&char::from(*c).to_string()), *n);
            }
        }
    }

    #[test]
    fn torture_via() {
        let v = Via::parse_list(
            "SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\
             SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239"
                .replace("\r\n", "")
                .as_str(),
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].transport, "TCP");
        assert_eq!(v[0].branch(), Some("z9hG4bK9ikj8"));
        assert_eq!(v[1].branch(), Some("z9hG4bK30239"));
        let v6 = Via::parse("SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas;rport").unwrap();
        assert_eq!(v6.port, Some(5070));
        assert_eq!(v6.rport(), Some(None));
        assert!(Via::parse_list("SIP/2.0/UDP 192.0.2.15;;,;,,").is_err());
    }

    #[test]
    fn name_addrs() {
        let n = NameAddr::parse(
            r#""J Rosenberg \\\""       <sip:jdrosen@example.com> ; tag = 98asjd8"#,
        )
        .unwrap();
        assert_eq!(n.tag(), Some("98asjd8"));
        let n = NameAddr::parse("sip:caller@example.net;tag=3ghsd41").unwrap();
        assert_eq!(n.tag(), Some("3ghsd41"));
        assert!(n.uri.params.is_empty());
        let n = NameAddr::parse("Bob Smith <sip:bob@[::1]>").unwrap();
        assert_eq!(n.display.as_deref(), Some("Bob Smith"));
        assert!(NameAddr::parse("\"Bob <sip:bob@x>").is_err());
        assert!(NameAddr::parse("Bob <sip:bob@x").is_err());
    }

    #[test]
    fn cseq_limits() {
        assert_eq!(
            CSeq::parse("0009\r\n  INVITE".replace("\r\n", "").as_str())
                .unwrap()
                .seq,
            9
        );
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse("2147483648 INVITE").is_err());
    }
}
