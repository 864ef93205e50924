//! The B2BUA's port to the dial plan above it (RFC 3261 layers: the transaction user
//! below, the hook engine above). The B2BUA runs a call's hooks through [`CallHooks`]
//! (`on_invite`, `on_refer`, `on_call_end`) and offers the call to them as a
//! [`CallControl`] (what `call:dial` does); the data and verdicts that cross are defined
//! here. The script engine implements these traits and imports this module, never the
//! reverse (as pingora's proxy hooks or drachtio's middleware: the lower layer names the
//! hook, the higher one fills it in). `server` hands the engine to [`super::B2buaParts`].
//!
//! Cost per call: one `Arc` clone of the current hook set when the call starts, one dynamic
//! call per hook run, and the call's script state behind one `Arc` it already had (no
//! allocation added by the port).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The dial plan's hooks: a reload replaces what [`CallHooks::current`] gives, the handle
/// (held by the B2BUA from start-up) stays the same.
pub trait CallHooks: Send + Sync + 'static {
    /// The hooks new calls start on; a call keeps them (and finishes on them) after a reload.
    fn current(&self) -> Arc<dyn CallHookSet>;
}

/// One version of the dial plan's call hooks, pinned by the calls that started on it.
pub trait CallHookSet: Send + Sync + 'static {
    /// 1 for the first load, +1 per successful reload.
    fn version(&self) -> u64;

    /// Whether `on_refer` is defined (then a call keeps its script state while up).
    fn has_on_refer(&self) -> bool;

    /// Whether `on_call_end` is defined. When it is not, a call's handle (and with it the
    /// call's script state) can be dropped as soon as `on_invite` has decided.
    fn has_on_call_end(&self) -> bool;

    /// Runs `on_invite(call)`; `control` is what the call's verbs act on.
    fn on_invite(
        self: Arc<Self>,
        call: CallInfo,
        control: Arc<dyn CallControl>,
    ) -> Pin<Box<dyn Future<Output = InviteOutcome> + Send>>;

    /// Runs `on_call_end(call, record)` on the version the call started on (the handle's),
    /// then frees the call's script state.
    fn on_call_end(
        &self,
        handle: CallScriptHandle,
        record: CallRecord,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        handle.on_call_end(record)
    }
}

/// The script's side of one call (its state, the version and VM it is pinned to),
/// implemented by the hook engine.
pub trait CallScript: Send + Sync + 'static {
    /// The hook set's version this call is pinned to.
    fn version(&self) -> u64;

    /// The call id given to `on_invite`.
    fn call_id(&self) -> &str;

    /// Runs `on_refer(call, refer)`; allows when there is no such hook. The future owns
    /// what it needs.
    fn on_refer(
        self: Arc<Self>,
        info: ReferInfo,
    ) -> Pin<Box<dyn Future<Output = ReferVerdict> + Send>>;

    /// Runs `on_call_end(call, record)` (a no-op when undefined) and frees the call's
    /// script state; the state is taken before this returns.
    fn on_call_end(self: Arc<Self>, record: CallRecord)
        -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// Frees the call's script state (the handle was dropped without `on_call_end`).
    fn release(&self);
}

/// A call's place in the dial plan. Give it back through [`CallHookSet::on_call_end`];
/// dropping it instead just frees the call's script state.
pub struct CallScriptHandle(Arc<dyn CallScript>);

impl CallScriptHandle {
    /// Wraps the hook engine's state of one call.
    pub fn new(call: Arc<dyn CallScript>) -> CallScriptHandle {
        CallScriptHandle(call)
    }

    /// The script version this call is pinned to.
    pub fn version(&self) -> u64 {
        self.0.version()
    }

    /// The call id given to `on_invite`.
    pub fn call_id(&self) -> &str {
        self.0.call_id()
    }

    /// Runs `on_refer(call, refer)`; the future owns what it needs (the call keeps its
    /// handle meanwhile).
    pub fn on_refer(&self, info: ReferInfo) -> Pin<Box<dyn Future<Output = ReferVerdict> + Send>> {
        self.0.clone().on_refer(info)
    }

    /// Runs `on_call_end(call, record)`, then frees the call's script state.
    pub fn on_call_end(self, record: CallRecord) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.0.clone().on_call_end(record)
    }
}

impl Drop for CallScriptHandle {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl std::fmt::Debug for CallScriptHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallScriptHandle")
            .field("call", &self.0.call_id())
            .field("version", &self.0.version())
            .finish()
    }
}

/// A SIP URI as the script sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UriInfo {
    pub uri: String,
    pub user: Option<String>,
    pub host: String,
}

/// A request's headers as a call keeps them for its hooks: one text buffer and the ends of
/// each name and value in it. Two `String`s per header cost two allocations each to make
/// for every call and memory for its whole life (issue 14); this is filled straight from
/// the parsed INVITE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderList {
    text: String,
    /// (end of the name, end of the value) of each header, in order.
    ends: Vec<(u32, u32)>,
}

