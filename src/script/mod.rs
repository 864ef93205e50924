//! The Lua scripting engine: runs the operator's dial plan.
//!
//! **Owns**: the pool of sandboxed Lua VMs (on the SIP thread, or each on its own thread
//! with `script.vm_threads = true`: `pool.rs`), the hook
//! table and its one runner (`hooks.rs`), the operator-facing Lua API (`call`, `log`,
//! `require`), per-run instruction and time budgets, per-VM memory limits, hot reload and
//! the script counters. Config: `[script]` (`config.rs`). Metrics:
//! `strowger_script_errors_total{hook}`, `strowger_script_hook_duration_seconds{hook}`.
//! **Must not touch**: SIP. The B2BUA offers a call through its [`CallControl`] port (what
//! `call:dial` does) and reads the hook's decision as an [`InviteOutcome`]; this module
//! never sees a SIP message, a transaction or a socket.
//!
//! **Layer**: the hook engine sits above the transaction users (B2BUA, presence, registrar,
//! hunt groups), as RFC 3261's layers and `../shared/ARCHITECTURE.md` order them; the UAS
//! core, admin and `server` are above it. Each user defines the port it runs hooks through
//! and the types that cross it: the B2BUA's `CallHooks`/`CallHookSet`/`CallScript` (in its
//! `hooks.rs`: `on_invite`, `on_refer`, `on_call_end`), presence's `PresenceHooks`
//! (`on_message`, `on_subscribe`), the registrar's `LocationService`
//! (`registrar.lookup`). This engine implements them ([`ScriptEngine`] for the engine-wide
//! ports, [`ScriptVersion`] per version, the call's state per call) and `server` hands it
//! to the users at start-up; a reload swaps the version inside the engine, so the handle
//! the users hold stays the same. Nothing below imports this module.
//!
//! The operator documentation, with examples, is `docs/lua-api.md` (every ```` ```lua ````
//! block there is compiled and loaded by the tests). Summary:
//!
//! # Hooks (global functions the script may define)
//!
//! | hook | when | default when undefined |
//! |------|------|------------------------|
//! | `on_invite(call)` | a new call arrives | the call is rejected `404 Not Found` |
//! | `on_call_end(call, record)` | the call is over (any outcome) | nothing |
//! | `on_register(req)` | a REGISTER | the users file decides |
//! | `on_refer(call, refer)` | a REFER in an answered call | the transfer goes ahead |
//! | `on_message(req)` | a MESSAGE outside any call | to the recipient's registered phones |
//! | `on_subscribe(req)` | a SUBSCRIBE (presence, dialog, message-summary) | accepted |
//!
//! Order for one call: `on_invite` → (call up, talk) → `on_call_end`. Both hooks of one call
//! run on the same VM and see the same `call` object, so `call.vars` carries state between
//! them.
//!
//! # The `call` object
//!
//! - Fields: `call.id`, `call.source` (`"udp:1.2.3.4:5060"`), `call.from`, `call.to`,
//!   `call.ruri` (each a table with `.uri`, `.user` (nil when the URI has none), `.host`),
//!   `call.vars` (a table of your own, kept until `on_call_end`).
//! - `call:header(name)`: the first value of that header of the INVITE, or nil. The name is
//!   case-insensitive and compact forms match (`"f"` finds `From`). Values are cut to
//!   [`MAX_HEADER_VALUE`] bytes.
//! - `call:dial(target_or_targets, opts)`: rings one target (a string) or several in
//!   parallel (a list of strings); waits (the hook yields, other calls keep running) and
//!   returns `{ answered = bool, status = code, reason = text }`. Options, all optional:
//!   `timeout` (seconds of ringing; server default when omitted), `headers` (a table
//!   `{ ["X-Name"] = "value" }` added to the outgoing INVITE), `from`, `to` (URIs for the
//!   outgoing leg), `max_duration` (seconds; the call is hung up after that). Unknown options
//!   are an error. After an answered dial the decision is made: a later `dial`, `reject` or
//!   `redirect` in that hook raises "call already answered".
//! - `call:reject(code, reason)`: answers the caller `code` (400-699) with `reason` (default:
//!   the standard phrase). Returns at once; later actions in the hook are errors.
//! - `call:redirect(contacts)`: answers `302 Moved Temporarily` with one contact (a string) or
//!   several (a list).
//!
//! When `on_invite` returns without answering, rejecting or redirecting, the caller gets the
//! status of the last failed dial, or `480 Temporarily Unavailable` if nothing was dialed.
//! The decision takes effect when the hook returns.
//!
//! - `call:hunt(group, opts)`: hunts for an agent of a hunt group (queueing the caller with
//!   182 when none is free) and returns `call:dial`'s outcome plus `agent`, `queued`,
//!   `waited`, `overflow`, `abandoned` (see `src/script/huntgroup.rs`, `crate::huntgroup`).
//!
//! # `on_call_end(call, record)`
//!
//! `record.start`, `record.answer` (nil if never answered), `record.ends` (`end` is a Lua
//! keyword): unix times in seconds (floats); `record.duration`: seconds from answer to end
//! (0 if never answered); `record.hangup_by`: `"caller"`, `"callee"` or `"system"`;
//! `record.final_status`: the final status the caller got. `call:dial`/`reject`/`redirect`
//! raise "the call has ended" here.
//!
//! # Other globals
//!
//! - `log.debug/info/warn/error(...)`: each argument through `tostring`, joined by tabs, to
//!   the server log (tracing target `script`, fields `script` = file, `line`). `print` is
//!   `log.info`.
//! - `huntgroup.agents(name)`, `huntgroup.set_state(agent, state)`: hunt-group agents.
//! - `require "name"` loads `name.lua` from the script's own directory (`"a.b"` →
//!   `a/b.lua`), once per VM. `string`, `table`, `math`, `utf8`, `coroutine` are
//!   preloaded. Nothing else can be loaded.
//! - The sandbox keeps `string`, `table`, `math`, `utf8`, `coroutine`, `os.time`,
//!   `os.clock`, `os.date`, `os.difftime` and the safe base functions. It removes `io`,
//!   `debug`, `package`, `dofile`, `loadfile`, `string.dump`, `warn`, the rest of `os`;
//!   `load` accepts text chunks only; `collectgarbage` allows only `"collect"`, `"count"`,
//!   `"step"`.
//!
//! # Limits and failures
//!
//! Each hook run has an instruction budget (`instruction_limit`, counted every 1000 VM
//! instructions) and a time budget (`time_limit`, Lua execution time, checked by the same
//! count hook); waiting in `call:dial` costs neither. Each VM has a memory limit. A run
//! stuck where the count hook cannot run (one long C call such as a backtracking pattern
//! match) is caught by the watchdog (`pool.rs`): past the time limit plus a grace its VM
//! is abandoned, its waiting runs fail, a fresh VM takes its slot. A Lua error, an
//! exhausted budget or a memory error fails the hook: `on_invite` yields
//! [`InviteOutcome::Failed`] (the B2BUA answers 500) with `file:line` in the text (for
//! memory errors: the last line the count hook sampled, so approximate); it is
//! logged (`warn`, target `script`) and counted in [`ScriptStats`]. The VM stays usable (a
//! full GC runs after a memory error). If the hook had already answered, rejected or
//! redirected, that decision stands and the error is only logged and counted. `pcall`
//! cannot swallow an exhausted budget.
//!
//! # Design
//!
//! - **Pool**: `pool_size` VMs (0 = one per core), each a full copy of the script on its
//!   own OS thread with a job queue; Lua never runs on the threads that carry SIP and HTTP.
//!   A call is assigned round robin when `on_invite` starts and pinned to that VM (its
//!   `call` object lives in that VM's registry) until `on_call_end`.
//! - **A pristine environment per call** (`sandbox.lua`): after the top level ran, the
//!   standard tables are read-only proxies, the string metatable is hidden, and the globals
//!   move behind the global table's metatable; a run's first global assignment gives it its
//!   own table of globals, which `Vm::enter` points the global table at whenever that run
//!   executes (carried from a call's `on_invite` to its later hooks). Top-level locals and
//!   tables a script mutates stay per VM.
//! - **Coroutines**: each hook run is a Lua coroutine driven by `wait.rs` on its VM
//!   thread's local task set: a verb that waits hands its future over and the sandbox
//!   yields the coroutine; many run interleaved on one VM. Every poll of a hook
//!   names the run's budget, so a single global count hook charges instructions and time
//!   to the right run (also inside coroutines the script creates itself). A run that needs
//!   no wait finishes in its first poll, without a task.
//! - **Cost per hook**: every Rust→Lua operation is a protected call while a memory limit
//!   is set, so a call's state is named by a handle (a light userdata naming its slot in
//!   its VM's `CallSlots`, no Lua object), and its `call` table (the sandbox's metatable,
//!   `ruri`, the private record) is made in the one protected call that starts
//!   `on_invite`; the other fields are built by the sandbox on first access (`pairs`
//!   still sees them all); dial outcomes and `on_call_end` records are built in Lua from
//!   plain values.
//!   Hook coroutines are recycled (a pool per VM, `wait.rs`).
//! - **Reload**: [`ScriptEngine::reload`] builds a fresh pool on new threads (awaited off the
//!   runtime); on success it swaps
//!   [`ScriptEngine::current`]. Calls keep the `Arc<ScriptVersion>` they started with (through
//!   their [`CallScriptHandle`]), so the old VMs live until their last call ends.
//! - **Known limits**: the memory limit is per VM, so a memory bomb can also fail a call that
//!   happens to allocate on the same VM at that moment; a stuck C call costs its VM (and the
//!   calls pinned to it) and keeps its thread busy until it returns; `require` reads the
//!   module file synchronously the first time (require modules at the top of the script);
//!   one hook run is two hand-offs between threads (about the cost of two thread wake-ups).
//!
//! # Counters ([`ScriptStats`])
//!
//! `hook_errors_total` (every failed hook run, any cause), `hook_timeouts` (instruction
//! budget exhausted), `time_limits`, `vms_abandoned`, `memory_errors`, `reloads_ok`,
//! `reloads_failed`.

