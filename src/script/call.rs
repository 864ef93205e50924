//! The `call` object: its Rust state, the `call:*` verbs, and running the two call hooks
//! (`on_invite`, `on_call_end`) as coroutines.

use std::ffi::CStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mlua::{Lua, Table, Value};
use parking_lot::Mutex;

use super::hooks::{self, Hook, HookFuture};
use super::pool::VmHandle;
use super::record::{push_record, record_into, store, Field};
use super::vm::FailKind;
use super::wait::{wait_marker, WaitFuture, Waited, Waits};
use super::{
    CallControl, CallInfo, CallRecord, CallScriptHandle, DialOptions, DialOutcome, DialSource,
    DialTarget, HeaderList, InviteOutcome, ScriptVersion, UriInfo,
};
use crate::b2bua::CallScript;

/// The decision `on_invite` made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Answered,
    Rejected(u16, String),
    Redirected(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `on_invite` is running.
    Deciding,
    /// `on_invite` has returned; the call may still be up.
    Returned,
    /// The call is over (`on_call_end`).
    Ended,
}

/// Rust-side state of one call, shared by its `call` object and its handle.
pub(crate) struct CallState {
    pub id: String,
    /// The rest of the call's facts, read by Lua on first access (see `raw_api`'s `field`).
    source: String,
    trunk: Option<String>,
    from: UriInfo,
    to: UriInfo,
    ruri: UriInfo,
    headers: HeaderList,
    inner: Mutex<Inner>,
    /// The registry slot of the call's `call` table on its VM, made only when the script
    /// has a later hook that is given the same table again (`on_call_end`, `on_refer`);
    /// freed with the handle.
    pub key: Mutex<Option<mlua::RegistryKey>>,
    /// The call's slot in its VM's [`CallSlots`] (set when `on_invite` starts), freed when
    /// the state goes.
    slot: std::sync::OnceLock<(Arc<CallSlots>, CallHandle)>,
    /// The call's own globals, carried from one of its hooks to the next. A registry key,
    /// not a `Table`: dropping a key off the VM's thread never waits for the VM.
    pub env: Mutex<Option<mlua::RegistryKey>>,
    /// Its VM and version while the B2BUA holds the call's handle (taken when the handle
    /// goes: the call's Lua object then no longer keeps its VM alive).
    pinned: Mutex<Option<Pinned>>,
}

/// What a call's handle keeps alive.
struct Pinned {
    vm: Option<Arc<VmHandle>>,
    version: Arc<ScriptVersion>,
}

struct Inner {
    control: Option<Arc<dyn CallControl>>,
    phase: Phase,
    decision: Option<Decision>,
    dialing: bool,
    last_failed: Option<(u16, String)>,
}

impl CallState {
    fn new(info: CallInfo, control: Arc<dyn CallControl>, pinned: Pinned) -> CallState {
        CallState {
            pinned: Mutex::new(Some(pinned)),
            id: info.id,
            source: info.source,
            trunk: info.trunk,
            from: info.from,
            to: info.to,
            ruri: info.ruri,
            headers: info.headers,
            key: Mutex::new(None),
            slot: std::sync::OnceLock::new(),
            env: Mutex::new(None),
            inner: Mutex::new(Inner {
                control: Some(control),
                phase: Phase::Deciding,
                decision: None,
                dialing: false,
                last_failed: None,
            }),
        }
    }

    /// May `verb` act on the call now?
    fn check(&self, verb: &str) -> Result<(), String> {
        let inner = self.inner.lock();
        let why = match (inner.phase, &inner.decision) {
            (Phase::Ended, _) => "the call has ended",
            (Phase::Returned, _) => "on_invite has already returned",
            (_, Some(Decision::Answered)) => "call already answered",
            (_, Some(Decision::Rejected(..))) => "call already rejected",
            (_, Some(Decision::Redirected(_))) => "call already redirected",
            _ if inner.dialing => "a dial is already in progress for this call",
            _ => return Ok(()),
        };
        Err(format!("call:{verb}: {why}"))
    }

    fn decide(&self, verb: &str, decision: Decision) -> Result<(), String> {
        self.check(verb)?;
        self.inner.lock().decision = Some(decision);
        Ok(())
    }

    pub(super) fn start_dial(&self) -> Result<Arc<dyn CallControl>, String> {
        self.check("dial")?;
        let mut inner = self.inner.lock();
        let control = inner
            .control
            .clone()
            .ok_or_else(|| "call:dial: the call has ended".to_owned())?;
        inner.dialing = true;
        Ok(control)
    }

    pub(super) fn finish_dial(&self, outcome: &DialOutcome) {
        let mut inner = self.inner.lock();
        inner.dialing = false;
        if outcome.answered {
            inner.decision = Some(Decision::Answered);
        } else {
            inner.last_failed = Some((outcome.status, outcome.reason.clone()));
        }
    }

    /// `on_invite` returned: no more verbs; returns the decision and the last failed dial.
    fn finish_invite(&self) -> (Option<Decision>, Option<(u16, String)>) {
        let mut inner = self.inner.lock();
        inner.phase = Phase::Returned;
        inner.control = None;
        (inner.decision.clone(), inner.last_failed.clone())
    }

    fn end(&self) {
        let mut inner = self.inner.lock();
        inner.phase = Phase::Ended;
        inner.control = None;
    }

    fn header(&self, name: &str) -> Option<&str> {
        let want = canonical_header(name);
        self.headers
            .iter()
            .find(|(n, _)| canonical_header(n) == want)
            .map(|(_, v)| super::bounded(v))
    }
}

impl Drop for CallState {
    fn drop(&mut self) {
        if let Some((slots, handle)) = self.slot.get() {
            slots.release(*handle);
        }
    }
}

/// Clears `dialing` if a dial is abandoned (its hook dropped mid-dial).
pub(super) struct DialInProgress(pub(super) Arc<CallState>);

impl Drop for DialInProgress {
    fn drop(&mut self) {
        self.0.inner.lock().dialing = false;
    }
}

