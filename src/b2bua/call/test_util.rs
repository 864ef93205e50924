//! Fixtures shared by the call parts' unit tests.

use crate::sip::{parse, Request, SipMessage};

/// The caller's INVITE (supports 100rel, has a Contact).
pub(super) fn caller_invite() -> Request {
    let text = "INVITE sip:bob@b2bua.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKcaller\r\n\
         From: <sip:alice@a.example>;tag=alice\r\n\
         To: <sip:bob@b2bua.example>\r\n\
         Call-ID: caller@a.example\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@192.0.2.1>\r\n\
         Supported: 100rel\r\n\
         Content-Length: 0\r\n\r\n";
    match parse(text.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        other => panic!("fixture does not parse: {other:?}"),
    }
}
