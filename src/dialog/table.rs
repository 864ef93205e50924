//! The dialog table: every dialog the server is a party to, by Call-ID and our own tag, to
//! the usage that owns it (RFC 5057: an INVITE usage, i.e. a call's leg, or a
//! subscription usage). An in-dialog request, an ACK for a 2xx and a stray 2xx
//! retransmission are each one lookup here, whoever owns the dialog.
//!
//! Owns: the index. Must not touch: what a usage does with a request (the usage's own
//! task decides, RFC 3261 12.2.2's CSeq check included) or when a dialog ends (the usage
//! registers and unregisters its dialogs).
//!
//! Why Call-ID and local tag without the remote tag: our tags are random and unique per
//! dialog, so they already tell our dialogs apart; the remote tag only separates the early
//! dialogs of one forked request, which the owning usage (the B2BUA's fork) sorts out
//! itself. This keeps a lookup at one sharded-map access, as the B2BUA's index was.

use crate::shard::ShardMap;
use crate::sip::{Request, Response};
use crate::transaction::ServerTransaction;

/// A dialog as the server names it: Call-ID and our own tag, kept as a 128-bit keyed hash
/// of the two (`shard::keyed_id`) rather than as copies of them (issue 14: the
/// index held two strings per dialog, and a lookup allocated both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DialogId(u128);

impl DialogId {
    pub fn new(call_id: &str, local_tag: &str) -> DialogId {
        DialogId(crate::shard::keyed_id(&[call_id, local_tag]))
    }

    /// Whether this is the dialog with that Call-ID and our tag.
    pub fn is(&self, call_id: &str, local_tag: &str) -> bool {
        *self == DialogId::new(call_id, local_tag)
    }
}

/// A request for a dialog whose usage is gone: handed back so that the caller answers 481.
pub type Unmatched = Box<(ServerTransaction, Request)>;

/// What owns a dialog: a cheap handle the table clones out of its lock before calling it.
pub trait DialogUsage: Clone + Send + Sync + 'static {
    /// A request inside the dialog (not ACK, not CANCEL). Gives it back when the usage has
    /// ended meanwhile.
    fn on_request(&self, tx: ServerTransaction, req: Request) -> Result<(), Unmatched>;
    /// An ACK for a 2xx of ours (RFC 3261 13.3.1.4; nothing answers it).
    fn on_ack(&self, _ack: Request) {}
    /// A 2xx retransmission no client transaction wanted (RFC 3261 13.2.2.4).
    fn on_stray_response(&self, _resp: Response) {}
}

/// The two usages a SIP dialog can have (RFC 5057 section 3).
#[derive(Clone)]
pub enum Usage<I, S> {
    /// An INVITE usage: a leg of a call.
    Invite(I),
    /// A subscription usage (RFC 6665).
    Subscription(S),
}

impl<I: DialogUsage, S: DialogUsage> DialogUsage for Usage<I, S> {
    fn on_request(&self, tx: ServerTransaction, req: Request) -> Result<(), Unmatched> {
        match self {
            Usage::Invite(u) => u.on_request(tx, req),
            Usage::Subscription(u) => u.on_request(tx, req),
        }
    }
    fn on_ack(&self, ack: Request) {
        match self {
            Usage::Invite(u) => u.on_ack(ack),
            Usage::Subscription(u) => u.on_ack(ack),
        }
    }
    fn on_stray_response(&self, resp: Response) {
        match self {
            Usage::Invite(u) => u.on_stray_response(resp),
            Usage::Subscription(u) => u.on_stray_response(resp),
        }
    }
}

/// Dialogs by id, sharded so that calls on different cores do not contend on one lock.
pub struct DialogTable<U> {
    map: ShardMap<DialogId, U>,
}

impl<U: Clone> Default for DialogTable<U> {
    fn default() -> Self {
        DialogTable {
            map: ShardMap::with_shards(64),
        }
    }
}

impl<U: Clone> DialogTable<U> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or re-points) a dialog.
    pub fn insert(&self, id: DialogId, usage: U) {
        self.map.insert(id, usage);
    }

    pub fn get(&self, id: &DialogId) -> Option<U> {
        self.map.get(id)
    }

    /// Unregisters a dialog if `owns` says the entry is still the caller's (a dialog
    /// handed to another usage meanwhile stays).
    pub fn remove_if(&self, id: &DialogId, owns: impl FnOnce(&U) -> bool) {
        self.map.remove_if(id, owns);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<U: DialogUsage> DialogTable<U> {
    /// A request with a To tag: to the usage of the dialog it names. Handed back when no
    /// dialog matches (the caller answers 481, RFC 3261 12.2.2).
    pub fn on_request(&self, tx: ServerTransaction, req: Request) -> Result<(), Unmatched> {
        let usage = match req.base.to.tag() {
            Some(tag) => self.get(&DialogId::new(&req.base.call_id, tag)),
            None => None,
        };
        match usage {
            Some(u) => u.on_request(tx, req),
            None => Err(Box::new((tx, req))),
        }
    }

    /// An ACK outside any transaction (for a 2xx); one for no dialog is dropped (RFC 3261
    /// 17.2.3: nothing answers an ACK).
    pub fn on_ack(&self, ack: Request) {
        let Some(tag) = ack.base.to.tag() else { return };
        if let Some(u) = self.get(&DialogId::new(&ack.base.call_id, tag)) {
            u.on_ack(ack);
        }
    }

    /// A response no client transaction wanted: ours are named by the From tag.
    pub fn on_stray_response(&self, resp: Response) {
        let Some(tag) = resp.base.from.tag() else {
            return;
        };
        if let Some(u) = self.get(&DialogId::new(&resp.base.call_id, tag)) {
            u.on_stray_response(resp);
        }
    }
}

/// One usage kind's view of a table: what a transaction user holds to register and find
/// its own dialogs without knowing the other kinds of usage.
pub trait UsageIndex<U>: Send + Sync + 'static {
    fn insert(&self, id: DialogId, usage: U);
    fn get(&self, id: &DialogId) -> Option<U>;
    /// Removes the entry when `owns` says it is still this usage's.
    fn remove_if(&self, id: &DialogId, owns: &mut dyn FnMut(&U) -> bool);
    /// Dialogs in the whole table.
    fn count(&self) -> usize;
}

