//! The B2BUA (back-to-back user agent): every INVITE that starts a call is terminated here
//! (leg A) and regenerated towards the targets the script dials (legs B), with new
//! Call-ID, tags, CSeq, Via and Contact, so that neither side sees the other's topology.
//!
//! Owns: calls and the index from dialog identifiers to calls. Must not touch:
//! transaction state (it uses `ServerTransaction`/`TransactionLayer`), the script's VMs
//! (it uses `ScriptEngine`).
//!
//! Each call is one task ([`call::Call`]); the index routes in-dialog requests, ACKs,
//! CANCELs and stray responses to it. The index is sharded so that calls on both cores do
//! not contend on one lock.

mod call;
mod config;
mod net;
mod records;
pub mod watch;

use call::Events;
pub use call::{refer_to, Side, TransferKind, TransferNote};
pub use config::{CallConfig, MAX_ROUTES};
pub use net::{resolve, LocalAddrs, ResolveError};
pub use records::{rfc3339_millis, CallDetail, RecordWriter};

use crate::metrics::RouteStats;
use crate::script::ScriptEngine;
use crate::shard::ShardMap;
use crate::sip::{Request, Response};
use crate::transaction::{ServerTransaction, TimerConfig, TransactionLayer};
use crate::transport::{Sender, Target};
use call::{Call, CallEvent};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A dialog as the server names it: Call-ID and our own tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogKey {
    call_id: String,
    local_tag: String,
}

impl DialogKey {
    pub fn new(call_id: &str, local_tag: &str) -> DialogKey {
        DialogKey {
            call_id: call_id.to_owned(),
            local_tag: local_tag.to_owned(),
        }
    }
}

/// How to reach a call from one of its dialogs.
#[derive(Clone)]
struct CallRef {
    events: Events,
    side: Side,
    branch: Option<u64>,
}

/// Where a registered contact is reached: the transport target its REGISTER came from and
/// its Path. Implemented over the registrar by the server.
pub trait ContactFlows: Send + Sync + 'static {
    fn flow(&self, contact: &str) -> Option<(Target, Vec<String>)>;
}

/// What `GET /calls` shows of a call in progress.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallSnapshot {
    pub id: String,
    /// "ringing" until a leg answers, then "answered".
    pub state: &'static str,
    pub a_call_id: String,
    pub from: String,
    pub to: String,
    pub source: String,
    /// The answering B leg's Call-ID and where it goes.
    pub b_call_id: Option<String>,
    pub b_target: Option<String>,
    /// Unix seconds.
    pub started: f64,
    pub answered: Option<f64>,
    /// `call:set_route`'s name, if the script tagged the call.
    pub route: Option<String>,
}

/// Counters of the call core.
#[derive(Debug, Default)]
pub struct B2buaStats {
    /// Calls that ended unanswered, by final status class 3xx..6xx.
    pub failed_by_class: [AtomicU64; 4],
    pub calls_started: AtomicU64,
    pub answered: AtomicU64,
    pub dials: AtomicU64,
    /// Transfers by kind (blind, attended, server) and result (attempted, succeeded,
    /// failed).
    pub transfers: [[AtomicU64; 3]; 3],
    /// Dials by outcome, indexed like [`crate::metrics::DIAL_OUTCOMES`].
    pub dial_outcomes: [AtomicU64; crate::metrics::DIAL_OUTCOMES.len()],
    pub script_failures: AtomicU64,
}

struct B2buaInner {
    layer: TransactionLayer,
    sender: Arc<dyn Sender>,
    scripts: ScriptEngine,
    local: LocalAddrs,
    timers: TimerConfig,
    default_ring_timeout: Duration,
    flows: Option<Arc<dyn ContactFlows>>,
    /// Registered devices of our addresses of record (transfer targets that are
    /// extensions).
    location: Option<Arc<dyn crate::script::LocationService>>,
    auth: Option<(crate::auth::DigestAuth, Arc<crate::auth::Users>)>,
    records: Option<RecordWriter>,
    dialogs: ShardMap<DialogKey, CallRef>,
    /// Calls whose INVITE is still pending, by (Call-ID, From tag) of the caller: CANCEL.
    pending: ShardMap<DialogKey, Events>,
    calls_active: AtomicU64,
    /// Calls in progress by id, for the admin API; written only when a call starts,
    /// answers and ends (never per message).
    calls: ShardMap<Arc<str>, CallSnapshot>,
    /// Keep the `engaged` index (hunt groups ask it); off without hunt groups, so that
    /// calls do not pay for it.
    track_busy: std::sync::atomic::AtomicBool,
    /// Each call in progress's event queue, by call id (`POST /calls/{id}/transfer`).
    controls: ShardMap<Arc<str>, Events>,
    /// Addresses on an answered call (`user@host[:port]`, see [`engaged_key`]) and how
    /// many calls each is on: hunt groups skip busy agents.
    engaged: ShardMap<String, u32>,
    stats: B2buaStats,
    routes: Arc<RouteStats>,
    traces: Option<crate::trace::CallTraces>,
    /// watch: call state changes for the dialog event package (presence).
    watch: watch::CallWatch,
}

