//! The caller's INVITE as the call keeps it: whole while the call is set up (responses are
//! built from it, the dial plan reads its headers, the B side's INVITE copies its body),
//! then, once both 2xx are ACKed, only what the call's life needs: its Call-ID, From tag,
//! CSeq and Max-Forwards, and the From, To and Request-URI as text, parsed again in the
//! rare moments they are read (a transfer dials from the caller's From, a record names the
//! parties). Issue 14: the parsed `Request` is 816 bytes inline plus its headers' heap, and
//! an established call may last hours.

use crate::sip::{Headers, NameAddr, Reply, Request, Response, Uri};
use std::borrow::Cow;

pub(super) enum CallerInvite {
    Whole(Box<Request>),
    Kept(Box<Kept>),
}

/// What is left of the INVITE of an established call.
pub(super) struct Kept {
    /// `call_id \n from_tag \n from \n to \n request-uri`.
    text: Box<str>,
    cseq: u32,
    max_forwards: Option<u32>,
}

impl Kept {
    fn part(&self, i: usize) -> &str {
        self.text.split('\n').nth(i).unwrap_or("")
    }
}

impl CallerInvite {
    pub(super) fn new(invite: Request) -> CallerInvite {
        CallerInvite::Whole(Box::new(invite))
    }

    /// The whole request, while the call is being set up.
    pub(super) fn whole(&self) -> Option<&Request> {
        match self {
            CallerInvite::Whole(r) => Some(r),
            CallerInvite::Kept(_) => None,
        }
    }

    /// A response to it (None once the call is established: nothing answers the INVITE
    /// any more, its Vias are gone). One that makes a dialog (101-299) copies the
    /// request's Record-Route (RFC 3261 12.1.1): a record-routing proxy in front (a load
    /// balancer) then stays on the caller's in-dialog path.
    pub(super) fn response(&self, status: u16) -> Option<Response> {
        self.whole().map(|r| {
            let mut resp = r.response(status);
            self.record_routes(status, &mut resp.headers);
            resp
        })
    }

    /// The same, borrowed, for a response written at once (see [`Reply`]): its headers
    /// are the caller's, who starts them with [`CallerInvite::record_routes`].
    pub(super) fn reply(&self, status: u16) -> Option<Reply<'_>> {
        self.whole().map(|r| r.reply(status))
    }

    /// The request's Record-Route, for a response with `status` that makes a dialog
    /// (101-299, RFC 3261 12.1.1).
    pub(super) fn record_routes(&self, status: u16, into: &mut Headers) {
        if let (Some(r), true) = (self.whole(), (101..300).contains(&status)) {
            for rr in r.headers.get_all("Record-Route") {
                into.push("Record-Route", rr);
            }
        }
    }

    pub(super) fn call_id(&self) -> &str {
        match self {
            CallerInvite::Whole(r) => &r.base.call_id,
            CallerInvite::Kept(k) => k.part(0),
        }
    }

    pub(super) fn caller_tag(&self) -> &str {
        match self {
            CallerInvite::Whole(r) => r.base.from.tag().unwrap_or(""),
            CallerInvite::Kept(k) => k.part(1),
        }
    }

    pub(super) fn from(&self) -> Cow<'_, NameAddr> {
        match self {
            CallerInvite::Whole(r) => Cow::Borrowed(&r.base.from),
            CallerInvite::Kept(k) => Cow::Owned(reparse_name_addr(k.part(2))),
        }
    }

    pub(super) fn to(&self) -> Cow<'_, NameAddr> {
        match self {
            CallerInvite::Whole(r) => Cow::Borrowed(&r.base.to),
            CallerInvite::Kept(k) => Cow::Owned(reparse_name_addr(k.part(3))),
        }
    }

    pub(super) fn uri(&self) -> Cow<'_, Uri> {
        match self {
            CallerInvite::Whole(r) => Cow::Borrowed(&r.uri),
            CallerInvite::Kept(k) => Cow::Owned(reparse_uri(k.part(4))),
        }
    }

    /// The CSeq number (the caller's ACK for the 2xx carries it).
    pub(super) fn cseq(&self) -> u32 {
        match self {
            CallerInvite::Whole(r) => r.base.cseq.seq,
            CallerInvite::Kept(k) => k.cseq,
        }
    }

    pub(super) fn max_forwards(&self) -> Option<u32> {
        match self {
            CallerInvite::Whole(r) => r.max_forwards,
            CallerInvite::Kept(k) => k.max_forwards,
        }
    }

    /// The call is established: keep only what its life needs.
    pub(super) fn compact(&mut self) {
        let CallerInvite::Whole(r) = self else {
            return;
        };
        // Pieces appended, not format!: this runs once per call (issue 14).
        let mut text = String::with_capacity(256);
        text.push_str(&r.base.call_id);
        text.push('\n');
        text.push_str(r.base.from.tag().unwrap_or(""));
        text.push('\n');
        let _ = r.base.from.write_to(&mut text);
        text.push('\n');
        let _ = r.base.to.write_to(&mut text);
        text.push('\n');
        let _ = r.uri.write_to(&mut text);
        *self = CallerInvite::Kept(Box::new(Kept {
            // A copy of exactly its length: the allocator shrinks a block in place (keeping
            // all 256 bytes) when the new size is at least half of it.
            text: Box::from(text.as_str()),
            cseq: r.base.cseq.seq,
            max_forwards: r.max_forwards,
        }));
    }
}