impl HeaderList {
    /// The list of `headers` (name, value), presized from a first pass over them.
    pub fn of<'a>(headers: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> HeaderList {
        let (count, bytes) = headers
            .clone()
            .fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
        let mut list = HeaderList {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(count),
        };
        for (name, value) in headers {
            list.text.push_str(name);
            let name_end = list.text.len();
            list.text.push_str(value);
            // A message is at most 64 KiB (`sip.max_message_size`); u32 offsets cannot
            // overflow.
            list.ends.push((name_end as u32, list.text.len() as u32));
        }
        list
    }

    /// (name, value) of each header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut start = 0usize;
        self.ends.iter().map(move |&(n, v)| {
            let (n, v) = (n as usize, v as usize);
            let name = self.text.get(start..n).unwrap_or("");
            let value = self.text.get(n..v).unwrap_or("");
            start = v;
            (name, value)
        })
    }
}

impl From<Vec<(String, String)>> for HeaderList {
    fn from(headers: Vec<(String, String)>) -> HeaderList {
        HeaderList::of(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())))
    }
}

/// What the script learns about a new call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallInfo {
    pub id: String,
    pub from: UriInfo,
    pub to: UriInfo,
    pub ruri: UriInfo,
    /// Where the INVITE came from, e.g. `"udp:1.2.3.4:5060"`.
    pub source: String,
    /// The INVITE's headers (name, value) in order.
    pub headers: HeaderList,
    /// The trunk the call came in from (its `inbound` sources, or the `line` parameter of
    /// the contact it registered), if any.
    pub trunk: Option<String>,
}

/// One target of `call:dial`: a SIP URI, or a number through a trunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialTarget {
    Uri(String),
    Trunk { trunk: String, user: String },
}

impl From<String> for DialTarget {
    fn from(uri: String) -> DialTarget {
        DialTarget::Uri(uri)
    }
}

impl From<&str> for DialTarget {
    fn from(uri: &str) -> DialTarget {
        DialTarget::Uri(uri.to_string())
    }
}

impl std::fmt::Display for DialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialTarget::Uri(u) => f.write_str(u),
            DialTarget::Trunk { trunk, user } => write!(f, "{user} via trunk {trunk}"),
        }
    }
}

/// `call:dial` options, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DialOptions {
    /// Ring timeout; `None` = the server's default.
    pub timeout: Option<Duration>,
    /// Extra headers for the outgoing INVITE (names are tokens, values have no CR/LF, and
    /// dialog headers such as Via, From, To, Call-ID, CSeq, Contact are refused).
    pub headers: Vec<(String, String)>,
    /// From URI for the outgoing leg.
    pub from: Option<String>,
    /// To URI for the outgoing leg.
    pub to: Option<String>,
    /// Hang up the call after this long once answered.
    pub max_duration: Option<Duration>,
    /// The caller ID (a user part, e.g. "+15551234") presented on a trunk: in From and the
    /// trunk's identity header; `None` = the caller's From user.
    pub caller_id: Option<String>,
    /// Withhold the caller's identity on a trunk (RFC 3323 `Privacy: id`); `None` = the
    /// trunk's `privacy` setting.
    pub privacy: Option<bool>,
}

/// The result of one `call:dial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialOutcome {
    pub answered: bool,
    pub status: u16,
    pub reason: String,
    /// Where `status` came from (`outcome.source`), so a dial plan need not guess from
    /// the code whether to try another target.
    pub source: DialSource,
    /// The index (into the dialled targets) of the target whose answer `status` is
    /// ([`DialSource::Callee`]) or that was refused here ([`DialSource::Local`]: a bad
    /// URI, no route); None when no one target is to blame (`outcome.target`).
    pub target: Option<usize>,
}

impl DialOutcome {
    /// An unanswered dial whose status came from `source` (not from one target).
    pub fn failed(status: u16, reason: impl Into<String>, source: DialSource) -> DialOutcome {
        DialOutcome {
            answered: false,
            status,
            reason: reason.into(),
            source,
            target: None,
        }
    }
}

/// Where a dial's status came from (`outcome.source` in Lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialSource {
    /// A target's answer (or its silence: 408 when it never answered the INVITE, 503
    /// when it could not be reached); `target` says which.
    Callee = 0,
    /// The dial's ring timeout (`timeout` option) expired.
    Timeout = 1,
    /// The caller hung up (CANCEL) or the call ended while dialling.
    Caller = 2,
    /// Refused here before any target answered: a bad target, no route to it, a dial
    /// already in progress, no target at all.
    Local = 3,
}

impl DialSource {
    /// The name Lua sees.
    pub fn as_str(self) -> &'static str {
        ["callee", "timeout", "caller", "local"][self as usize]
    }
}