/// The call core; a cheap handle.
#[derive(Clone)]
pub struct B2bua {
    inner: Arc<B2buaInner>,
}

/// What the B2BUA needs from the server around it.
pub struct B2buaParts {
    pub layer: TransactionLayer,
    pub sender: Arc<dyn Sender>,
    pub scripts: ScriptEngine,
    pub local: LocalAddrs,
    pub timers: TimerConfig,
    pub default_ring_timeout: Duration,
    /// Registered contacts' flows (None: dial targets are resolved by their URI).
    pub flows: Option<Arc<dyn ContactFlows>>,
    /// The location service (None: transfer targets are reached by their URI only).
    pub location: Option<Arc<dyn crate::script::LocationService>>,
    /// Digest authentication for `call:authenticate()` (None: no users configured).
    pub auth: Option<(crate::auth::DigestAuth, Arc<crate::auth::Users>)>,
    /// The `call.records_file` writer (None: no record file).
    pub records: Option<RecordWriter>,
    /// Per-route call counters (`call.routes`; indexes are the script's route numbers).
    pub routes: Arc<RouteStats>,
    /// Message traces of calls (`call.trace`; None: off).
    pub traces: Option<crate::trace::CallTraces>,
}

impl B2bua {
    pub fn new(parts: B2buaParts) -> B2bua {
        B2bua {
            inner: Arc::new(B2buaInner {
                layer: parts.layer,
                sender: parts.sender,
                scripts: parts.scripts,
                local: parts.local,
                timers: parts.timers,
                default_ring_timeout: parts.default_ring_timeout,
                flows: parts.flows,
                location: parts.location,
                auth: parts.auth,
                records: parts.records,
                dialogs: ShardMap::with_shards(64),
                pending: ShardMap::with_shards(64),
                calls_active: AtomicU64::new(0),
                calls: ShardMap::new(),
                controls: ShardMap::new(),
                track_busy: std::sync::atomic::AtomicBool::new(false),
                engaged: ShardMap::new(),
                stats: B2buaStats::default(),
                routes: parts.routes,
                traces: parts.traces,
                watch: watch::CallWatch::new(),
            }),
        }
    }

    pub fn stats(&self) -> &B2buaStats {
        &self.inner.stats
    }

    /// Calls per route (`call:set_route`).
    pub fn routes(&self) -> &RouteStats {
        &self.inner.routes
    }

    /// watch: the broadcast of call state changes (trying, early, confirmed, terminated).
    pub fn call_watch(&self) -> &watch::CallWatch {
        &self.inner.watch
    }

    /// Calls in progress (ringing or up).
    pub fn active_calls(&self) -> u64 {
        self.inner.calls_active.load(Ordering::Relaxed)
    }

    /// The calls in progress, oldest first.
    pub fn calls(&self) -> Vec<CallSnapshot> {
        let mut all = self.inner.calls.values();
        all.sort_by(|a, b| a.started.total_cmp(&b.started));
        all
    }

    /// Connects the caller (`to_caller`) or the callee of call `id` to `target` and
    /// releases the other party; `None` when there is no such call.
    pub async fn transfer(
        &self,
        id: &str,
        target: String,
        to_caller: bool,
    ) -> Option<crate::script::DialOutcome> {
        let events = self.inner.controls.get(id)?;
        let party = if to_caller { Side::A } else { Side::B };
        Some(call::transfer_via(&events, target, party).await)
    }

    /// The SIP ladder of call `id` (in progress or recently ended), when tracing is on.
    pub fn trace(&self, id: &str) -> Option<crate::trace::TraceView> {
        self.inner.traces.as_ref()?.get(id)
    }

    /// From now on, keep track of who is on a call or being rung (for `on_call`).
    pub fn track_busy(&self) {
        self.inner.track_busy.store(true, Ordering::Relaxed);
    }

    fn tracks_busy(inner: &B2buaInner) -> bool {
        inner.track_busy.load(Ordering::Relaxed)
    }