mod call;
mod config;
mod hooks;
mod huntgroup;
mod metrics;
mod pattern;
mod pool;
mod presence;
mod record;
mod register;
mod vm;
mod wait;

pub use config::ScriptConfig;
pub use hooks::{Hook, HookInfo};
pub use pool::run_vms_inline;

// The ports of the transaction users below, which this engine implements.
use crate::b2bua::{
    AuthVerdict, CallControl, CallHookSet, CallHooks, CallInfo, CallRecord, CallScriptHandle,
    DialOptions, DialOutcome, DialSource, DialTarget, HeaderList, InviteOutcome, ReferInfo,
    ReferVerdict, UriInfo,
};
use crate::presence::{
    MessageInfo, MessageVerdict, PresenceHooks, SubscribeInfo, SubscribeVerdict,
};
use crate::registrar::LocationService;

#[cfg(test)]
mod safety_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use hooks::RunCtx;
use pool::{BuildCtx, VmHandle, Watchdog};
use vm::ScriptFile;

/// Default memory limit of one VM in KiB (`script.memory_limit_kb`).
///
/// Every call waiting in its hook (ringing, on `call:dial`) holds its coroutine and tables
/// on the VM, and garbage waits for the collector: at 8 MiB a flood of calls filled the VM
/// and failed them with 500 (issue 15). 64 MiB leaves room for tens of thousands of
/// ringing calls; new calls are refused with 503 from 75% of it (`crate::overload`).
pub const DEFAULT_MEMORY_LIMIT_KB: usize = 64 * 1024;
/// Default instruction budget of one hook run (`script.instruction_limit`).
pub const DEFAULT_INSTRUCTION_LIMIT: u64 = 1_000_000;
/// Default Lua execution time of one hook run in ms (`script.time_limit_ms`).
pub const DEFAULT_TIME_LIMIT_MS: u64 = 1000;
/// Header values longer than this many bytes reach Lua cut to this length (at a
/// character boundary): a script's patterns then cost at most what a header of this size
/// can make them cost.
pub const MAX_HEADER_VALUE: usize = 4096;

