//! Character classes and small scanners of the RFC 3261 section 25 grammar.
//!
//! Written by hand: no maintained crate exposes the SIP ABNF classes, and these are a
//! few table lookups on the per-message hot path.

/// `token` characters (RFC 3261 25.1), by definition.
const fn token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Characters of a URI or header parameter name or unquoted value: token, plus the URI's
/// param-unreserved, escapes and IPv6 brackets.
const fn param_char(c: u8) -> bool {
    token_char(c) || matches!(c, b'[' | b']' | b'/' | b':' | b'&' | b'$')
}

/// One byte's classes as bits of a table entry: a lookup per byte instead of a chain of
/// comparisons (issue 14: every parameter name and value of every message is checked).
const TOKEN: u8 = 1;
const PARAM: u8 = 2;
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = if token_char(b) { TOKEN } else { 0 } | if param_char(b) { PARAM } else { 0 };
        c += 1;
    }
    t
};

/// `token` characters (RFC 3261 25.1).
#[inline]
pub fn is_token_char(c: u8) -> bool {
    CLASS[c as usize] & TOKEN != 0
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// Whether every byte of `s` may appear in a parameter name or unquoted value.
#[inline]
pub(crate) fn is_param_text(s: &str) -> bool {
    s.bytes().all(|c| CLASS[c as usize] & PARAM != 0)
}

/// Linear white space inside a header value (folding is already undone).
pub fn is_ws(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

pub fn trim_ws(s: &str) -> &str {
    // On bytes: `trim_matches` with a char predicate decodes UTF-8 at both ends (issue
    // 14: ~1.5% of a call's instructions). Space and tab are ASCII, so both ends are
    // character boundaries.
    let b = s.as_bytes();
    let start = b.iter().position(|&c| !is_ws(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|&c| !is_ws(c)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// Splits a header value on commas that are outside quoted strings and `<...>`
/// (RFC 3261 7.3.1: a header of several values may be one line, comma-separated).
/// Returns `None` when a quoted string is left open.
pub fn split_commas(value: &str) -> Option<Vec<&str>> {
    let bytes = value.as_bytes();
    // Most values (a Via, a Contact) are one element: without a comma or a quote there is
    // nothing to split and no quote to leave open, and one SIMD search says so (issue 14:
    // the byte loop below was ~900 instructions a Via).
    if memchr::memchr2(b',', b'"', bytes).is_none() {
        return Some(vec![trim_ws(value)]);
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_quote = false;
    let mut in_angle = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if in_quote {
            match c {
                b'\\' => i += 1,
                b'"' => in_quote = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_quote = true,
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                b',' if !in_angle => {
                    out.push(trim_ws(&value[start..i]));
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    if in_quote {
        return None;
    }
    out.push(trim_ws(&value[start..]));
    Some(out)
}

/// Finds the end of a quoted string that starts at `s[0] == '"'`; returns the index just
/// past the closing quote.
pub fn quoted_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    debug_assert_eq!(b.first(), Some(&b'"'));
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table gives what the definitions give, for every byte.
    #[test]
    fn class_table_matches_the_definitions() {
        for b in 0..=255u8 {
            assert_eq!(is_token_char(b), token_char(b), "{b}");
            let s = [b];
            let text = std::str::from_utf8(&s).unwrap_or("");
            if !text.is_empty() {
                assert_eq!(is_param_text(text), param_char(b), "{b}");
            }
        }
        assert!(is_token_char(b'~') && !is_token_char(b'[') && is_param_text("[::1]"));
    }

    #[test]
    fn commas_respect_quotes_and_angles() {
        let v = split_commas(r#""a, b" <sip:x@y;p=1,2>, <sip:z@w>"#).unwrap();
        assert_eq!(v, vec![r#""a, b" <sip:x@y;p=1,2>"#, "<sip:z@w>"]);
        assert!(split_commas("\"open").is_none());
    }

    /// One element (no comma, no quote) takes the fast path; it must give what the
    /// scanner gives: the value trimmed, angle brackets and all.
    #[test]
    fn one_element_values_are_trimmed_not_split() {
        for v in [
            "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1",
            "  <sip:a@b;lr>\t",
            "<sip:a@b",
            "",
            " \t ",
            "a\\b",
        ] {
            assert_eq!(split_commas(v), Some(vec![trim_ws(v)]), "{v:?}");
        }
        assert_eq!(split_commas(" a , b "), Some(vec!["a", "b"]));
        assert_eq!(split_commas("<a,b>"), Some(vec!["<a,b>"]));
    }
}

/// The first `byte` (ASCII) in `s`. `str::find(char)` encodes the char and runs core's
/// generic searcher; this is one memchr (issue 14: char searches were ~4% of a call's
/// instructions). The index is a character boundary because `byte` is ASCII.
///
/// Haystacks under 16 bytes (the pieces of a URI: a user, a host and port, a parameter)
/// are read a byte at a time: memchr's entry and set-up cost more than such a scan.
#[inline]
pub(crate) fn find_byte(s: &str, byte: u8) -> Option<usize> {
    debug_assert!(byte.is_ascii());
    let b = s.as_bytes();
    if b.len() < 16 {
        return b.iter().position(|&c| c == byte);
    }
    memchr::memchr(byte, b)
}

/// The first `byte` in `b` at or after `from`, read eight bytes at a time in a `u64`
/// (SWAR). For the ends of a message's lines: the next one is tens of bytes away, where
/// memchr's set-up per call (~150 instructions each, ten lines a message) costs more than
/// the search. Written here because memchr exposes no such entry for near matches.
pub(crate) fn find_byte_near(b: &[u8], from: usize, byte: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let pattern = ONES * u64::from(byte);
    let rest = b.get(from..)?;
    let mut words = rest.chunks_exact(8);
    let mut at = from;
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w) ^ pattern;
        // A byte of `x` is zero where `byte` is; the lowest flagged byte is exact (a borrow
        // only flags bytes above a zero one).
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&c| c == byte)
        .map(|i| at + i)
}

/// `s.split_once(byte)` with [`find_byte`].
#[inline]
pub(crate) fn split_once_byte(s: &str, byte: u8) -> Option<(&str, &str)> {
    find_byte(s, byte).map(|i| (&s[..i], &s[i + 1..]))
}

/// The first byte of `s` that `stop` accepts (all ASCII), e.g. the end of a token.
#[inline]
pub(crate) fn find_any(s: &str, stop: impl Fn(u8) -> bool) -> Option<usize> {
    s.bytes().position(stop)
}

#[cfg(test)]
mod byte_search_tests {
    use super::*;

    #[test]
    fn byte_searches_agree_with_str_methods() {
        for s in [
            "",
            " ",
            "\t \t",
            "a",
            " a ",
            "\tab c\t ",
            "é ü",
            " é",
            "x:y:z",
            "<a@b>;x",
            "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1",
            "aaaaaaa:bbbbbbbbb<cccccccc>ddddddddddddddd;eeeeeeee@",
            "ééééééé:é<éééééééé>é;é@é",
        ] {
            assert_eq!(
                trim_ws(s),
                s.trim_matches(|c| c == ' ' || c == '\t'),
                "{s:?}"
            );
            for b in [b':', b'<', b'>', b';', b'@'] {
                assert_eq!(find_byte(s, b), s.find(b as char), "{s:?} {b}");
                for from in 0..=s.len() {
                    assert_eq!(
                        find_byte_near(s.as_bytes(), from, b),
                        s.as_bytes()[from..]
                            .iter()
                            .position(|&c| c == b)
                            .map(|i| i + from),
                        "{s:?} {b} from {from}"
                    );
                }
                assert_eq!(split_once_byte(s, b), s.split_once(b as char), "{s:?} {b}");
            }
            assert_eq!(
                find_any(s, |c| matches!(c, b';' | b' ' | b'\t')),
                s.find([';', ' ', '\t'])
            );
        }
    }
}
