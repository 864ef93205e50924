//! The From and To of a message (RFC 3261 20.20, 20.39), read for their tags at once and
//! parsed into a [`NameAddr`] only when something reads more.
//!
//! A B2BUA reads nothing but the tags of most messages it receives: the responses and the
//! in-dialog requests of a call are matched to their dialog and transaction by Call-ID,
//! tags and branch, and the other leg's messages are made from our own dialog state. A
//! name-addr parsed into owned strings was ~2,200 instructions, ten a call for tags alone
//! (issue 14). Requests outside a dialog (no To tag: an INVITE, REGISTER, SUBSCRIBE...) are
//! parsed whole as they are read, so that a malformed From or To gets its 400 (RFC 4475);
//! see [`crate::sip::parse`].

use super::header::{HeaderError, NameAddr};
use super::lex::{find_byte, quoted_end, trim_ws};
use super::uri::{find_param_value, Host, Uri};
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::sync::OnceLock;

/// A From or To header value. Dereferences to its [`NameAddr`] (parsed on first use);
/// [`tag`](Self::tag) and [`write_to`](Self::write_to) do not parse.
#[derive(Clone)]
pub struct PartyAddr(Repr);

// Boxed: a message carries two, and it is moved between layers (`NameAddr` inline made
// the From and To 528 of a request's bytes).
#[derive(Clone)]
enum Repr {
    Parsed(Box<NameAddr>),
    /// The value as it came, its header parameters checked and its tag found.
    Text {
        text: Box<str>,
        tag: Option<Range<u32>>,
        parsed: OnceLock<Box<NameAddr>>,
    },
}

impl PartyAddr {
    /// Reads a From or To value for its tag, leaving the rest to be parsed when used.
    /// The header parameters are checked as [`NameAddr::parse`] checks them; the display
    /// name and the URI are not. A value of unusual shape (white space among its
    /// parameters, an unclosed `<`) is parsed whole now, with that parse's error.
    pub fn read_lazily(value: &str) -> Result<PartyAddr, HeaderError> {
        let value = trim_ws(value);
        let Some(params_at) = header_params_start(value) else {
            return PartyAddr::parse(value);
        };
        let params = &value[params_at..];
        if params.bytes().any(|c| c == b' ' || c == b'\t') || value.len() > u32::MAX as usize {
            return PartyAddr::parse(value);
        }
        let tag = find_param_value(params, "tag").map_err(|_| HeaderError::Params)?;
        Ok(PartyAddr(Repr::Text {
            text: value.into(),
            tag: tag.map(|r| (r.start + params_at) as u32..(r.end + params_at) as u32),
            parsed: OnceLock::new(),
        }))
    }

    /// A value made of name-addr text this server wrote itself (`[display ]<uri>[;params]`
    /// without a tag, as a dialog keeps its URIs) and a tag, not parsed: it is parsed when
    /// used, as a value read lazily is (RFC 3261 12.2.1.1: an in-dialog request's From and
    /// To are the dialog's URIs and tags).
    pub fn from_own_text(name_addr: &str, tag: Option<&str>) -> PartyAddr {
        let mut text = String::with_capacity(name_addr.len() + tag.map_or(0, |t| t.len() + 5));
        text.push_str(name_addr);
        let tag = tag.map(|t| {
            text.push_str(";tag=");
            let start = text.len();
            text.push_str(t);
            start as u32..text.len() as u32
        });
        PartyAddr(Repr::Text {
            text: text.into_boxed_str(),
            tag,
            parsed: OnceLock::new(),
        })
    }

    /// Parses a From or To value whole (as [`NameAddr::parse`]).
    pub fn parse(value: &str) -> Result<PartyAddr, HeaderError> {
        NameAddr::parse(value).map(PartyAddr::from)
    }

    /// The tag parameter's value.
    pub fn tag(&self) -> Option<&str> {
        match &self.0 {
            Repr::Parsed(n) => n.tag(),
            Repr::Text { text, tag, .. } => tag
                .as_ref()
                .map(|r| &text[r.start as usize..r.end as usize]),
        }
    }

