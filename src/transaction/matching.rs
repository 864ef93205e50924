//! Transaction matching keys (RFC 3261 17.1.3, 17.2.3 with its RFC 2543 fallback, 9.2 for
//! CANCEL, 8.2.2.2 for merged requests) and the sharded maps that hold transactions.
//!
//! Owns: how a message is turned into a key, and the sharded map type.
//! Must not touch: state machines, sending.

use crate::sip::{BaseHeaders, Method, Request, Response, BRANCH_COOKIE};
use parking_lot::Mutex;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Identifies a server transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ServerKey {
    /// RFC 3261 17.2.3: branch (with the magic cookie), sent-by, method (ACK as INVITE).
    Branch {
        branch: String,
        sent_by: String,
        method: Method,
    },
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
            let sent_by = match via.port {
                Some(p) => format!("{}:{p}", via.host.to_string().to_ascii_lowercase()),
                None => via.host.to_string().to_ascii_lowercase(),
            };
            Some(ServerKey::Branch {
                branch: branch.to_owned(),
                sent_by,
                method,
            })
        } else {
            // The transport adds received/rport to the top Via; leave them out so that the
            // comparison is on what the peer wrote.
            let mut v = via.clone();
            v.params.remove("received");
            v.params.remove("rport");
            Some(ServerKey::Legacy {
                uri: req.uri.to_string(),
                from_tag: req.base.from.tag().unwrap_or("").to_owned(),
                call_id: req.base.call_id.clone(),
                cseq: req.base.cseq.seq,
                via: v.to_string(),
                method,
            })
        }
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

/// Identifies a client transaction (RFC 3261 17.1.3): top Via branch + CSeq method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    branch: String,
    method: Method,
}

impl ClientKey {
    pub(crate) fn of(base: &BaseHeaders) -> ClientKey {
        ClientKey {
            branch: base.branch().to_owned(),
            method: base.cseq.method.clone(),
        }
    }
    pub(crate) fn of_response(resp: &Response) -> ClientKey {
        ClientKey::of(&resp.base)
    }
}

/// A map split into shards, each behind its own lock, so that cores handling different
/// transactions do not contend. Locks are held only for the map operation itself.
pub(crate) struct Sharded<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: RandomState,
}

const SHARDS: usize = 64;

impl<K: Hash + Eq, V: Clone> Sharded<K, V> {
    pub(crate) fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, k: &K) -> &Mutex<HashMap<K, V>> {
        let h = self.hasher.hash_one(k) as usize;
        &self.shards[h % SHARDS]
    }

    pub(crate) fn get(&self, k: &K) -> Option<V> {
        self.shard(k).lock().get(k).cloned()
    }

    /// Every value, one shard at a time (for rare whole-table questions: shutdown).
    pub(crate) fn values(&self) -> Vec<V> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Inserts unless the key is present; returns the present value in that case.
    pub(crate) fn insert_new(&self, k: K, v: V) -> Result<(), V> {
        match self.shard(&k).lock().entry(k) {
            Entry::Occupied(o) => Err(o.get().clone()),
            Entry::Vacant(e) => {
                e.insert(v);
                Ok(())
            }
        }
    }

    /// Removes `k` when `matches` says its value is the one to remove (a newer transaction
    /// with the same key must not be removed by an older one ending).
    pub(crate) fn remove_if(&self, k: &K, matches: impl FnOnce(&V) -> bool) -> bool {
        let mut shard = self.shard(k).lock();
        if shard.get(k).is_some_and(matches) {
            shard.remove(k);
            true
        } else {
            false
        }
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

    #[test]
    fn sharded_insert_remove() {
        let m: Sharded<u32, u32> = Sharded::new();
        assert!(m.insert_new(1, 10).is_ok());
        assert_eq!(m.insert_new(1, 11), Err(10));
        assert!(!m.remove_if(&1, |v| *v == 11));
        assert!(m.remove_if(&1, |v| *v == 10));
        assert_eq!(m.get(&1), None);
    }
}
