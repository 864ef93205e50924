//! The RFC 3261 section 17 transaction layer with the fixes of RFC 6026: INVITE and
//! non-INVITE, client and server transactions, their timers, retransmissions, the
//! hop-by-hop ACK, 100 Trying, CANCEL matching (9.2), merged-request detection (8.2.2.2).
//!
//! Owns: the transaction maps, matching, the timer queue, and the driver that
//! runs the pure state machines of `invite_client`, `non_invite_client`, `invite_server`
//! and `non_invite_server` (timer values in `timers`, keys in `matching`).
//! Must not touch: sockets (it only calls [`Sender`]), dialogs or call logic (the
//! [`TransactionUser`] above decides every response but 100 Trying, the CANCEL 200/481 and
//! the stateless 482/503), anything above it: what it reports goes to traits it defines
//! ([`TransactionUser`], [`MessageObserver`] for call traces) or to its own counters
//! (registered on the telemetry handle by [`TransactionLayer::register_metrics`]).
//!
//! Concurrency: transactions live in sharded maps (64 shards, each a `parking_lot` mutex held
//! only for one map operation); each transaction has its own mutex around its state machine,
//! never held while sending or calling the TU. Timers: one queue for the whole layer and one
//! task that sleeps until its earliest deadline (see `driver`).

mod config;
mod driver;
mod invite_client;
mod invite_server;
mod matching;
mod metrics;
mod non_invite_client;
mod non_invite_server;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;
mod timers;

pub use config::TimersConfig;

use crate::allocator::short_lived;
use crate::shard::ShardMap;
use crate::sip::{new_tag, Headers, Method, Reply, Request, Response, SipMessage};
use crate::transport::{Sender, Target, TransportError};
use bytes::Bytes;
use driver::{Core, Driven, Machine, Queued, TimerQueue};
use invite_client::InviteClient;
use invite_server::InviteServer;

/// Both cores look transactions up on every message: more shards than the default.
const TABLE_SHARDS: usize = 64;
use matching::{ClientKey, MergeKey, ServerKey};
use non_invite_client::NonInviteClient;
use non_invite_server::NonInviteServer;
use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use timers::Timer;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// T1, T2, T4 (RFC 3261 17.1.1.1, table 4); every other timer derives from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for TimerConfig {
    /// The defaults of `[sip.timers]` (one set of defaults for the file and the layer).
    fn default() -> Self {
        TimersConfig::default().to_timers()
    }
}

impl TimerConfig {
    /// Timer B / F / H / J span: 64*T1.
    pub fn timeout_64t1(&self) -> Duration {
        self.t1 * 64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    #[error("transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("transaction already has a final response")]
    AlreadyFinal,
    #[error("transaction is gone")]
    Gone,
    #[error("a transaction with this branch already exists")]
    Duplicate,
    #[error("request has no Via branch")]
    NoBranch,
}

/// What a client transaction reports to its user.
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A 1xx (100 included; the user may ignore it).
    Provisional(Response),
    /// A final response. For INVITE 2xx the transaction enters Accepted (RFC 6026) and every
    /// further 2xx retransmission is reported again as `Final`.
    Final(Response),
    /// Timer B or F fired (RFC 3261 17.1.1.2, 17.1.2.2).
    Timeout,
    /// The transport could not send (RFC 3261 17.1.1.2: reported like a 503).
    TransportError(String),
}

/// The layer above: the UAS core. Called from transport/timer tasks; must not block.
pub trait TransactionUser: Send + Sync + 'static {
    /// A new request that created a server transaction (any method but ACK and CANCEL).
    fn on_request(&self, tx: ServerTransaction, req: Request);
    /// An ACK that matched no server transaction: the ACK for a 2xx (RFC 3261 17.2.3, 13.3.1.4),
    /// including ACKs that arrive while the INVITE transaction is in RFC 6026 Accepted.
    fn on_ack(&self, ack: Request, source: Target);
    /// A CANCEL that matched a pending INVITE server transaction (RFC 3261 9.2). The layer has
    /// already answered the CANCEL with 200; the user should end the INVITE with 487.
    fn on_cancel(&self, invite: ServerTransaction, cancel: Request);
    /// A response that matched no client transaction (e.g. a 2xx retransmission after the
    /// INVITE client transaction ended).
    fn on_stray_response(&self, resp: Response, source: Target);
}

/// Counters of the layer (monotonic), for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransactionStats {
    pub server_created: u64,
    pub client_created: u64,
    /// Retransmitted requests absorbed by a server transaction.
    pub retransmissions_absorbed: u64,
    /// Timer B or F fired.
    pub client_timeouts: u64,
    /// Timer H fired: no ACK for a non-2xx final.
    pub ack_timeouts: u64,
    pub transport_errors: u64,
    /// 482 Loop Detected for merged requests (RFC 3261 8.2.2.2).
    pub merged_rejected: u64,
    /// 503 while not accepting new requests.
    pub rejected_not_accepting: u64,
    /// Requests retransmitted by Timers A, E and G.
    pub retransmissions_sent: u64,
    /// 503 to requests outside dialogs while the table held `max_transactions`.
    pub refused_table_full: u64,
}

#[derive(Default)]
struct Counters {
    server_created: AtomicU64,
    client_created: AtomicU64,
    retransmissions_absorbed: AtomicU64,
    client_timeouts: AtomicU64,
    ack_timeouts: AtomicU64,
    transport_errors: AtomicU64,
    merged_rejected: AtomicU64,
    rejected_not_accepting: AtomicU64,
    retransmissions_sent: AtomicU64,
    refused_table_full: AtomicU64,
}