    /// Writes the value: as it came when it was read and not changed since.
    pub fn write_to<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        match &self.0 {
            Repr::Parsed(n) => n.write_to(f),
            Repr::Text { text, .. } => f.write_str(text),
        }
    }

    /// The value as text (`to_string` without the formatter).
    pub fn to_text(&self) -> String {
        match &self.0 {
            Repr::Parsed(n) => n.to_text(),
            Repr::Text { text, .. } => text.to_string(),
        }
    }

    /// The value parsed whole now, with the whole parse's error: a value read lazily
    /// turns out to belong to a request outside a dialog (see [`crate::sip::parse`]).
    pub(crate) fn into_parsed(self) -> Result<PartyAddr, HeaderError> {
        match self.0 {
            Repr::Parsed(_) => Ok(self),
            Repr::Text { text, .. } => PartyAddr::parse(&text),
        }
    }
}

/// Where a From or To value's header parameters start: after the `>` of a name-addr, or
/// at the first `;` (or white space) of an addr-spec, whose own parameters would be
/// ambiguous (RFC 3261 20.10); `None` for an unclosed quote or angle bracket.
fn header_params_start(value: &str) -> Option<usize> {
    let after_display = if value.starts_with('"') {
        quoted_end(value)?
    } else {
        0
    };
    let rest = &value[after_display..];
    match find_byte(rest, b'<') {
        Some(lt) => {
            let gt = find_byte(&rest[lt..], b'>')?;
            Some(after_display + lt + gt + 1)
        }
        // A quoted display name must be followed by `<`.
        None if after_display > 0 => None,
        None => Some(
            rest.bytes()
                .position(|c| matches!(c, b';' | b' ' | b'\t'))
                .unwrap_or(rest.len()),
        ),
    }
}

/// What a value read lazily stands for when its URI or display name turns out not to
/// parse: an empty `sip:` URI with the value's tag and no other parameter, rather than a
/// panic. Such a value is only ever of a response or an in-dialog request, which are
/// matched by their tags.
fn parse_or_placeholder(text: &str, tag: &Option<Range<u32>>) -> NameAddr {
    NameAddr::parse(text).unwrap_or_else(|_| {
        let mut n = NameAddr::new(Uri::sip(None, Host::Domain(String::new()), None));
        if let Some(r) = tag {
            n.set_tag(&text[r.start as usize..r.end as usize]);
        }
        n
    })
}

impl From<NameAddr> for PartyAddr {
    fn from(n: NameAddr) -> PartyAddr {
        PartyAddr(Repr::Parsed(Box::new(n)))
    }
}

impl Deref for PartyAddr {
    type Target = NameAddr;
    fn deref(&self) -> &NameAddr {
        match &self.0 {
            Repr::Parsed(n) => n,
            Repr::Text { text, tag, parsed } => {
                parsed.get_or_init(|| Box::new(parse_or_placeholder(text, tag)))
            }
        }
    }
}

impl DerefMut for PartyAddr {
    /// A change makes the parsed value the truth: the text is dropped.
    fn deref_mut(&mut self) -> &mut NameAddr {
        if let Repr::Text { text, tag, parsed } = &mut self.0 {
            let n = parsed
                .take()
                .unwrap_or_else(|| Box::new(parse_or_placeholder(text, tag)));
            self.0 = Repr::Parsed(n);
        }
        match &mut self.0 {
            Repr::Parsed(n) => n,
            Repr::Text { .. } => unreachable!("made Parsed just above"),
        }
    }
}

impl PartialEq for PartyAddr {
    fn eq(&self, other: &PartyAddr) -> bool {
        **self == **other
    }
}

impl Eq for PartyAddr {}

impl PartialEq<NameAddr> for PartyAddr {
    fn eq(&self, other: &NameAddr) -> bool {
        **self == *other
    }
}

