//! A cheap broadcast of dialog state changes (RFC 4235 3.7.1) of the server's own calls,
//! seen from each caller's leg: the B2BUA posts, the presence module turns them into the
//! dialog event package (busy-lamp fields) without any extra component. It lives in the
//! dialog layer so that the poster and the watcher share it without knowing each other.
//!
//! Owns: the event type and the broadcast channel. Must not touch: call state; the call
//! task only posts what happened (four points in the B2BUA's call, marked `watch:`), and a
//! send with nobody listening costs one atomic load.
//!
//! The channel is bounded (`CAPACITY`): a watcher that falls behind loses the oldest
//! events (`RecvError::Lagged`) and never slows a call down.

use crate::sip::Uri;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events kept for a slow watcher before the oldest are dropped.
const CAPACITY: usize = 4096;

/// The states of RFC 4235 3.7.1 a call goes through, seen from its caller's leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallPhase {
    /// The INVITE arrived; nothing rings yet.
    Trying,
    /// A callee is ringing (a provisional above 100).
    Early,
    /// Answered.
    Confirmed,
    /// Over (any outcome).
    Terminated,
}

impl CallPhase {
    /// The `<state>` value of RFC 4235.
    pub fn as_str(self) -> &'static str {
        match self {
            CallPhase::Trying => "trying",
            CallPhase::Early => "early",
            CallPhase::Confirmed => "confirmed",
            CallPhase::Terminated => "terminated",
        }
    }
}

/// One change of one call.
#[derive(Debug, Clone)]
pub struct CallChange {
    /// The call's id (as in `GET /calls`).
    pub id: Arc<str>,
    pub phase: CallPhase,
    /// The caller's leg: Call-ID, the caller's tag and ours (for RFC 4235 `call-id`,
    /// `local-tag`, `remote-tag`, which phones use for call pick-up).
    pub call_id: Arc<str>,
    pub caller_tag: Arc<str>,
    pub our_tag: Arc<str>,
    /// The caller (From URI of the INVITE).
    pub caller: Arc<Uri>,
    /// What the caller dialled (Request-URI of the INVITE): the extension that rings.
    pub callee: Arc<Uri>,
}

/// The sending side; cloned into every call through the B2BUA.
#[derive(Clone)]
pub struct CallWatch {
    tx: broadcast::Sender<CallChange>,
    /// Whether the watchers want changes now (the presence core turns this off while
    /// nobody subscribes to the dialog package, so calls build nothing for nobody; it
    /// re-reads the calls in progress when it turns it on).
    wanted: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for CallWatch {
    fn default() -> Self {
        CallWatch::new()
    }
}

impl CallWatch {
    pub fn new() -> CallWatch {
        let (tx, _) = broadcast::channel(CAPACITY);
        CallWatch {
            tx,
            wanted: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Whether anybody listens (so that a call builds no event for nobody).
    pub fn is_watched(&self) -> bool {
        self.wanted.load(std::sync::atomic::Ordering::Relaxed) && self.tx.receiver_count() > 0
    }

    /// The switch of [`Self::is_watched`] (on by default).
    pub fn interest(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.wanted.clone()
    }

    /// Posts a change; nobody listening is fine.
    pub fn post(&self, change: CallChange) {
        if self.is_watched() {
            let _ = self.tx.send(change);
        }
    }

    /// A receiver of every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CallChange> {
        self.tx.subscribe()
    }
}