/// The configured default of `script.path`.
pub const DEFAULT_SCRIPT_PATH: &str = "scripts/default.lua";
/// The copy of `scripts/default.lua` built into the binary, used when that path is
/// configured and no such file exists.
pub const EMBEDDED_DEFAULT_SCRIPT: &str = include_str!("../../scripts/default.lua");

/// How to load a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// The main script file; `require` looks in its directory.
    pub path: PathBuf,
    /// Memory limit of each VM in bytes; 0 = unlimited.
    pub memory_limit: usize,
    /// Instruction budget of each hook run; 0 = unlimited.
    pub instruction_limit: u64,
    /// Lua execution time of each hook run (and of the top-level code); zero = unlimited.
    /// A run stuck past it where the count hook cannot stop it costs its VM.
    pub time_limit: Duration,
    /// Number of VMs; 0 = one per available core.
    pub pool_size: usize,
    /// The route names `call:set_route` accepts (`call.routes`): metric labels, so a set
    /// fixed by configuration.
    pub routes: Vec<String>,
}

impl EngineOptions {
    /// Options with the defaults of the `[script]` configuration section: 64 MiB per VM,
    /// one million instructions and one second of Lua per hook run, one VM per core.
    pub fn new(path: impl Into<PathBuf>) -> EngineOptions {
        EngineOptions {
            path: path.into(),
            memory_limit: DEFAULT_MEMORY_LIMIT_KB * 1024,
            instruction_limit: DEFAULT_INSTRUCTION_LIMIT,
            time_limit: Duration::from_millis(DEFAULT_TIME_LIMIT_MS),
            pool_size: 0,
            routes: Vec::new(),
        }
    }
}