/// What the script may do to a call: the B2BUA implements it.
pub trait CallControl: Send + Sync + 'static {
    /// Rings `targets` (in parallel when several) and resolves when one answers or all
    /// failed. Dropping the future means the hook was abandoned (cancel the branches).
    fn dial(
        &self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>>;

    /// `call:authenticate()`: checks the INVITE's Proxy-Authorization (digest, RFC 3261
    /// 22.3). The default is for call controls without users.
    fn authenticate(&self) -> AuthVerdict {
        AuthVerdict::NotConfigured
    }

    /// `call:set_route(name)`: the call is counted under route number `route` (an index
    /// into `EngineOptions::routes`, already checked).
    fn set_route(&self, _route: usize) {}

    /// `call:transfer(target, { party = ... })`: connects the caller (`to_caller`) or the
    /// callee of the answered call to `target` and releases the other party. Resolves
    /// with the outcome of ringing the target.
    fn transfer(
        &self,
        _target: String,
        _to_caller: bool,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        Box::pin(async {
            DialOutcome::failed(501, "Transfer not supported here", DialSource::Local)
        })
    }

    // ---- for hunt groups (`call:hunt`) ----

    /// Like `dial`, also saying which target (index into `targets`) answered.
    fn dial_indexed(
        &self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = (DialOutcome, Option<usize>)> + Send>> {
        let dial = self.dial(targets, opts);
        Box::pin(async move { (dial.await, None) })
    }

    /// Sends the caller a provisional response (182 Queued) while its INVITE is pending.
    fn provisional(&self, _status: u16, _reason: &str, _headers: Vec<(String, String)>) {}

    /// Whether the call has ended (the caller CANCELled, or it was hung up).
    fn is_ended(&self) -> bool {
        false
    }

    /// Resolves when the call ends. The default never does.
    fn ended(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(std::future::pending())
    }
}

/// What `call:authenticate()` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthVerdict {
    /// The caller proved to be this user.
    Ok(String),
    /// Answer the caller with this status (407 with a challenge the call control has
    /// prepared, or 403/400) and end the hook's decision there.
    Reject(u16, String),
    /// No users are configured (`registrar.users_file`).
    NotConfigured,
}

/// The decision of `on_invite`.
#[derive(Debug)]
pub enum InviteOutcome {
    /// A dial answered; the call is up.
    Bridged { handle: CallScriptHandle },
    /// Answer the caller with this final status: `call:reject`, no `on_invite` (404), or the
    /// hook returned without a decision (480 or the last failed dial's status).
    Rejected {
        status: u16,
        reason: String,
        handle: CallScriptHandle,
    },
    /// `call:redirect`: answer 302 with these contacts.
    Redirected {
        contacts: Vec<String>,
        handle: CallScriptHandle,
    },
    /// The hook failed (Lua error, instruction budget, memory): answer 500. The text has
    /// the script's `file:line`.
    Failed {
        error: String,
        handle: CallScriptHandle,
    },
}

impl InviteOutcome {
    /// The handle, whatever the outcome.
    pub fn handle(&self) -> &CallScriptHandle {
        match self {
            InviteOutcome::Bridged { handle }
            | InviteOutcome::Rejected { handle, .. }
            | InviteOutcome::Redirected { handle, .. }
            | InviteOutcome::Failed { handle, .. } => handle,
        }
    }

    /// Splits off the handle.
    pub fn into_handle(self) -> CallScriptHandle {
        match self {
            InviteOutcome::Bridged { handle }
            | InviteOutcome::Rejected { handle, .. }
            | InviteOutcome::Redirected { handle, .. }
            | InviteOutcome::Failed { handle, .. } => handle,
        }
    }
}

/// What `on_refer(call, refer)` sees of a transfer request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReferInfo {
    /// Who asked: `"caller"` or `"callee"`.
    pub by: String,
    /// The Refer-To URI (without its `?headers`).
    pub target: String,
    /// The Referred-By header, if any.
    pub referred_by: Option<String>,
    /// The `Replaces` of an attended transfer (`call-id;to-tag=..;from-tag=..`), if any.
    pub replaces: Option<String>,
}

/// What `on_refer` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferVerdict {
    /// Go ahead, to this target (the script may have rewritten it) with this Referred-By.
    Allow {
        target: String,
        referred_by: Option<String>,
    },
    /// `refer:deny(code, reason)`: answer the REFER with this.
    Deny(u16, String),
    /// The hook failed: the REFER gets 500. Text with file:line.
    Failed(String),
}

/// Facts about a finished call for `on_call_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub start: SystemTime,
    pub answer: Option<SystemTime>,
    pub end: SystemTime,
    /// `"caller"`, `"callee"` or `"system"`.
    pub hangup_by: String,
    pub final_status: u16,
}
