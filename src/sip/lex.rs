//! Character classes and small scanners of the RFC 3261 section 25 grammar.
//!
//! Written by hand: no maintained crate exposes the SIP ABNF classes, and these are a
//! few table lookups on the per-message hot path.

/// `token` characters (RFC 3261 25.1).
pub fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// Linear white space inside a header value (folding is already undone).
pub fn is_ws(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

pub fn trim_ws(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// Splits a header value on commas that are outside quoted strings and `<...>`
/// (RFC 3261 7.3.1: a header of several values may be one line, comma-separated).
/// Returns `None` when a quoted string is left open.
pub fn split_commas(value: &str) -> Option<Vec<&str>> {
    let bytes = value.as_bytes();
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

    #[test]
    fn commas_respect_quotes_and_angles() {
        let v = split_commas(r#""a, b" <sip:x@y;p=1,2>, <sip:z@w>"#).unwrap();
        assert_eq!(v, vec![r#""a, b" <sip:x@y;p=1,2>"#, "<sip:z@w>"]);
        assert!(split_commas("\"open").is_none());
    }
}