/// Why a script could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The script (or a module it requires) does not compile.
    #[error("{file}:{line}: {message}")]
    Compile {
        file: String,
        line: u32,
        message: String,
    },
    /// The script compiled but its top-level code failed (error, budget, memory) or it
    /// defines a hook that is not a function.
    #[error("{}", located(file, *line, message))]
    Init {
        file: String,
        line: Option<u32>,
        message: String,
    },
    /// The Lua runtime itself failed (should not happen).
    #[error("script engine: {0}")]
    Internal(String),
}

fn located(file: &str, line: Option<u32>, message: &str) -> String {
    match line {
        Some(line) => format!("{file}:{line}: {message}"),
        None => format!("{file}: {message}"),
    }
}

/// What the Lua VMs hold ([`ScriptEngine::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScriptMemory {
    /// Bytes of all the current version's VMs.
    pub bytes: u64,
    /// The fullest VM's share of its memory limit (0 to 1; 0 without a limit).
    pub highest_share: f64,
}

/// Script counters (read with `load(Ordering::Relaxed)`), shared by every version.
#[derive(Debug, Default)]
pub struct ScriptStats {
    /// Failed hook runs, any cause (Lua error, budget, memory).
    pub hook_errors_total: AtomicU64,
    /// The same by hook, indexed like [`Hook`].
    pub hook_errors: [AtomicU64; Hook::COUNT],
    /// Time hook runs spent executing Lua, by hook.
    pub hook_duration: metrics::HookDurations,
    /// Hook runs stopped because their instruction budget ran out.
    pub hook_timeouts: AtomicU64,
    /// Hook runs stopped by the time limit (`script.time_limit_ms`), including runs on a
    /// VM the watchdog abandoned.
    pub time_limits: AtomicU64,
    /// VMs abandoned (stuck past the time limit) and replaced.
    pub vms_abandoned: AtomicU64,
    /// Hook runs stopped by the VM memory limit.
    pub memory_errors: AtomicU64,
    /// Successful reloads.
    pub reloads_ok: AtomicU64,
    /// Refused reloads (the running version stayed).
    pub reloads_failed: AtomicU64,
}