/// Which way a message went, seen from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// A message as it passes the transaction layer, lent to a [`MessageObserver`]: what is
/// at hand, so that an observer that keeps nothing of it costs nothing.
pub enum Passing<'a> {
    /// A message sent: its bytes.
    Sent(&'a [u8]),
    Request(&'a Request),
    Response(&'a Response),
}

/// Something that wants to see every message in and out (the per-call traces of
/// `call.trace`): defined here and implemented above, handed in by the server, so that
/// this layer reports without knowing who listens.
pub trait MessageObserver: Send + Sync + 'static {
    fn on_message(&self, call_id: &str, dir: Direction, peer: &Target, msg: Passing<'_>);
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// ---- what the pure state machines ask the driver to do ----------------------------------

/// What a message sent is, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum What {
    Method(Method),
    Status(u16),
}

/// One output of a state machine.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send these bytes to the transaction's peer.
    Send(Bytes, What),
    /// (Re)start a timer; a running timer of the same kind is replaced.
    Start(Timer, Duration),
    /// Stop a timer that no longer matters in the new state (a retransmission or timeout
    /// timer of the state left), so that nothing wakes up for it (issue 14).
    Stop(Timer),
    /// Tell the client transaction's user (boxed: responses are large, sends are common).
    Report(Box<ClientEvent>),
    /// Give the ACK being processed to the TU (RFC 6026 Accepted).
    PassAck,
    /// The transaction is over: remove it.
    Terminate,
}

impl Action {
    pub(crate) fn report(ev: ClientEvent) -> Action {
        Action::Report(Box::new(ev))
    }
}

pub(crate) type Actions = Vec<Action>;

enum ServerMachine {
    Invite(InviteServer),
    NonInvite(NonInviteServer),
}

impl ServerMachine {
    fn tu_response(&mut self, status: u16, b: Bytes) -> Result<Actions, TransactionError> {
        match self {
            ServerMachine::Invite(m) => m.on_tu_response(status, b),
            ServerMachine::NonInvite(m) => m.on_tu_response(status, b),
        }
    }
    fn retransmission(&mut self) -> Actions {
        match self {
            ServerMachine::Invite(m) => m.on_retransmission(),
            ServerMachine::NonInvite(m) => m.on_retransmission(),
        }
    }
    fn ack(&mut self) -> Actions {
        match self {
            ServerMachine::Invite(m) => m.on_ack(),
            ServerMachine::NonInvite(_) => Vec::new(),
        }
    }
    fn is_finished(&self) -> bool {
        match self {
            ServerMachine::Invite(m) => m.is_finished(),
            ServerMachine::NonInvite(m) => m.is_finished(),
        }
    }
    /// An INVITE's last provisional while it has no final (see `ServerTransaction::response`).
    fn last_provisional(&self) -> Option<Bytes> {
        match self {
            ServerMachine::Invite(m) => m.last_provisional().cloned(),
            ServerMachine::NonInvite(_) => None,
        }
    }
}

impl Machine for ServerMachine {
    fn timer(&mut self, t: Timer) -> Actions {
        match self {
            ServerMachine::Invite(m) => m.on_timer(t),
            ServerMachine::NonInvite(m) => m.on_timer(t),
        }
    }
    fn transport_error(&mut self, _err: String) -> Actions {
        match self {
            ServerMachine::Invite(m) => m.on_transport_error(),
            ServerMachine::NonInvite(m) => m.on_transport_error(),
        }
    }
}

enum ClientMachine {
    /// Boxed: it keeps the INVITE for the ACK (17.1.1.3).
    Invite(Box<InviteClient>),
    NonInvite(NonInviteClient),
}

impl ClientMachine {
    fn response(&mut self, r: Response) -> Actions {
        match self {
            ClientMachine::Invite(m) => m.on_response(r),
            ClientMachine::NonInvite(m) => m.on_response(r),
        }
    }
}

impl Machine for ClientMachine {
    fn timer(&mut self, t: Timer) -> Actions {
        match self {
            ClientMachine::Invite(m) => m.on_timer(t),
            ClientMachine::NonInvite(m) => m.on_timer(t),
        }
    }
    fn transport_error(&mut self, err: String) -> Actions {
        match self {
            ClientMachine::Invite(m) => m.on_transport_error(err),
            ClientMachine::NonInvite(m) => m.on_transport_error(err),
        }
    }
}

struct ServerInner {
    shared: Arc<Shared>,
    key: ServerKey,
    merge_key: Option<MergeKey>,
    /// Of the request that created the transaction, what matching needs: its method and,
    /// for an RFC 2543 request (no magic cookie), its To tag. No copy of its base headers:
    /// the user answers from its own copy of the request (`Reply`), and what the
    /// transaction must answer itself (an INVITE's 487, a 500 for bytes written elsewhere
    /// that are too large) is built from the 100 Trying it sent (issue 14: the copy and
    /// its drop were ~1,700 instructions per request).
    method: Method,
    legacy_to_tag: Option<Box<str>>,
    /// For logs and traces, for the transaction's whole life.
    call_id: Box<str>,
    source: Target,
    core: Core<ServerMachine>,
    /// The To tag of the last response sent: the 200 to a CANCEL copies it (RFC 3261 9.2),
    /// an RFC 2543 ACK is matched against it (17.2.3).
    to_tag: Mutex<Option<String>>,
}

impl Driven for ServerInner {
    type M = ServerMachine;
    fn core(&self) -> &Core<ServerMachine> {
        &self.core
    }
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    fn queue_ref(self: &Arc<Self>) -> Queued {
        Queued::Server(Arc::downgrade(self))
    }
    fn execute(
        self: &Arc<Self>,
        mut effects: Actions,
        mut ack: Option<Request>,
    ) -> Option<TransportError> {
        let mut first_err = None;
        while !effects.is_empty() {
            let mut more = Vec::new();
            for e in effects {
                match e {
                    Action::Send(b, what) => {
                        let call_id = &*self.call_id;
                        if let Err(err) = self.shared.send(&self.source, b, &what, call_id) {
                            tracing::debug!(call_id = %call_id, error = %err, "server transaction send failed");
                            self.send_failed(&err, &mut more);
                            first_err.get_or_insert(err);
                        }
                    }
                    Action::PassAck => {
                        if let Some(a) = ack.take() {
                            self.shared.tu.on_ack(a, self.source);
                        }
                    }
                    Action::Terminate => self.terminated(),
                    // Timer H (RFC 3261 17.2.1): no ACK came; a transaction failure.
                    Action::Report(_) => {
                        bump(&self.shared.stats.ack_timeouts);
                        tracing::debug!(call_id = %self.call_id, "Timer H: no ACK for the final response");
                    }
                    Action::Start(..) | Action::Stop(_) => {}
                }
            }
            effects = more;
        }
        first_err
    }
}

impl ServerInner {
    fn terminated(&self) {
        let me: *const ServerInner = self;
        // A removal may shrink the table (`shard::give_back`): the smaller one goes where
        // the table grew, on the short-lived heap. Made on the long-lived heap while the
        // calls' own tables grew there, shrunk transaction tables kept pages of it
        // resident (issue 14: ~240 B per held call with T1 at 500 ms against 50 ms).
        let removed = short_lived(|| {
            let server = self
                .shared
                .servers
                .remove_if(&self.key, |v| std::ptr::eq(Arc::as_ptr(v), me));
            let merged = self
                .merge_key
                .as_ref()
                .and_then(|mk| self.shared.merged.remove_if(mk, |k| *k == self.key));
            (server, merged)
        });
        drop(removed);
        self.shared.live.fetch_sub(1, Ordering::AcqRel);
        tracing::trace!(call_id = %self.call_id, method = %self.method, "server transaction terminated");
    }

    fn retransmission(self: &Arc<Self>) {
        bump(&self.shared.stats.retransmissions_absorbed);
        let _ = self.drive(|m| Ok((m.retransmission(), ())), None);
    }
}

/// Handle to a server transaction; cheap to clone.
#[derive(Clone)]
pub struct ServerTransaction {
    inner: Arc<ServerInner>,
}

impl fmt::Debug for ServerTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTransaction")
            .field("key", &self.inner.key)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl ServerTransaction {
    /// Sends a response through the transaction (drives its state machine).
    pub fn respond(&self, resp: Response) -> Result<(), TransactionError> {
        self.reply(&resp.as_reply())
    }
    /// Sends a response written from borrowed headers (see [`Reply`]).
    pub fn reply(&self, r: &Reply<'_>) -> Result<(), TransactionError> {
        let bytes = short_lived(|| r.to_bytes());
        self.send_response(r.status, r.sent_to_tag(), bytes, || {
            let mut small = Reply::new(r.base, 500);
            small.reason = TOO_LARGE;
            small.to_tag = r.to_tag;
            Some(small.to_bytes())
        })
    }
    /// Sends a response already written: `bytes`, whose status is `status` and whose To
    /// tag is `to_tag` (a 2xx the call retransmits, RFC 3261 13.3.1.4).
    pub fn respond_written(
        &self,
        status: u16,
        to_tag: Option<&str>,
        bytes: Bytes,
    ) -> Result<(), TransactionError> {
        self.send_response(status, to_tag, bytes, || {
            // No headers of the request at hand here: those of the 100 Trying.
            let mut small = self.response(500)?.with_reason(TOO_LARGE);
            if let Some(t) = to_tag {
                small.set_to_tag(t);
            }
            Some(small.to_bytes())
        })
    }
    /// Drives the state machine with a response. One too large for a datagram (a
    /// script's huge reject reason or redirect list) would leave the peer with no answer
    /// at all, retransmitting into the void: `too_large` writes the short 500 that goes
    /// instead, with the same To tag (issue 15).
    fn send_response(
        &self,
        mut status: u16,
        to_tag: Option<&str>,
        mut bytes: Bytes,
        too_large: impl FnOnce() -> Option<Bytes>,
    ) -> Result<(), TransactionError> {
        if bytes.len() > MAX_DATAGRAM && !self.inner.source.transport.is_reliable() {
            tracing::warn!(
                status,
                size = bytes.len(),
                "response too large for a datagram; answering 500 instead"
            );
            if let Some(small) = short_lived(too_large) {
                status = 500;
                bytes = small;
            }
        }
        // What the transaction keeps (the bytes to send again, the To tag) lives as long
        // as it does: on its heap (issue 14; see `short_lived`).
        let tag = to_tag.map(|t| short_lived(|| t.to_owned()));
        let ((), err) = self
            .inner
            .drive(|m| Ok((m.tu_response(status, bytes)?, ())), None)?;
        if tag.is_some() {
            *self.inner.to_tag.lock() = tag;
        }
        match err {
            Some(e) => Err(TransactionError::Transport(e)),
            None => Ok(()),
        }
    }
    /// Sends a final response and ends the transaction at once, instead of lingering 32 s
    /// (Timer J) to answer retransmissions of the request: RFC 3261 8.2.7 lets a UAS answer
    /// statelessly, "typically" a challenge to an unauthenticated request. A retransmitted
    /// request is then a new one and gets its own answer (a fresh challenge). Issue 15: a
    /// flood of REGISTERs with bad credentials then leaves no transaction behind. INVITEs
    /// (whose non-2xx final must absorb an ACK) and provisionals go through [`respond`].
    ///
    /// [`respond`]: ServerTransaction::respond
    pub fn respond_and_end(&self, resp: Response) -> Result<(), TransactionError> {
        if self.inner.method == Method::Invite || resp.status < 200 {
            return self.respond(resp);
        }
        let status = resp.status;
        let bytes = short_lived(|| resp.to_bytes());
        let ((), err) = self.inner.drive(
            |m| {
                if m.is_finished() {
                    return Err(TransactionError::AlreadyFinal);
                }
                Ok((
                    vec![Action::Send(bytes, What::Status(status)), Action::Terminate],
                    (),
                ))
            },
            None,
        )?;
        match err {
            Some(e) => Err(TransactionError::Transport(e)),
            None => Ok(()),
        }
    }
    /// Where responses go (RFC 3261 18.2.2), as computed when the request arrived.
    pub fn source(&self) -> Target {
        self.inner.source
    }
    /// True once a final response was sent.
    pub fn is_finished(&self) -> bool {
        self.inner.core.with_machine(|m| m.is_finished())
    }
    /// The method of the request that created the transaction.
    pub fn method(&self) -> &Method {
        &self.inner.method
    }
    /// A response to the INVITE that created the transaction (RFC 3261 8.2.6.2), for
    /// when the user no longer has the request (a CANCEL's 487): its Via, From, To,
    /// Call-ID and CSeq read back from the last provisional sent (the 100 Trying, or a
    /// 18x whose To tag it then keeps). None for other requests and once a final went.
    pub fn response(&self, status: u16) -> Option<Response> {
        let last = self.inner.core.with_machine(|m| m.last_provisional())?;
        match crate::sip::parse(&last) {
            Ok((SipMessage::Response(sent), _)) => Some(sent.base.into_response(status)),
            // We wrote it; should it not read back (a bug), there is nothing to answer with.
            _ => {
                tracing::error!("a response we sent does not parse");
                None
            }
        }
    }
}

/// The largest UDP payload (IPv4: 65,535 - 8 - 20 bytes).
const MAX_DATAGRAM: usize = 65_507;

/// The reason of the 500 that replaces a response too large for a datagram.
const TOO_LARGE: &str = "Response Too Large";

struct ClientInner {
    shared: Arc<Shared>,
    key: ClientKey,
    target: Target,
    call_id: String,
    core: Core<ClientMachine>,
    /// Dropped on termination so that `next_event` then returns None (or the sink is
    /// told no more).
    events: Mutex<Option<EventOut>>,
}

/// A function that receives a client transaction's events where they happen (on the
/// transport's or the timer's task). It must not block.
pub type ClientSink = Box<dyn Fn(ClientEvent) + Send + Sync>;

/// Where a client transaction's events go.
enum EventOut {
    // Boxed: tokio's mpsc allocates slots in blocks of 32, and an inline ClientEvent (a whole
    // Response, ~620 bytes) made that ~20 KiB per client transaction.
    Channel(mpsc::UnboundedSender<Box<ClientEvent>>),
    /// Straight to the user: no channel and no task to forward from it, one task wake-up
    /// less per response on the call path.
    Sink(ClientSink),
}

impl Driven for ClientInner {
    type M = ClientMachine;
    fn core(&self) -> &Core<ClientMachine> {
        &self.core
    }
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    fn queue_ref(self: &Arc<Self>) -> Queued {
        Queued::Client(Arc::downgrade(self))
    }
    fn execute(
        self: &Arc<Self>,
        mut effects: Actions,
        _ack: Option<Request>,
    ) -> Option<TransportError> {
        let mut first_err = None;
        while !effects.is_empty() {
            let mut more = Vec::new();
            for e in effects {
                match e {
                    Action::Send(b, what) => {
                        if let Err(err) = self.shared.send(&self.target, b, &what, &self.call_id) {
                            tracing::debug!(call_id = %self.call_id, error = %err, "client transaction send failed");
                            self.send_failed(&err, &mut more);
                            first_err.get_or_insert(err);
                        }
                    }
                    Action::Report(ev) => {
                        if matches!(*ev, ClientEvent::Timeout) {
                            bump(&self.shared.stats.client_timeouts);
                        }
                        match self.events.lock().as_ref() {
                            // The user may have dropped its handle; nobody to tell then.
                            Some(EventOut::Channel(tx)) => {
                                let _ = tx.send(ev);
                            }
                            Some(EventOut::Sink(sink)) => sink(*ev),
                            None => {}
                        }
                    }
                    Action::Terminate => {
                        let me: *const ClientInner = &**self;
                        // As in `ServerInner::terminated`: a shrunk table stays on the
                        // short-lived heap.
                        let removed = short_lived(|| {
                            self.shared
                                .clients
                                .remove_if(&self.key, |v| std::ptr::eq(Arc::as_ptr(v), me))
                        });
                        drop(removed);
                        self.shared.live.fetch_sub(1, Ordering::AcqRel);
                        self.events.lock().take();
                    }
                    Action::PassAck | Action::Start(..) | Action::Stop(_) => {}
                }
            }
            effects = more;
        }
        first_err
    }
}

/// A client transaction; events arrive through `next_event`.
pub struct ClientTransaction {
    branch: String,
    events: mpsc::UnboundedReceiver<Box<ClientEvent>>,
}

impl ClientTransaction {
    /// The next event, or None when the transaction has terminated and will report no more.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await.map(|ev| *ev)
    }
    /// The branch of the request's top Via.
    pub fn branch(&self) -> &str {
        &self.branch
    }
}