/// A table of one usage kind is its own index (a transaction user alone: tests).
impl<U: Clone + Send + Sync + 'static> UsageIndex<U> for DialogTable<U> {
    fn insert(&self, id: DialogId, usage: U) {
        DialogTable::insert(self, id, usage);
    }
    fn get(&self, id: &DialogId) -> Option<U> {
        DialogTable::get(self, id)
    }
    fn remove_if(&self, id: &DialogId, owns: &mut dyn FnMut(&U) -> bool) {
        DialogTable::remove_if(self, id, owns);
    }
    fn count(&self) -> usize {
        DialogTable::len(self)
    }
}

/// The INVITE usages of a shared table.
pub struct Invites<I, S>(pub std::sync::Arc<DialogTable<Usage<I, S>>>);

/// The subscription usages of a shared table.
pub struct Subscriptions<I, S>(pub std::sync::Arc<DialogTable<Usage<I, S>>>);

macro_rules! usage_index {
    ($view:ident, $variant:ident, $own:ident) => {
        impl<I, S> UsageIndex<$own> for $view<I, S>
        where
            I: Clone + Send + Sync + 'static,
            S: Clone + Send + Sync + 'static,
        {
            fn insert(&self, id: DialogId, usage: $own) {
                self.0.insert(id, Usage::$variant(usage));
            }
            fn get(&self, id: &DialogId) -> Option<$own> {
                match self.0.get(id)? {
                    Usage::$variant(u) => Some(u),
                    _ => None,
                }
            }
            fn remove_if(&self, id: &DialogId, owns: &mut dyn FnMut(&$own) -> bool) {
                self.0.remove_if(id, |u| match u {
                    Usage::$variant(u) => owns(u),
                    _ => false,
                });
            }
            fn count(&self) -> usize {
                self.0.len()
            }
        }
    };
}
usage_index!(Invites, Invite, I);
usage_index!(Subscriptions, Subscription, S);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Debug, PartialEq)]
    struct Leg(u32);
    #[derive(Clone, Debug, PartialEq)]
    struct Sub(&'static str);

    #[test]
    fn a_dialog_id_names_exactly_its_call_id_and_tag() {
        let id = DialogId::new("a84b4c76e66710@pc33.example.com", "1928301774");
        assert_eq!(
            id,
            DialogId::new("a84b4c76e66710@pc33.example.com", "1928301774")
        );
        assert!(id.is("a84b4c76e66710@pc33.example.com", "1928301774"));
        assert!(!id.is("a84b4c76e66710@pc33.example.com", "1928301775"));
        assert!(!id.is("a84b4c76e66710@pc33.example.co", "1928301774"));
        // The boundary between the two parts counts.
        assert_ne!(DialogId::new("ab", "c"), DialogId::new("a", "bc"));
        assert_ne!(DialogId::new("", "x"), DialogId::new("x", ""));
        assert_eq!(std::mem::size_of::<DialogId>(), 16);
    }

    #[test]
    fn each_usage_sees_only_its_own_dialogs_in_one_table() {
        let table = Arc::new(DialogTable::<Usage<Leg, Sub>>::new());
        let calls = Invites(table.clone());
        let subs = Subscriptions(table.clone());
        calls.insert(DialogId::new("c1", "a"), Leg(1));
        subs.insert(DialogId::new("s1", "b"), Sub("presence"));
        assert_eq!(calls.get(&DialogId::new("c1", "a")), Some(Leg(1)));
        assert_eq!(calls.get(&DialogId::new("s1", "b")), None, "not a call's");
        assert_eq!(subs.get(&DialogId::new("s1", "b")), Some(Sub("presence")));
        assert_eq!(calls.count(), 2, "one table");
        // A usage cannot remove another's dialog, nor its own when it is no longer the
        // owner.
        calls.remove_if(&DialogId::new("s1", "b"), &mut |_| true);
        calls.remove_if(&DialogId::new("c1", "a"), &mut |l| l.0 == 2);
        assert_eq!(table.len(), 2);
        calls.remove_if(&DialogId::new("c1", "a"), &mut |l| l.0 == 1);
        assert_eq!(table.len(), 1);
        assert!(table.get(&DialogId::new("c1", "a")).is_none());
    }
}