/// What `on_register(req)` sees of a REGISTER.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterInfo {
    /// The user part of the To URI.
    pub user: String,
    /// The address of record, `sip:user@domain`.
    pub aor: String,
    /// Where it came from, e.g. `"udp:192.0.2.7:5060"`.
    pub source: String,
    pub user_agent: Option<String>,
    /// The first Contact URI, if any.
    pub contact: Option<String>,
    /// Headers (lower-case name, first value).
    pub headers: Vec<(String, String)>,
}

/// What `on_register(req)` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterVerdict {
    /// No hook, or it returned nothing: the users file decides.
    Default,
    /// `req:reject(code, reason)`.
    Reject(u16, String),
    /// The hook returned credentials for digest authentication of this user.
    Credentials {
        password: Option<String>,
        ha1_md5: Option<String>,
        ha1_sha256: Option<String>,
    },
    /// The hook failed (error, budget, memory): answer 500. Text with file:line.
    Failed(String),
}

/// The scripting engine: a cheap, cloneable handle.
#[derive(Clone)]
pub struct ScriptEngine {
    inner: Arc<EngineInner>,
}

impl fmt::Debug for ScriptEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptEngine")
            .field("path", &self.inner.opts.path)
            .field("vms", &self.inner.pool_size)
            .field("current", &self.current().version)
            .finish()
    }
}

/// The server's services the Lua API reaches (`registrar.lookup`). Set after the engine is
/// loaded, read when a function is called, so every VM of every version sees them.
#[derive(Clone, Default)]
pub struct Services {
    location: Arc<parking_lot::RwLock<Option<Arc<dyn LocationService>>>>,
    /// `call:hunt` and `huntgroup.*` (None: no hunt groups attached).
    hunt: Arc<parking_lot::RwLock<Option<crate::huntgroup::HuntGroups>>>,
    /// The server's runtime: work a Lua verb starts that outlives a VM (hunting) runs
    /// there, not on the VM's thread.
    main: Option<tokio::runtime::Handle>,
}

impl Services {
    /// `registrar.lookup(aor)`: empty when no registrar is attached.
    pub(crate) fn lookup(&self, aor: &str) -> Vec<String> {
        let location = self.location.read().clone();
        location.map(|l| l.lookup(aor)).unwrap_or_default()
    }

    /// Runs `fut` on the server's runtime (when there is one) and waits for it there;
    /// dropping the wait cancels it.
    pub(crate) async fn on_main<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        match &self.main {
            Some(rt) => {
                struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
                impl<T> Drop for AbortOnDrop<T> {
                    fn drop(&mut self) {
                        self.0.abort();
                    }
                }
                let mut task = AbortOnDrop(rt.spawn(fut));
                (&mut task.0).await.ok()
            }
            None => Some(fut.await),
        }
    }
}

struct EngineInner {
    services: Services,
    opts: EngineOptions,
    pool_size: usize,
    current: RwLock<Arc<ScriptVersion>>,
    stats: Arc<ScriptStats>,
    versions: AtomicU64,
    reloading: tokio::sync::Mutex<()>,
    watchdog: Option<Arc<Watchdog>>,
}