impl fmt::Debug for PartyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Display for PartyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: &[&str] = &[
        "sipp <sip:sipp@127.0.0.1:47460>;tag=17601SIPpTag001",
        "<sip:service@127.0.0.1:56843>",
        "<sip:service@127.0.0.1:56843>;tag=17463SIPpTag011",
        "sip:bob@example.com;tag=abc",
        "sip:bob@example.com",
        "\"A <b> c\" <sip:a@b;transport=udp>;TAG=x;other",
        "\"Quoted;tag=no\" <sip:a@b>",
        "Bob <sips:bob@[2001:db8::1]:5061;maddr=x>;tag=1;x=\"q v\"",
        "<tel:+123;phone-context=x>;tag=t",
        "<sip:a@b> ; tag = spaced",
        "<sip:a@b>;tag=1;tag=2",
        "<sip:a@b>;tag",
    ];

    /// Read lazily or parsed whole, a value gives the same tag, the same parsed value,
    /// and text that parses to it.
    #[test]
    fn lazy_reads_agree_with_the_whole_parse() {
        for v in VALUES {
            let whole = NameAddr::parse(v).unwrap_or_else(|e| panic!("{v}: {e}"));
            let lazy = PartyAddr::read_lazily(v).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(lazy.tag(), whole.tag(), "{v}: tag");
            assert_eq!(*lazy, whole, "{v}: parsed");
            assert_eq!(NameAddr::parse(&lazy.to_text()).as_ref(), Ok(&whole), "{v}");
            assert_eq!(lazy.clone().into_parsed().as_ref(), Ok(&lazy), "{v}: whole");
        }
    }

    #[test]
    fn bad_header_parameters_or_brackets_are_refused_at_once() {
        for v in [
            "<sip:a@b>;tag=\"open",
            "<sip:a@b>;=x",
            "<sip:a@b>;;",
            "<sip:a@b",
            "\"open <sip:a@b>",
            "\"q\" sip:a@b",
            "<sip:a@b>;t@g=1",
        ] {
            assert!(PartyAddr::read_lazily(v).is_err(), "{v}");
            assert!(NameAddr::parse(v).is_err(), "{v}: the whole parse agrees");
        }
    }

    /// A URI that does not parse, read lazily from a response or an in-dialog request,
    /// keeps its tag and stands for an empty `sip:` URI; it is written back as it came.
    #[test]
    fn an_unparsable_uri_read_lazily_keeps_its_tag_and_its_text() {
        let v = "<sip:a b@c>;tag=t1";
        assert!(NameAddr::parse(v).is_err());
        let lazy = PartyAddr::read_lazily(v).unwrap();
        assert_eq!(lazy.tag(), Some("t1"));
        assert_eq!(lazy.uri.user, None);
        assert_eq!(
            lazy.params.iter().collect::<Vec<_>>(),
            [("tag", Some("t1"))]
        );
        assert_eq!(lazy.to_text(), v);
        assert!(
            lazy.clone().into_parsed().is_err(),
            "the whole parse still refuses it"
        );
        let mut changed = lazy.clone();
        changed.set_tag("t2");
        assert_eq!(changed.tag(), Some("t2"));
    }

    #[test]
    fn own_text_with_a_tag_reads_as_the_parse_of_the_same_text() {
        for (text, tag) in [
            ("<sip:a@b>", Some("t1")),
            ("Bob <sip:b@c;lr>;x=1", Some("t2")),
            ("\"A;B\" <sip:a@b>", None),
        ] {
            let own = PartyAddr::from_own_text(text, tag);
            let written = match tag {
                Some(t) => format!("{text};tag={t}"),
                None => text.to_owned(),
            };
            assert_eq!(own.to_text(), written);
            assert_eq!(own.tag(), tag);
            assert_eq!(*own, NameAddr::parse(&written).unwrap(), "{written}");
        }
    }

    #[test]
    fn a_change_writes_the_parsed_value() {
        let mut p = PartyAddr::read_lazily("Bob   <sip:b@c>").unwrap();
        assert_eq!(p.to_text(), "Bob   <sip:b@c>");
        p.set_tag("new");
        assert_eq!(p.tag(), Some("new"));
        assert_eq!(p.to_text(), "Bob <sip:b@c>;tag=new");
    }
}
