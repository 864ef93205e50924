//! One call: the caller's leg (A, where we are the UAS) and the callee's legs (B, where we
//! are the UAC; several while a dial forks), run as one task that owns all of the call's
//! state. Everything that happens to the call arrives as a [`CallEvent`] on its channel,
//! so no lock guards call state and nothing waits on anything else's lock.
//!
//! The script's `on_invite` runs as its own task and talks to this one through
//! [`CallEvent::Dial`]: a dial is a request with a reply channel.
//!
//! The call is made of parts, each a sans-IO state machine that owns its state and is
//! unit-tested on tokio's paused clock; the task feeds them events and runs the actions
//! they return (sends, timers, script replies):
//! - [`caller`]: answering the caller's INVITE (provisionals, PRACK, 2xx until ACK,
//!   CANCEL);
//! - [`fork`]: the B side's INVITE branches and the dial (RFC 3261 9.1 CANCEL rules, late
//!   2xx, 16.7 best response, ring timeout, where an outcome came from);
//! - [`bridge`]: the two dialogs and relaying between them (glare, ACK mapping, hold);
//! - `transfer`: REFER, Replaces and server transfers (its own state enum; its steps are
//!   still methods of the call);
//! - [`control`]: the script's handle on the call.
//!
//! After the call ends, its task stays only while a branch still owes a CANCEL or may
//! answer late (bounded by 128*T1), so that nobody's phone rings on or is answered into
//! silence.

mod bridge;
mod caller;
mod control;
mod fork;
mod invite;
mod record;
mod session;
#[cfg(test)]
mod test_util;
mod transfer;

use bridge::{copy_relayed, has_tag, Bridge, Reinvite, SentAck};
use caller::{CallerLeg, Prack};
pub use control::transfer_via;
use control::{CallAuth, Control};
use fork::{Fork, Owner};
use invite::CallerInvite;
pub use transfer::{refer_to, HandedLeg, TransferKind, TransferNote};
use transfer::{Transfer, TransferStep};

use super::records::CallDetail;
use super::{B2buaInner, CallRef, DialogKey};
use crate::b2bua::{
    CallHookSet, CallInfo, CallRecord, CallScriptHandle, DialOptions, DialOutcome, DialSource,
    DialTarget, HeaderList, InviteOutcome, UriInfo,
};
use crate::dialog::{Dialog, DialogState};
use crate::sip::{new_tag, Headers, Method, NameAddr, Request, Response, Uri};
use crate::transaction::{ClientEvent, ServerTransaction};
use crate::transport::{Target, TransportKind};
use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Which leg of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller's leg: we are its UAS.
    A,
    /// The callee's leg: we are its UAC.
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// The sending side of a call's event queue.
///
/// futures-channel's queue rather than tokio's (issue 14, memory per held call): tokio's
/// unbounded channel is ~1.1 KB per call before its first message (cache-padded counters
/// and a first block of 32 slots), futures-channel's is one small node list (~100 bytes)
/// that allocates per message instead, and a call gets about a dozen messages. Events are
/// boxed so that the call task's future stays small while it waits on one.
#[derive(Clone)]
pub struct Events(EventSender);

type EventSender = futures_channel::mpsc::UnboundedSender<Box<CallEvent>>;
type EventReceiver = futures_channel::mpsc::UnboundedReceiver<Box<CallEvent>>;

impl Events {
    /// Queues an event; gives it back when the call has ended.
    pub fn post(&self, ev: CallEvent) -> Result<(), Box<CallEvent>> {
        self.0
            .unbounded_send(Box::new(ev))
            .map_err(futures_channel::mpsc::TrySendError::into_inner)
    }

    /// Whether both reach the same call.
    pub fn same(&self, other: &Events) -> bool {
        self.0.same_receiver(&other.0)
    }
}

/// The next event of a call's queue (None once every sender is gone).
async fn next_event(rx: &mut EventReceiver) -> Option<Box<CallEvent>> {
    use futures_core::Stream;
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rx).poll_next(cx)).await
}

pub enum CallEvent {
    /// A request inside one of the call's dialogs (not ACK).
    Request {
        side: Side,
        branch: Option<u64>,
        tx: ServerTransaction,
        req: Request,
    },
    /// An ACK for a 2xx we sent on leg A or B.
    Ack { side: Side, req: Request },
    /// CANCEL of the caller's INVITE (already answered 200 by the B2BUA).
    Cancel,
    /// What a client transaction of ours reported.
    Client { id: u64, event: ClientEvent },
    /// A response that matched no client transaction (2xx retransmission).
    Stray { resp: Response },
    /// From `call:authenticate()`: headers for the caller's final answer (the 407's
    /// Proxy-Authenticate challenges).
    FinalHeaders(Vec<(String, String)>),
    /// From the script: dial these targets.
    Dial {
        targets: Vec<DialTarget>,
        opts: DialOptions,
        reply: oneshot::Sender<DialOutcome>,
        /// Told the index (in `targets`) of the target that answered (hunt groups).
        winner: Option<oneshot::Sender<usize>>,
    },
    /// From a hunt: a provisional response to the caller (182 Queued, RFC 3261 21.1.3).
    Provisional {
        status: u16,
        reason: String,
        headers: Vec<(String, String)>,
    },
    /// The script's `on_invite` has returned.
    HookDone(InviteOutcome),
    /// From `call:set_route`: count the call under this route.
    Route(usize),
    /// The script's `on_refer` verdict on the REFER being held.
    ReferDecided(crate::b2bua::ReferVerdict),
    /// `call:transfer` or the admin API: connect `party` to `target`.
    Transfer {
        target: String,
        party: Side,
        reply: oneshot::Sender<DialOutcome>,
    },
    /// The leg an INVITE with Replaces takes over (or why not).
    ReplacesReady(Result<HandedLeg, (u16, String)>),
    /// Another call's attended transfer (or an INVITE with Replaces) names our `named`
    /// leg: hand over the other leg to it and end `named`.
    Handover {
        named: Side,
        from_tag: String,
        reply: oneshot::Sender<Result<HandedLeg, (u16, String)>>,
    },
}

/// What a client transaction of ours is for. Small (the relayed request is boxed): the
/// map of them keeps its capacity for the whole call, and with inline requests that was
/// ~3 KiB of every established call (heaptrack, issue 14).
enum Purpose {
    /// An INVITE branch of a dial.
    Branch(u64),
    /// An in-dialog request relayed from the other leg, to be answered on `server`.
    Relay {
        from: Side,
        server: ServerTransaction,
        orig: Box<Request>,
    },
    /// A step of a transfer.
    Transfer(TransferStep),
    /// A CANCEL, BYE or PRACK of our own whose answer changes nothing.
    Own,
    /// An in-dialog OPTIONS of `call.keepalive_s` to this side.
    Keepalive(Side),
    /// Our session refresh (RFC 4028) on this side: UPDATE, or re-INVITE with CSeq `seq`.
    Refresh { side: Side, seq: u32 },
    /// A request on the leg to a trunk with credentials, kept until it is answered so that
    /// a 401/407 can be answered by sending it again (`tries` so far); `purpose` is what
    /// its answer is for.
    ToTrunk {
        purpose: Box<Purpose>,
        req: Box<Request>,
        tries: u8,
    },
}

/// What [`Call::new_leg`] builds an INVITE from.
struct NewLeg {
    dest: Target,
    uri: Uri,
    from: NameAddr,
    to: NameAddr,
    headers: Headers,
    body: Bytes,
    max_forwards: u32,
    /// Position of the target in the dial's target list.
    index: usize,
}

/// A leg [`Call::new_leg`] made, for [`Call::send_leg`].
struct LegToSend {
    bid: u64,
    owner: Owner,
    index: usize,
    invite: Request,
    dest: Target,
}

/// What became of a 401/407 on a branch.
enum Challenge {
    /// Sent again with credentials: the branch rings on.
    Answered,
    /// Our credentials were refused, or there are none to give.
    Refused,
    /// Not a branch through a trunk (or no longer one that may be sent again).
    NotOurs,
}

/// Where the dial in progress reports to: the script's `call:dial`.
struct DialReply {
    reply: oneshot::Sender<DialOutcome>,
    /// Told the index of the target that answered (hunt groups).
    winner: Option<oneshot::Sender<usize>>,
}

/// The call's client transactions in progress, by id, with what each is for. A call has
/// a handful at most: a vector searched in order costs 24 bytes in `Call` where a hash
/// map cost 48 (issue 14), and is as quick at that size.
#[derive(Default)]
struct ClientMap(Vec<(u64, Purpose)>);

impl ClientMap {
    fn insert(&mut self, id: u64, purpose: Purpose) {
        match self.0.iter_mut().find(|(i, _)| *i == id) {
            Some(slot) => slot.1 = purpose,
            None => self.0.push((id, purpose)),
        }
    }
    fn get(&self, id: &u64) -> Option<&Purpose> {
        self.0.iter().find(|(i, _)| i == id).map(|(_, p)| p)
    }
    fn remove(&mut self, id: &u64) -> Option<Purpose> {
        let at = self.0.iter().position(|(i, _)| i == id)?;
        let (_, purpose) = self.0.swap_remove(at);
        if self.0.is_empty() {
            // An established call keeps no buffer for the transactions it had.
            self.0 = Vec::new();
        }
        Some(purpose)
    }
    /// Forgets the transactions of the INVITE branch `bid` (sent to a trunk or not).
    fn forget_branch(&mut self, bid: u64) {
        self.0.retain(|(_, p)| {
            !matches!(p, Purpose::Branch(b) if *b == bid)
                && !matches!(p, Purpose::ToTrunk { purpose, .. } if matches!(**purpose, Purpose::Branch(b) if b == bid))
        });
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
    }
    fn values(&self) -> impl Iterator<Item = &Purpose> {
        self.0.iter().map(|(_, p)| p)
    }
    fn drain(&mut self) -> std::vec::Drain<'_, (u64, Purpose)> {
        self.0.drain(..)
    }
}

/// Who ended the call, as call records name it (`record.hangup_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HangupBy {
    Caller,
    Callee,
    System,
    /// RFC 4028: a session timer ran out.
    SessionTimer,
}

impl HangupBy {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            HangupBy::Caller => "caller",
            HangupBy::Callee => "callee",
            HangupBy::System => "system",
            HangupBy::SessionTimer => "session_timer",
        }
    }
}

/// `call:dial`'s `max_duration`: kept while the dial rings, armed when it answers.
#[derive(Clone, Copy)]
enum MaxDuration {
    Off,
    Pending(Duration),
    Until(Instant),
}

impl MaxDuration {
    fn until(self) -> Option<Instant> {
        match self {
            MaxDuration::Until(t) => Some(t),
            _ => None,
        }
    }
}

/// The call's optional deadlines, boxed together: most calls have neither (no
/// `max_duration`, `call.keepalive_s = 0` by default), and inline they were 40 bytes of
/// every held call.
struct Deadlines {
    /// `call:dial`'s `max_duration`, pending until the answer, then its deadline.
    max_duration: MaxDuration,
    /// The next in-dialog OPTIONS to both parties (`call.keepalive_s`), once answered.
    keepalive_at: Option<Instant>,
}

/// The state a call keeps once it has been through a transfer (or an INVITE with
/// Replaces). Out of `Call` itself: an established call without transfers (nearly all)
/// carries one pointer for it instead of ~120 bytes (issue 14).
#[derive(Default)]
struct AfterTransfer {
    /// Legs replaced by a transfer, until their BYE; then only their keys (stray
    /// requests on them are answered, not relayed).
    old_legs: Vec<Dialog>,
    old_keys: Vec<DialogKey>,
    /// The ACK of a transfer's re-INVITE, for its retransmitted 2xx.
    reinvite_ack: Option<(Target, Box<SentAck>)>,
    /// Transfers of this call, for the record.
    notes: Vec<TransferNote>,
    /// The dialog an INVITE with Replaces took over, until its party answered.
    replacing: Option<Dialog>,
    /// The side a failed transfer's resuming re-INVITE went to.
    resume_side: Option<Side>,
    /// watch: the parties after a transfer (caller, callee); None: the INVITE's.
    watch_parties: Option<(Arc<Uri>, Arc<Uri>)>,
}