struct Shared {
    sender: Arc<dyn Sender>,
    cfg: TimerConfig,
    tu: Arc<dyn TransactionUser>,
    /// Origin of the cleanup timers' grid ([`timers::deadline`]).
    epoch: Instant,
    servers: ShardMap<ServerKey, Arc<ServerInner>>,
    /// RFC 3261 8.2.2.2: (From tag, Call-ID, CSeq) of server transactions created by
    /// requests without To tag -> the transaction's key.
    merged: ShardMap<MergeKey, ServerKey>,
    clients: ShardMap<ClientKey, Arc<ClientInner>>,
    live: AtomicUsize,
    /// Most live transactions before requests outside dialogs are refused (0: no bound).
    max_live: AtomicUsize,
    accepting: AtomicBool,
    stats: Counters,
    messages: metrics::MessageCounters,
    /// Sees every message in and out when set (the per-call traces of `call.trace`).
    observer: std::sync::OnceLock<Arc<dyn MessageObserver>>,
    /// Overload control of new INVITEs and the Retry-After of its 503s (issue 15).
    overload: std::sync::OnceLock<(Arc<crate::overload::Overload>, u64)>,
    /// Per-source flood limit of requests outside dialogs.
    pike: std::sync::OnceLock<Arc<crate::pike::Pike>>,
    /// Every transaction's timers.
    timers: Arc<TimerQueue>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.timers.close();
    }
}