    /// Whether any of these addresses (AORs or contact URIs) is on an answered call, as
    /// the callee or as the caller (hunt groups: an agent on any call is busy).
    pub fn on_call(&self, uris: &[String]) -> bool {
        uris.iter()
            .filter_map(|u| engaged_key(u))
            .any(|k| self.inner.engaged.contains(&k))
    }

    /// Dialog index size (two per bridged call), for tests and metrics.
    pub fn dialogs(&self) -> usize {
        self.inner.dialogs.len()
    }

    /// An INVITE outside any dialog, already validated: a new call.
    pub fn on_invite(&self, tx: ServerTransaction, req: Request) {
        self.inner
            .stats
            .calls_started
            .fetch_add(1, Ordering::Relaxed);
        Call::start(self.inner.clone(), tx, req);
    }

    /// A request with a To tag. Returns it back when no dialog of ours matches (the
    /// caller answers 481, RFC 3261 12.2.2).
    pub fn on_in_dialog(
        &self,
        tx: ServerTransaction,
        req: Request,
    ) -> Result<(), Box<(ServerTransaction, Request)>> {
        let Some(tag) = req.base.to.tag() else {
            return Err(Box::new((tx, req)));
        };
        let key = DialogKey::new(&req.base.call_id, tag);
        match self.inner.dialogs.get(&key) {
            Some(r) => {
                let ev = CallEvent::Request {
                    side: r.side,
                    branch: r.branch,
                    tx,
                    req,
                };
                r.events.post(ev).map_err(|e| match *e {
                    CallEvent::Request { tx, req, .. } => Box::new((tx, req)),
                    _ => unreachable!("we sent a Request"),
                })
            }
            None => Err(Box::new((tx, req))),
        }
    }

    /// An ACK outside any transaction (for a 2xx). Unknown ones are dropped (RFC 3261
    /// 17.2.3: nothing answers an ACK).
    pub fn on_ack(&self, ack: Request) {
        let Some(tag) = ack.base.to.tag() else { return };
        if let Some(r) = self
            .inner
            .dialogs
            .get(&DialogKey::new(&ack.base.call_id, tag))
        {
            let _ = r.events.post(CallEvent::Ack {
                side: r.side,
                req: ack,
            });
        }
    }

    /// A CANCEL for a pending INVITE: true when it belonged to a call (which then ends
    /// the INVITE with 487 itself).
    pub fn on_cancel(&self, cancel: &Request) -> bool {
        let key = DialogKey::new(&cancel.base.call_id, cancel.base.from.tag().unwrap_or(""));
        match self.inner.pending.get(&key) {
            Some(events) => events.post(CallEvent::Cancel).is_ok(),
            None => false,
        }
    }

    /// A response no client transaction wanted: a 2xx retransmission for one of our legs.
    pub fn on_stray_response(&self, resp: Response) {
        let Some(tag) = resp.base.from.tag() else {
            return;
        };
        if let Some(r) = self
            .inner
            .dialogs
            .get(&DialogKey::new(&resp.base.call_id, tag))
        {
            let _ = r.events.post(CallEvent::Stray { resp });
        }
    }
}

/// The key of an address in the `engaged` index: `user@host[:port]`, host lower-cased,
/// parameters dropped, so a contact and the URI dialed for it compare equal.
pub(crate) fn engaged_key(uri: &str) -> Option<String> {
    crate::sip::Uri::parse(uri.trim())
        .ok()
        .map(|u| engaged_key_of(&u))
}

/// [`engaged_key`] of a parsed URI.
pub(crate) fn engaged_key_of(u: &crate::sip::Uri) -> String {
    let host = u.host.to_string().to_ascii_lowercase();
    let user = u.user.as_deref().unwrap_or_default();
    match u.port {
        Some(p) => format!("{user}@{host}:{p}"),
        None => format!("{user}@{host}"),
    }
}

pub(crate) fn engage(map: &ShardMap<String, u32>, key: &str) {
    // Bounded: between a failed increment and a failed insert another call must have
    // inserted or removed the key, which does not go on forever.
    for _ in 0..8 {
        if map.with(&key.to_owned(), |n| *n += 1).is_some() {
            return;
        }
        if map.insert_new(key.to_owned(), 1).is_ok() {
            return;
        }
    }
}

pub(crate) fn disengage(map: &ShardMap<String, u32>, key: &str) {
    let key = key.to_owned();
    map.with(&key, |n| *n = n.saturating_sub(1));
    map.remove_if(&key, |n| *n == 0);
}