/// What the sandbox keeps for a call beside its `call` table and hands back to the raw
/// verbs: a light userdata naming the call's slot in its VM's [`CallSlots`]. A full
/// userdata per call cost ~2,500 instructions of every `on_invite` (made in a protected
/// call, a finalizer run by the collector, a typed borrow per verb; issue 14); a light one
/// is a plain value. Scripts never see it (the sandbox keeps it in its private record),
/// and could not make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CallHandle(usize);

impl CallHandle {
    pub(super) fn to_lua(self) -> mlua::LightUserData {
        mlua::LightUserData(self.0 as *mut std::ffi::c_void)
    }
}

impl mlua::FromLua for CallHandle {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<CallHandle> {
        match value {
            Value::LightUserData(ud) => Ok(CallHandle(ud.0 as usize)),
            other => Err(mlua::Error::runtime(format!(
                "expected a call's handle, got a {}",
                other.type_name()
            ))),
        }
    }
}

/// Bits of a handle that name the slot; the rest is the slot's generation, so that a call
/// object a script kept past its call names no later call that took the slot (it gets
/// "this call is over"). With 32 bits of generation (64-bit targets) a slot would have
/// to be reused four billion times under a kept object for the two to meet.
const SLOT_BITS: u32 = usize::BITS / 2;
const SLOT_MASK: usize = (1 << SLOT_BITS) - 1;

/// The calls a VM's scripts can act on, by [`CallHandle`]. A slot holds its call weakly:
/// the hook run (and, for `on_call_end` and `on_refer`, the B2BUA's handle) holds the
/// state strongly, so a script reaches it whenever one of the call's hooks runs; the
/// state frees its slot when it goes.
#[derive(Default)]
pub(crate) struct CallSlots(Mutex<SlotTable>);

#[derive(Default)]
struct SlotTable {
    slots: Vec<Slot>,
    free: Vec<usize>,
}

struct Slot {
    generation: usize,
    call: Weak<CallState>,
}

impl CallSlots {
    /// A slot for `call`; `None` when every slot a handle can name is taken.
    fn insert(&self, call: &Arc<CallState>) -> Option<CallHandle> {
        let mut table = self.0.lock();
        let index = match table.free.pop() {
            Some(index) => index,
            None if table.slots.len() <= SLOT_MASK => {
                table.slots.push(Slot {
                    generation: 0,
                    call: Weak::new(),
                });
                table.slots.len() - 1
            }
            None => return None,
        };
        let slot = &mut table.slots[index];
        // Never 0, so that no handle is a null pointer.
        slot.generation = match (slot.generation + 1) & (usize::MAX >> SLOT_BITS) {
            0 => 1,
            g => g,
        };
        slot.call = Arc::downgrade(call);
        Some(CallHandle(slot.generation << SLOT_BITS | index))
    }

    /// The call `handle` names, while it lives.
    pub(super) fn get(&self, handle: CallHandle) -> mlua::Result<Arc<CallState>> {
        let table = self.0.lock();
        table
            .slots
            .get(handle.0 & SLOT_MASK)
            .filter(|slot| slot.generation == handle.0 >> SLOT_BITS)
            .and_then(|slot| slot.call.upgrade())
            .ok_or_else(|| {
                mlua::Error::runtime("this call is over (a call object kept past its hooks)")
            })
    }

    fn release(&self, handle: CallHandle) {
        let mut table = self.0.lock();
        let index = handle.0 & SLOT_MASK;
        if let Some(slot) = table.slots.get_mut(index) {
            if slot.generation == handle.0 >> SLOT_BITS {
                slot.call = Weak::new();
                table.free.push(index);
            }
        }
    }
}

/// Compact header forms (RFC 3261 7.3.3 and later RFCs).
const COMPACT: &[(&str, &str)] = &[
    ("a", "accept-contact"),
    ("b", "referred-by"),
    ("c", "content-type"),
    ("d", "request-disposition"),
    ("e", "content-encoding"),
    ("f", "from"),
    ("i", "call-id"),
    ("j", "reject-contact"),
    ("k", "supported"),
    ("l", "content-length"),
    ("m", "contact"),
    ("o", "event"),
    ("r", "refer-to"),
    ("s", "subject"),
    ("t", "to"),
    ("u", "allow-events"),
    ("v", "via"),
    ("x", "session-expires"),
    ("y", "identity"),
];

fn canonical_header(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    COMPACT
        .iter()
        .find(|(short, _)| *short == lower)
        .map_or(lower, |(_, long)| (*long).to_owned())
}

/// Headers the server owns: a script may not add them to a dial.
const SERVER_HEADERS: &[&str] = &[
    "via",
    "call-id",
    "cseq",
    "from",
    "to",
    "contact",
    "content-length",
    "max-forwards",
    "route",
    "record-route",
];