impl Shared {
    /// Every message the layer sends goes through here (one debug line each, issue item 9).
    fn send(
        &self,
        target: &Target,
        bytes: Bytes,
        what: &What,
        call_id: &str,
    ) -> Result<(), TransportError> {
        match what {
            What::Method(m) => {
                self.messages.request(Direction::Out, m);
                tracing::debug!(dir = "out", method = %m, call_id = %call_id, peer = %target.addr, transport = %target.transport)
            }
            What::Status(s) => {
                self.messages.response(Direction::Out, *s);
                tracing::debug!(dir = "out", status = s, call_id = %call_id, peer = %target.addr, transport = %target.transport)
            }
        }
        if let Some(o) = self.observer.get() {
            o.on_message(call_id, Direction::Out, target, Passing::Sent(&bytes));
        }
        self.sender.send(target, bytes)
    }

    /// A response sent outside any transaction (482, 503, and the like).
    fn respond_stateless(&self, req: &Request, status: u16) -> Response {
        let mut resp = req.response(status);
        // RFC 3261 8.2.6.2: a UAS adds a To tag to a response to a request without one.
        resp.set_to_tag(&new_tag());
        resp
    }
}

/// The To tags of the 503s that refuse calls under overload start with this (our other
/// tags are hex digits): the ACK of such a 503 is recognised without a parse.
const OVERLOAD_TAG_PREFIX: &str = "ovl-";

