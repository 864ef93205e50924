//! The B2BUA (back-to-back user agent): every INVITE that starts a call is terminated here
//! (leg A) and regenerated towards the targets the script dials (legs B), with new
//! Call-ID, tags, CSeq, Via and Contact, so that neither side sees the other's topology.
//!
//! Owns: calls, their INVITE usages in the dialog table, the pending INVITEs a CANCEL may
//! name, the calls-in-progress list and the busy index hunt groups ask. Must not touch:
//! transaction state (it uses `ServerTransaction`/`TransactionLayer`), the dial plan
//! above it (it runs hooks through its own `CallHooks` port in `hooks.rs`, which the
//! script engine implements, and offers each call to them as a `CallControl`), other
//! usages' dialogs (it sees the table only through its `Invites` view), presence or the
//! UAS core above it.
//!
//! Each call is one task (`call::Call`); the call registers each leg's dialog in the
//! server's dialog table (`crate::dialog::DialogTable`) as a [`CallRef`], and the UAS
//! core's one lookup there routes in-dialog requests, ACKs and stray responses to it.
//! CANCELs find the call by the pending INVITE (Call-ID and the caller's tag).
//!
//! cluster (`cluster.enabled`, issue 18): each established call keeps a compact record
//! of its two dialogs in Redis through the cluster module's queue, and a surviving node
//! ends a dead node's calls from those records (BYE to both parties, a call record with
//! `hangup_by = "takeover"`): `takeover.rs`, and `call/record.rs` for the call's side.
//!
//! Metrics: see `metrics.rs` in this module.

mod call;
mod config;
mod hooks;
mod metrics;
mod records;
mod summary;
mod takeover;
/// The call watch is the dialog layer's; the call posts to it as `super::watch`.
pub use crate::dialog::watch;

use call::Events;
pub use call::{refer_to, Side, TransferKind, TransferNote};
pub use config::{CallConfig, MAX_ROUTES};
pub use hooks::{
    AuthVerdict, CallControl, CallHookSet, CallHooks, CallInfo, CallRecord, CallScript,
    CallScriptHandle, DialOptions, DialOutcome, DialSource, DialTarget, HeaderList, InviteOutcome,
    ReferInfo, ReferVerdict, UriInfo,
};
pub use metrics::{
    DialResult, FailureClass, RouteStats, SetupStage, TransferLabel, TransferResult,
};
pub use records::{CallDetail, RecordWriter};
/// cluster: a call record as stored in Redis, read back (operators' tools, tests).
pub use takeover::{decode as decode_call_record, CallFacts, RecordError, StoredCall, StoredLeg};

use crate::dialog::{DialogUsage, Unmatched, UsageIndex};
use crate::shard::ShardMap;
use crate::sip::{Request, Response};
use crate::transaction::{ServerTransaction, TimerConfig, TransactionLayer};
use crate::transport::{ContactFlows, LocalAddrs, Sender};
use call::{Call, CallEvent};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A dialog as the server names it (Call-ID and our own tag): the dialog layer's id.
pub use crate::dialog::DialogId as DialogKey;

/// How to reach a call from one of its dialogs: the call's INVITE usage in the dialog
/// table.
///
/// 16 bytes, as the dialog table holds one per leg of every call (issue 14): the branch
/// is kept in 32 bits, 0 for none.
#[derive(Clone)]
pub struct CallRef {
    events: Events,
    branch: u32,
    side: Side,
}

impl CallRef {
    fn new(events: Events, side: Side, branch: Option<u64>) -> CallRef {
        // A call's ids count from 1 and never reach 2^32 (one per request it sends); one
        // past that is kept as 2^32-1, a number no branch of the call reaches either.
        let branch = branch.map_or(0, |b| u32::try_from(b).unwrap_or(u32::MAX));
        CallRef {
            events,
            branch,
            side,
        }
    }

    fn branch(&self) -> Option<u64> {
        (self.branch != 0).then_some(u64::from(self.branch))
    }
}