impl ScriptEngine {
    /// Reads the script and loads it into every pooled VM, each on its own thread, or on
    /// this one when it serves its VMs inline (`pool::run_vms_inline`); the top-level
    /// code runs there. Blocks until they are ready.
    pub fn load(opts: EngineOptions) -> Result<ScriptEngine, ScriptError> {
        let pool_size = match opts.pool_size {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let stats = Arc::new(ScriptStats::default());
        let services = Services {
            main: tokio::runtime::Handle::try_current().ok(),
            ..Services::default()
        };
        let watchdog = Watchdog::start(opts.time_limit, stats.clone());
        let version = ScriptVersion::build(&opts, pool_size, 1, &stats, &services, &watchdog)?;
        tracing::info!(
            target: "script",
            script = %version.file.display,
            vms = pool_size,
            "script loaded"
        );
        version.warn();
        Ok(ScriptEngine {
            inner: Arc::new(EngineInner {
                services,
                opts,
                pool_size,
                current: RwLock::new(version),
                stats,
                versions: AtomicU64::new(1),
                reloading: tokio::sync::Mutex::new(()),
                watchdog,
            }),
        })
    }

    /// Attaches the location service behind `registrar.lookup` (all VMs, all versions).
    pub fn set_location(&self, location: Arc<dyn LocationService>) {
        *self.inner.services.location.write() = Some(location);
    }

    /// Attaches the hunt groups behind `call:hunt` and `huntgroup.*`.
    pub fn set_huntgroups(&self, groups: crate::huntgroup::HuntGroups) {
        *self.inner.services.hunt.write() = Some(groups);
    }

    /// Checks a script without serving it (`strowger check`): compiles it and runs its
    /// top-level code once in a sandboxed VM with `opts`' limits (the time limit bounds
    /// the wait), so syntax errors, missing modules and top-level errors are all
    /// reported. On success, returns what the script defines (see
    /// [`HookInfo::warnings`]).
    pub fn check(opts: &EngineOptions) -> Result<HookInfo, ScriptError> {
        let stats = Arc::new(ScriptStats::default());
        let ctx = Arc::new(BuildCtx {
            file: ScriptFile::new(&opts.path),
            source: ScriptFile::new(&opts.path).read()?.into(),
            opts: opts.clone(),
            services: Services::default(),
            watchdog: Watchdog::start(opts.time_limit, stats),
        });
        let vms = pool::load_blocking(&ctx, 1)?;
        Ok((*vms[0].info).clone())
    }

    /// Re-reads the file and loads it into a fresh pool (on new VM threads, awaited
    /// without blocking the caller's thread); on success new calls use it, calls in
    /// progress finish on their version. On error the running version stays.
    pub async fn reload(&self) -> Result<(), ScriptError> {
        let inner = self.inner.clone();
        let _one_at_a_time = inner.reloading.lock().await;
        let number = inner.versions.load(Ordering::Relaxed) + 1;
        let build = move |inner: &EngineInner| {
            ScriptVersion::build(
                &inner.opts,
                inner.pool_size,
                number,
                &inner.stats,
                &inner.services,
                &inner.watchdog,
            )
        };
        let built = if pool::inline_here() {
            // VMs of this thread are its local tasks ([`run_vms_inline`]), so the new ones
            // must be too (this is the SIP thread with `script.vm_threads = false`): built here, which
            // holds the thread while the script's top-level code runs (bounded by
            // `script.time_limit_ms`).
            build(&inner)
        } else {
            let inner = inner.clone();
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            tokio::task::spawn_blocking(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                build(&inner)
            })
            .await
            .unwrap_or_else(|e| Err(ScriptError::Internal(e.to_string())))
        };
        let built = built.and_then(|version| {
            // A script that lost `on_invite` (an empty file caught mid-save by an
            // editor, a bad merge) would answer every call 404 without a word
            // (issue 15): refused while the running version has one. A restart
            // still loads it, with the start-up warning.
            let running = inner.current.read().info.has(Hook::Invite);
            if running && !version.info.has(Hook::Invite) {
                return Err(ScriptError::Init {
                    file: version.info.file.clone(),
                    line: None,
                    message:
                        "defines no on_invite (the running script does): every call would get 404"
                            .into(),
                });
            }
            Ok(version)
        });
        match built {
            Ok(version) => {
                inner.versions.store(number, Ordering::Relaxed);
                *inner.current.write() = version.clone();
                inner.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "script", version = number, "script reloaded");
                version.warn();
                Ok(())
            }
            Err(e) => {
                inner.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "script", error = %e, "script reload refused; the running version stays");
                Err(e)
            }
        }
    }

    /// The version new calls should use.
    pub fn current(&self) -> Arc<ScriptVersion> {
        self.inner.current.read().clone()
    }

    /// The counters.
    /// Bytes held by the current version's Lua VMs together, and the highest share of
    /// `script.memory_limit_kb` any one of them holds (0 without a limit): what the
    /// overload detector reads so that new calls are refused with 503 before a VM's limit
    /// fails running calls with 500.
    pub fn memory(&self) -> ScriptMemory {
        let version = self.current();
        let limit = self.inner.opts.memory_limit as u64;
        let mut m = ScriptMemory::default();
        for vm in &version.vms {
            let used = vm.read().watch.used_memory();
            m.bytes += used;
            if limit > 0 {
                m.highest_share = m.highest_share.max(used as f64 / limit as f64);
            }
        }
        m
    }

    /// How long jobs stood in the VMs' queues since the last call: of each VM the smallest
    /// wait, of those the largest (one VM with a standing queue is enough: new calls are
    /// spread over all of them). `None` when no job ran. The overload detector's view of
    /// the script side.
    pub fn take_queue_delay(&self) -> Option<std::time::Duration> {
        let version = self.current();
        version
            .vms
            .iter()
            .filter_map(|vm| vm.read().watch.take_queue_wait())
            .max()
    }

    pub fn stats(&self) -> &ScriptStats {
        &self.inner.stats
    }

    /// The options the engine was loaded with (pool size as configured).
    pub fn options(&self) -> &EngineOptions {
        &self.inner.opts
    }
}