/// The To tag of the 503 refusing the call `call_id` under overload: the same for every
/// retransmission of the INVITE (RFC 3261 8.2.7), unguessable across processes (19.3).
fn overload_tag(call_id: &str) -> String {
    use std::hash::BuildHasher;
    static SALT: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(std::hash::RandomState::new);
    format!("{OVERLOAD_TAG_PREFIX}{:016x}", SALT.hash_one(call_id))
}

/// RFC 3261 17.2.3, RFC 2543 fallback: the To tag is part of the match. An ACK carries the
/// tag of the response, other requests the tag of the request that created the transaction.
fn to_tag_matches(key: &ServerKey, tx: &ServerInner, req: &Request) -> bool {
    if !key.is_legacy() {
        return true;
    }
    let want = req.base.to.tag();
    if req.method == Method::Ack {
        tx.to_tag.lock().as_deref() == want
    } else {
        // Once the final was sent, the rest of the RFC 2543 key matched.
        tx.legacy_to_tag.as_deref() == want || tx.core.with_machine(|m| m.is_finished())
    }
}

/// The transaction layer; a cheap handle.
#[derive(Clone)]
pub struct TransactionLayer {
    shared: Arc<Shared>,
}

impl TransactionLayer {
    /// Must be called inside a tokio runtime.
    pub fn new(sender: Arc<dyn Sender>, timers: TimerConfig, tu: Arc<dyn TransactionUser>) -> Self {
        TransactionLayer {
            shared: Arc::new(Shared {
                sender,
                cfg: timers,
                tu,
                epoch: Instant::now(),
                servers: ShardMap::with_shards(TABLE_SHARDS),
                merged: ShardMap::with_shards(TABLE_SHARDS),
                clients: ShardMap::with_shards(TABLE_SHARDS),
                live: AtomicUsize::new(0),
                max_live: AtomicUsize::new(0),
                accepting: AtomicBool::new(true),
                stats: Counters::default(),
                messages: Default::default(),
                observer: std::sync::OnceLock::new(),
                overload: std::sync::OnceLock::new(),
                pike: std::sync::OnceLock::new(),
                timers: TimerQueue::start(&tokio::runtime::Handle::current()),
            }),
        }
    }

    /// Shows every message in and out to `observer` from now on (`call.trace`); set once.
    pub fn set_observer(&self, observer: Arc<dyn MessageObserver>) {
        let _ = self.shared.observer.set(observer);
    }

    /// Refuses new INVITEs (no To tag) that `overload` does not admit, statelessly with
    /// 503 and `Retry-After: retry_after` seconds: before a transaction, a call or a script
    /// run exist, so a refusal costs a parse and a send (as Kamailio's `sl_send_reply`);
    /// requests inside dialogs always pass.
    /// Drops requests outside dialogs (no To tag) from sources that `pike` blocks, before
    /// any transaction exists and without an answer (issue 15: floods from one source).
    pub fn set_pike(&self, pike: Arc<crate::pike::Pike>) {
        let _ = self.shared.pike.set(pike);
    }

    /// Bounds the table (issue 15: a flood of requests with bad credentials, each answered
    /// and then remembered for Timer J's 32 s, must not grow memory without end): with
    /// `max` transactions alive, a new request outside a dialog gets a stateless `503 Too
    /// Many Transactions` with `Retry-After: retry_after`. Requests inside dialogs (BYE,
    /// re-INVITE of calls already up) still get transactions: there are as many of those
    /// as dialogs. 0 = no bound.
    pub fn set_max_transactions(&self, max: usize) {
        self.shared.max_live.store(max, Ordering::Relaxed);
    }

    pub fn set_overload(&self, overload: Arc<crate::overload::Overload>, retry_after: u64) {
        let _ = self.shared.overload.set((overload, retry_after));
    }