/// The From or To of a request we parsed, written and read back: it parses. Should it not
/// (a bug), the call goes on with an anonymous party rather than failing.
fn reparse_name_addr(text: &str) -> NameAddr {
    NameAddr::parse(text).unwrap_or_else(|_| NameAddr::new(reparse_uri("sip:anonymous@invalid")))
}

fn reparse_uri(text: &str) -> Uri {
    Uri::parse(text)
        .unwrap_or_else(|_| Uri::parse("sip:anonymous@invalid").expect("a literal URI parses"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, SipMessage};

    #[test]
    fn what_an_established_call_keeps_reads_as_the_whole_did() {
        let text = "INVITE sip:bob;x=1@example.com:5070;transport=udp SIP/2.0\r\n\
                    Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\n\
                    From: \"Alice A\" <sip:alice@example.com>;tag=abc;x=y\r\n\
                    To: <sip:bob@example.com>\r\n\
                    Call-ID: call-1@10.0.0.1\r\n\
                    CSeq: 7 INVITE\r\n\
                    Max-Forwards: 12\r\n\
                    Content-Length: 0\r\n\r\n";
        let Ok((SipMessage::Request(req), _)) = parse(text.as_bytes()) else {
            panic!("parses")
        };
        let mut inv = CallerInvite::new(req.clone());
        inv.compact();
        assert!(inv.whole().is_none());
        assert_eq!(inv.call_id(), "call-1@10.0.0.1");
        assert_eq!(inv.caller_tag(), "abc");
        assert_eq!(*inv.from(), *req.base.from);
        assert_eq!(*inv.to(), *req.base.to);
        assert_eq!(*inv.uri(), req.uri);
        assert_eq!(inv.cseq(), 7);
        assert_eq!(inv.max_forwards(), Some(12));
        assert!(std::mem::size_of::<CallerInvite>() <= 16);
    }

    #[test]
    fn dialog_making_responses_copy_record_route() {
        let text = "INVITE sip:bob@example.com SIP/2.0\r\n\
                    Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK2\r\n\
                    Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\n\
                    Record-Route: <sip:10.0.0.9;lr;ftag=abc>\r\n\
                    Record-Route: <sip:10.0.0.8;lr>\r\n\
                    From: <sip:alice@example.com>;tag=abc\r\n\
                    To: <sip:bob@example.com>\r\n\
                    Call-ID: call-2@10.0.0.1\r\n\
                    CSeq: 1 INVITE\r\n\
                    Content-Length: 0\r\n\r\n";
        let Ok((SipMessage::Request(req), _)) = parse(text.as_bytes()) else {
            panic!("parses")
        };
        let inv = CallerInvite::new(req);
        for status in [180, 183, 200] {
            let r = inv.response(status).unwrap();
            let rr: Vec<&str> = r.headers.get_all("Record-Route").collect();
            assert_eq!(rr, ["<sip:10.0.0.9;lr;ftag=abc>", "<sip:10.0.0.8;lr>"]);
        }
        for status in [100, 486] {
            let r = inv.response(status).unwrap();
            assert_eq!(r.headers.get_all("Record-Route").count(), 0, "{status}");
        }
    }
}
