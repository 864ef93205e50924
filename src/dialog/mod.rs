//! Dialogs (RFC 3261 section 12): the state two user agents share for a call leg, the
//! construction of requests inside it, the one table of every dialog of the server to the
//! usage that owns it ([`DialogTable`]) and the broadcast of call dialogs' states for the
//! dialog event package ([`watch`]).
//!
//! Owns: dialog identifiers, route set, remote target, the CSeq space of each side, the
//! table's index. Must not touch: transaction state or transports (it builds and checks
//! messages and hands requests to a [`DialogUsage`]); what a usage does with a request
//! (the B2BUA's calls and presence's subscriptions implement [`DialogUsage`] above).

pub mod session_timer;
mod table;
pub mod watch;

pub use table::{
    DialogId, DialogTable, DialogUsage, Invites, Subscriptions, Unmatched, Usage, UsageIndex,
};

use crate::sip::{
    BaseHeaders, CSeq, Headers, Method, NameAddr, PartyAddr, Request, Response, Uri, Via,
};
use crate::transport::Target;
use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialogState {
    /// Created by a provisional response with a To tag.
    Early,
    Confirmed,
    Terminated,
}

/// A dialog as one side sees it.
///
/// Compact (issue 14: memory per established call): the identifiers, both URIs, the
/// remote target and the route set live as text in one allocation; the URIs are parsed
/// again when a request is built (a BYE or re-INVITE now and then, not on every packet).
#[derive(Debug, Clone)]
pub struct Dialog {
    /// Call-ID, local tag, remote tag, local URI, remote URI, remote target, then the
    /// route set, one entry a line (a header value holds no line break once parsed).
    text: Box<str>,
    /// Where each of the first six parts of `text` ends.
    ends: [u32; 6],
    /// Last CSeq we sent; ACK and CANCEL reuse the INVITE's (RFC 3261 12.2.1.1).
    pub local_seq: u32,
    /// Highest CSeq the peer sent, for the ordering check of 12.2.2.
    pub remote_seq: Option<u32>,
    pub state: DialogState,
    /// Where requests of this dialog go: the flow it was created on, so that peers behind
    /// NAT are reached at the address and port they used (RFC 5626's flow idea; RFC 3581).
    pub flow: Target,
}

/// The text parts of a dialog, as [`Dialog::from_parts`] takes them.
pub struct DialogParts<'a> {
    pub call_id: &'a str,
    pub local_tag: &'a str,
    pub remote_tag: &'a str,
    /// Our From/To header value (without tag).
    pub local_uri: &'a str,
    pub remote_uri: &'a str,
    /// The peer's Contact.
    pub remote_target: &'a str,
    /// Record-Route as seen from our side (RFC 3261 12.1.1 / 12.1.2).
    pub route_set: &'a [String],
}

fn without_tag(n: &NameAddr) -> String {
    // Written without the tag rather than cloned and edited (issue 14: a copy of every
    // part of the name-addr, twice per dialog).
    n.to_text_without_tag()
}

fn contact_uri(headers: &Headers) -> Option<Uri> {
    NameAddr::parse(headers.first_item("Contact")?)
        .ok()
        .map(|n| n.uri)
}

fn record_route(headers: &Headers) -> Vec<String> {
    headers
        .list("Record-Route")
        .iter()
        .filter_map(|r| NameAddr::parse(r).ok())
        .map(|r| r.to_text())
        .collect()
}