    /// Everything the transports read (requests already carry received/rport; for requests
    /// `source` is where responses go, RFC 3261 18.2.2).
    pub fn on_message(&self, msg: SipMessage, source: Target) {
        match msg {
            SipMessage::Request(req) => {
                self.shared.messages.request(Direction::In, &req.method);
                tracing::debug!(dir = "in", method = %req.method, call_id = %req.base.call_id, peer = %source.addr, transport = %source.transport);
                if let Some(o) = self.shared.observer.get() {
                    o.on_message(
                        &req.base.call_id,
                        Direction::In,
                        &source,
                        Passing::Request(&req),
                    );
                }
                match req.method {
                    Method::Ack => self.on_ack(req, source),
                    Method::Cancel => self.on_cancel(req, source),
                    _ => self.on_request(req, source),
                }
            }
            SipMessage::Response(resp) => {
                self.shared.messages.response(Direction::In, resp.status);
                tracing::debug!(dir = "in", status = resp.status, call_id = %resp.base.call_id, peer = %source.addr, transport = %source.transport);
                if let Some(o) = self.shared.observer.get() {
                    o.on_message(
                        &resp.base.call_id,
                        Direction::In,
                        &source,
                        Passing::Response(&resp),
                    );
                }
                self.on_response(resp, source);
            }
        }
    }

    /// A look at a request before it is parsed (the transport asks, see
    /// [`crate::transport::InboundSink::screen`]). While the overload detector refuses new
    /// calls, a new INVITE it does not admit is refused from the look alone, statelessly
    /// (RFC 3261 8.2.7: 503 with Retry-After, a To tag that is a function of the Call-ID),
    /// and the ACK of such a 503 is dropped: a refusal then costs a scan of the header
    /// lines, not a parse of the INVITE and of its ACK. True: parse and deliver it. A
    /// retransmission of an INVITE whose transaction exists, a request of any unusual
    /// shape, and everything while nothing is refused take the full path.
    ///
    /// During an overload, a new INVITE that stood in the socket's queue (`queued`)
    /// longer than the detector's target is refused whatever the refused fraction (see
    /// [`crate::overload::Overload::admit_queued`]).
    pub fn screen(&self, data: &[u8], source: &Target, queued: Option<Duration>) -> bool {
        let Some((overload, retry_after)) = self.shared.overload.get() else {
            return true;
        };
        if !overload.is_refusing() && !queued.is_some_and(|q| overload.is_stale(q)) {
            return true;
        }
        // Only a new INVITE or the ACK of a refusal is taken here; the rest of the traffic
        // (responses, in-dialog requests of the calls already up) is not looked at twice.
        // Methods are case-sensitive (RFC 3261 7.1).
        if !(data.starts_with(b"INVITE ") || data.starts_with(b"ACK ")) {
            return true;
        }
        let Some(peek) = crate::sip::peek_request(data) else {
            return true;
        };
        match (peek.method, peek.to_tag) {
            ("ACK", Some(tag)) if tag.starts_with(OVERLOAD_TAG_PREFIX) => {
                self.shared.messages.request(Direction::In, &Method::Ack);
                false
            }
            ("INVITE", None) => {
                !self.refuse_from_peek(&peek, overload, *retry_after, source, queued)
            }
            _ => true,
        }
    }

    /// True when the INVITE `peek` shows was refused (or dropped for its source).
    fn refuse_from_peek(
        &self,
        peek: &crate::sip::Peek<'_>,
        overload: &crate::overload::Overload,
        retry_after: u64,
        source: &Target,
        queued: Option<Duration>,
    ) -> bool {
        if !self.shared.accepting.load(Ordering::Acquire) {
            return false;
        }
        let key = ServerKey::branch(peek.branch, &peek.sent_by(), &Method::Invite);
        let now = Instant::now();
        if self.shared.servers.get(&key).is_some()
            || overload.admit_queued(now, peek.call_id, queued)
        {
            return false;
        }
        self.shared.messages.request(Direction::In, &Method::Invite);
        // Counted by the flood detector as the full path would count it (once per request).
        if let Some(pike) = self.shared.pike.get() {
            if !pike.allow(source.addr.ip(), now) {
                return true;
            }
        }
        let extra = format!("Retry-After: {retry_after}\r\n");
        let bytes = peek.response(
            503,
            "Overloaded",
            &overload_tag(peek.call_id),
            source.addr,
            &extra,
        );
        let rport = peek.rport.then_some(None);
        let target = crate::transport::response_target_of(rport, peek.port, source);
        if let Err(e) = self.shared.send(
            &target,
            Bytes::from(bytes),
            &What::Status(503),
            peek.call_id,
        ) {
            bump(&self.shared.stats.transport_errors);
            tracing::debug!(call_id = %peek.call_id, error = %e, "stateless response not sent");
        }
        true
    }

    /// A request the transport took could not be delivered after all (its connection
    /// could not be opened or secured): its client transaction fails as on a transport
    /// error at send (RFC 3261 17.1.1.2, 17.1.2.2; the TU sees 503, 8.1.3.1) rather than
    /// waiting for Timer B or F.
    pub fn on_undelivered(&self, req: &Request, err: &str) {
        let key = ClientKey::of(&req.base);
        if let Some(tx) = self.shared.clients.get(&key) {
            bump(&self.shared.stats.transport_errors);
            let _ = tx.drive(|m| Ok((m.transport_error(err.to_string()), ())), None);
        }
    }

    fn on_response(&self, resp: Response, source: Target) {
        // RFC 3261 17.1.3: branch of the top Via and the CSeq method.
        let key = ClientKey::of_response(&resp);
        match self.shared.clients.get(&key) {
            Some(tx) => {
                let _ = tx.drive(|m| Ok((m.response(resp), ())), None);
            }
            None => self.shared.tu.on_stray_response(resp, source),
        }
    }

    /// The server transaction `req` belongs to, if any, checking the To tag for RFC 2543
    /// keys (17.2.3: it is compared after the lookup because an ACK carries the tag of the
    /// response, not the INVITE's).
    fn find_server(&self, key: &ServerKey, req: &Request) -> Option<Arc<ServerInner>> {
        let tx = self.shared.servers.get(key)?;
        to_tag_matches(key, &tx, req).then_some(tx)
    }