/// One loaded version of the script: a pool of VMs (see `pool.rs` for where they run).
pub struct ScriptVersion {
    version: u64,
    file: ScriptFile,
    /// The pool; a slot whose VM was abandoned gets a fresh VM when it is ready.
    vms: Vec<RwLock<Arc<VmHandle>>>,
    /// What the script defines (the same for every VM of the version).
    info: Arc<HookInfo>,
    next: AtomicUsize,
    run: RunCtx,
    ctx: Arc<BuildCtx>,
}

impl fmt::Debug for ScriptVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptVersion")
            .field("version", &self.version)
            .field("file", &self.file.display)
            .field("vms", &self.vms.len())
            .finish()
    }
}

impl ScriptVersion {
    /// Loads the script into `pool_size` new VMs (blocking until they are ready).
    fn build(
        opts: &EngineOptions,
        pool_size: usize,
        version: u64,
        stats: &Arc<ScriptStats>,
        services: &Services,
        watchdog: &Option<Arc<Watchdog>>,
    ) -> Result<Arc<ScriptVersion>, ScriptError> {
        let file = ScriptFile::new(&opts.path);
        let source = file.read()?;
        let ctx = Arc::new(BuildCtx {
            file: file.clone(),
            source: source.into(),
            opts: opts.clone(),
            services: services.clone(),
            watchdog: watchdog.clone(),
        });
        let vms = pool::load_blocking(&ctx, pool_size.max(1))?;
        let version = Arc::new(ScriptVersion {
            version,
            file,
            info: vms[0].info.clone(),
            vms: vms.into_iter().map(RwLock::new).collect(),
            next: AtomicUsize::new(0),
            run: RunCtx {
                stats: stats.clone(),
                version,
            },
            ctx,
        });
        for (slot, vm) in version.vms.iter().enumerate() {
            pool::set_owner(&vm.read(), &version, slot);
        }
        Ok(version)
    }

    /// Builds a fresh VM for `slot` (its VM was abandoned) on a new thread; it takes the
    /// slot when its top-level code has run.
    fn replace_vm(self: &Arc<Self>, slot: usize) {
        let version = Arc::downgrade(self);
        pool::spawn_vm(self.ctx.clone(), move |built| {
            let Some(version) = version.upgrade() else {
                return false;
            };
            match built {
                Ok(vm) => {
                    pool::set_owner(&vm, &version, slot);
                    *version.vms[slot].write() = vm;
                    tracing::info!(target: "script", version = version.version, slot, "a fresh Lua VM replaced the abandoned one");
                    true
                }
                Err(e) => {
                    tracing::error!(target: "script", error = %e, "the replacement of an abandoned Lua VM failed");
                    false
                }
            }
        });
    }

    /// Logs what `strowger check` would warn about (no `on_invite`, misspelled hooks).
    fn warn(&self) {
        for warning in self.info.warnings() {
            tracing::warn!(target: "script", version = self.version, "{warning}");
        }
    }