impl Dialog {
    /// A dialog from its parts (e.g. as stored).
    pub fn from_parts(
        parts: &DialogParts<'_>,
        local_seq: u32,
        remote_seq: Option<u32>,
        state: DialogState,
        flow: Target,
    ) -> Dialog {
        let fixed = [
            parts.call_id,
            parts.local_tag,
            parts.remote_tag,
            parts.local_uri,
            parts.remote_uri,
            parts.remote_target,
        ];
        let len = fixed.iter().map(|p| p.len()).sum::<usize>()
            + parts.route_set.iter().map(|r| r.len() + 1).sum::<usize>();
        let mut text = String::with_capacity(len);
        let mut ends = [0u32; 6];
        for (end, part) in ends.iter_mut().zip(fixed) {
            text.push_str(part);
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        for r in parts.route_set {
            text.push_str(r);
            text.push('\n');
        }
        Dialog {
            text: text.into_boxed_str(),
            ends,
            local_seq,
            remote_seq,
            state,
            flow,
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize).unwrap_or("")
    }

    pub fn call_id(&self) -> &str {
        self.part(0)
    }
    pub fn local_tag(&self) -> &str {
        self.part(1)
    }
    pub fn remote_tag(&self) -> &str {
        self.part(2)
    }
    /// Our From/To header value (without tag), as text.
    pub fn local_uri_text(&self) -> &str {
        self.part(3)
    }
    /// The peer's From/To header value (without tag), as text.
    pub fn remote_uri_text(&self) -> &str {
        self.part(4)
    }
    /// Our From/To header value (without tag).
    pub fn local_uri(&self) -> NameAddr {
        parse_name_addr(self.local_uri_text())
    }
    pub fn remote_uri(&self) -> NameAddr {
        parse_name_addr(self.remote_uri_text())
    }
    /// The peer's Contact, as text.
    pub fn remote_target_text(&self) -> &str {
        self.part(5)
    }
    /// The peer's Contact.
    pub fn remote_target(&self) -> Uri {
        Uri::parse(self.remote_target_text()).unwrap_or_else(|_| self.remote_uri().uri)
    }
    /// Record-Route as seen from our side (RFC 3261 12.1.1 / 12.1.2), one entry each.
    pub fn route_set(&self) -> impl Iterator<Item = &str> {
        self.text
            .get(self.ends[5] as usize..)
            .unwrap_or("")
            .split_terminator('\n')
    }

    /// The dialog a UAS creates when it answers `req` with To tag `local_tag`
    /// (RFC 3261 12.1.1). `flow` is where the request came from.
    pub fn uas(req: &Request, local_tag: &str, flow: Target) -> Dialog {
        let target = contact_uri(&req.headers).unwrap_or_else(|| req.base.from.uri.clone());
        Dialog::from_parts(
            &DialogParts {
                call_id: &req.base.call_id,
                local_tag,
                remote_tag: req.base.from.tag().unwrap_or(""),
                local_uri: &without_tag(&req.base.to),
                remote_uri: &without_tag(&req.base.from),
                remote_target: &target.to_text(),
                route_set: &record_route(&req.headers),
            },
            0,
            Some(req.base.cseq.seq),
            DialogState::Early,
            flow,
        )
    }

    /// The dialog a UAC gets from a response with a To tag to its request
    /// (RFC 3261 12.1.2): the route set is the Record-Route reversed.
    pub fn uac(req: &Request, resp: &Response, flow: Target) -> Dialog {
        let mut route_set = record_route(&resp.headers);
        route_set.reverse();
        let target = contact_uri(&resp.headers).unwrap_or_else(|| req.uri.clone());
        Dialog::from_parts(
            &DialogParts {
                call_id: &req.base.call_id,
                local_tag: req.base.from.tag().unwrap_or(""),
                remote_tag: resp.base.to.tag().unwrap_or(""),
                local_uri: &without_tag(&req.base.from),
                remote_uri: &without_tag(&req.base.to),
                remote_target: &target.to_text(),
                route_set: &route_set,
            },
            req.base.cseq.seq,
            None,
            if resp.is_success() {
                DialogState::Confirmed
            } else {
                DialogState::Early
            },
            flow,
        )
    }

    /// A target refresh (re-INVITE, UPDATE, their 2xx) replaces the remote target
    /// (RFC 3261 12.2.1.2 / 12.2.2).
    pub fn refresh_target(&mut self, headers: &Headers) {
        let Some(uri) = contact_uri(headers) else {
            return;
        };
        let target = uri.to_text();
        if target == self.remote_target_text() {
            return;
        }
        let routes: Vec<String> = self.route_set().map(str::to_owned).collect();
        let parts = DialogParts {
            call_id: self.call_id(),
            local_tag: self.local_tag(),
            remote_tag: self.remote_tag(),
            local_uri: self.local_uri_text(),
            remote_uri: self.remote_uri_text(),
            remote_target: &target,
            route_set: &routes,
        };
        *self = Dialog::from_parts(
            &parts,
            self.local_seq,
            self.remote_seq,
            self.state,
            self.flow,
        );
    }

    /// Checks an incoming in-dialog request's CSeq (RFC 3261 12.2.2): lower than the last
    /// one means out of order (answer 500). ACK and CANCEL are exempt.
    pub fn accept_remote_cseq(&mut self, req: &Request) -> bool {
        if matches!(req.method, Method::Ack | Method::Cancel) {
            return true;
        }
        let seq = req.base.cseq.seq;
        match self.remote_seq {
            Some(last) if seq < last => false,
            _ => {
                self.remote_seq = Some(seq);
                true
            }
        }
    }

    /// Builds a request inside the dialog (RFC 3261 12.2.1.1). `via` is the caller's (a
    /// fresh branch); CSeq increments except for ACK, which reuses `ack_seq`.
    pub fn request(&mut self, method: Method, via: Via, contact: Option<&str>) -> Request {
        let seq = if method == Method::Ack {
            self.local_seq
        } else {
            self.local_seq += 1;
            self.local_seq
        };
        self.request_with_seq(method, seq, via, contact)
    }

    /// Takes the next local CSeq number (a request sent again with credentials, RFC 3261
    /// 22.2, goes with a new CSeq).
    pub fn next_seq(&mut self) -> u32 {
        self.local_seq += 1;
        self.local_seq
    }

    /// Builds an ACK for the INVITE with CSeq `invite_seq` (RFC 3261 13.2.2.4).
    pub fn ack(&self, invite_seq: u32, via: Via) -> Request {
        self.request_with_seq(Method::Ack, invite_seq, via, None)
    }

    fn request_with_seq(
        &self,
        method: Method,
        seq: u32,
        via: Via,
        contact: Option<&str>,
    ) -> Request {
        // From and To are our stored text with the tags, not parsed again (they are read
        // for their tags; a name-addr's parse was ~2,200 instructions, issue 14).
        let from = PartyAddr::from_own_text(self.local_uri_text(), Some(self.local_tag()));
        let remote_tag = Some(self.remote_tag()).filter(|t| !t.is_empty());
        let to = PartyAddr::from_own_text(self.remote_uri_text(), remote_tag);
        let mut headers = Headers::new();
        for r in self.route_set() {
            headers.push("Route", r);
        }
        if let Some(c) = contact {
            headers.push("Contact", c);
        }
        Request {
            method: method.clone(),
            uri: self.remote_target(),
            version: "2.0".into(),
            base: BaseHeaders {
                via: vec![via],
                from,
                to,
                call_id: self.call_id().to_owned(),
                cseq: CSeq { seq, method },
            },
            max_forwards: Some(70),
            headers,
            body: Bytes::new(),
        }
    }

    /// Whether an in-dialog request belongs here: Call-ID, our tag in To, theirs in From.
    pub fn matches(&self, req: &Request) -> bool {
        req.base.call_id == self.call_id()
            && req.base.to.tag() == Some(self.local_tag())
            && req.base.from.tag().unwrap_or("") == self.remote_tag()
    }
}

/// Parses a URI this module wrote itself; a failure (impossible for our own text) gives
/// an empty `sip:` URI rather than a panic.
fn parse_name_addr(text: &str) -> NameAddr {
    NameAddr::parse(text).unwrap_or_else(|_| {
        NameAddr::new(Uri::sip(
            None,
            crate::sip::Host::Domain(String::new()),
            None,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written directly, it is what removing the tag from a copy gave.
    #[test]
    fn without_tag_is_the_name_addr_minus_its_tag() {
        for text in [
            "\"Alice\" <sip:alice@a.example;transport=tcp>;tag=1928301774",
            "<sip:bob@b.example>;x=1;TAG=abc;lr",
            "sip:carol@c.example",
            "Dave <sips:d@[2001:db8::1]:5061>;tag=9;q=0.5",
        ] {
            let n = NameAddr::parse(text).expect(text);
            let mut copy = n.clone();
            copy.params.remove("tag");
            assert_eq!(without_tag(&n), copy.to_text(), "{text}");
        }
    }
    use crate::sip::{parse, SipMessage};
    use crate::transport::TransportKind;

    fn req() -> Request {
        let text = "INVITE sip:bob@b.example SIP/2.0\r\n\
            Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
            From: Alice <sip:alice@a.example>;tag=at\r\n\
            To: <sip:bob@b.example>\r\n\
            Call-ID: d1\r\nCSeq: 5 INVITE\r\n\
            Contact: <sip:alice@192.0.2.1:5070>\r\n\
            Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n\
            Content-Length: 0\r\n\r\n";
        match parse(text.as_bytes()).unwrap().0 {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    fn flow() -> Target {
        Target {
            transport: TransportKind::Udp,
            addr: "192.0.2.1:5070".parse().unwrap(),
            connection: None,
        }
    }

    #[test]
    fn uas_dialog_and_in_dialog_request() {
        let r = req();
        let mut d = Dialog::uas(&r, "bt", flow());
        assert_eq!(d.remote_tag(), "at");
        assert_eq!(d.remote_target().to_string(), "sip:alice@192.0.2.1:5070");
        assert_eq!(d.route_set().count(), 2);
        let via = Via::parse("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx").unwrap();
        let bye = d.request(Method::Bye, via, None);
        assert_eq!(bye.base.to.tag(), Some("at"));
        assert_eq!(bye.base.from.tag(), Some("bt"));
        assert_eq!(bye.base.cseq.seq, 1);
        assert_eq!(bye.headers.get("Route"), Some("<sip:p1.example;lr>"));
        // 12.2.2: an older CSeq is refused, a newer one accepted.
        let mut old = r.clone();
        old.base.cseq.seq = 4;
        old.method = Method::Info;
        assert!(!d.accept_remote_cseq(&old));
        old.base.cseq.seq = 6;
        assert!(d.accept_remote_cseq(&old));
    }

    #[test]
    fn a_target_refresh_keeps_the_route_set_and_identifiers() {
        let r = req();
        let mut d = Dialog::uas(&r, "bt", flow());
        let mut h = Headers::new();
        h.push("Contact", "<sip:alice@192.0.2.9:5071;transport=udp>");
        d.refresh_target(&h);
        assert_eq!(
            d.remote_target().to_string(),
            "sip:alice@192.0.2.9:5071;transport=udp"
        );
        assert_eq!(
            d.route_set().collect::<Vec<_>>(),
            ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]
        );
        assert_eq!(
            (d.call_id(), d.local_tag(), d.remote_tag()),
            ("d1", "bt", "at")
        );
        assert_eq!(d.remote_uri().to_string(), "Alice <sip:alice@a.example>");
        assert_eq!(d.local_uri().to_string(), "<sip:bob@b.example>");
    }
}