    fn on_ack(&self, ack: Request, source: Target) {
        // RFC 3261 17.2.3: an ACK matches the INVITE transaction (for a non-2xx final);
        // otherwise it is the ACK for a 2xx and belongs to the TU.
        let tx = ServerKey::of(&ack, false).and_then(|k| self.find_server(&k, &ack));
        match tx {
            Some(tx) if tx.method == Method::Invite => {
                let _ = tx.drive(|m| Ok((m.ack(), ())), Some(ack));
            }
            _ => self.shared.tu.on_ack(ack, source),
        }
    }

    fn on_cancel(&self, cancel: Request, source: Target) {
        let Some(own) = ServerKey::of(&cancel, false) else {
            return;
        };
        if let Some(tx) = self.find_server(&own, &cancel) {
            tx.retransmission();
            return;
        }
        // RFC 3261 9.2: the INVITE transaction with the same branch and sent-by.
        let invite = ServerKey::of(&cancel, true)
            .and_then(|k| self.find_server(&k, &cancel))
            .filter(|tx| tx.method == Method::Invite);
        let Some(handle) = self.create_server(own, None, &cancel, source) else {
            return;
        };
        match invite {
            Some(inv) => {
                let mut resp = cancel.response(200);
                // RFC 3261 9.2: the To tag of the 200 matches the INVITE's responses.
                let tag = inv.to_tag.lock().clone().unwrap_or_else(new_tag);
                resp.set_to_tag(&tag);
                let _ = handle.respond(resp);
                let invite = ServerTransaction { inner: inv };
                if !invite.is_finished() {
                    self.shared.tu.on_cancel(invite, cancel);
                }
            }
            None => {
                let mut resp = cancel.response(481);
                resp.set_to_tag(&new_tag());
                let _ = handle.respond(resp);
            }
        }
    }

    fn on_request(&self, req: Request, source: Target) {
        // The keys end up in the tables, for the transaction's life: short-lived (see
        // `create_server`).
        let Some(key) = short_lived(|| ServerKey::of(&req, false)) else {
            return;
        };
        if let Some(tx) = self.shared.servers.get(&key) {
            // A retransmission (RFC 3261 17.2.1, 17.2.2); RFC 2543 keys need the To tag too.
            if to_tag_matches(&key, &tx, &req) {
                tx.retransmission();
            } else {
                tracing::debug!(call_id = %req.base.call_id, "RFC 2543 request matches a transaction but not its To tag; dropped");
            }
            return;
        }
        let merge_key = short_lived(|| MergeKey::of(&req));
        if merge_key.is_some() && !self.shared.accepting.load(Ordering::Acquire) {
            // Graceful shutdown: no new dialogs; in-dialog requests (To tag) go on.
            bump(&self.shared.stats.rejected_not_accepting);
            let mut resp = self.shared.respond_stateless(&req, 503);
            resp.headers.push("Retry-After", "30");
            self.send_response_stateless(&resp, &source);
            return;
        }
        if merge_key.is_some() {
            if let Some(pike) = self.shared.pike.get() {
                if !pike.allow(source.addr.ip(), Instant::now()) {
                    return;
                }
            }
        }
        if merge_key.is_some() {
            let max = self.shared.max_live.load(Ordering::Relaxed);
            if max > 0 && self.shared.live.load(Ordering::Acquire) >= max {
                bump(&self.shared.stats.refused_table_full);
                let mut resp = self.shared.respond_stateless(&req, 503);
                resp.reason = "Too Many Transactions".into();
                let retry = self.shared.overload.get().map_or(2, |(_, r)| *r);
                resp.headers.push("Retry-After", retry.to_string());
                self.send_response_stateless(&resp, &source);
                return;
            }
        }
        if req.method == Method::Invite && merge_key.is_some() {
            if let Some((overload, retry_after)) = self.shared.overload.get() {
                if !overload.admit(Instant::now(), &req.base.call_id) {
                    let mut resp = req.response(503);
                    resp.set_to_tag(&overload_tag(&req.base.call_id));
                    resp.reason = "Overloaded".into();
                    resp.headers.push("Retry-After", retry_after.to_string());
                    self.send_response_stateless(&resp, &source);
                    return;
                }
            }
        }
        if let Some(mk) = &merge_key {
            // RFC 3261 8.2.2.2: same From tag, Call-ID and CSeq as a transaction in progress
            // but another branch: a request that forked and came back (merged).
            if let Some(other) = self.shared.merged.get(mk) {
                if other != key {
                    bump(&self.shared.stats.merged_rejected);
                    let resp = self.shared.respond_stateless(&req, 482);
                    self.send_response_stateless(&resp, &source);
                    return;
                }
            }
        }
        let Some(tx) = self.create_server(key, merge_key, &req, source) else {
            return;
        };
        if req.method == Method::Invite {
            // RFC 3261 17.2.1: 100 Trying at once, so the client stops retransmitting; it
            // copies Timestamp (8.2.6.1) and carries no To tag.
            let mut stamp = Headers::new();
            if let Some(ts) = req.headers.get("Timestamp") {
                stamp.push("Timestamp", ts);
            }
            let mut trying = req.reply(100);
            trying.headers = &stamp;
            let _ = tx.reply(&trying);
        }
        self.shared.tu.on_request(tx, req);
    }

    /// Creates and registers a server transaction; None (after treating the request as a
    /// retransmission) when another thread created it first.
    fn create_server(
        &self,
        key: ServerKey,
        merge_key: Option<MergeKey>,
        req: &Request,
        source: Target,
    ) -> Option<ServerTransaction> {
        // A transaction outlives the call's set-up by 32 s (Timer J/L): on the heap of
        // short-lived objects, it leaves no holes among the call's state when it ends.
        let inner: Result<_, Arc<ServerInner>> = short_lived(|| {
            let reliable = source.transport.is_reliable();
            let machine = if req.method == Method::Invite {
                ServerMachine::Invite(InviteServer::new(self.shared.cfg, reliable))
            } else {
                ServerMachine::NonInvite(NonInviteServer::new(self.shared.cfg, reliable))
            };
            let inner = Arc::new(ServerInner {
                shared: self.shared.clone(),
                key: key.clone(),
                merge_key: merge_key.clone(),
                method: req.method.clone(),
                legacy_to_tag: if key.is_legacy() {
                    req.base.to.tag().map(Box::from)
                } else {
                    None
                },
                call_id: req.base.call_id.as_str().into(),
                source,
                core: Core::new(machine, self.shared.epoch),
                to_tag: Mutex::new(None),
            });
            self.shared.servers.insert_new(key.clone(), inner.clone())?;
            if let Some(mk) = merge_key {
                let _ = self.shared.merged.insert_new(mk, key);
            }
            Ok(inner)
        });
        let inner = match inner {
            Ok(inner) => inner,
            Err(existing) => {
                existing.retransmission();
                return None;
            }
        };
        self.shared.live.fetch_add(1, Ordering::AcqRel);
        bump(&self.shared.stats.server_created);
        Some(ServerTransaction { inner })
    }