pub struct Call {
    id: Arc<str>,
    inner: Arc<B2buaInner>,
    events: Events,
    rx: EventReceiver,
    /// The caller's INVITE transaction until the caller's ACK confirms the call: the
    /// transaction (its request and last response) is not kept for the call's life.
    a_tx: Option<ServerTransaction>,
    /// The caller's INVITE: whole during set-up, its identifiers once established.
    a_invite: CallerInvite,
    a_source: Target,
    /// How the caller's INVITE is answered (provisionals, PRACK, 2xx until ACK, CANCEL).
    caller: CallerLeg,
    /// The two dialogs and what relaying between them remembers (glare, ACK, hold).
    bridge: Bridge,
    /// The B side's INVITE branches and the dial in progress.
    fork: Fork,
    /// Boxed: only while a dial rings.
    dial_reply: Option<Box<DialReply>>,
    clients: ClientMap,
    next_id: u64,
    /// `max_duration` and keep-alives, when the call has either.
    deadlines: Option<Box<Deadlines>>,
    /// The script version the call started on: it finishes there (hot reload).
    version: Arc<dyn CallHookSet>,
    script: Option<CallScriptHandle>,
    hook_running: bool,
    start: SystemTime,
    answer: Option<SystemTime>,
    hangup_by: HangupBy,
    final_status: u16,
    ended: bool,
    /// `call:set_route`'s route number.
    route: Option<u16>,
    /// B legs dialled so far (their trace names: B1, B2...).
    legs: u32,
    /// RFC 4028 session timers of the two legs, when either has one.
    session: Option<Box<session::SessionTimers>>,
    /// A transfer in progress (REFER, `call:transfer`, admin API).
    transfer: Option<Box<Transfer>>,
    /// What transfers leave behind (most calls have none: boxed, made by the first).
    after: Option<Box<AfterTransfer>>,
    /// True once the call has ended: the hunt waits on it (CANCEL while queued, wrap-up).
    ended_tx: control::EndedTx,
    /// Keys in the B2BUA's `engaged` index this call holds while answered.
    /// A boxed slice: written once when the call is answered (or transferred), 8 bytes
    /// fewer than a `Vec`.
    engaged: Box<[String]>,
    /// watch: the last phase posted to the call watch.
    watched: Option<super::watch::CallPhase>,
    /// cluster: the fingerprint of the record last queued for Redis (0: none), see
    /// `record.rs`.
    record: u64,
}

fn uri_info(n: &NameAddr) -> UriInfo {
    UriInfo {
        uri: n.uri.to_text(),
        user: n.uri.user.clone(),
        host: n.uri.host.to_text(),
    }
}

impl Call {
    /// Creates the call for an INVITE that passed validation and starts its task.
    pub fn start(inner: Arc<B2buaInner>, tx: ServerTransaction, invite: Request) {
        let (events, rx) = futures_channel::mpsc::unbounded();
        let events = Events(events);
        let id: Arc<str> = Arc::from(new_tag());
        let a_tag = new_tag();
        let source = tx.source();
        let a_dialog = Dialog::uas(&invite, &a_tag, source);
        let a_contact = inner.local.contact_in(&source, &invite.uri);
        let key = DialogKey::new(&invite.base.call_id, &a_tag);
        inner
            .dialogs
            .insert(key, CallRef::new(events.clone(), Side::A, None));
        let a_supports_100rel = has_tag(&invite.headers, "Supported", "100rel")
            || has_tag(&invite.headers, "Require", "100rel");
        // The script's digest checks need the INVITE for the whole call (a copy only where
        // `call:authenticate` can be used at all).
        let auth_invite = inner.auth.is_some().then(|| invite.clone());
        let call = Call {
            id: id.clone(),
            inner: inner.clone(),
            events: events.clone(),
            rx,
            a_tx: Some(tx),
            a_source: source,
            bridge: Bridge::new(a_dialog, a_contact),
            caller: CallerLeg::new(a_supports_100rel),
            fork: Fork::new(inner.timers.t1),
            dial_reply: None,
            clients: ClientMap::default(),
            next_id: 1,
            deadlines: None,
            version: inner.scripts.current(),
            script: None,
            hook_running: true,
            start: SystemTime::now(),
            answer: None,
            hangup_by: HangupBy::Caller,
            final_status: 0,
            ended: false,
            route: None,
            legs: 0,
            transfer: None,
            after: None,
            ended_tx: control::EndedTx::new(),
            engaged: Box::default(),
            watched: None,
            record: 0,
            session: None,
            a_invite: CallerInvite::new(invite),
        };
        inner.calls_active.fetch_add(1, Ordering::Relaxed);
        inner.calls.insert(
            call.id.clone(),
            super::CallEntry {
                events: events.clone(),
                summary: Box::new(super::summary::CallSummary::new(
                    call.a_invite.call_id(),
                    &call.a_invite.from().uri.to_text(),
                    &call.a_invite.to().uri.to_text(),
                    &crate::transport::peer_text(source.transport, &source.addr),
                    unix_secs(call.start),
                )),
            },
        );
        inner
            .pending
            .insert(call.pending_key(), call.events.clone());
        if let Some(t) = &inner.traces {
            // The INVITE and the 100 Trying the transaction layer sent at once (RFC 3261
            // 17.2.1) went by before the call existed: they open its ladder.
            let a_call_id = call.a_invite.call_id();
            t.start_call(&call.id, a_call_id);
            t.record(
                a_call_id,
                crate::trace::Direction::In,
                &source,
                crate::trace::Line::Request(&Method::Invite, &call.a_invite.uri()),
            );
            t.record(
                a_call_id,
                crate::trace::Direction::Out,
                &source,
                crate::trace::Line::Text("SIP/2.0 100 Trying"),
            );
        }
        let info = call.call_info();
        let version = call.version.clone();
        let control = Arc::new(Control {
            events: events.clone(),
            ended: call.ended_tx.subscribe(),
            auth: inner
                .auth
                .clone()
                .zip(auth_invite)
                .map(|((auth, users), invite)| {
                    Box::new(CallAuth {
                        auth,
                        users,
                        invite,
                        source: source.addr.ip(),
                    })
                }),
        });
        // RFC 3891: an INVITE with Replaces joins the other party of the dialog it names;
        // the dial plan does not run for it.
        let replaces = call
            .a_invite
            .whole()
            .and_then(|r| r.headers.get("Replaces"))
            .map(|v| transfer::parse_replaces(v).ok_or((400, "Bad Replaces".to_owned())));
        match replaces {
            Some(ids) => {
                let inner = inner.clone();
                tokio::spawn(async move {
                    let leg = match ids {
                        Ok((call_id, to_tag, from_tag)) => {
                            transfer::take_leg(&inner, &events, &call_id, &to_tag, &from_tag).await
                        }
                        Err(e) => Err(e),
                    };
                    let _ = events.post(CallEvent::ReplacesReady(leg));
                });
            }
            None => {
                tokio::spawn(async move {
                    let outcome = version.on_invite(info, control).await;
                    let _ = events.post(CallEvent::HookDone(outcome));
                });
            }
        }
        let mut call = Box::new(call);
        call.watch(super::watch::CallPhase::Trying); // watch:
        tokio::spawn(call.run());
    }

    /// watch: tells the call watch (dialog event package) that the call reached `phase`,
    /// once per phase; builds nothing when nobody watches.
    fn watch(&mut self, phase: super::watch::CallPhase) {
        if self.watched == Some(phase) {
            return;
        }
        self.watched = Some(phase);
        self.post_watch(phase);
    }

    /// watch: the change as the call's current parties see it.
    fn post_watch(&self, phase: super::watch::CallPhase) {
        let w = &self.inner.watch;
        if !w.is_watched() {
            return;
        }
        let a = &self.a_invite;
        let (caller, callee) = match self.after.as_ref().and_then(|t| t.watch_parties.as_ref()) {
            Some((caller, callee)) => (caller.clone(), callee.clone()),
            None => (
                Arc::new(a.from().uri.clone()),
                Arc::new(a.uri().into_owned()),
            ),
        };
        w.post(super::watch::CallChange {
            id: self.id.clone(),
            phase,
            call_id: Arc::from(a.call_id()),
            caller_tag: Arc::from(a.caller_tag()),
            our_tag: Arc::from(self.bridge.a.local_tag()),
            caller,
            callee,
        });
    }

    /// watch: a transfer changed who is on the call: the dialog ends for the parties that
    /// were on it and is confirmed for the new ones (busy lamps follow the transfer).
    fn watch_new_parties(&mut self, caller: Uri, callee: Uri) {
        self.post_watch(super::watch::CallPhase::Terminated);
        self.after_transfer().watch_parties = Some((Arc::new(caller), Arc::new(callee)));
        self.watched = Some(super::watch::CallPhase::Confirmed);
        self.post_watch(super::watch::CallPhase::Confirmed);
    }

    /// What transfers leave behind, made on first use.
    fn after_transfer(&mut self) -> &mut AfterTransfer {
        self.after.get_or_insert_with(Box::default)
    }

    fn pending_key(&self) -> DialogKey {
        DialogKey::new(self.a_invite.call_id(), self.a_invite.caller_tag())
    }

    /// The trunk this call came in from: the `line` parameter of a registering trunk's
    /// contact (the carrier calls us at the contact we registered), else the trunk whose
    /// `inbound` sources hold the caller's address.
    fn inbound_trunk(&self) -> Option<&Arc<crate::trunk::Trunk>> {
        let trunks = &self.inner.trunks;
        if trunks.is_empty() {
            return None;
        }
        let by_line = self
            .a_invite
            .uri()
            .params
            .value("line")
            .and_then(|l| trunks.from_line(l));
        by_line.or_else(|| trunks.from_source(self.a_source.addr.ip()))
    }

    fn call_info(&self) -> CallInfo {
        let r = &self.a_invite;
        let ruri = r.uri();
        CallInfo {
            id: self.id.to_string(),
            from: uri_info(&r.from()),
            to: uri_info(&r.to()),
            ruri: UriInfo {
                uri: ruri.to_text(),
                user: ruri.user.clone(),
                host: ruri.host.to_text(),
            },
            source: crate::transport::peer_text(self.a_source.transport, &self.a_source.addr),
            headers: r
                .whole()
                .map(|r| HeaderList::of(r.headers.iter().map(|h| (&*h.name, h.value.as_str()))))
                .unwrap_or_default(),
            trunk: self.inbound_trunk().map(|t| t.name().to_string()),
        }
    }