impl DialogUsage for CallRef {
    fn on_request(&self, tx: ServerTransaction, req: Request) -> Result<(), Unmatched> {
        let ev = CallEvent::Request {
            side: self.side,
            branch: self.branch(),
            tx,
            req,
        };
        self.events.post(ev).map_err(|e| match *e {
            CallEvent::Request { tx, req, .. } => Box::new((tx, req)),
            _ => unreachable!("we sent a Request"),
        })
    }

    fn on_ack(&self, ack: Request) {
        let _ = self.events.post(CallEvent::Ack {
            side: self.side,
            req: ack,
        });
    }

    fn on_stray_response(&self, resp: Response) {
        let _ = self.events.post(CallEvent::Stray { resp });
    }
}

/// The calls' dialogs in the dialog table (the B2BUA registers each leg's dialog there).
struct CallDialogs(Arc<dyn UsageIndex<CallRef>>);

impl CallDialogs {
    fn insert(&self, key: DialogKey, r: CallRef) {
        self.0.insert(key, r);
    }
    fn get(&self, key: &DialogKey) -> Option<CallRef> {
        self.0.get(key)
    }
    fn remove_if(&self, key: &DialogKey, mut owns: impl FnMut(&CallRef) -> bool) {
        self.0.remove_if(key, &mut owns);
    }
    fn len(&self) -> usize {
        self.0.count()
    }
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

/// A call in progress in the admin API's one index: its event queue (`POST
/// /calls/{id}/transfer`) and what `GET /calls` shows of it.
struct CallEntry {
    events: Events,
    /// Boxed: the table's slots are then 32 bytes instead of 96, and a table keeps
    /// its free slots too (issue 14: ~25 bytes of every held call).
    summary: Box<summary::CallSummary>,
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
    /// Dials by outcome, indexed like [`DialResult`].
    pub dial_outcomes: [AtomicU64; <DialResult as crate::metrics::Label>::ALL.len()],
    pub script_failures: AtomicU64,
    /// Calls ended because a leg's RFC 4028 session expired unrefreshed (or its refresh
    /// got 408/481).
    pub session_expiries: AtomicU64,
    /// INVITEs refused with 422 (Session-Expires below `call.min_se_s`).
    pub session_too_brief: AtomicU64,
    /// Calls ended because a party answered its keep-alive OPTIONS (`call.keepalive_s`)
    /// with nothing, 408 or 481.
    pub parties_gone: AtomicU64,
}

struct B2buaInner {
    layer: TransactionLayer,
    sender: Arc<dyn Sender>,
    scripts: Arc<dyn CallHooks>,
    local: LocalAddrs,
    timers: TimerConfig,
    default_ring_timeout: Duration,
    keepalive: Option<Duration>,
    overload: Option<Arc<crate::overload::Overload>>,
    flows: Option<Arc<dyn ContactFlows>>,
    /// Registered devices of our addresses of record (transfer targets that are
    /// extensions).
    location: Option<Arc<dyn crate::registrar::LocationService>>,
    auth: Option<(crate::auth::DigestAuth, Arc<crate::auth::Users>)>,
    records: Option<RecordWriter>,
    dialogs: CallDialogs,
    /// Calls whose INVITE is still pending, by (Call-ID, From tag) of the caller: CANCEL.
    pending: ShardMap<DialogKey, Events>,
    calls_active: AtomicU64,
    /// Calls in progress by id, for the admin API; written only when a call starts,
    /// answers, is transferred and ends (never per message).
    calls: ShardMap<Arc<str>, CallEntry>,
    /// Keep the `engaged` index (hunt groups ask it); off without hunt groups, so that
    /// calls do not pay for it.
    track_busy: std::sync::atomic::AtomicBool,
    /// Addresses on an answered call (`user@host[:port]`, see [`engaged_key`]) and how
    /// many calls each is on: hunt groups skip busy agents.
    engaged: ShardMap<String, u32>,
    stats: B2buaStats,
    routes: Arc<RouteStats>,
    histograms: metrics::CallHistograms,
    traces: Option<crate::trace::CallTraces>,
    /// watch: call state changes for the dialog event package (presence).
    watch: watch::CallWatch,
    /// `[trunks.<name>]`: where `call:dial({ trunk = ... })` goes, and which trunk a call
    /// came in from.
    trunks: crate::trunk::Trunks,
    /// `call.session_expires_s` and `call.min_se_s` (RFC 4028).
    session_timers: crate::dialog::session_timer::SessionTimerConfig,
    /// cluster: where established calls keep their record (`cluster.enabled`; unset:
    /// nothing is recorded), see `takeover.rs`.
    cluster: std::sync::OnceLock<crate::cluster::CallRecords>,
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
    pub scripts: Arc<dyn CallHooks>,
    pub local: LocalAddrs,
    pub timers: TimerConfig,
    pub default_ring_timeout: Duration,
    /// `call.keepalive_s` (None: off).
    pub keepalive: Option<Duration>,
    /// The overload detector, fed with new calls' waits for their script (the transaction
    /// layer refuses; None: never refuse).
    pub overload: Option<Arc<crate::overload::Overload>>,
    /// Registered contacts' flows (None: dial targets are resolved by their URI).
    pub flows: Option<Arc<dyn ContactFlows>>,
    /// The location service (None: transfer targets are reached by their URI only).
    pub location: Option<Arc<dyn crate::registrar::LocationService>>,
    /// Digest authentication for `call:authenticate()` (None: no users configured).
    pub auth: Option<(crate::auth::DigestAuth, Arc<crate::auth::Users>)>,
    /// The `call.records_file` writer (None: no record file).
    pub records: Option<RecordWriter>,
    /// Per-route call counters (`call.routes`; indexes are the script's route numbers).
    pub routes: Arc<RouteStats>,
    /// Message traces of calls (`call.trace`; None: off).
    pub traces: Option<crate::trace::CallTraces>,
    /// Where the calls register their dialogs: the server's dialog table, whose lookups
    /// reach them through [`CallRef`]'s [`DialogUsage`].
    pub dialogs: Arc<dyn UsageIndex<CallRef>>,
    /// The trunks (none configured: empty).
    pub trunks: crate::trunk::Trunks,
    /// RFC 4028 session timers (`session_expires` 0: off).
    pub session_timers: crate::dialog::session_timer::SessionTimerConfig,
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
                keepalive: parts.keepalive,
                overload: parts.overload,
                flows: parts.flows,
                location: parts.location,
                auth: parts.auth,
                records: parts.records,
                dialogs: CallDialogs(parts.dialogs),
                pending: ShardMap::with_shards(64),
                calls_active: AtomicU64::new(0),
                calls: ShardMap::new(),
                track_busy: std::sync::atomic::AtomicBool::new(false),
                engaged: ShardMap::new(),
                stats: B2buaStats::default(),
                routes: parts.routes,
                histograms: metrics::CallHistograms::new(),
                traces: parts.traces,
                watch: watch::CallWatch::new(),
                trunks: parts.trunks,
                session_timers: parts.session_timers,
                cluster: std::sync::OnceLock::new(),
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