/// The `call:*` verbs as raw functions of the call's handle, returning `(error message)`
/// or `(nil, result)`; the sandbox prelude wraps them into methods that raise. `field`
/// reads the call's facts for the lazily built fields of the `call` table.
pub(crate) fn raw_api(
    lua: &Lua,
    routes: &[String],
    waits: &Waits,
    calls: &Arc<CallSlots>,
) -> mlua::Result<Table> {
    let api = lua.create_table()?;

    let routes: Arc<[String]> = routes.into();
    let slots = calls.clone();
    api.raw_set(
        "set_route",
        lua.create_function(move |_, (ud, name): (CallHandle, Value)| {
            // (true) or (nil, why): a label that is not configured is the script's
            // mistake, but not one worth failing a call for.
            let state = slots.get(ud)?;
            let name = match &name {
                Value::String(s) => s.to_string_lossy(),
                other => {
                    return Ok((
                        None,
                        Some(format!(
                            "call:set_route: the route must be a string, not a {}",
                            other.type_name()
                        )),
                    ))
                }
            };
            let Some(index) = routes.iter().position(|r| *r == name) else {
                return Ok((
                    None,
                    Some(format!(
                        "call:set_route: {name:?} is not one of call.routes ({})",
                        routes.join(", ")
                    )),
                ));
            };
            let control = state.inner.lock().control.clone();
            match control {
                Some(control) => {
                    control.set_route(index);
                    Ok((Some(true), None))
                }
                None => Ok((
                    None,
                    Some("call:set_route: on_invite has already returned".to_owned()),
                )),
            }
        })?,
    )?;

    let slots = calls.clone();
    api.raw_set(
        "field",
        lua.create_function(move |lua, (ud, bit, call): (CallHandle, i64, Table)| {
            // Stores the field in the call table (raw) as it makes it; the bits are the
            // sandbox's `lazy_bit`. `ruri` (16) is never asked for: `new_call_table` makes
            // it with the table.
            let state = slots.get(ud)?;
            let text = |key: &CStr, s: Option<&str>| store(lua, &call, key, s.map(Field::Str));
            let uri = |key: &CStr, uri: &UriInfo| {
                let fields = uri_fields(uri);
                record_into(lua, &call, key, &fields).map(Value::Table)
            };
            match bit {
                1 => text(c"id", Some(&state.id)),
                2 => text(c"source", Some(&state.source)),
                4 => uri(c"from", &state.from),
                8 => uri(c"to", &state.to),
                64 => text(c"trunk", state.trunk.as_deref()),
                _ => Err(mlua::Error::runtime("call: no such field")),
            }
        })?,
    )?;

    let slots = calls.clone();
    api.raw_set(
        "header",
        lua.create_function(move |lua, (ud, name): (CallHandle, Value)| {
            let state = slots.get(ud)?;
            let Value::String(name) = name else {
                return Ok((
                    Some(format!(
                        "call:header: the header name must be a string, not a {}",
                        name.type_name()
                    )),
                    Value::Nil,
                ));
            };
            let name = name.to_string_lossy();
            match state.header(&name) {
                Some(v) => Ok((None, Value::String(lua.create_string(v)?))),
                None => Ok((None, Value::Nil)),
            }
        })?,
    )?;

    let slots = calls.clone();
    api.raw_set(
        "authenticate",
        lua.create_function(move |_, ud: CallHandle| {
            // (user, error): the user when the caller is authenticated; nothing when the
            // call has been answered with a challenge (or 403); an error otherwise.
            let state = slots.get(ud)?;
            let control = state.check("authenticate").and_then(|()| {
                state
                    .inner
                    .lock()
                    .control
                    .clone()
                    .ok_or_else(|| "call:authenticate: the call has ended".to_owned())
            });
            let control = match control {
                Ok(c) => c,
                Err(e) => return Ok((None, Some(e))),
            };
            match control.authenticate() {
                crate::script::AuthVerdict::Ok(user) => Ok((Some(user), None)),
                crate::script::AuthVerdict::Reject(code, reason) => {
                    match state.decide("authenticate", Decision::Rejected(code, reason)) {
                        Ok(()) => Ok((None, None)),
                        Err(e) => Ok((None, Some(e))),
                    }
                }
                crate::script::AuthVerdict::NotConfigured => Ok((
                    None,
                    Some(
                        "call:authenticate: no users are configured (registrar.users_file)"
                            .to_owned(),
                    ),
                )),
            }
        })?,
    )?;

    let slots = calls.clone();
    api.raw_set(
        "reject",
        lua.create_function(move |_, (ud, code, reason): (CallHandle, Value, Value)| {
            let state = slots.get(ud)?;
            let result = parse_reject(&code, &reason).and_then(|(code, reason)| {
                state.decide("reject", Decision::Rejected(code, reason))
            });
            Ok(result.err())
        })?,
    )?;

    let slots = calls.clone();
    api.raw_set(
        "redirect",
        lua.create_function(move |_, (ud, contacts): (CallHandle, Value)| {
            let state = slots.get(ud)?;
            let result = state.check("redirect").and_then(|()| {
                let contacts = string_list(&contacts, "call:redirect", "contact")?;
                state.decide("redirect", Decision::Redirected(contacts))
            });
            Ok(result.err())
        })?,
    )?;

    // The verbs that wait hand their future to the hook's driver (`wait.rs`) and return
    // the wait marker, on which the sandbox yields; the sandbox has already checked that
    // they run in the call's own hook coroutine. An error returns (nil, message).
    let w = waits.clone();
    let slots = calls.clone();
    api.raw_set(
        "dial",
        lua.create_function(
            move |lua, (ud, target, opts, known): (CallHandle, Value, Value, KnownOptions)| {
                let state = slots.get(ud)?;
                let prepared = (|| {
                    state.check("dial")?;
                    // An empty list (e.g. `registrar.lookup` of a user with no device
                    // registered) is a dial that nobody can answer, not a script error.
                    let nobody = matches!(&target, Value::Table(t) if t.is_empty());
                    let (targets, whole) = if nobody {
                        (Vec::new(), false)
                    } else {
                        dial_targets(&target)?
                    };
                    let opts = match opts {
                        Value::Nil => parse_known(&known)?,
                        opts => parse_dial_options(&opts)?,
                    };
                    let control = state.start_dial()?;
                    Ok((DialInProgress(state), targets, whole, opts, control))
                })();
                let (in_progress, targets, whole, opts, control) = match prepared {
                    Ok(p) => p,
                    Err(msg) => return failed(lua, msg),
                };
                let lua = lua.clone();
                let dialled = async move {
                    let outcome = if targets.is_empty() {
                        // Nobody to ring: refused here, no target involved.
                        DialOutcome::failed(480, "Temporarily Unavailable", DialSource::Local)
                    } else {
                        control.dial(targets, opts).await
                    };
                    in_progress.0.finish_dial(&outcome);
                    drop(in_progress);
                    outcome_values(&lua, &outcome, whole)
                };
                wait_for(&w, "dial", Box::pin(dialled))
            },
        )?,
    )?;

    let w = waits.clone();
    let slots = calls.clone();
    api.raw_set(
        "transfer",
        lua.create_function(
            move |lua, (ud, target, party): (CallHandle, Value, Value)| {
                let state = slots.get(ud)?;
                let prepared = (|| -> Result<_, String> {
                    let target = match &target {
                        Value::String(s) => {
                            s.to_str().map_err(|e| e.to_string())?.trim().to_owned()
                        }
                        other => return Err(type_error("call:transfer", "a target URI", other)),
                    };
                    let to_caller = match &party {
                        Value::Nil => true,
                        Value::String(s) if &*s.as_bytes() == b"caller" => true,
                        Value::String(s) if &*s.as_bytes() == b"callee" => false,
                        other => {
                            return Err(format!(
                                "call:transfer: party must be \"caller\" or \"callee\", not {}",
                                describe_value(other)
                            ))
                        }
                    };
                    let inner = state.inner.lock();
                    let answered = matches!(inner.decision, Some(Decision::Answered));
                    let control = match (&inner.control, inner.phase, answered) {
                        (Some(c), Phase::Deciding, true) => c.clone(),
                        (_, Phase::Deciding, false) => {
                            return Err("call:transfer: the call is not answered".into())
                        }
                        _ => return Err("call:transfer: on_invite has already returned".into()),
                    };
                    Ok((target, to_caller, control))
                })();
                let (target, to_caller, control) = match prepared {
                    Ok(p) => p,
                    Err(msg) => return failed(lua, msg),
                };
                let lua = lua.clone();
                let transferred = async move {
                    let outcome = control.transfer(target, to_caller).await;
                    outcome_values(&lua, &outcome, true)
                };
                wait_for(&w, "transfer", Box::pin(transferred))
            },
        )?,
    )?;

    // The standard phrases, for `unless_standard`'s None (the sandbox's REASONS).
    let reasons = lua.create_table_with_capacity(STANDARD_STATUSES.len(), 0)?;
    for status in STANDARD_STATUSES {
        reasons.raw_set(status, default_reason(status))?;
    }
    api.raw_set("reasons", reasons)?;

    Ok(api)
}

