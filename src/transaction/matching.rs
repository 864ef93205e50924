//! Transaction matching keys (RFC 3261 17.1.3, 17.2.3 with its RFC 2543 fallback, 9.2 for
//! CANCEL, 8.2.2.2 for merged requests) and the sharded maps that hold transactions.
//!
//! Owns: how a message is turned into a key, and the sharded map type.
//! Must not touch: state machines, sending.

use crate::sip::{BaseHeaders, Method, Request, Response, BRANCH_COOKIE};
use std::hash::Hash;

/// Identifies a server transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ServerKey {
    /// RFC 3261 17.2.3: branch (with the magic cookie), sent-by (host in lower case),
    /// method (ACK as INVITE), as their 128-bit keyed hash (see [`ClientKey`]): made for
    /// every request, and cloned for the transaction's tables.
    Branch(u128),
    /// RFC 2543 peers (no cookie): Request-URI, From tag, Call-ID, CSeq, top Via. The To
    /// tag is compared after the lookup because an ACK carries the response's To tag.
    Legacy {
        uri: String,
        from_tag: String,
        call_id: String,
        cseq: u32,
        via: String,
        method: Method,
    },
}

/// ACK and CANCEL are matched against the INVITE transaction (RFC 3261 17.2.3, 9.2).
fn normalized(method: &Method, as_invite: bool) -> Method {
    if *method == Method::Ack || (as_invite && *method == Method::Cancel) {
        Method::Invite
    } else {
        method.clone()
    }
}

impl ServerKey {
    /// The key of the transaction `req` belongs to. With `as_invite`, a CANCEL yields the
    /// key of the INVITE it cancels (RFC 3261 9.2); an ACK always yields the INVITE's key.
    pub(crate) fn of(req: &Request, as_invite: bool) -> Option<ServerKey> {
        let via = req.base.top_via()?;
        let method = normalized(&req.method, as_invite);
        let branch = via.branch().unwrap_or("");
        if branch.starts_with(BRANCH_COOKIE) {
            let mut sent_by = via.host.to_text();
            sent_by.make_ascii_lowercase();
            if let Some(p) = via.port {
                let _ = crate::sip::write_port(&mut sent_by, p);
            }
            Some(ServerKey::branch(branch, &sent_by, &method))
        } else {
            // The transport adds received/rport to the top Via; leave them out so that the
            // comparison is on what the peer wrote.
            let mut v = via.clone();
            v.params.remove("received");
            v.params.remove("rport");
            Some(ServerKey::Legacy {
                uri: req.uri.to_text(),
                from_tag: req.base.from.tag().unwrap_or("").to_owned(),
                call_id: req.base.call_id.clone(),
                cseq: req.base.cseq.seq,
                via: v.to_string(),
                method,
            })
        }
    }

    /// The key of an RFC 3261 branch (with the magic cookie): `sent_by` as
    /// `host[:port]`, the host in lower case.
    pub(crate) fn branch(branch: &str, sent_by: &str, method: &Method) -> ServerKey {
        ServerKey::Branch(crate::shard::keyed_id(&[branch, sent_by, method.as_str()]))
    }

    pub(crate) fn is_legacy(&self) -> bool {
        matches!(self, ServerKey::Legacy { .. })
    }
}

/// RFC 3261 8.2.2.2: From tag, Call-ID and CSeq of a request without To tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MergeKey {
    from_tag: String,
    call_id: String,
    cseq: u32,
    method: Method,
}

impl MergeKey {
    /// None for requests with a To tag (in-dialog), for which merging does not apply.
    pub(crate) fn of(req: &Request) -> Option<MergeKey> {
        if req.base.to.tag().is_some() {
            return None;
        }
        Some(MergeKey {
            from_tag: req.base.from.tag().unwrap_or("").to_owned(),
            call_id: req.base.call_id.clone(),
            cseq: req.base.cseq.seq,
            method: req.method.clone(),
        })
    }
}

/// Identifies a client transaction (RFC 3261 17.1.3): top Via branch + CSeq method, as
/// their 128-bit keyed hash (`shard::keyed_id`, as the dialog index keys its entries):
/// every response looks its transaction up, and owning copies of the two strings cost two
/// allocations per lookup (issue 14). The branch is ours (we made it), but the response
/// that carries it comes from the network; the key is random per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey(u128);

impl ClientKey {
    pub(crate) fn of(base: &BaseHeaders) -> ClientKey {
        ClientKey(crate::shard::keyed_id(&[
            base.branch(),
            base.cseq.method.as_str(),
        ]))
    }
    pub(crate) fn of_response(resp: &Response) -> ClientKey {
        ClientKey::of(&resp.base)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::invite;
    use super::*;

    #[test]
    fn ack_and_cancel_map_to_invite() {
        let inv = invite();
        let mut ack = inv.clone();
        ack.method = Method::Ack;
        let mut cancel = inv.clone();
        cancel.method = Method::Cancel;
        let k = ServerKey::of(&inv, false).unwrap();
        assert_eq!(ServerKey::of(&ack, false).unwrap(), k);
        assert_eq!(ServerKey::of(&cancel, true).unwrap(), k);
        assert_ne!(ServerKey::of(&cancel, false).unwrap(), k);
        assert!(!k.is_legacy());
    }

    /// The keys are hashes now: each part still tells transactions apart, and a host's
    /// case does not (RFC 3261 17.2.3 compares sent-by as a host).
    #[test]
    fn keys_tell_apart_branch_sent_by_port_and_method() {
        use super::super::test_util::request;
        let with_via = |via: &str| {
            request(&format!(
                "INVITE sip:bob@b.example SIP/2.0\r\nVia: SIP/2.0/UDP {via}\r\n\
                 From: <sip:alice@a.example>;tag=f\r\nTo: <sip:bob@b.example>\r\n\
                 Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
            ))
        };
        let key = |via: &str| ServerKey::of(&with_via(via), false).unwrap();
        let k = key("host.example:5060;branch=z9hG4bKa");
        assert_eq!(key("HOST.example:5060;branch=z9hG4bKa"), k);
        assert_ne!(key("host.example:5060;branch=z9hG4bKb"), k);
        assert_ne!(key("other.example:5060;branch=z9hG4bKa"), k);
        assert_ne!(key("host.example:5070;branch=z9hG4bKa"), k);
        assert_ne!(key("host.example;branch=z9hG4bKa"), k);

        let inv = with_via("host.example:5060;branch=z9hG4bKa");
        let mut cancel = inv.clone();
        cancel.base.cseq.method = Method::Cancel;
        assert_eq!(
            ClientKey::of(&inv.base),
            ClientKey::of(&inv.response(200).base)
        );
        assert_ne!(ClientKey::of(&cancel.base), ClientKey::of(&inv.base));
    }
}