    /// The next live VM of the pool (round robin), if any.
    fn pick(&self) -> Option<Arc<VmHandle>> {
        let n = self.vms.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).find_map(|i| {
            let vm = self.vms[(start + i) % n].read();
            vm.is_alive().then(|| vm.clone())
        })
    }

    /// 1 for the first load, +1 per successful reload.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The script file, as configured.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// What the script defines.
    pub fn hooks(&self) -> &HookInfo {
        &self.info
    }

    /// Whether the script defines `on_invite` (else every call gets 404).
    pub fn has_on_invite(&self) -> bool {
        self.info.has(Hook::Invite)
    }

    /// Runs `on_register(req)` on the next VM.
    pub async fn on_register(&self, info: &RegisterInfo) -> RegisterVerdict {
        register::run_on_register(self, info).await
    }

    /// Whether the script defines `on_register`.
    pub fn has_on_register(&self) -> bool {
        self.info.has(Hook::Register)
    }

    /// Whether the script defines `on_refer` (then a call keeps its Lua state while up).
    pub fn has_on_refer(&self) -> bool {
        self.info.has(Hook::Refer)
    }

    /// Whether the script defines `on_call_end`. When it does not, a call's handle (and
    /// with it the call's Lua state) can be dropped as soon as `on_invite` has decided.
    pub fn has_on_call_end(&self) -> bool {
        self.info.has(Hook::CallEnd)
    }

    /// Runs `on_invite(call)` as a coroutine on the next VM of the pool (round robin) and
    /// pins the call to that VM.
    pub fn on_invite(
        self: &Arc<Self>,
        call: CallInfo,
        control: Arc<dyn CallControl>,
    ) -> Pin<Box<dyn Future<Output = InviteOutcome> + Send>> {
        let version = Arc::clone(self);
        Box::pin(async move { call::run_on_invite(version, call, control).await })
    }

    /// Runs `on_call_end(call, record)` on the call's VM with the same `call` object (no-op
    /// when undefined), then frees the call's Lua state. The handle's own version is used,
    /// so a call that started before a reload ends on the old script.
    pub fn on_call_end(
        self: &Arc<Self>,
        handle: CallScriptHandle,
        record: CallRecord,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        handle.on_call_end(record)
    }
}

/// The B2BUA's port: new calls start on the current version.
impl CallHooks for ScriptEngine {
    fn current(&self) -> Arc<dyn CallHookSet> {
        self.inner.current.read().clone()
    }
}

impl CallHookSet for ScriptVersion {
    fn version(&self) -> u64 {
        self.version
    }

    fn has_on_refer(&self) -> bool {
        ScriptVersion::has_on_refer(self)
    }

    fn has_on_call_end(&self) -> bool {
        ScriptVersion::has_on_call_end(self)
    }

    fn on_invite(
        self: Arc<Self>,
        call: CallInfo,
        control: Arc<dyn CallControl>,
    ) -> Pin<Box<dyn Future<Output = InviteOutcome> + Send>> {
        Box::pin(call::run_on_invite(self, call, control))
    }
}

/// Presence's port: `on_message` and `on_subscribe` run on the current version.
impl PresenceHooks for ScriptEngine {
    fn has_on_message(&self) -> bool {
        self.current().has_on_message()
    }

    fn has_on_subscribe(&self) -> bool {
        self.current().has_on_subscribe()
    }

    fn on_message<'a>(
        &'a self,
        info: &'a MessageInfo,
    ) -> Pin<Box<dyn Future<Output = MessageVerdict> + Send + 'a>> {
        let version = self.current();
        Box::pin(async move { version.on_message(info).await })
    }

    fn on_subscribe<'a>(
        &'a self,
        info: &'a SubscribeInfo,
    ) -> Pin<Box<dyn Future<Output = SubscribeVerdict> + Send + 'a>> {
        let version = self.current();
        Box::pin(async move { version.on_subscribe(info).await })
    }
}

/// `value` cut to [`MAX_HEADER_VALUE`] bytes at a character boundary.
pub(crate) fn bounded(value: &str) -> &str {
    if value.len() <= MAX_HEADER_VALUE {
        return value;
    }
    let mut end = MAX_HEADER_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}