/// `(nil, msg)`: a waiting verb refused (the sandbox raises it at the script's line).
fn failed(lua: &Lua, msg: String) -> mlua::Result<(Value, Value)> {
    Ok((Value::Nil, Value::String(lua.create_string(msg)?)))
}

/// Hands `fut` to the hook's driver: the sandbox yields on the marker returned.
fn wait_for(waits: &Waits, verb: &str, fut: WaitFuture) -> mlua::Result<(Value, Value)> {
    waits.start(None, fut).map_err(|()| {
        mlua::Error::runtime(format!(
            "call:{verb}: cannot wait here (only in the call's own hook)"
        ))
    })?;
    Ok((wait_marker(), Value::Nil))
}

/// The values a dial or transfer resumes the sandbox with: its packed code and, unless
/// standard, its reason phrase (the sandbox turns them into the outcome table).
fn outcome_values(lua: &Lua, outcome: &DialOutcome, whole: bool) -> Waited {
    let code = Value::Integer(outcome_code(outcome, whole));
    Ok(match unless_standard(outcome.status, &outcome.reason) {
        Some(reason) => (code, Value::String(lua.create_string(reason)?)),
        None => (code, Value::Nil),
    })
}

/// The statuses the sandbox knows the standard reason phrase of.
const STANDARD_STATUSES: std::ops::RangeInclusive<u16> = 100..=699;

/// A dial's or transfer's reason phrase for the script, None when it is the standard one
/// for `status` (the sandbox then uses its own copy): with a memory limit set, every
/// string Rust hands to Lua is made in a protected call of its own (~1,000 instructions).
fn unless_standard(status: u16, reason: &str) -> Option<&str> {
    (!STANDARD_STATUSES.contains(&status) || reason != default_reason(status)).then_some(reason)
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        other => format!("a {}", other.type_name()),
    }
}

/// `call.from`, `call.to` or `call.ruri` as the script sees it, `{ uri, user, host }`, in
/// one protected call ([`record`]: the largest cost of reading `call.ruri.user` was
/// mlua's protected call per string).
fn uri_fields(uri: &UriInfo) -> [(&'static CStr, Option<Field<'_>>); 3] {
    [
        (c"uri", Some(Field::Str(&uri.uri))),
        (c"user", uri.user.as_deref().map(Field::Str)),
        (c"host", Some(Field::Str(&uri.host))),
    ]
}

/// An outcome packed in one integer, so that the raw verb returns two plain values (mlua's
/// fast path, no table built in Rust): `answered + 2 * status + 2048 * source +
/// 8192 * target`, where target is 0 (none), 1 (what was dialled, when `whole`: one URI
/// or trunk target) or n + 1 (the nth of the list dialled). `outcome()` in sandbox.lua
/// unpacks it. The raw verbs return `(code, reason)`, or `(nil, error message)`.
fn outcome_code(o: &DialOutcome, whole: bool) -> i64 {
    let target = match o.target {
        None => 0,
        Some(_) if whole => 1,
        Some(i) => i as i64 + 2,
    };
    i64::from(o.answered)
        + i64::from(o.status.min(1023)) * 2
        + (o.source as i64) * 2048
        + target * 8192
}

fn type_error(what: &str, expected: &str, got: &Value) -> String {
    format!("{what}: expected {expected}, got a {}", got.type_name())
}

