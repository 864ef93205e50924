//! Dialogs (RFC 3261 section 12): the state two user agents share for a call leg, the
//! construction of requests inside it, the one table of every dialog of the server to the
//! usage that owns it ([`DialogTable`]) and the broadcast of call dialogs' states for the
//! dialog event package ([`watch`]).
//!
//! Owns: dialog identifiers, route set, remote target, the CSeq space of each side, the
//! table's index. Must not touch: transaction state or transports (it builds and checks
//! messages and hands requests to a [`DialogUsage`]); what a usage does with a request
//! (the B2BUA's calls and presence's subscriptions implement [`DialogUsage`] above).

mod table;
pub mod watch;

pub use table::{
    DialogId, DialogTable, DialogUsage, Invites, Subscriptions, Unmatched, Usage, UsageIndex,
};

use crate::sip::{BaseHeaders, CSeq, Headers, Method, NameAddr, Request, Response, Uri, Via};
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
#[derive(Debug, Clone)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// Our From/To header value (without tag).
    pub local_uri: NameAddr,
    pub remote_uri: NameAddr,
    /// Last CSeq we sent; ACK and CANCEL reuse the INVITE's (RFC 3261 12.2.1.1).
    pub local_seq: u32,
    /// Highest CSeq the peer sent, for the ordering check of 12.2.2.
    pub remote_seq: Option<u32>,
    /// The peer's Contact.
    pub remote_target: Uri,
    /// Record-Route as seen from our side (RFC 3261 12.1.1 / 12.1.2).
    pub route_set: Vec<NameAddr>,
    pub state: DialogState,
    /// Where requests of this dialog go: the flow it was created on, so that peers behind
    /// NAT are reached at the address and port they used (RFC 5626's flow idea; RFC 3581).
    pub flow: Target,
}

fn strip_tag(n: &NameAddr) -> NameAddr {
    let mut n = n.clone();
    n.params.remove("tag");
    n
}

fn contact_uri(headers: &Headers) -> Option<Uri> {
    let c = headers.list("Contact").into_iter().next()?;
    NameAddr::parse(&c).ok().map(|n| n.uri)
}

fn record_route(headers: &Headers) -> Vec<NameAddr> {
    headers
        .list("Record-Route")
        .iter()
        .filter_map(|r| NameAddr::parse(r).ok())
        .collect()
}

impl Dialog {
    /// The dialog a UAS creates when it answers `req` with To tag `local_tag`
    /// (RFC 3261 12.1.1). `flow` is where the request came from.
    pub fn uas(req: &Request, local_tag: &str, flow: Target) -> Dialog {
        Dialog {
            call_id: req.base.call_id.clone(),
            local_tag: local_tag.to_owned(),
            remote_tag: req.base.from.tag().unwrap_or("").to_owned(),
            local_uri: strip_tag(&req.base.to),
            remote_uri: strip_tag(&req.base.from),
            local_seq: 0,
            remote_seq: Some(req.base.cseq.seq),
            remote_target: contact_uri(&req.headers).unwrap_or_else(|| req.base.from.uri.clone()),
            route_set: record_route(&req.headers),
            state: DialogState::Early,
            flow,
        }
    }

    /// The dialog a UAC gets from a response with a To tag to its request
    /// (RFC 3261 12.1.2): the route set is the Record-Route reversed.
    pub fn uac(req: &Request, resp: &Response, flow: Target) -> Dialog {
        let mut route_set = record_route(&resp.headers);
        route_set.reverse();
        Dialog {
            call_id: req.base.call_id.clone(),
            local_tag: req.base.from.tag().unwrap_or("").to_owned(),
            remote_tag: resp.base.to.tag().unwrap_or("").to_owned(),
            local_uri: strip_tag(&req.base.from),
            remote_uri: strip_tag(&req.base.to),
            local_seq: req.base.cseq.seq,
            remote_seq: None,
            remote_target: contact_uri(&resp.headers).unwrap_or_else(|| req.uri.clone()),
            route_set,
            state: if resp.is_success() {
                DialogState::Confirmed
            } else {
                DialogState::Early
            },
            flow,
        }
    }

    /// A target refresh (re-INVITE, UPDATE, their 2xx) replaces the remote target
    /// (RFC 3261 12.2.1.2 / 12.2.2).
    pub fn refresh_target(&mut self, headers: &Headers) {
        if let Some(uri) = contact_uri(headers) {
            self.remote_target = uri;
        }
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
        let mut from = self.local_uri.clone();
        from.set_tag(&self.local_tag);
        let mut to = self.remote_uri.clone();
        if !self.remote_tag.is_empty() {
            to.set_tag(&self.remote_tag);
        }
        let mut headers = Headers::new();
        for r in &self.route_set {
            headers.push("Route", r.to_string());
        }
        if let Some(c) = contact {
            headers.push("Contact", c);
        }
        Request {
            method: method.clone(),
            uri: self.remote_target.clone(),
            version: "2.0".into(),
            base: BaseHeaders {
                via: vec![via],
                from,
                to,
                call_id: self.call_id.clone(),
                cseq: CSeq { seq, method },
            },
            max_forwards: Some(70),
            headers,
            body: Bytes::new(),
        }
    }

    /// Whether an in-dialog request belongs here: Call-ID, our tag in To, theirs in From.
    pub fn matches(&self, req: &Request) -> bool {
        req.base.call_id == self.call_id
            && req.base.to.tag() == Some(self.local_tag.as_str())
            && req.base.from.tag().unwrap_or("") == self.remote_tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(d.remote_tag, "at");
        assert_eq!(d.remote_target.to_string(), "sip:alice@192.0.2.1:5070");
        assert_eq!(d.route_set.len(), 2);
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
}