    // The call lives on the heap and the task holds a pointer: a call waits most of its
    // life, and a large task future is memory every established call pays for.
    async fn run(mut self: Box<Self>) {
        // The event is handled after the `select!`, not in its arm: an arm's await keeps
        // the timer and the other branch alive beside the handler's future, and the task
        // of every held call was one allocator size class larger for it (issue 14).
        let mut timer = CallTimer::default();
        while !self.ended || self.hook_running {
            timer.set(self.next_deadline());
            let woke = tokio::select! {
                ev = next_event(&mut self.rx) => Some(ev),
                () = timer.fired() => None,
            };
            match woke {
                Some(Some(ev)) => self.on_event(ev).await,
                // Unreachable while we hold a sender ourselves; end cleanly anyway.
                Some(None) => {
                    self.end(HangupBy::System);
                    self.hook_running = false;
                }
                None => self.on_timers(),
            }
            // cluster: what another node needs to end the call, if it changed.
            self.sync_record();
        }
        self.finish();
        // A branch cancelled before its callee's first provisional still owes a CANCEL
        // (RFC 3261 9.1) or an ACK and BYE for a late 2xx (13.2.2.4), and a BYE to a trunk
        // may be challenged (RFC 3261 22.2): the task stays for their events, bounded in
        // case the transaction layer never reports.
        let bound = Instant::now() + self.inner.timers.t1 * 128;
        while (!self.fork.is_settled() || self.trunk_requests_pending()) && Instant::now() < bound {
            timer.set(Some(self.fork.deadline().map_or(bound, |d| d.min(bound))));
            let woke = tokio::select! {
                Some(ev) = next_event(&mut self.rx) => Some(ev),
                () = timer.fired() => None,
            };
            match woke {
                Some(ev) => self.on_event(ev).await,
                None => self.on_timers(),
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        if let Some(t) = self.caller.deadline() {
            consider(t);
        }
        if let Some(d) = self.fork.deadline() {
            consider(d);
        }
        if let Some(m) = self.max_duration_until() {
            consider(m);
        }
        if let Some(k) = self.keepalive_at() {
            consider(k);
        }
        if let Some(s) = self.session_deadline() {
            consider(s);
        }
        if let Some(t) = self.transfer_deadline() {
            consider(t);
        }
        if let Some(t) = self.kept_ack_until() {
            consider(t);
        }
        next
    }

    /// Until when the ACK for the callee's 2xx is kept for its retransmissions: 64*T1
    /// after it was sent, when the callee has stopped retransmitting (RFC 3261 13.3.1.4).
    fn kept_ack_until(&self) -> Option<Instant> {
        let ack = self.bridge.b_ack.as_ref()?;
        Some(ack.sent + self.inner.timers.t1 * 64)
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        for action in self.caller.on_timer(now, self.inner.timers.t2) {
            match action {
                caller::Action::Resend(sent) => {
                    if let Some(tx) = &self.a_tx {
                        // The To tag was recorded when it first went.
                        let _ = tx.respond_written(sent.status, None, sent.bytes);
                    }
                }
                caller::Action::NoAck => {
                    tracing::info!(call = %self.id, "no ACK from the caller for the 2xx; ending the call");
                    self.hangup(HangupBy::System, None);
                }
                caller::Action::NoPrack => {
                    self.reply_a_final(504, "No PRACK for reliable provisional");
                    let a = self
                        .fork
                        .end_dial(487, "Request Terminated", DialSource::Local);
                    self.run_fork(a, None);
                }
            }
        }
        // The dial's ring timeout, and CANCELled branches given up (RFC 3261 9.1).
        let a = self.fork.on_timer(now);
        self.run_fork(a, None);
        self.on_transfer_timeout();
        if self.keepalive_at().is_some_and(|t| now >= t) {
            self.send_keepalives(now);
        }
        if self.session_deadline().is_some_and(|t| now >= t) {
            self.on_session_timers(now);
        }
        if self.kept_ack_until().is_some_and(|t| now >= t) {
            self.bridge.b_ack = None;
            // The answered branch's transaction ended before this (Timer M, 64*T1 after
            // its 2xx, RFC 6026 7.2): no event can come for it any more, and an
            // established call keeps no entry (issue 14: 128 bytes of every held call).
            if let Some(bid) = self.bridge.b_branch {
                self.clients.forget_branch(bid);
            }
        }
        if self.max_duration_until().is_some_and(|t| now >= t) {
            self.set_max_duration(MaxDuration::Off);
            tracing::info!(call = %self.id, "maximum call duration reached");
            self.hangup(HangupBy::System, None);
        }
    }

    /// Takes the event boxed: the task's future holds this call's argument while it waits,
    /// and an inline event is ~850 bytes of every call.
    async fn on_event(&mut self, ev: Box<CallEvent>) {
        if let (CallEvent::Dial { .. }, 0, Some(overload)) = (&*ev, self.legs, &self.inner.overload)
        {
            // How long the call's first dial took to come out of the script: mostly the
            // wait for a VM (issue 15's overload signal; the script's own time is µs).
            let waited = SystemTime::now()
                .duration_since(self.start)
                .unwrap_or_default();
            overload.observe(crate::overload::Queue::Script, waited, Instant::now());
        }
        match *ev {
            CallEvent::Dial {
                targets,
                opts,
                reply,
                winner,
                // Boxed: inline, the dial's future (name resolution) would sit in every call's
                // task for the whole call, several KiB each.
            } => Box::pin(self.start_dial(targets, opts, reply, winner)).await,
            CallEvent::Provisional {
                status,
                reason,
                headers,
            } => self.send_a_provisional(status, &reason, headers),
            CallEvent::HookDone(outcome) => self.on_hook_done(outcome),
            CallEvent::Client { id, event } => self.on_client(id, event),
            CallEvent::Cancel => self.on_cancel(),
            CallEvent::Ack { side, req } => self.on_ack(side, req),
            CallEvent::Request {
                side,
                branch,
                tx,
                req,
            } => self.on_request(side, branch, tx, req),
            CallEvent::Stray { resp } => self.on_stray(resp),
            CallEvent::FinalHeaders(h) => self.caller.set_final_headers(h),
            CallEvent::Route(r) => {
                // Route numbers are below `MAX_ROUTES` (64).
                self.route = u16::try_from(r).ok();
                let route = self.route;
                self.inner.calls.with(&self.id, |e| e.summary.route = route);
            }
            // Boxed like the dial: the transfer's futures resolve names and wait on other
            // calls.
            CallEvent::ReferDecided(v) => Box::pin(self.on_refer_decided(v)).await,
            CallEvent::Transfer {
                target,
                party,
                reply,
            } => Box::pin(self.start_server_transfer(target, party, reply)).await,
            CallEvent::Handover {
                named,
                from_tag,
                reply,
            } => self.on_handover(named, &from_tag, reply),
            CallEvent::ReplacesReady(leg) => self.on_replaces_ready(leg),
        }
    }

    /// Answers the caller's INVITE (nothing once the call is confirmed: see `a_tx`).
    fn respond_a(&self, r: Response) {
        if let Some(tx) = &self.a_tx {
            let _ = tx.respond(r);
        }
    }

    /// The headers that put a response to the caller's INVITE in A's dialog: the INVITE's
    /// Record-Route (RFC 3261 12.1.1) and our Contact. More go after them.
    fn dialog_headers_to_a(&self, status: u16) -> Headers {
        let mut headers = Headers::new();
        self.a_invite.record_routes(status, &mut headers);
        headers.push("Contact", self.bridge.a_contact.as_str());
        headers
    }

    /// A response to the caller's INVITE in A's dialog (our To tag), written from the
    /// INVITE's headers without copying them (`crate::sip::Reply`). None once the call is
    /// established (nothing answers the INVITE any more).
    fn write_to_a(
        &self,
        status: u16,
        reason: &str,
        headers: &Headers,
        body: &Bytes,
    ) -> Option<caller::Written> {
        let mut reply = self.a_invite.reply(status)?;
        reply.reason = reason;
        reply.to_tag = Some(self.bridge.a.local_tag());
        reply.headers = headers;
        reply.body = body;
        let bytes = crate::allocator::short_lived(|| reply.to_bytes());
        Some(caller::Written { status, bytes })
    }

    /// Sends what [`Call::write_to_a`] wrote on the caller's INVITE transaction.
    fn send_written_to_a(&self, sent: caller::Written) {
        if let Some(tx) = &self.a_tx {
            let _ = tx.respond_written(sent.status, Some(self.bridge.a.local_tag()), sent.bytes);
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends an ACK for a 2xx: end to end, outside any transaction (RFC 3261 13.2.2.4),
    /// logged like the transaction layer logs its messages.
    /// What was sent is returned, to be resent for a retransmitted 2xx. (A send error is
    /// only logged: the ACK's retransmission is driven by the peer's 2xx, and a lost ACK
    /// makes the peer end the call, RFC 3261 13.3.1.4.)
    fn send_ack(&self, target: &Target, ack: &Request) -> Box<SentAck> {
        let bytes = ack.to_bytes();
        // Kept 64*T1 (below), not for the call's life.
        let sent = crate::allocator::short_lived(|| {
            Box::new(SentAck {
                seq: ack.base.cseq.seq,
                bytes: Box::from(&bytes[..]),
                sent: Instant::now(),
            })
        });
        self.transmit_ack(target, &ack.base.call_id, bytes);
        sent
    }

    /// Sends an ACK as it was built before: the same bytes (RFC 3261 13.2.2.4).
    fn resend_ack(&self, target: &Target, ack: &SentAck) {
        let bytes = bytes::Bytes::copy_from_slice(&ack.bytes);
        self.transmit_ack(target, ack.call_id(), bytes);
    }

    fn transmit_ack(&self, target: &Target, call_id: &str, bytes: bytes::Bytes) {
        tracing::debug!(dir = "out", method = "ACK", call_id = %call_id, peer = %target.addr, transport = %target.transport);
        if let Some(t) = &self.inner.traces {
            t.record(
                call_id,
                crate::trace::Direction::Out,
                target,
                crate::trace::Line::Sent(&bytes),
            );
        }
        if let Err(e) = self.inner.sender.send(target, bytes) {
            tracing::debug!(call = %self.id, error = %e, "ACK not sent");
        }
    }

    /// Sends a request in a new client transaction whose events come back to this call.
    fn send_client(&mut self, req: Request, target: Target, purpose: Purpose) -> Option<u64> {
        self.send_client_ref(&req, target, purpose)
    }

    /// [`Call::send_client`] for a request the call keeps (a branch's INVITE): only read.
    fn send_client_ref(
        &mut self,
        req: &Request,
        mut target: Target,
        purpose: Purpose,
    ) -> Option<u64> {
        // RFC 3261 18.1.1: a request over 1300 octets (path MTU unknown) goes over TCP when
        // we have it; the Via then says TCP. (The request is serialized twice, and copied,
        // only then.)
        let over_tcp;
        let req = if target.transport == TransportKind::Udp
            && self.inner.local.has(TransportKind::Tcp)
            && crate::transport::needs_reliable(req.body.len() + 600)
            && crate::transport::needs_reliable(req.to_bytes().len())
        {
            target.transport = TransportKind::Tcp;
            target.connection = None;
            let mut copy = req.clone();
            if let Some(v) = copy.base.via.first_mut() {
                let fresh = self.inner.local.via(&target);
                v.transport = fresh.transport;
                v.host = fresh.host;
                v.port = fresh.port;
            }
            over_tcp = copy;
            &over_tcp
        } else {
            req
        };
        let id = self.new_id();
        // The transaction's events are posted to this call as they happen (no task in
        // between).
        let events = self.events.clone();
        // Kept by the transaction until it ends (32 s after the call's set-up).
        let sink: crate::transaction::ClientSink = crate::allocator::short_lived(|| {
            Box::new(move |event| {
                let _ = events.post(CallEvent::Client { id, event });
            })
        });
        let purpose = if self.to_trunk_with_credentials(req, &purpose) {
            Purpose::ToTrunk {
                purpose: Box::new(purpose),
                req: Box::new(req.clone()),
                tries: 0,
            }
        } else {
            purpose
        };
        match self.inner.layer.send_request_with(req, target, sink) {
            Ok(()) => {
                self.clients.insert(id, purpose);
                Some(id)
            }
            Err(e) => {
                tracing::debug!(call = %self.id, error = %e, "request not sent");
                None
            }
        }
    }

    // ---- dialing -------------------------------------------------------------------

    async fn start_dial(
        &mut self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
        reply: oneshot::Sender<DialOutcome>,
        winner: Option<oneshot::Sender<usize>>,
    ) {
        if self.caller.answered() || self.ended {
            let source = if self.caller.cancelled() {
                DialSource::Caller
            } else {
                DialSource::Local
            };
            self.count_dial(487);
            let _ = reply.send(DialOutcome::failed(487, "Request Terminated", source));
            return;
        }
        let Some(owner) = self.fork.start_dial(None) else {
            let _ = reply.send(DialOutcome::failed(
                491,
                "A dial is already in progress",
                DialSource::Local,
            ));
            return;
        };
        self.dial_reply = Some(Box::new(DialReply { reply, winner }));
        self.inner.stats.dials.fetch_add(1, Ordering::Relaxed);
        for (index, t) in targets.iter().enumerate() {
            if let Err((status, reason)) = self.start_branch(index, t, &opts, owner).await {
                self.fork.refused(index, status, reason);
            }
        }
        if let Some(max) = opts.max_duration {
            // Kept until answer; armed then.
            self.set_max_duration(MaxDuration::Pending(max));
        }
        // The ring timeout counts from when the targets were sent (after name resolution).
        let ring = opts.timeout.unwrap_or(self.inner.default_ring_timeout);
        self.fork.set_ring_deadline(Instant::now() + ring);
        let a = self.fork.settle();
        self.run_fork(a, None);
    }

    /// Where a request to `uri` goes first, and the addresses to fail over to (RFC 3263:
    /// NAPTR, SRV, AAAA/A; 4.3).
    async fn locate(&self, uri: &Uri) -> Result<(Target, Vec<Target>), (u16, String)> {
        let mut all = self.inner.local.locate(uri).await.map_err(|e| match e {
            // RFC 5630 3.1.3: no secure way there is "temporarily unavailable".
            crate::transport::ResolveError::Insecure(why) => (480, why),
            e => (503, e.to_string()),
        })?;
        if all.is_empty() {
            return Err((503, format!("{}: no address", uri.host)));
        }
        let first = all.remove(0);
        Ok((first, all))
    }

    async fn start_branch(
        &mut self,
        index: usize,
        target: &DialTarget,
        opts: &DialOptions,
        owner: Owner,
    ) -> Result<u64, (u16, String)> {
        let (uri, flow, dest, alternates, trunk) = match target {
            DialTarget::Uri(target) => {
                let uri = Uri::parse(target.trim())
                    .map_err(|e| (400, format!("Bad dial target {target:?}: {e}")))?;
                // A registered contact is reached where its REGISTER came from
                // (received/rport, the same TCP connection), through its Path (RFC 3327),
                // not by resolving its URI (a private address behind NAT).
                let flow = self
                    .inner
                    .flows
                    .as_ref()
                    .and_then(|f| f.flow(target.trim()));
                let (dest, alternates) = match &flow {
                    Some((t, _)) => (*t, Vec::new()),
                    None => self.locate(&uri).await?,
                };
                (uri, flow, dest, alternates, None)
            }
            DialTarget::Trunk { trunk, user } => {
                let Some(t) = self.inner.trunks.get(trunk) else {
                    return Err((404, format!("No trunk named {trunk:?}")));
                };
                // Down or full: refused at once, so the dial plan fails over (issue 16).
                let channel = t.seize().map_err(|why| (503, why.to_string()))?;
                let (dest, alternates) = self.locate(t.next_hop()).await?;
                (t.request_uri(user), None, dest, alternates, Some(channel))
            }
        };
        // RFC 3261 26.2, RFC 5630 3.1.3: a call asked for with sips: (by the caller or the
        // dial plan) goes out over TLS hops only, whatever the contact or trunk says.
        let sips = uri.scheme == crate::sip::Scheme::Sips
            || self.a_invite.uri().scheme == crate::sip::Scheme::Sips;
        if sips && !dest.transport.is_secure() {
            return Err((
                480,
                format!(
                    "sips: call cannot be secured: {} is reached over {}",
                    uri, dest.transport
                ),
            ));
        }
        let a = &self.a_invite;
        let caller_id = opts
            .caller_id
            .clone()
            .or_else(|| a.from().uri.user.clone())
            .unwrap_or_else(|| "anonymous".into());
        let privacy = match &trunk {
            Some(ch) => opts.privacy.unwrap_or_else(|| ch.trunk().privacy()),
            None => false,
        };
        let mut from = match (&opts.from, &trunk) {
            (Some(f), _) => {
                NameAddr::parse(f).map_err(|e| (400, format!("Bad from {f:?}: {e}")))?
            }
            (None, Some(ch)) => ch.trunk().from(&caller_id, privacy),
            (None, None) => {
                let mut f = a.from().into_owned();
                f.params.remove("tag");
                f
            }
        };
        from.set_tag(&new_tag());
        let to = match &opts.to {
            Some(t) => NameAddr::parse(t).map_err(|e| (400, format!("Bad to {t:?}: {e}")))?,
            None => NameAddr::new(uri.clone()),
        };
        let mut headers = Headers::new();
        if let Some((_, path)) = &flow {
            for hop in path {
                headers.push("Route", hop.clone());
            }
        }
        if let Some(proxy) = trunk.as_ref().and_then(|ch| ch.trunk().proxy()) {
            // RFC 3261 8.1.2: a pre-loaded route to the trunk's outbound proxy (loose
            // routing, RFC 3261 16.12.1.1).
            let mut hop = proxy.clone();
            if !hop.params.has("lr") {
                hop.params.set("lr", None);
            }
            headers.push("Route", format!("<{hop}>"));
        }
        headers.push("Contact", self.inner.local.contact_in(&dest, &uri));
        if let Some(r) = a.whole() {
            copy_relayed(&r.headers, &mut headers);
        }
        if let Some(ch) = &trunk {
            // RFC 3325 9.1/9.2 and RFC 3323 4.2: our identity header and privacy for the
            // carrier (the caller's own P-Asserted-Identity is not relayed).
            if let Some((name, value)) = ch.trunk().identity(&caller_id) {
                headers.push(name, value);
            }
            if privacy {
                headers.push("Privacy", "id");
            }
        }
        headers.push("Allow", Method::allow_list());
        if self.caller.supports_100rel() {
            headers.push("Supported", "100rel");
        }
        self.offer_session_timer(&mut headers, None);
        for (name, value) in &opts.headers {
            headers.push(name, value.clone());
        }
        // RFC 3261 16.6 step 3 by analogy: the hop count goes on down.
        let max_forwards = a.max_forwards().unwrap_or(70).saturating_sub(1);
        let leg = NewLeg {
            dest,
            uri,
            from,
            to,
            headers,
            body: a.whole().map(|r| r.body.clone()).unwrap_or_default(),
            max_forwards,
            index,
        };
        let leg = self.new_leg(leg, owner);
        let bid = leg.bid;
        // A target being rung counts as on a call for hunt groups (it would otherwise get
        // a second call while it rings).
        let ringing =
            super::B2bua::tracks_busy(&self.inner).then(|| super::engaged_key_of(&leg.invite.uri));
        if let Some(k) = &ringing {
            super::engage(&self.inner.engaged, k);
        }
        let sent = self.send_leg(leg, Purpose::Branch(bid), |b| {
            b.trunk = trunk;
            b.alternates = alternates;
            b.ringing = ringing;
        });
        match sent {
            true => Ok(bid),
            false => Err((503, "Transport error".into())),
        }
    }

    /// Sends a leg [`Call::new_leg`] made and keeps it as a branch of the fork (`fill` sets
    /// the branch's extras). The branch keeps the INVITE the transaction was given to read
    /// (issue 14: no copy of it per call). False when it could not be sent: the branch is
    /// gone again.
    fn send_leg(
        &mut self,
        leg: LegToSend,
        purpose: Purpose,
        fill: impl FnOnce(&mut fork::Branch),
    ) -> bool {
        let LegToSend {
            bid,
            owner,
            index,
            invite,
            dest,
        } = leg;
        let sent = self.send_client_ref(&invite, dest, purpose).is_some();
        fill(self.fork.add(bid, owner, index, invite, dest));
        if !sent {
            self.remove_branch_key(bid);
            self.fork.remove(bid);
        }
        sent
    }

    /// A new INVITE leg (fresh Call-ID, CSeq 1) indexed as a B-side branch of this call and
    /// traced; [`Call::send_leg`] sends it.
    fn new_leg(&mut self, leg: NewLeg, owner: Owner) -> LegToSend {
        let NewLeg {
            dest,
            uri,
            from,
            to,
            headers,
            body,
            max_forwards,
            index,
        } = leg;
        let mut invite = self
            .inner
            .local
            .new_request(Method::Invite, uri, from, to, &dest);
        invite.max_forwards = Some(max_forwards);
        invite.headers = headers;
        invite.body = body;
        let bid = self.new_id();
        if let Some(t) = &self.inner.traces {
            self.legs += 1;
            t.add_leg(&self.id, &invite.base.call_id, u64::from(self.legs));
        }
        let key = DialogKey::new(&invite.base.call_id, invite.base.from.tag().unwrap_or(""));
        self.inner
            .dialogs
            .insert(key, CallRef::new(self.events.clone(), Side::B, Some(bid)));
        LegToSend {
            bid,
            owner,
            index,
            invite,
            dest,
        }
    }

    /// Keeps the call's Lua state for `on_call_end`, or frees it now when the script has
    /// no `on_call_end` (nothing would read `call.vars` again): memory per established call.
    fn keep_script(&mut self, handle: CallScriptHandle) {
        if self.version.has_on_call_end() || self.version.has_on_refer() {
            self.script = Some(handle);
        }
    }

    /// The call is established (both 2xx ACKed): what only the set-up needed goes, since an
    /// established call may last hours and memory per call is what a busy PBX pays for.
    /// Kept: the dialogs, the base headers of the INVITEs (Call-ID, tags and CSeq for
    /// matching), the ACK sent to B (for 2xx retransmissions).
    fn compact(&mut self) {
        self.a_tx = None;
        let winner = self.bridge.b_branch;
        for b in self.fork.branches_mut() {
            if Some(b.id()) != winner && !b.is_pending() {
                release_branch(&self.inner, &self.events, b);
            }
        }
        self.fork.compact(winner);
        self.a_invite.compact();
        self.caller.compact();
        if let Some(t) = &self.inner.traces {
            t.settle(&self.id);
        }
    }

    /// Removes a dialog from the B2BUA's index if it still routes to this call (a leg
    /// handed over to another call, RFC 3891, is that call's entry by now).
    fn unindex(&self, key: &DialogKey) {
        self.inner
            .dialogs
            .remove_if(key, |r| r.events.same(&self.events));
    }

    fn remove_branch_key(&mut self, bid: u64) {
        if let Some(b) = self.fork.get_mut(bid) {
            release_branch(&self.inner, &self.events, b);
        }
    }

    /// CANCEL every branch still pending (RFC 3261 9.1: only after a provisional; the
    /// others get it when their first provisional arrives).
    fn cancel_branches(&mut self) {
        let a = self.fork.cancel_all();
        self.run_fork(a, None);
    }

    fn cancel_branch(&mut self, id: u64) {
        let a = self.fork.cancel(id);
        self.run_fork(a, None);
    }

    /// Runs what the fork asked for; `resp` is the response that caused it, if any.
    fn run_fork(&mut self, actions: fork::Actions, resp: Option<&Response>) {
        for action in actions {
            match action {
                fork::Action::Cancel(id) => {
                    if let Some((cancel, target)) = self.fork.cancel_request(id) {
                        self.send_client(cancel, target, Purpose::Own);
                    }
                }
                fork::Action::Relay(id) => {
                    if let Some(resp) = resp {
                        self.relay_provisional(id, resp);
                    }
                }
                fork::Action::Answered(id) => {
                    if let Some(resp) = resp {
                        self.on_winner(id, resp);
                    }
                }
                fork::Action::AckBye(id) => {
                    if let Some(resp) = resp {
                        self.ack_branch(id, resp, true);
                    }
                }
                fork::Action::ReAck(id) => {
                    if self.bridge.b_branch == Some(id) {
                        // A retransmitted 2xx: our ACK got lost (RFC 3261 13.2.2.4).
                        if let (Some(ack), Some(d)) = (&self.bridge.b_ack, &self.bridge.b) {
                            self.resend_ack(&d.flow, ack);
                        }
                    } else if let Some(resp) = resp {
                        self.ack_branch(id, resp, false);
                    }
                }
                fork::Action::DialDone(outcome) => self.dial_done(outcome),
            }
        }
    }

    /// ACKs a 2xx on a branch nobody wants, and BYEs it (`bye`; not for a retransmission).
    fn ack_branch(&mut self, id: u64, resp: &Response, bye: bool) {
        let Some(b) = self.fork.get(id) else {
            return;
        };
        let Some(invite) = b.invite() else {
            return;
        };
        let mut dialog = Dialog::uac(invite, resp, b.target);
        dialog.state = DialogState::Confirmed;
        let via = self.inner.local.via(&dialog.flow);
        let ack = dialog.ack(b.seq(), via);
        let _ = self.send_ack(&dialog.flow, &ack);
        if bye {
            let via = self.inner.local.via(&dialog.flow);
            let bye = dialog.request(Method::Bye, via, None);
            let flow = dialog.flow;
            self.send_client(bye, flow, Purpose::Own);
        }
    }

    /// The dial is over: the script learns how (and a hunt which target answered).
    fn dial_done(&mut self, outcome: DialOutcome) {
        self.count_dial(outcome.status);
        if !outcome.answered {
            self.final_status = outcome.status;
        }
        if let Some(d) = self.dial_reply.take() {
            if let (true, Some(w), Some(i)) = (outcome.answered, d.winner, outcome.target) {
                let _ = w.send(i);
            }
            let _ = d.reply.send(outcome);
        }
    }

    /// Counts a dial's outcome (`strowger_dial_outcomes_total`).
    fn count_dial(&self, status: u16) {
        let i = super::metrics::dial_outcome(status, self.caller.cancelled());
        self.inner.stats.dial_outcomes[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Forgets a branch's dialog in the B2BUA's index (if it still routes to this call), and
/// frees its target for hunt groups if it was ringing.
fn release_branch(inner: &B2buaInner, events: &Events, b: &mut fork::Branch) {
    let (call_id, tag) = b.call_id_and_tag();
    let key = DialogKey::new(call_id, tag);
    if let Some(k) = b.ringing.take() {
        super::disengage(&inner.engaged, &k);
    }
    inner.dialogs.remove_if(&key, |r| r.events.same(events));
}

/// The call task's one timer, on the heap and only while the call has a deadline: a
/// runtime `Sleep` is 112 bytes, and held in the task future it put every call's task in
/// the next allocator size class, though an established call mostly has no deadline at
/// all (issue 14). It is reset rather than re-created when the deadline moves.
#[derive(Default)]
struct CallTimer(Option<Pin<Box<tokio::time::Sleep>>>);

impl CallTimer {
    fn set(&mut self, at: Option<Instant>) {
        match (at, &mut self.0) {
            (None, t) => *t = None,
            (Some(at), Some(sleep)) => {
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
            }
            (Some(at), t) => *t = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Completes when the deadline passes; never without one.
    async fn fired(&mut self) {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

// ---- responses from the B side and relays -----------------------------------------

impl Call {
    /// Whether `req` goes on the answered leg to a trunk that has credentials (its INVITE
    /// branches answer their own challenges; ACK and CANCEL are never challenged). A
    /// transfer's requests on that leg (re-INVITE, REFER, NOTIFY) are included; its new
    /// legs are other dialogs.
    fn to_trunk_with_credentials(&self, req: &Request, purpose: &Purpose) -> bool {
        if matches!(purpose, Purpose::Branch(_) | Purpose::ToTrunk { .. })
            || matches!(req.method, Method::Ack | Method::Cancel)
        {
            return false;
        }
        let Some(d) = &self.bridge.b else {
            return false;
        };
        d.call_id() == req.base.call_id.as_str() && self.b_trunk().is_some()
    }

    /// Requests to a trunk that may still be challenged.
    fn trunk_requests_pending(&self) -> bool {
        self.clients
            .values()
            .any(|p| matches!(p, Purpose::ToTrunk { .. }))
    }

    /// The trunk of the answered leg, when it has credentials.
    fn b_trunk(&self) -> Option<Arc<crate::trunk::Trunk>> {
        let b = self.fork.get(self.bridge.b_branch?)?;
        let trunk = b.trunk.as_ref()?.trunk();
        trunk.client().is_some().then(|| trunk.clone())
    }

    /// A 401/407 to a request within the call sent to a trunk: sent again with credentials
    /// and the dialog's next CSeq (RFC 3261 22.2), once (twice when the first answer's nonce
    /// was stale). Gives the purpose back when it is not sent again.
    fn resend_to_trunk(
        &mut self,
        purpose: Purpose,
        mut req: Request,
        tries: u8,
        resp: &Response,
    ) -> Result<(), Purpose> {
        let Some(trunk) = self.b_trunk() else {
            return Err(purpose);
        };
        let Some(client) = trunk.client() else {
            return Err(purpose);
        };
        let header = if resp.status == 407 {
            "Proxy-Authenticate"
        } else {
            "WWW-Authenticate"
        };
        let challenges: Vec<&str> = resp.headers.get_all(header).collect();
        let uri = req.uri.to_text();
        let answer = match client.answer(resp.status, &challenges, req.method.as_str(), &uri) {
            Ok(a) if tries == 0 || (tries == 1 && a.stale) => a,
            other => {
                trunk.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(trunk = trunk.name(), method = %req.method, error = ?other.err(), "trunk refused our credentials within a call");
                return Err(purpose);
            }
        };
        let Some(d) = self.bridge.b.as_mut() else {
            return Err(purpose);
        };
        req.base.cseq.seq = d.next_seq();
        let flow = d.flow;
        req.base.via = vec![self.inner.local.via(&flow)];
        req.headers.remove(answer.header);
        req.headers.push(answer.header, answer.value);
        trunk
            .counters
            .challenges_answered
            .fetch_add(1, Ordering::Relaxed);
        let again = Purpose::ToTrunk {
            purpose: Box::new(purpose),
            req: Box::new(req.clone()),
            tries: tries + 1,
        };
        self.send_client(req, flow, again);
        Ok(())
    }

    fn on_client(&mut self, id: u64, event: ClientEvent) {
        if matches!(self.clients.get(&id), Some(Purpose::ToTrunk { .. })) {
            let Some(Purpose::ToTrunk {
                purpose,
                req,
                tries,
            }) = self.clients.remove(&id)
            else {
                return;
            };
            match &event {
                ClientEvent::Final(resp) if matches!(resp.status, 401 | 407) => {
                    match self.resend_to_trunk(*purpose, *req, tries, resp) {
                        Ok(()) => return,
                        Err(p) => {
                            self.clients.insert(id, p);
                        }
                    }
                }
                ClientEvent::Provisional(_) => {
                    self.clients.insert(id, *purpose);
                    self.on_client_event(id, event);
                    if let Some(p) = self.clients.remove(&id) {
                        self.clients.insert(
                            id,
                            Purpose::ToTrunk {
                                purpose: Box::new(p),
                                req,
                                tries,
                            },
                        );
                    }
                    return;
                }
                _ => {
                    self.clients.insert(id, *purpose);
                }
            }
        }
        self.on_client_event(id, event);
    }

    fn on_client_event(&mut self, id: u64, event: ClientEvent) {
        let Some(purpose) = self.clients.get(&id) else {
            return;
        };
        match purpose {
            Purpose::Branch(bid) => {
                let bid = *bid;
                match event {
                    ClientEvent::Provisional(resp) => self.on_branch_provisional(bid, resp),
                    ClientEvent::Final(resp) if resp.is_success() => self.on_branch_ok(bid, resp),
                    ClientEvent::Final(resp) => {
                        self.clients.remove(&id);
                        if resp.status == 422 && self.retry_with_min_se(bid, &resp) {
                            return;
                        }
                        if resp.status == 503 && self.try_next_address(bid) {
                            return;
                        }
                        if matches!(resp.status, 401 | 407) {
                            match self.answer_trunk_challenge(bid, &resp) {
                                Challenge::Answered => return,
                                Challenge::Refused => {
                                    // The caller cannot answer the carrier's challenge: the
                                    // trunk refused our credentials (RFC 3261 22.2).
                                    self.on_branch_failed(bid, 403, "Trunk Authentication Failed");
                                    return;
                                }
                                Challenge::NotOurs => {}
                            }
                        }
                        self.on_branch_failed(bid, resp.status, &resp.reason);
                    }
                    ClientEvent::Timeout => {
                        self.clients.remove(&id);
                        if !self.try_next_address(bid) {
                            self.on_branch_failed(bid, 408, "Request Timeout");
                        }
                    }
                    ClientEvent::TransportError(e) => {
                        self.clients.remove(&id);
                        if !self.try_next_address(bid) {
                            self.on_branch_failed(bid, 503, &format!("Transport error: {e}"));
                        }
                    }
                }
            }
            Purpose::Relay { .. } => {
                let final_event = !matches!(event, ClientEvent::Provisional(_));
                if final_event {
                    if let Some(Purpose::Relay { from, server, orig }) = self.clients.remove(&id) {
                        self.on_relay_final(from, server, *orig, event);
                    }
                } else if let (
                    Some(Purpose::Relay { server, orig, .. }),
                    ClientEvent::Provisional(resp),
                ) = (self.clients.get(&id), event)
                {
                    if resp.status > 100 {
                        let mut r = orig.response(resp.status).with_reason(resp.reason.clone());
                        copy_relayed(&resp.headers, &mut r.headers);
                        r.body = resp.body.clone();
                        let _ = server.respond(r);
                    }
                }
            }
            Purpose::Transfer(step) => {
                let step = *step;
                self.on_transfer_client(id, step, event);
            }
            Purpose::Own => {
                if !matches!(event, ClientEvent::Provisional(_)) {
                    self.clients.remove(&id);
                }
            }
            Purpose::Refresh { side, seq } => {
                let (side, seq) = (*side, *seq);
                match &event {
                    ClientEvent::Provisional(_) => {}
                    ClientEvent::Final(r) => {
                        self.clients.remove(&id);
                        self.on_refresh_answer(side, seq, Some(r));
                    }
                    ClientEvent::Timeout | ClientEvent::TransportError(_) => {
                        self.clients.remove(&id);
                        self.on_refresh_answer(side, seq, None);
                    }
                }
            }
            // Unwrapped by `on_client` before this runs.
            Purpose::ToTrunk { .. } => {}
            Purpose::Keepalive(side) => {
                let side = *side;
                let gone = match &event {
                    ClientEvent::Provisional(_) => return,
                    // RFC 3261 12.2.1.2: 481 and 408 end the dialog; no answer at all is
                    // the party that vanished (power cut, network gone).
                    ClientEvent::Final(r) => matches!(r.status, 408 | 481),
                    ClientEvent::Timeout | ClientEvent::TransportError(_) => true,
                };
                self.clients.remove(&id);
                if gone && !self.ended {
                    tracing::info!(call = %self.id, ?side, "party gone (keep-alive OPTIONS unanswered or 481/408); ending the call");
                    self.inner
                        .stats
                        .parties_gone
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.hangup(HangupBy::System, Some(side));
                }
            }
        }
    }

    fn on_branch_provisional(&mut self, bid: u64, resp: Response) {
        let a = self.fork.on_provisional(bid, &resp);
        self.run_fork(a, Some(&resp));
    }

    /// A provisional of a live branch goes to the caller, in the caller's one early dialog.
    fn relay_provisional(&mut self, bid: u64, resp: &Response) {
        if self.caller.answered() {
            return;
        }
        let rseq_b: Option<u32> = resp.headers.get("RSeq").and_then(|v| v.trim().parse().ok());
        let reliable = has_tag(&resp.headers, "Require", "100rel") && rseq_b.is_some();
        // Relay the provisional to A, in A's one early dialog.
        if self.a_invite.whole().is_none() {
            return;
        }
        let Some(caller::Provisional { first, rseq }) =
            self.caller.provisional(resp.status, reliable)
        else {
            return;
        };
        let mut headers = self.dialog_headers_to_a(resp.status);
        copy_relayed(&resp.headers, &mut headers);
        if let Some(rseq) = rseq {
            // RFC 3262: the caller gets its own reliable provisional with our RSeq.
            headers.push("Require", "100rel");
            headers.push("RSeq", rseq.to_string());
        }
        // A's PRACK goes on to B as a PRACK for B's RSeq (RFC 3262).
        let from_b = rseq_b.map(|rs| (bid, rs, resp.base.cseq.seq));
        let Some(sent) = self.write_to_a(resp.status, &resp.reason, &headers, &resp.body) else {
            return;
        };
        if let Some(rseq) = rseq {
            let t1 = self.inner.timers.t1;
            self.caller.sent_reliable(rseq, sent.clone(), from_b, t1);
        }
        self.watch(super::watch::CallPhase::Early); // watch:
        if reliable && !self.caller.supports_100rel() {
            // A cannot PRACK: we acknowledge B's reliable provisional ourselves.
            if let Some((bid, rs, cseq)) = from_b {
                self.send_prack(bid, rs, cseq, None);
            }
        }
        if first {
            if let Ok(t) = SystemTime::now().duration_since(self.start) {
                self.inner
                    .histograms
                    .setup
                    .observe(super::SetupStage::Ringing, t.as_secs_f64());
            }
        }
        self.send_written_to_a(sent);
    }

    /// PRACK on a B branch's early dialog (RFC 3262 7.2: RAck = RSeq CSeq-num method).
    fn send_prack(
        &mut self,
        bid: u64,
        rseq: u32,
        cseq: u32,
        relay: Option<(ServerTransaction, Request)>,
    ) {
        let Some(b) = self.fork.get_mut(bid) else {
            return;
        };
        let Some(early) = b.early.as_mut() else {
            return;
        };
        let via = self.inner.local.via(&early.flow);
        let mut prack = early.request(Method::Prack, via, None);
        prack.headers.push("RAck", format!("{rseq} {cseq} INVITE"));
        let flow = early.flow;
        let purpose = match relay {
            Some((server, orig)) => {
                copy_relayed(&orig.headers, &mut prack.headers);
                prack.body = orig.body.clone();
                Purpose::Relay {
                    from: Side::A,
                    server,
                    orig: Box::new(orig),
                }
            }
            None => Purpose::Own,
        };
        self.send_client(prack, flow, purpose);
    }

    fn on_branch_ok(&mut self, bid: u64, resp: Response) {
        let a = self.fork.on_success(bid, &resp);
        self.run_fork(a, Some(&resp));
    }

    /// Branch `bid`'s 2xx won the dial: it is the call's B leg, and the caller is answered.
    fn on_winner(&mut self, bid: u64, resp: &Response) {
        let Some(b) = self.fork.get_mut(bid) else {
            return;
        };
        // The answered branch keeps its trunk channel for the call's life (the winner
        // branch outlives the set-up; the channel is freed with the call).
        if let Some(ch) = &b.trunk {
            ch.trunk().counters.answered.fetch_add(1, Ordering::Relaxed);
        }
        let Some(invite) = b.invite() else {
            return;
        };
        let mut dialog = Dialog::uac(invite, resp, b.target);
        dialog.state = DialogState::Confirmed;
        self.bridge.b_branch = Some(bid);
        let b_uri = invite.uri.clone();
        // Engaged while it rang: the mark stays for the call.
        let rang = b.ringing.take();
        // On a call from now on: hunt groups skip these addresses (the callee's URI and
        // the caller's From).
        let mut engaged: Vec<String> = rang.into_iter().collect();
        if super::B2bua::tracks_busy(&self.inner) {
            let a_uri = self.a_invite.from().uri.clone();
            for u in [&b_uri, &a_uri] {
                let k = super::engaged_key_of(u);
                if !engaged.contains(&k) {
                    super::engage(&self.inner.engaged, &k);
                    engaged.push(k);
                }
            }
        }
        self.engaged = engaged.into_boxed_slice();
        self.bridge.b = Some(dialog);
        self.answer_caller(resp);
    }

    /// The B side (already in `b_dialog`) answered with `resp`: the caller gets the 2xx,
    /// retransmitted until its ACK (RFC 3261 13.3.1.4), and the call is up.
    fn answer_caller(&mut self, resp: &Response) {
        if let Some(dialog) = &self.bridge.b {
            let target = crate::transport::peer_text(dialog.flow.transport, &dialog.flow.addr);
            let at = unix_secs(SystemTime::now());
            self.inner.calls.with(&self.id, |e| {
                e.summary.answered(dialog.call_id(), &target, at);
            });
        }
        if self.a_invite.whole().is_none() {
            return;
        }
        let mut headers = self.dialog_headers_to_a(resp.status);
        headers.push("Allow", Method::allow_list());
        copy_relayed(&resp.headers, &mut headers);
        self.start_session_timers(resp, &mut headers);
        let Some(sent) = self.write_to_a(resp.status, &resp.reason, &headers, &resp.body) else {
            return;
        };
        self.bridge.a.state = DialogState::Confirmed;
        self.caller.accept(sent.clone(), self.inner.timers.t1);
        self.send_written_to_a(sent);
        let now = SystemTime::now();
        if let Ok(setup) = now.duration_since(self.start) {
            self.inner
                .histograms
                .setup
                .observe(super::SetupStage::Answered, setup.as_secs_f64());
        }
        self.answer = Some(now);
        self.final_status = resp.status;
        if let Some(d) = self.deadlines.as_deref_mut() {
            if let MaxDuration::Pending(max) = d.max_duration {
                d.max_duration = MaxDuration::Until(Instant::now() + max);
            }
        }
        self.inner.stats.answered.fetch_add(1, Ordering::Relaxed);
        self.watch(super::watch::CallPhase::Confirmed); // watch:
    }

    /// A 401/407 on a branch through a trunk: the INVITE again with the trunk's credentials
    /// (RFC 3261 22.2: new CSeq and branch, same Call-ID and From tag), once; a second
    /// challenge is a refusal unless it says the nonce was stale (RFC 7616 3.3).
    fn answer_trunk_challenge(&mut self, bid: u64, resp: &Response) -> Challenge {
        let Some(b) = self.fork.get_mut(bid) else {
            return Challenge::NotOurs;
        };
        let Some(trunk) = b.trunk.as_ref().map(|ch| ch.trunk().clone()) else {
            return Challenge::NotOurs;
        };
        let (Some(client), Some(invite)) = (trunk.client(), b.invite()) else {
            trunk.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                trunk = trunk.name(),
                status = resp.status,
                "trunk challenged a call but has no credentials (username/password)"
            );
            return Challenge::Refused;
        };
        let header = if resp.status == 407 {
            "Proxy-Authenticate"
        } else {
            "WWW-Authenticate"
        };
        let challenges: Vec<&str> = resp.headers.get_all(header).collect();
        let answer = match client.answer(resp.status, &challenges, "INVITE", &invite.uri.to_text())
        {
            Ok(a) if b.auth_tries == 0 || (b.auth_tries == 1 && a.stale) => a,
            Ok(_) => {
                trunk.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    trunk = trunk.name(),
                    user = client.username(),
                    "trunk refused our credentials (challenged again)"
                );
                return Challenge::Refused;
            }
            Err(e) => {
                trunk.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(trunk = trunk.name(), error = %e, "cannot answer the trunk's challenge");
                return Challenge::Refused;
            }
        };
        let mut again = invite.clone();
        again.base.cseq.seq = again.base.cseq.seq.wrapping_add(1);
        let dest = b.target;
        again.base.via = vec![self.inner.local.via(&dest)];
        again.headers.remove(answer.header);
        again.headers.push(answer.header, answer.value);
        b.auth_tries += 1;
        if !b.resend(again.clone()) {
            return Challenge::NotOurs;
        }
        trunk
            .counters
            .challenges_answered
            .fetch_add(1, Ordering::Relaxed);
        if self
            .send_client(again, dest, Purpose::Branch(bid))
            .is_none()
        {
            return Challenge::Refused;
        }
        Challenge::Answered
    }

    /// RFC 3263 4.3: the branch's address timed out, answered 503 or could not be
    /// reached; its INVITE goes to the target's next address (new branch and CSeq, same
    /// Call-ID and From tag). False when there is none left (or the branch is being
    /// cancelled).
    fn try_next_address(&mut self, bid: u64) -> bool {
        let Some(b) = self.fork.get_mut(bid) else {
            return false;
        };
        if b.alternates.is_empty() {
            return false;
        }
        let Some(mut again) = b.invite().cloned() else {
            return false;
        };
        let next = b.alternates.remove(0);
        again.base.cseq.seq = again.base.cseq.seq.wrapping_add(1);
        again.base.via = vec![self.inner.local.via(&next)];
        again
            .headers
            .set("Contact", self.inner.local.contact(&next));
        if !b.resend(again.clone()) {
            return false;
        }
        b.target = next;
        tracing::debug!(call = %self.id, addr = %next.addr, "trying the target's next address (RFC 3263 4.3)");
        self.send_client(again, next, Purpose::Branch(bid))
            .is_some()
    }

    /// A 422 to our INVITE: sent again once asking for the callee's Min-SE (RFC 4028 7.4:
    /// new CSeq, same Call-ID and From tag).
    fn retry_with_min_se(&mut self, bid: u64, resp: &Response) -> bool {
        let cfg = self.session_config();
        let Some(min_se) = crate::dialog::session_timer::min_se_of(&resp.headers) else {
            return false;
        };
        if cfg.session_expires == 0 || min_se > 86_400 {
            return false;
        }
        let Some(b) = self.fork.get_mut(bid) else {
            return false;
        };
        if b.timer_retried {
            return false;
        }
        let Some(invite) = b.invite() else {
            return false;
        };
        let mut again = invite.clone();
        again.base.cseq.seq = again.base.cseq.seq.wrapping_add(1);
        let dest = b.target;
        again.base.via = vec![self.inner.local.via(&dest)];
        for h in ["Session-Expires", "Min-SE"] {
            again.headers.remove(h);
        }
        let interval = min_se.max(cfg.session_expires);
        again.headers.push(
            "Session-Expires",
            crate::dialog::session_timer::SessionExpires {
                delta: interval,
                refresher: Some(crate::dialog::session_timer::Refresher::Uas),
            }
            .value(),
        );
        again.headers.push("Min-SE", min_se.to_string());
        b.timer_retried = true;
        if !b.resend(again.clone()) {
            return false;
        }
        self.send_client(again, dest, Purpose::Branch(bid))
            .is_some()
    }

    fn on_branch_failed(&mut self, bid: u64, status: u16, reason: &str) {
        if let Some(ch) = self.fork.get_mut(bid).and_then(|b| b.trunk.take()) {
            // The trunk's channel is free again; a branch we cancelled (487) did not fail.
            if status != 487 {
                ch.trunk().counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.remove_branch_key(bid);
        let a = self.fork.on_failure(bid, status, reason);
        self.run_fork(a, None);
    }

    fn on_relay_final(
        &mut self,
        from: Side,
        server: ServerTransaction,
        orig: Request,
        event: ClientEvent,
    ) {
        let resp = match event {
            ClientEvent::Final(resp) => resp,
            ClientEvent::Timeout => {
                if orig.method == Method::Invite {
                    self.bridge.reinvite_ended();
                }
                let _ = server.respond(orig.response(408));
                return;
            }
            ClientEvent::TransportError(_) => {
                if orig.method == Method::Invite {
                    self.bridge.reinvite_ended();
                }
                let _ = server.respond(orig.response(503));
                return;
            }
            ClientEvent::Provisional(_) => return,
        };
        let mut r = orig.response(resp.status).with_reason(resp.reason.clone());
        copy_relayed(&resp.headers, &mut r.headers);
        r.body = resp.body.clone();
        let target_refresh = matches!(orig.method, Method::Invite | Method::Update);
        if target_refresh && resp.is_success() {
            // A re-INVITE or UPDATE answered on both legs refreshes both sessions.
            self.session_refreshed();
            self.session_headers(from, &mut r.headers, true);
            r.headers.push("Contact", self.contact_for(from));
            if let Some(d) = self.dialog_mut(from.other()) {
                d.refresh_target(&resp.headers);
            }
        }
        if orig.method == Method::Invite {
            if resp.is_success() {
                // The ACK that `from` sends for this 2xx goes on to the other side.
                self.bridge.reinvite_answered(from, resp.base.cseq.seq);
            } else {
                self.bridge.reinvite_ended();
            }
        }
        let _ = server.respond(r);
    }

    fn contact_for(&self, side: Side) -> String {
        match side {
            Side::A => self.bridge.a_contact.clone(),
            Side::B => self
                .bridge
                .b
                .as_ref()
                .map(|d| self.inner.local.contact(&d.flow))
                .unwrap_or_else(|| self.bridge.a_contact.clone()),
        }
    }

    fn dialog_mut(&mut self, side: Side) -> Option<&mut Dialog> {
        self.bridge.dialog_mut(side)
    }

    fn on_stray(&mut self, resp: Response) {
        // A 2xx retransmission for the B INVITE after its transaction ended: re-ACK.
        if resp.is_success() && resp.base.cseq.method == Method::Invite {
            if let (Some(ack), Some(d)) = (&self.bridge.b_ack, &self.bridge.b) {
                if ack.seq == resp.base.cseq.seq {
                    self.resend_ack(&d.flow, ack);
                }
            }
        }
    }
}

// ---- the caller's side, in-dialog requests, and the end of the call ---------------

impl Call {
    fn reply_a_final(&mut self, status: u16, reason: &str) {
        if self.caller.answered() {
            return;
        }
        let Some(r) = self.a_invite.response(status) else {
            return;
        };
        let mut r = r.with_reason(reason);
        r.set_to_tag(self.bridge.a.local_tag());
        if let Some(r) = self.caller.reject(r) {
            self.final_status = status;
            self.respond_a(r);
        }
    }

    fn on_hook_done(&mut self, outcome: InviteOutcome) {
        self.hook_running = false;
        match outcome {
            InviteOutcome::Bridged { handle } => {
                self.keep_script(handle);
                if self.bridge.b.is_none() && !self.ended {
                    // The hook claims an answer the call does not have; fail safe.
                    self.reply_a_final(500, "Server Internal Error");
                    self.end(HangupBy::System);
                }
            }
            InviteOutcome::Rejected {
                status,
                reason,
                handle,
            } => {
                self.keep_script(handle);
                self.cancel_branches();
                self.reply_a_final(status, &reason);
                self.end(if self.caller.cancelled() {
                    HangupBy::Caller
                } else {
                    HangupBy::System
                });
            }
            InviteOutcome::Redirected { contacts, handle } => {
                self.keep_script(handle);
                if let Some(mut r) = self
                    .a_invite
                    .response(302)
                    .filter(|_| !self.caller.answered())
                {
                    r.set_to_tag(self.bridge.a.local_tag());
                    for c in contacts {
                        r.headers.push("Contact", format!("<{c}>"));
                    }
                    if let Some(r) = self.caller.reject(r) {
                        self.final_status = 302;
                        self.respond_a(r);
                    }
                }
                self.end(HangupBy::System);
            }
            InviteOutcome::Failed { error, handle } => {
                self.keep_script(handle);
                tracing::warn!(call = %self.id, %error, "script failed; answering 500");
                self.inner
                    .stats
                    .script_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.cancel_branches();
                if self.bridge.b.is_some() {
                    // Already bridged: the call stays up; the error only ended the hook.
                    return;
                }
                self.reply_a_final(500, "Server Internal Error");
                self.end(HangupBy::System);
            }
        }
    }

    /// A provisional to the caller while its INVITE is pending (a hunt's 182 Queued).
    fn send_a_provisional(&mut self, status: u16, reason: &str, headers: Vec<(String, String)>) {
        if self.caller.answered() || self.ended || !(101..200).contains(&status) {
            return;
        }
        let mut extra = self.dialog_headers_to_a(status);
        for (name, value) in headers {
            extra.push(&name, value);
        }
        if let Some(sent) = self.write_to_a(status, reason, &extra, &Bytes::new()) {
            self.send_written_to_a(sent);
        }
    }

    fn on_cancel(&mut self) {
        // RFC 3261 9.2: the INVITE ends with 487, every pending branch is CANCELled.
        let Some(r) = self.a_invite.response(487) else {
            return;
        };
        let mut r = r.with_reason("Request Terminated");
        r.set_to_tag(self.bridge.a.local_tag());
        let Some(r) = self.caller.cancel(r) else {
            return; // answered already: the CANCEL changes nothing
        };
        self.final_status = 487;
        self.respond_a(r);
        let a = self
            .fork
            .end_dial(487, "Request Terminated", DialSource::Caller);
        self.run_fork(a, None);
        self.end(HangupBy::Caller);
    }

    fn on_ack(&mut self, side: Side, ack: Request) {
        if side == Side::A && ack.base.cseq.seq == self.a_invite.cseq() && self.caller.on_ack() {
            // The caller's ACK for the call's 2xx: retransmission stopped; ACK B with the
            // caller's ACK body (the answer, for a late offer).
            if self.bridge.b_ack.is_none() {
                if let (Some(d), Some(bid)) = (&self.bridge.b, self.bridge.b_branch) {
                    let seq = self.fork.get(bid).map(fork::Branch::seq).unwrap_or(1);
                    let via = self.inner.local.via(&d.flow);
                    let mut b_ack = d.ack(seq, via);
                    copy_relayed(&ack.headers, &mut b_ack.headers);
                    b_ack.body = ack.body.clone();
                    self.bridge.b_ack = Some(self.send_ack(&d.flow, &b_ack));
                }
            }
            self.compact();
            self.set_keepalive_at(self.inner.keepalive.map(|k| Instant::now() + k));
            self.on_caller_acked();
            return;
        }
        if let Some(seq) = self.bridge.on_ack(side) {
            {
                let other = side.other();
                let Some(d) = self.dialog_mut(other) else {
                    return;
                };
                let via_target = d.flow;
                let d = d.clone();
                let via = self.inner.local.via(&via_target);
                let mut fwd = d.ack(seq, via);
                copy_relayed(&ack.headers, &mut fwd.headers);
                fwd.body = ack.body;
                let _ = self.send_ack(&via_target, &fwd);
            }
        }
    }

    fn on_request(&mut self, side: Side, branch: Option<u64>, tx: ServerTransaction, req: Request) {
        if self.ended {
            let _ = tx.respond(req.response(481));
            return;
        }
        if self
            .after
            .as_ref()
            .is_some_and(|t| !t.old_legs.is_empty() || !t.old_keys.is_empty())
            && self.on_old_leg_request(&tx, &req)
        {
            return;
        }
        // RFC 3261 12.2.2: a CSeq lower than the last one is out of order.
        let in_order = match side {
            Side::A => self.bridge.a.accept_remote_cseq(&req),
            Side::B => match (branch, self.bridge.b_branch) {
                (Some(b), Some(w)) if b == w => self
                    .bridge
                    .b
                    .as_mut()
                    .map(|d| d.accept_remote_cseq(&req))
                    .unwrap_or(true),
                _ => true,
            },
        };
        if !in_order {
            let _ = tx.respond(req.response(500).with_reason("CSeq out of order"));
            return;
        }
        match req.method {
            Method::Bye => {
                let _ = tx.reply(&req.reply(200));
                let by = if side == Side::A {
                    HangupBy::Caller
                } else {
                    HangupBy::Callee
                };
                if side == Side::B && self.bridge.b_branch != branch {
                    // BYE on a losing branch's dialog: nothing more to do.
                    return;
                }
                if self.transferor_left(side) {
                    // Phones often hang up right after a blind transfer's 202: the
                    // transfer goes on for the other party.
                    return;
                }
                self.hangup(by, Some(side));
            }
            Method::Refer => self.on_refer(side, tx, req),
            Method::Prack if side == Side::A => self.on_prack_from_a(tx, req),
            Method::Invite if self.bridge.on_reinvite(side) == Reinvite::Glare => {
                // RFC 3261 14.2: an INVITE while one is in progress: glare.
                let _ = tx.respond(req.response(491));
            }
            _ => self.relay(side, tx, req),
        }
    }

    fn on_prack_from_a(&mut self, tx: ServerTransaction, req: Request) {
        // RAck: response-num CSeq-num method (RFC 3262 7.2).
        let rack: Option<u32> = req
            .headers
            .get("RAck")
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        match self.caller.on_prack(rack) {
            Prack::NoMatch => {
                let _ = tx.respond(
                    req.response(481)
                        .with_reason("No matching reliable provisional"),
                );
            }
            Prack::FromB(bid, rseq, cseq) => self.send_prack(bid, rseq, cseq, Some((tx, req))),
            Prack::Ours => {
                let _ = tx.respond(req.response(200));
            }
        }
    }

    /// Relays an in-dialog request to the other leg as a new request of that leg's dialog.
    fn relay(&mut self, from: Side, tx: ServerTransaction, req: Request) {
        let to = from.other();
        let early_branch = self.bridge.b_branch.or_else(|| self.fork.early_branch());
        let contact = match to {
            Side::A => Some(self.bridge.a_contact.clone()),
            Side::B => None,
        };
        let dialog = match to {
            Side::A => Some(&mut self.bridge.a),
            Side::B => match &mut self.bridge.b {
                Some(d) => Some(d),
                None => early_branch
                    .and_then(|b| self.fork.get_mut(b))
                    .and_then(|b| b.early.as_deref_mut()),
            },
        };
        let Some(dialog) = dialog else {
            if req.method == Method::Invite {
                self.bridge.reinvite_ended();
            }
            let _ = tx.respond(req.response(481));
            return;
        };
        let flow = dialog.flow;
        let via = self.inner.local.via(&flow);
        let refresh = matches!(
            req.method,
            Method::Invite | Method::Update | Method::Subscribe | Method::Notify | Method::Refer
        );
        let contact = if refresh {
            Some(contact.unwrap_or_else(|| self.inner.local.contact(&flow)))
        } else {
            None
        };
        let mut out = dialog.request(req.method.clone(), via, contact.as_deref());
        copy_relayed(&req.headers, &mut out.headers);
        if matches!(req.method, Method::Invite | Method::Update) {
            self.session_headers(from.other(), &mut out.headers, false);
        }
        out.body = req.body.clone();
        if req.method == Method::Invite {
            // The bridge took it as the re-INVITE in progress (on_request).
            self.bridge.note_offer(from, &req.body);
        }
        if refresh {
            // The sender's own target may have moved (RFC 3261 12.2.2).
            if let Some(d) = self.dialog_mut(from) {
                d.refresh_target(&req.headers);
            }
        }
        if self
            .send_client(
                out,
                flow,
                Purpose::Relay {
                    from,
                    server: tx.clone(),
                    orig: Box::new(req.clone()),
                },
            )
            .is_none()
        {
            if req.method == Method::Invite {
                self.bridge.reinvite_ended();
            }
            let _ = tx.respond(req.response(503));
        }
    }

    /// Ends an established (or establishing) call: BYE to every leg but `except`, 487 to
    /// requests still pending (the seed: pending requests of an ended session get 487).
    fn hangup(&mut self, by: HangupBy, except: Option<Side>) {
        self.abort_transfer();
        self.bye_old_legs();
        for (_, purpose) in self.clients.drain() {
            let purpose = match purpose {
                Purpose::ToTrunk { purpose, .. } => *purpose,
                p => p,
            };
            if let Purpose::Relay { server, orig, .. } = purpose {
                if !server.is_finished() {
                    let _ = server.respond(orig.response(487));
                }
            }
        }
        if except != Some(Side::B) {
            if let Some(d) = self.bridge.b.as_mut() {
                let via = self.inner.local.via(&d.flow);
                let bye = d.request(Method::Bye, via, None);
                let flow = d.flow;
                self.send_client(bye, flow, Purpose::Own);
            }
        }
        if except != Some(Side::A) && self.bridge.a.state == DialogState::Confirmed {
            let via = self.inner.local.via(&self.bridge.a.flow);
            let contact = None;
            let bye = self.bridge.a.request(Method::Bye, via, contact);
            let flow = self.bridge.a.flow;
            self.send_client(bye, flow, Purpose::Own);
        }
        self.caller.stop();
        self.end(by);
    }

    /// Sends an in-dialog OPTIONS to each party of the answered call (`call.keepalive_s`, as
    /// Kamailio's dialog keep-alives): nothing else notices a party that vanished without
    /// a BYE. The answer is in `Purpose::Keepalive`.
    fn send_keepalives(&mut self, now: Instant) {
        self.set_keepalive_at(self.inner.keepalive.map(|k| now + k));
        for side in [Side::A, Side::B] {
            let busy = self.clients.values().any(|p| match p {
                Purpose::ToTrunk { purpose, .. } => {
                    matches!(**purpose, Purpose::Keepalive(s) if s == side)
                }
                p => matches!(p, Purpose::Keepalive(s) if *s == side),
            });
            if busy {
                continue;
            }
            let Some(d) = self.dialog_mut(side) else {
                continue;
            };
            if d.state != DialogState::Confirmed {
                continue;
            }
            let flow = d.flow;
            let via = self.inner.local.via(&flow);
            let options = self
                .dialog_mut(side)
                .map(|d| d.request(Method::Options, via, None));
            if let Some(req) = options {
                self.send_client(req, flow, Purpose::Keepalive(side));
            }
        }
    }

    fn max_duration_until(&self) -> Option<Instant> {
        self.deadlines.as_deref()?.max_duration.until()
    }

    fn keepalive_at(&self) -> Option<Instant> {
        self.deadlines.as_deref()?.keepalive_at
    }

    /// The call's deadlines, boxed on first use.
    fn deadlines_mut(&mut self) -> &mut Deadlines {
        self.deadlines.get_or_insert_with(|| {
            Box::new(Deadlines {
                max_duration: MaxDuration::Off,
                keepalive_at: None,
            })
        })
    }

    fn set_max_duration(&mut self, m: MaxDuration) {
        if matches!(m, MaxDuration::Off) && self.deadlines.is_none() {
            return;
        }
        self.deadlines_mut().max_duration = m;
    }

    fn set_keepalive_at(&mut self, at: Option<Instant>) {
        if at.is_none() && self.deadlines.is_none() {
            return;
        }
        self.deadlines_mut().keepalive_at = at;
    }

    /// Marks the call over and forgets its dialogs; `finish` runs once the hook is done.
    fn end(&mut self, by: HangupBy) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.ended_tx.set();
        self.drop_record(); // cluster:
        for k in std::mem::take(&mut self.engaged) {
            super::disengage(&self.inner.engaged, &k);
        }
        self.hangup_by = by;
        self.watch(super::watch::CallPhase::Terminated); // watch:
                                                         // Branches still pending are CANCELled (those that have not rung yet when they
                                                         // do: the task stays until they are settled, see `run`).
                                                         // The dial's outcome was given where the call ended for a reason (CANCEL, PRACK
                                                         // timeout); here nobody waits for it any more, and it is not counted again.
        let a = self.fork.abandon_dial();
        self.run_fork(a, None);
        self.dial_reply = None;
        self.deadlines = None;
        self.caller.stop();
        self.unindex(&DialogKey::new(
            self.bridge.a.call_id(),
            self.bridge.a.local_tag(),
        ));
        self.inner.pending.remove(&self.pending_key());
        for b in self.fork.branches_mut() {
            release_branch(&self.inner, &self.events, b);
        }
        if let Some(mut t) = self.after.take() {
            for d in std::mem::take(&mut t.old_legs) {
                t.old_keys.push(DialogKey::new(d.call_id(), d.local_tag()));
            }
            for k in &t.old_keys {
                self.unindex(k);
            }
            self.after = Some(t);
        }
    }

    /// The line for `call.records_file`: `record` plus who the call was between.
    fn detail(&self, record: &CallRecord) -> CallDetail {
        let r = &self.a_invite;
        let duration_s = match record.answer {
            Some(answer) => record
                .end
                .duration_since(answer)
                .unwrap_or_default()
                .as_secs_f64(),
            None => 0.0,
        };
        CallDetail {
            call_id: self.id.to_string(),
            a_call_id: r.call_id().to_owned(),
            b_call_id: self.bridge.b.as_ref().map(|d| d.call_id().to_owned()),
            from: r.from().uri.to_text(),
            to: r.to().uri.to_text(),
            ruri: r.uri().to_text(),
            source: crate::transport::peer_text(self.a_source.transport, &self.a_source.addr),
            start: record.start,
            answer: record.answer,
            end: record.end,
            duration_s,
            final_status: record.final_status,
            hangup_by: record.hangup_by.clone(),
            script_version: self.version.version(),
            route: self
                .route
                .and_then(|r| self.inner.routes.name(usize::from(r)))
                .map(str::to_owned),
            transfers: self
                .after
                .as_ref()
                .map_or_else(Vec::new, |t| t.notes.clone()),
            taken_over_from: None,
        }
    }

    /// The call is over and its hook has returned: run `on_call_end` with the record.
    fn finish(&mut self) {
        self.inner.calls_active.fetch_sub(1, Ordering::Relaxed);
        self.inner.calls.remove(&self.id);
        if let Some(t) = &self.inner.traces {
            t.end_call(&self.id);
        }
        if self.final_status == 0 {
            self.final_status = if self.answer.is_some() { 200 } else { 500 };
        }
        if self.answer.is_none() && (300..700).contains(&self.final_status) {
            let class = usize::from(self.final_status / 100 - 3);
            self.inner.stats.failed_by_class[class].fetch_add(1, Ordering::Relaxed);
        }
        let end = SystemTime::now();
        if let Some(d) = self.answer.and_then(|a| end.duration_since(a).ok()) {
            self.inner.histograms.duration.observe(d.as_secs_f64());
        }
        if let Some(r) = self.route {
            self.inner
                .routes
                .call_ended(usize::from(r), self.answer.is_some(), self.final_status);
        }
        let record = CallRecord {
            start: self.start,
            answer: self.answer,
            end,
            hangup_by: self.hangup_by.as_str().to_owned(),
            final_status: self.final_status,
        };
        if let Some(records) = &self.inner.records {
            records.send(self.detail(&record));
        }
        if let Some(handle) = self.script.take() {
            let version = self.version.clone();
            tokio::spawn(async move { version.on_call_end(handle, record).await });
        }
    }
}

/// Unix time in seconds, for the admin API's call list.
fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    /// Memory per held call (issue 14): the call's own struct must not grow back (3,976
    /// bytes before its parts were split out, 3,184 before the compact dialogs, 1,824
    /// before the caller's INVITE was boxed and reduced once the call is established,
    /// 1,008 before what transfers leave behind was boxed, 896 before the ringing dial's
    /// state, the kept ACK and the hold offer were, 768 before the caller leg's set-up
    /// state, the rare deadlines and who hung up were made smaller). 640 is an allocator
    /// size class (mimalloc's bins step by an eighth: 512, 640, 768): a byte more and every
    /// call's box is 768.
    #[test]
    fn a_call_is_no_bigger_than_before() {
        let size = std::mem::size_of::<super::Call>();
        eprintln!("size_of::<Call>() = {size}");
        assert!(size <= 640, "Call is {size} bytes");
    }

    /// The dialog table holds an entry per leg of every call: its key and a `CallRef`,
    /// 32 bytes (48 while the branch was an `Option<u64>`). The subscription usage beside
    /// it is a channel sender, a pointer like the `Arc` here (presence is not ours to
    /// import).
    /// The admin API's table holds an entry per call: its id and a `CallEntry` of two
    /// pointers, 32 bytes (96 with the summary inline).
    #[test]
    fn an_admin_table_entry_is_32_bytes() {
        assert_eq!(
            std::mem::size_of::<(std::sync::Arc<str>, super::super::CallEntry)>(),
            32
        );
    }

    #[test]
    fn a_dialog_table_entry_is_32_bytes() {
        type Entry = (
            crate::dialog::DialogId,
            crate::dialog::Usage<super::CallRef, std::sync::Arc<()>>,
        );
        assert_eq!(std::mem::size_of::<super::CallRef>(), 16);
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    /// Where a message goes, held several times by every call (its caller's source, its
    /// dialogs' flows, its ladder's peers): 48 bytes since a connection id is never 0.
    #[test]
    fn a_target_is_48_bytes() {
        assert_eq!(std::mem::size_of::<crate::transport::Target>(), 48);
        use crate::transport::ConnectionId;
        assert!(ConnectionId::new(0).is_none());
        assert_eq!(ConnectionId::new(7).map(ConnectionId::get), Some(7));
    }

    /// The call's timer fires at its deadline and not before, follows a moved deadline,
    /// never fires without one, and holds no runtime timer then (paused clock).
    #[tokio::test(start_paused = true)]
    async fn the_call_timer_fires_at_its_deadline_only() {
        use std::time::Duration;
        use tokio::time::{timeout, Instant};
        let mut timer = super::CallTimer::default();
        let t0 = Instant::now();
        timer.set(Some(t0 + Duration::from_secs(5)));
        assert!(timeout(Duration::from_secs(4), timer.fired())
            .await
            .is_err());
        // Moved later: the same timer, reset.
        timer.set(Some(t0 + Duration::from_secs(8)));
        assert!(timeout(Duration::from_secs(3), timer.fired())
            .await
            .is_err());
        timeout(Duration::from_secs(2), timer.fired())
            .await
            .expect("fires at 8 s");
        assert_eq!(Instant::now(), t0 + Duration::from_secs(8));
        // No deadline: no timer kept, and it never fires.
        timer.set(None);
        assert!(timer.0.is_none());
        assert!(timeout(Duration::from_secs(3600), timer.fired())
            .await
            .is_err());
        // Moved earlier than a pending one.
        timer.set(Some(Instant::now() + Duration::from_secs(10)));
        timer.set(Some(Instant::now() + Duration::from_secs(1)));
        timeout(Duration::from_secs(2), timer.fired())
            .await
            .expect("fires at the earlier deadline");
    }

    #[test]
    fn a_call_ref_keeps_its_branch() {
        let (tx, _rx) = futures_channel::mpsc::unbounded();
        let events = super::Events(tx);
        let a = super::CallRef::new(events.clone(), super::Side::A, None);
        assert_eq!(a.branch(), None);
        let b = super::CallRef::new(events.clone(), super::Side::B, Some(7));
        assert_eq!(b.branch(), Some(7));
        // Out of range (never in practice): kept at the highest number, which a call does
        // not reach either.
        let far = super::CallRef::new(events, super::Side::B, Some(u64::from(u32::MAX) + 5));
        assert_eq!(far.branch(), Some(u64::from(u32::MAX)));
    }
}
