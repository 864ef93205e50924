//! Stream framing for SIP over TCP (RFC 3261 18.3): a message is its header section plus
//! exactly Content-Length octets of body.
//!
//! Owns: deciding where one message ends in a byte stream. Must not touch: parsing beyond
//! Content-Length (the message parser does that) or the connection itself.

use crate::sip::find_head_end;

/// What the start of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Not enough octets yet.
    Incomplete,
    /// CR/LF octets before a start line: keep-alives (RFC 5626 3.5.1) or the empty lines
    /// RFC 3261 7.5 says to ignore. Skip this many octets.
    KeepAlive(usize),
    /// A whole message of this many octets.
    Message(usize),
    /// More than the maximum message size: the connection must be closed.
    TooLarge,
    /// A complete header section without Content-Length; on a stream that is an error
    /// (RFC 3261 18.3, 20.14). The value is the length of the header section with its
    /// blank line.
    NoLength(usize),
    /// Content-Length is there but not a number (or given twice, differently).
    BadLength(usize),
}

/// Finds the first frame in `buf`; `max` is the largest message accepted.
pub(crate) fn frame(buf: &[u8], max: usize) -> Frame {
    let skip = buf
        .iter()
        .take_while(|&&c| c == b'\r' || c == b'\n')
        .count();
    if skip > 0 {
        return Frame::KeepAlive(skip);
    }
    let Some((head_len, body_start)) = find_head_end(buf) else {
        return if buf.len() > max {
            Frame::TooLarge
        } else {
            Frame::Incomplete
        };
    };
    if body_start > max {
        return Frame::TooLarge;
    }
    let length = match content_length(&buf[..head_len]) {
        Ok(Some(n)) => n,
        Ok(None) => return Frame::NoLength(body_start),
        Err(()) => return Frame::BadLength(body_start),
    };
    match body_start.checked_add(length) {
        Some(total) if total <= max => {
            if buf.len() >= total {
                Frame::Message(total)
            } else {
                Frame::Incomplete
            }
        }
        _ => Frame::TooLarge,
    }
}

/// The Content-Length (or compact `l`, RFC 3261 7.3.3) of a header section; folded lines
/// (RFC 3261 7.3.1) are joined. Two different values are an error.
fn content_length(head: &[u8]) -> Result<Option<usize>, ()> {
    let mut found: Option<usize> = None;
    let mut lines = head
        .split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .skip(1) // the start line
        .peekable();
    while let Some(line) = lines.next() {
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let mut value = line[colon + 1..].trim_ascii().to_vec();
        while let Some(next) = lines.next_if(|l| l.starts_with(b" ") || l.starts_with(b"\t")) {
            value.extend_from_slice(next.trim_ascii());
        }
        if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n: usize = std::str::from_utf8(&value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(())?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h\r\nContent-Length: 4\r\n\r\nbody";

    #[test]
    fn whole_and_partial() {
        assert_eq!(frame(MSG, 1000), Frame::Message(MSG.len()));
        for cut in 0..MSG.len() {
            assert_eq!(frame(&MSG[..cut], 1000), Frame::Incomplete, "cut at {cut}");
        }
        let mut two = MSG.to_vec();
        two.extend_from_slice(MSG);
        assert_eq!(frame(&two, 1000), Frame::Message(MSG.len()));
    }

    #[test]
    fn keepalives_and_compact() {
        assert_eq!(frame(b"\r\n\r\nOPT", 1000), Frame::KeepAlive(4));
        let m = b"OPTIONS sip:a@b SIP/2.0\r\nl : 2\r\n\r\nhi";
        assert_eq!(frame(m, 1000), Frame::Message(m.len()));
        let folded = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length:\r\n 2\r\n\r\nhi";
        assert_eq!(frame(folded, 1000), Frame::Message(folded.len()));
    }

    #[test]
    fn errors() {
        let m = b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n";
        assert_eq!(frame(m, 1000), Frame::NoLength(m.len()));
        let m = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: x\r\n\r\n";
        assert_eq!(frame(m, 1000), Frame::BadLength(m.len()));
        let m = b"OPTIONS sip:a@b SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(frame(m, 1000), Frame::BadLength(m.len()));
        assert_eq!(frame(MSG, MSG.len() - 1), Frame::TooLarge);
        assert_eq!(frame(&[b'A'; 100], 50), Frame::TooLarge);
        let huge = b"OPTIONS sip:a@b SIP/2.0\r\nl: 9999999999\r\n\r\n";
        assert_eq!(frame(huge, 1000), Frame::TooLarge);
    }
}