/// A string or a non-empty list of strings, each without spaces or control characters.
pub(super) fn string_list(v: &Value, what: &str, item: &str) -> Result<Vec<String>, String> {
    let check = |s: &mlua::String| -> Result<String, String> {
        let s = s
            .to_str()
            .map_err(|_| format!("{what}: {item} is not valid UTF-8"))?
            .to_owned();
        if s.is_empty() {
            return Err(format!("{what}: empty {item}"));
        }
        // Bytes first (every dial checks its targets): only a URI with non-ASCII text
        // needs the Unicode classes.
        let bad_ascii = |b: u8| b <= b' ' || b == 0x7f || b == b'<' || b == b'>' || b == b'"';
        let bad = if s.is_ascii() {
            s.bytes().any(bad_ascii)
        } else {
            s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>' || c == '"')
        };
        if bad {
            return Err(format!(
                "{what}: bad {item} '{}' (no spaces, quotes, <, > or control characters)",
                s.escape_debug()
            ));
        }
        Ok(s)
    };
    match v {
        Value::String(s) => Ok(vec![check(s)?]),
        Value::Table(t) => {
            let mut out = Vec::new();
            for v in t.clone().sequence_values::<Value>() {
                match v.map_err(|e| format!("{what}: {e}"))? {
                    Value::String(s) => out.push(check(&s)?),
                    other => {
                        return Err(type_error(
                            what,
                            &format!("each {item} to be a string"),
                            &other,
                        ))
                    }
                }
            }
            if out.is_empty() {
                return Err(format!("{what}: the {item} list is empty"));
            }
            Ok(out)
        }
        other => Err(type_error(
            what,
            &format!("a {item} string or a list of them"),
            other,
        )),
    }
}