    /// The calls in progress as dialog-package changes (phase early or confirmed): what a
    /// watcher that lost changes re-reads.
    pub fn call_changes(&self) -> Vec<watch::CallChange> {
        self.calls()
            .into_iter()
            .filter_map(|snap| {
                let caller = crate::sip::Uri::parse(&snap.from).ok()?;
                let callee = crate::sip::Uri::parse(&snap.to).ok()?;
                Some(watch::CallChange {
                    id: Arc::from(snap.id.as_str()),
                    phase: if snap.state == "answered" {
                        watch::CallPhase::Confirmed
                    } else {
                        watch::CallPhase::Early
                    },
                    call_id: Arc::from(snap.a_call_id.as_str()),
                    caller_tag: Arc::from(""),
                    our_tag: Arc::from(""),
                    caller: Arc::new(caller),
                    callee: Arc::new(callee),
                })
            })
            .collect()
    }

    /// Calls in progress (ringing or up).
    pub fn active_calls(&self) -> u64 {
        self.inner.calls_active.load(Ordering::Relaxed)
    }

    /// The calls in progress, oldest first.
    pub fn calls(&self) -> Vec<CallSnapshot> {
        let routes = &self.inner.routes;
        let mut all = self.inner.calls.map_entries(|id, e| {
            let route = e.summary.route.and_then(|r| routes.name(usize::from(r)));
            e.summary.snapshot(id, route.map(str::to_owned))
        });
        all.sort_by(|a, b| a.started.total_cmp(&b.started));
        all
    }