    fn send_response_stateless(&self, resp: &Response, target: &Target) {
        let r = self.shared.send(
            target,
            resp.to_bytes(),
            &What::Status(resp.status),
            &resp.base.call_id,
        );
        if let Err(e) = r {
            bump(&self.shared.stats.transport_errors);
            tracing::debug!(call_id = %resp.base.call_id, error = %e, "stateless response not sent");
        }
    }

    /// Starts a client transaction; the request must carry its top Via with a fresh branch.
    /// Send failures (even of the first transmission) are reported as
    /// [`ClientEvent::TransportError`], so that the caller handles them like any other
    /// outcome (RFC 3261 17.1.1.2: like a 503). Do not send ACKs here: an ACK has no
    /// transaction (use [`TransactionLayer::send_stateless`]).
    pub fn send_request(
        &self,
        req: Request,
        target: Target,
    ) -> Result<ClientTransaction, TransactionError> {
        let branch = req.base.branch().to_owned();
        let (tx_events, rx_events) = mpsc::unbounded_channel();
        self.start_client(&req, target, EventOut::Channel(tx_events))?;
        Ok(ClientTransaction {
            branch,
            events: rx_events,
        })
    }

    /// Like [`send_request`](Self::send_request), but the events go to `sink` as they
    /// happen instead of through a [`ClientTransaction`] handle. The request is only
    /// read (written out and its key taken): the caller may keep it without a copy.
    pub fn send_request_with(
        &self,
        req: &Request,
        target: Target,
        sink: ClientSink,
    ) -> Result<(), TransactionError> {
        self.start_client(req, target, EventOut::Sink(sink))
    }

    fn start_client(
        &self,
        req: &Request,
        target: Target,
        events: EventOut,
    ) -> Result<(), TransactionError> {
        if req.base.branch().is_empty() {
            return Err(TransactionError::NoBranch);
        }
        // Short-lived, as in `create_server`: the transaction (and the request's bytes it
        // keeps for retransmissions) ends 32 s after the call's set-up (Timer M, K).
        let (inner, actions) = short_lived(|| {
            let key = ClientKey::of(&req.base);
            let reliable = target.transport.is_reliable();
            let call_id = req.base.call_id.clone();
            let (machine, actions) = if req.method == Method::Invite {
                let (m, a) = InviteClient::start(self.shared.cfg, reliable, req);
                (ClientMachine::Invite(Box::new(m)), a)
            } else {
                let method = req.method.clone();
                let bytes = req.to_bytes();
                let (m, a) = NonInviteClient::start(self.shared.cfg, reliable, method, bytes);
                (ClientMachine::NonInvite(m), a)
            };
            let inner = Arc::new(ClientInner {
                shared: self.shared.clone(),
                key,
                target,
                call_id,
                core: Core::new(machine, self.shared.epoch),
                events: Mutex::new(Some(events)),
            });
            match self.shared.clients.insert_new(key, inner.clone()) {
                Ok(()) => Ok((inner, actions)),
                Err(_) => Err(TransactionError::Duplicate),
            }
        })?;
        self.shared.live.fetch_add(1, Ordering::AcqRel);
        bump(&self.shared.stats.client_created);
        // The first transmission and the first timers.
        inner.drive(|_| Ok((actions, ())), None)?;
        Ok(())
    }

    /// Sends a message outside any transaction (the ACK for a 2xx, a 2xx retransmission).
    pub fn send_stateless(
        &self,
        msg: &SipMessage,
        target: &Target,
    ) -> Result<(), TransactionError> {
        let what = match msg {
            SipMessage::Request(r) => What::Method(r.method.clone()),
            SipMessage::Response(r) => What::Status(r.status),
        };
        self.shared
            .send(target, msg.to_bytes(), &what, &msg.base().call_id)
            .map_err(TransactionError::from)
    }

    /// Server transactions still owing a final response: what a graceful shutdown waits
    /// for. (Transactions that have answered only linger for retransmissions, Timer J/L.)
    pub fn unanswered(&self) -> usize {
        self.shared
            .servers
            .values()
            .iter()
            .filter(|s| !s.core.with_machine(|m| m.is_finished()))
            .count()
    }

    /// Transactions alive now (server + client).
    pub fn len(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// From now on, new dialog-creating requests (no To tag) get 503; in-dialog requests and
    /// everything in flight go on (graceful shutdown).
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }
    pub fn timers(&self) -> TimerConfig {
        self.shared.cfg
    }
    /// The layer's counters.
    pub fn stats(&self) -> TransactionStats {
        let c = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransactionStats {
            server_created: g(&c.server_created),
            client_created: g(&c.client_created),
            retransmissions_absorbed: g(&c.retransmissions_absorbed),
            client_timeouts: g(&c.client_timeouts),
            ack_timeouts: g(&c.ack_timeouts),
            transport_errors: g(&c.transport_errors),
            merged_rejected: g(&c.merged_rejected),
            rejected_not_accepting: g(&c.rejected_not_accepting),
            retransmissions_sent: g(&c.retransmissions_sent),
            refused_table_full: g(&c.refused_table_full),
        }
    }
}