fn seconds(v: &Value, name: &str) -> Result<Duration, String> {
    let secs = match v {
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        other => {
            return Err(type_error(
                &format!("call:dial: option {name}"),
                "seconds (a number)",
                other,
            ))
        }
    };
    if !(secs > 0.0 && secs <= 1e9) {
        return Err(format!(
            "call:dial: option {name} must be a positive number of seconds, got {secs}"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn opt_string(v: &Value, name: &str) -> Result<String, String> {
    match v {
        Value::String(s) => {
            let s = s
                .to_str()
                .map_err(|_| format!("call:dial: option {name} is not valid UTF-8"))?
                .to_owned();
            if s.is_empty() || s.chars().any(|c| c.is_control()) {
                return Err(format!("call:dial: option {name} must be a non-empty string without control characters"));
            }
            Ok(s)
        }
        other => Err(type_error(
            &format!("call:dial: option {name}"),
            "a string",
            other,
        )),
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

fn parse_headers(v: &Value) -> Result<Vec<(String, String)>, String> {
    let Value::Table(t) = v else {
        return Err(type_error(
            "call:dial: option headers",
            "a table like { [\"X-Name\"] = \"value\" }",
            v,
        ));
    };
    let mut out = Vec::new();
    for pair in t.clone().pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| format!("call:dial: headers: {e}"))?;
        let Value::String(k) = k else {
            return Err(type_error("call:dial: headers", "header names as keys", &k));
        };
        let name = k.to_string_lossy();
        if !is_token(&name) {
            return Err(format!(
                "call:dial: bad header name '{}'",
                name.escape_debug()
            ));
        }
        if SERVER_HEADERS.contains(&canonical_header(&name).as_str()) {
            return Err(format!(
                "call:dial: header '{name}' is set by the server (use the from/to options for From and To)"
            ));
        }
        let value = match &v {
            Value::String(s) => s.to_string_lossy(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Boolean(b) => b.to_string(),
            other => {
                return Err(type_error(
                    &format!("call:dial: header '{name}'"),
                    "a string value",
                    other,
                ))
            }
        };
        if value.contains(['\r', '\n', '\0']) {
            return Err(format!(
                "call:dial: header '{name}' has a line break in its value"
            ));
        }
        out.push((name, value));
    }
    out.sort();
    Ok(out)
}

/// The `call:dial` options passed one by one (timeout, headers, from, to, max_duration,
/// caller_id, privacy): the sandbox does this when the options table has only known keys,
/// which spares iterating the table from Rust (costly per key). A tuple of single values,
/// so that mlua reads them straight off Lua's stack (a type of our own implementing
/// `FromLuaMulti` would be handed a `MultiValue`, allocated per dial).
type KnownOptions = (Value, Value, Value, Value, Value, Value, Value);

/// Errors are checked in this fixed order rather than in table order.
fn parse_known(known: &KnownOptions) -> Result<DialOptions, String> {
    let (timeout, headers, from, to, max_duration, caller, private) = known;
    let mut opts = DialOptions::default();
    if !timeout.is_nil() {
        opts.timeout = Some(seconds(timeout, "timeout")?);
    }
    if !headers.is_nil() {
        opts.headers = parse_headers(headers)?;
    }
    if !from.is_nil() {
        opts.from = Some(opt_string(from, "from")?);
    }
    if !to.is_nil() {
        opts.to = Some(opt_string(to, "to")?);
    }
    if !max_duration.is_nil() {
        opts.max_duration = Some(seconds(max_duration, "max_duration")?);
    }
    if !caller.is_nil() {
        opts.caller_id = Some(caller_id(caller)?);
    }
    if !private.is_nil() {
        opts.privacy = Some(privacy(private)?);
    }
    Ok(opts)
}

/// `caller_id`: a user part to present on a trunk ("+15551234", "1001").
fn caller_id(v: &Value) -> Result<String, String> {
    let s = opt_string(v, "caller_id")?;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-_.!~*'()&=$,;?/".contains(c));
    if !ok {
        return Err(format!(
            "call:dial: caller_id '{}' must be a number or user name (letters, digits, + - _ . and no spaces)",
            s.escape_debug()
        ));
    }
    Ok(s)
}

/// `privacy`: "id" withholds the caller's identity, "none" presents it.
fn privacy(v: &Value) -> Result<bool, String> {
    match v {
        Value::Boolean(b) => Ok(*b),
        Value::String(s) if s.as_bytes().as_ref() == b"id" => Ok(true),
        Value::String(s) if s.as_bytes().as_ref() == b"none" => Ok(false),
        other => Err(format!(
            "call:dial: privacy must be \"id\" or \"none\", got {}",
            match other {
                Value::String(s) => format!("'{}'", s.to_string_lossy()),
                o => format!("a {}", o.type_name()),
            }
        )),
    }
}

/// The targets of `call:dial`: a URI, a trunk target `{ trunk = "name", user = "+1555" }`,
/// or a list of them (rung in parallel); and whether `v` is one target, not a list (the
/// outcome then names `v` itself, see [`outcome_code`]).
fn dial_targets(v: &Value) -> Result<(Vec<DialTarget>, bool), String> {
    let trunk_target = |t: &Table| -> Result<Option<DialTarget>, String> {
        let trunk: Value = t.raw_get("trunk").map_err(|e| e.to_string())?;
        if trunk.is_nil() {
            return Ok(None);
        }
        let name = match &trunk {
            Value::String(s) => s.to_string_lossy(),
            other => return Err(type_error("call:dial: trunk", "a trunk name", other)),
        };
        let user: Value = t.raw_get("user").map_err(|e| e.to_string())?;
        let user = match &user {
            Value::String(s) => s.to_string_lossy(),
            Value::Integer(i) => i.to_string(),
            other => {
                return Err(type_error(
                    "call:dial: a trunk target's user",
                    "the number to call",
                    other,
                ))
            }
        };
        let ok_user = !user.is_empty()
            && user.len() <= 128
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-_.!~*'()&=$,;?/%#".contains(c));
        if !ok_user {
            return Err(format!(
                "call:dial: bad trunk user '{}' (a number or user name, no spaces, @, : or quotes)",
                user.escape_debug()
            ));
        }
        for pair in t.clone().pairs::<Value, Value>() {
            let (k, _) = pair.map_err(|e| e.to_string())?;
            match &k {
                Value::String(s) if matches!(s.as_bytes().as_ref(), b"trunk" | b"user") => {}
                other => {
                    return Err(format!(
                        "call:dial: a trunk target has only `trunk` and `user`, not {}",
                        match other {
                            Value::String(s) => format!("'{}'", s.to_string_lossy()),
                            o => format!("a {} key", o.type_name()),
                        }
                    ))
                }
            }
        }
        Ok(Some(DialTarget::Trunk { trunk: name, user }))
    };
    match v {
        Value::Table(t) => {
            if let Some(one) = trunk_target(t)? {
                return Ok((vec![one], true));
            }
            let mut out = Vec::new();
            for item in t.clone().sequence_values::<Value>() {
                let item = item.map_err(|e| e.to_string())?;
                match &item {
                    Value::Table(t) => match trunk_target(t)? {
                        Some(one) => out.push(one),
                        None => {
                            return Err(
                                "call:dial: a table in the target list must be a trunk target { trunk = ..., user = ... }"
                                    .to_owned(),
                            )
                        }
                    },
                    other => out.extend(
                        string_list(other, "call:dial", "target")?
                            .into_iter()
                            .map(DialTarget::Uri),
                    ),
                }
            }
            if out.is_empty() {
                return Err("call:dial: empty target list".to_owned());
            }
            Ok((out, false))
        }
        other => Ok((
            string_list(other, "call:dial", "target")?
                .into_iter()
                .map(DialTarget::Uri)
                .collect(),
            true,
        )),
    }
}

fn parse_dial_options(v: &Value) -> Result<DialOptions, String> {
    let mut opts = DialOptions::default();
    let t = match v {
        Value::Nil => return Ok(opts),
        Value::Table(t) => t,
        other => {
            return Err(type_error(
                "call:dial",
                "an options table as second argument",
                other,
            ))
        }
    };
    for pair in t.clone().pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| format!("call:dial: options: {e}"))?;
        let key = match &k {
            Value::String(s) => s.to_string_lossy(),
            other => {
                return Err(type_error(
                    "call:dial: options",
                    "option names as keys",
                    other,
                ))
            }
        };
        match key.as_str() {
            "timeout" => opts.timeout = Some(seconds(&v, "timeout")?),
            "max_duration" => opts.max_duration = Some(seconds(&v, "max_duration")?),
            "headers" => opts.headers = parse_headers(&v)?,
            "from" => opts.from = Some(opt_string(&v, "from")?),
            "to" => opts.to = Some(opt_string(&v, "to")?),
            "caller_id" => opts.caller_id = Some(caller_id(&v)?),
            "privacy" => opts.privacy = Some(privacy(&v)?),
            other => {
                return Err(format!(
                    "call:dial: unknown option '{other}' (known: timeout, headers, from, to, max_duration, caller_id, privacy)"
                ))
            }
        }
    }
    Ok(opts)
}

pub(super) fn parse_reject(code: &Value, reason: &Value) -> Result<(u16, String), String> {
    let code = match code {
        Value::Integer(i) => *i,
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e6 => *n as i64,
        other => return Err(type_error("call:reject", "a status code (400-699)", other)),
    };
    if !(400..=699).contains(&code) {
        return Err(format!("call:reject: status must be 400-699, got {code}"));
    }
    let code = code as u16;
    let reason = match reason {
        Value::Nil => default_reason(code).to_owned(),
        Value::String(s) => {
            let s = s.to_string_lossy();
            if s.contains(['\r', '\n', '\0']) {
                return Err("call:reject: the reason has a line break".to_owned());
            }
            if s.trim().is_empty() {
                default_reason(code).to_owned()
            } else {
                s
            }
        }
        other => return Err(type_error("call:reject", "a reason string", other)),
    };
    Ok((code, reason))
}

/// The standard reason phrase for a final status (one table for the whole server).
pub(crate) fn default_reason(code: u16) -> &'static str {
    crate::sip::reason_phrase(code)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Keeps the globals a call's hook run made for the call's later hooks (VM thread).
fn save_env(lua: &Lua, call: &CallState, budget: &super::vm::Budget) {
    let env = budget.env.lock().take();
    *call.env.lock() = env.and_then(|t| lua.create_registry_value(t).ok());
}

/// Gives a hook run the globals its call's earlier hooks made (VM thread).
fn restore_env(lua: &Lua, call: &CallState, budget: &super::vm::Budget) {
    let key = call.env.lock().take();
    if let Some(key) = key {
        *budget.env.lock() = lua.registry_value::<Table>(&key).ok();
        let _ = lua.remove_registry_value(key);
    }
}

/// Fails a hook run for which no VM of `version` is alive (counted and logged).
pub(super) fn no_vm(hook: Hook, version: &ScriptVersion) -> String {
    let msg = format!(
        "{}: no script VM is available (all were abandoned; fresh ones are loading)",
        version.info.pos(hook)
    );
    hooks::fail(&version.run, hook, "-", FailKind::Abandoned, &msg);
    msg
}

/// The bit of `ruri` among the sandbox's lazily built fields (its `lazy_bit`).
const RURI_BIT: i64 = 16;

/// A call's `call` table as its `on_invite` starts, made in one protected call: the
/// sandbox's metatable, `ruri` (nearly every dial plan routes on it), room for the fields
/// most scripts read, and its private record `{ handle, hook coroutine, built fields }` in
/// the sandbox's weak table. Made in Lua, this cost a `setmetatable` call, two table
/// constructors and, for `ruri`, a metamethod and a crossing into Rust more (issue 14).
fn new_call_table(
    vm: &super::vm::Vm,
    handle: CallHandle,
    thread: &mlua::Thread,
    ruri: &UriInfo,
) -> mlua::Result<Table> {
    let fields = uri_fields(ruri);
    // SAFETY: inside `exec_raw`'s protected call (a memory error unwinds to it), borrowed
    // data only. Stack: the arguments (1 the metatable, 2 the private table, 3 the
    // coroutine); the call table, its `ruri` record popped into it by `lua_setfield`, the
    // metatable pushed and popped by `lua_setmetatable`; a copy of the call table and the
    // private record, both popped by `lua_rawset`; then the call table moved to index 1
    // and the rest dropped, leaving it as the one result. At most four values above the
    // arguments: the protected call runs the closure as a C function, which Lua gives
    // LUA_MINSTACK (20) free slots.
    unsafe {
        vm.lua
            .exec_raw::<Table>((&vm.call_meta, &vm.call_private, thread), |state| {
                mlua::ffi::lua_createtable(state, 0, 4);
                push_record(state, &fields);
                mlua::ffi::lua_setfield(state, -2, c"ruri".as_ptr());
                mlua::ffi::lua_pushvalue(state, 1);
                mlua::ffi::lua_setmetatable(state, -2);
                mlua::ffi::lua_pushvalue(state, -1);
                mlua::ffi::lua_createtable(state, 3, 0);
                mlua::ffi::lua_pushlightuserdata(state, handle.to_lua().0);
                mlua::ffi::lua_rawseti(state, -2, 1);
                mlua::ffi::lua_pushvalue(state, 3);
                mlua::ffi::lua_rawseti(state, -2, 2);
                mlua::ffi::lua_pushinteger(state, RURI_BIT);
                mlua::ffi::lua_rawseti(state, -2, 3);
                mlua::ffi::lua_rawset(state, 2);
                mlua::ffi::lua_replace(state, 1);
                mlua::ffi::lua_settop(state, 1);
            })
    }
}

pub(crate) async fn run_on_invite(
    version: Arc<ScriptVersion>,
    info: CallInfo,
    control: Arc<dyn CallControl>,
) -> InviteOutcome {
    let vm = if version.info.has(Hook::Invite) {
        version.pick()
    } else {
        None
    };
    let pinned = Pinned {
        vm: vm.clone(),
        version: version.clone(),
    };
    let state = Arc::new(CallState::new(info, control, pinned));
    let handle = CallScriptHandle::new(state.clone());
    let Some(vm) = vm else {
        state.finish_invite();
        if !version.info.has(Hook::Invite) {
            return InviteOutcome::Rejected {
                status: 404,
                reason: default_reason(404).to_owned(),
                handle,
            };
        }
        let error = no_vm(Hook::Invite, &version);
        return InviteOutcome::Failed { error, handle };
    };
    let call = state.clone();
    // A later hook (`on_call_end`, `on_refer`) is given the same `call` table again.
    let findable = version.info.has(Hook::CallEnd) || version.info.has(Hook::Refer);
    let result = hooks::run(
        &version.run,
        &vm,
        Hook::Invite,
        &state.id,
        move |vm, budget| {
            // The call's handle is a light userdata, no Lua object.
            let handle = vm
                .calls
                .insert(&call)
                .ok_or_else(|| mlua::Error::runtime("too many calls at once on this script VM"))?;
            let _ = call.slot.set((vm.calls.clone(), handle));
            let fut = vm.start_hook_with::<(), _>(Hook::Invite, |thread| {
                let table = new_call_table(vm, handle, thread, &call.ruri)?;
                if findable {
                    *call.key.lock() = Some(vm.lua.create_registry_value(&table)?);
                }
                Ok(table)
            })?;
            let (budget, lua) = (budget.clone(), vm.lua.clone());
            Ok(Box::pin(async move {
                let out = fut.await;
                // The call's globals go on to its later hooks.
                save_env(&lua, &call, &budget);
                out
            }) as HookFuture<()>)
        },
    )
    .await;
    let (decision, last_failed) = state.finish_invite();
    // With a decision made, an error after it was only counted and logged: it stands.
    match decision {
        Some(Decision::Answered) => InviteOutcome::Bridged { handle },
        Some(Decision::Rejected(status, reason)) => InviteOutcome::Rejected {
            status,
            reason,
            handle,
        },
        Some(Decision::Redirected(contacts)) => InviteOutcome::Redirected { contacts, handle },
        None => match result {
            Ok(()) => match last_failed {
                Some((status, reason)) if (400..=699).contains(&status) => {
                    InviteOutcome::Rejected {
                        status,
                        reason,
                        handle,
                    }
                }
                _ => InviteOutcome::Rejected {
                    status: 480,
                    reason: default_reason(480).to_owned(),
                    handle,
                },
            },
            Err(error) => InviteOutcome::Failed { error, handle },
        },
    }
}

/// The B2BUA's handle on a call's script state.
impl CallScript for CallState {
    fn version(&self) -> u64 {
        // The handle that asks still holds the pin.
        self.pinned.lock().as_ref().map_or(0, |p| p.version.version)
    }

    fn call_id(&self) -> &str {
        &self.id
    }

    fn on_refer(
        self: Arc<Self>,
        info: super::ReferInfo,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = super::ReferVerdict> + Send>> {
        run_on_refer(self, info)
    }

    fn on_call_end(
        self: Arc<Self>,
        record: CallRecord,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        // Taken now: the handle that goes after this call has nothing left to free.
        let pinned = self.pinned.lock().take();
        let key = self.key.lock().take();
        Box::pin(run_on_call_end(self, pinned, key, record))
    }

    fn release(&self) {
        // Frees the call's Lua object (mlua defers the unref to its VM's thread).
        drop(self.key.lock().take());
        drop(self.pinned.lock().take());
    }
}

async fn run_on_call_end(
    state: Arc<CallState>,
    pinned: Option<Pinned>,
    key: Option<mlua::RegistryKey>,
    record: CallRecord,
) {
    state.end();
    let Some(Pinned {
        vm: Some(vm),
        version,
    }) = pinned
    else {
        return;
    };
    let Some(key) = key else {
        return;
    };
    if !version.info.has(Hook::CallEnd) {
        return;
    }
    let duration = record
        .answer
        .and_then(|a| record.end.duration_since(a).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let call = state.clone();
    let _ = hooks::run(
        &version.run,
        &vm,
        Hook::CallEnd,
        &call.id,
        move |vm, budget| {
            let call: Table = vm.lua.registry_value(&key)?;
            vm.lua.remove_registry_value(key)?;
            // The call's own globals, from its earlier hooks.
            restore_env(&vm.lua, &state, budget);
            // The sandbox builds the record table from these.
            let args = (
                call,
                unix(record.start),
                record.answer.map(unix),
                unix(record.end),
                duration,
                record.hangup_by,
                record.final_status,
            );
            Ok(Box::pin(vm.start_hook::<()>(Hook::CallEnd, args)?) as HookFuture<()>)
        },
    )
    .await;
}

/// `on_refer(call, refer)` on the call's VM; the returned future owns what it needs.
fn run_on_refer(
    state: Arc<CallState>,
    info: super::ReferInfo,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = super::ReferVerdict> + Send>> {
    use super::ReferVerdict;
    let allow = ReferVerdict::Allow {
        target: info.target.clone(),
        referred_by: info.referred_by.clone(),
    };
    let pinned = state
        .pinned
        .lock()
        .as_ref()
        .map(|p| (p.vm.clone(), p.version.clone()));
    let Some((Some(vm), version)) = pinned else {
        return Box::pin(async move { allow });
    };
    if !version.info.has(Hook::Refer) {
        return Box::pin(async move { allow });
    }
    Box::pin(async move {
        let id = state.id.clone();
        enum Said {
            Deny(Result<(u16, String), String>),
            Allow(Option<String>, Option<String>),
        }
        let result = hooks::run(&version.run, &vm, Hook::Refer, &id, move |vm, budget| {
            let key = state.key.lock();
            let Some(key) = key.as_ref() else {
                return Err(mlua::Error::runtime("the call's script state is gone"));
            };
            let call: Table = vm.lua.registry_value(key)?;
            restore_env(&vm.lua, &state, budget);
            let fut = vm.start_hook::<(String, Value, Value)>(
                Hook::Refer,
                (call, info.by, info.target, info.referred_by, info.replaces),
            )?;
            let (st, b, lua) = (state.clone(), budget.clone(), vm.lua.clone());
            Ok(Box::pin(async move {
                let out = fut.await;
                save_env(&lua, &st, &b);
                let (kind, a, b) = out?;
                let text = |v: &Value| match v {
                    Value::String(s) => s.to_str().ok().map(|s| s.to_owned()),
                    _ => None,
                };
                Ok(if kind == "deny" {
                    Said::Deny(parse_reject(&a, &b))
                } else {
                    Said::Allow(text(&a), text(&b))
                })
            }) as HookFuture<Said>)
        })
        .await;
        match result {
            Ok(Said::Deny(Ok((code, reason)))) => ReferVerdict::Deny(code, reason),
            Ok(Said::Deny(Err(e))) => {
                let msg = format!(
                    "{}: {}",
                    version.info.pos(Hook::Refer),
                    e.replace("call:reject", "refer:deny")
                );
                hooks::fail(&version.run, Hook::Refer, &id, FailKind::Error, &msg);
                ReferVerdict::Failed(msg)
            }
            Ok(Said::Allow(Some(target), referred_by)) => ReferVerdict::Allow {
                target,
                referred_by,
            },
            Ok(Said::Allow(None, _)) => ReferVerdict::Deny(400, "Bad Refer-To".into()),
            Err(e) => ReferVerdict::Failed(e),
        }
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn targets_with_spaces_quotes_brackets_or_controls_are_refused() {
        let lua = Lua::new();
        let check = |s: &str| {
            let v = Value::String(lua.create_string(s).unwrap());
            string_list(&v, "call:dial", "target")
        };
        for good in [
            "sip:1000@example.com",
            "sip:jürgen@example.com",
            "tel:+4930123",
        ] {
            assert_eq!(check(good), Ok(vec![good.to_owned()]), "{good}");
        }
        // ASCII (the byte-wise check) and beyond it (the Unicode classes): a space, a
        // tab, DEL, a quote, an angle bracket; NEL and a no-break space.
        for bad in [
            "sip:a b@c",
            "sip:a\t@c",
            "sip:a\u{7f}@c",
            "sip:\"a\"@c",
            "<sip:a@c>",
            "sip:jürgen\u{85}@c",
            "sip:jürgen\u{a0}@c",
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.contains("no spaces"), "{bad:?}: {err}");
        }
    }
}