    /// Connects the caller (`to_caller`) or the callee of call `id` to `target` and
    /// releases the other party; `None` when there is no such call.
    pub async fn transfer(&self, id: &str, target: String, to_caller: bool) -> Option<DialOutcome> {
        let events = self.inner.calls.with(id, |e| e.events.clone())?;
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

    /// Dialogs in the server's dialog table (two per bridged call, and presence's
    /// subscriptions), for tests and the shutdown log.
    pub fn dialogs(&self) -> usize {
        self.inner.dialogs.len()
    }

    /// An INVITE outside any dialog, already validated: a new call.
    pub fn on_invite(&self, tx: ServerTransaction, req: Request) {
        use crate::dialog::session_timer::{uas_decide, UasDecision};
        let cfg = self.inner.session_timers;
        if cfg.session_expires == 0 {
            // Off: a caller that requires session timers is told so (RFC 3261 8.2.2.3).
            let required = req
                .headers
                .list("Require")
                .iter()
                .any(|t| t.eq_ignore_ascii_case("timer"));
            if required {
                let mut r = req.response(420);
                r.headers.push("Unsupported", "timer");
                let _ = tx.respond(r);
                return;
            }
        } else if let UasDecision::TooBrief { min_se } = uas_decide(cfg, &req.headers) {
            // RFC 4028 9: an interval below our minimum gets 422 with our Min-SE.
            let mut r = req.response(422).with_reason("Session Interval Too Small");
            r.set_to_tag(&crate::sip::new_tag());
            r.headers.push("Min-SE", min_se.to_string());
            self.inner
                .stats
                .session_too_brief
                .fetch_add(1, Ordering::Relaxed);
            let _ = tx.respond(r);
            return;
        }
        self.inner
            .stats
            .calls_started
            .fetch_add(1, Ordering::Relaxed);
        Call::start(self.inner.clone(), tx, req);
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
    // One buffer: user, `@`, the host lower-cased in place, the port.
    let user = u.user.as_deref().unwrap_or_default();
    let mut key = String::with_capacity(user.len() + 32);
    key.push_str(user);
    key.push('@');
    let host_start = key.len();
    // Writing into a String cannot fail.
    let _ = u.host.write_to(&mut key);
    key[host_start..].make_ascii_lowercase();
    if let Some(p) = u.port {
        let _ = crate::sip::write_port(&mut key, p);
    }
    key
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

#[cfg(test)]
mod engaged_key_tests {
    use super::engaged_key;

    /// The key is `user@host[:port]` with the host in lower case, the user as written.
    #[test]
    fn keys_are_user_at_lower_case_host_and_port() {
        assert_eq!(
            engaged_key("sip:Alice@PBX.Example.com:5070;transport=udp").as_deref(),
            Some("Alice@pbx.example.com:5070")
        );
        assert_eq!(
            engaged_key(" sip:1042@192.0.2.7 ").as_deref(),
            Some("1042@192.0.2.7")
        );
        assert_eq!(
            engaged_key("sip:[2001:DB8::1]:5060").as_deref(),
            Some("@[2001:db8::1]:5060")
        );
        assert_eq!(engaged_key("not a uri"), None);
    }
}
