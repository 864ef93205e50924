//! One sandboxed Lua VM of the pool: creation (sandbox, `log`, `require`, the operator
//! script), the instruction budget charged by a single global count hook, and the exec lock
//! that tells that hook which hook run is executing.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use mlua::{
    ChunkMode, Debug, Error as LuaError, Function, HookTriggers, Lua, LuaOptions, MultiValue,
    StdLib, Table, Value, VmState,
};
use parking_lot::{Mutex, ReentrantMutex};

use super::{call, EngineOptions, ScriptError};

/// The count hook fires every this many VM instructions (or every `instruction_limit`
/// instructions when that is smaller).
const HOOK_STEP: u32 = 1000;

/// Finished hook coroutines kept per VM for reuse (more may run at once; the extra ones
/// are simply left to the GC).
const THREAD_POOL: usize = 64;

/// The sandbox prelude: runs once per VM before the operator's script.
const SANDBOX: &str = include_str!("sandbox.lua");
/// Chunk names of our own Lua code start with this (never blamed in error positions).
const INTERNAL_SOURCE: &str = "strowger/";

/// The main script file and how to name it in messages.
#[derive(Debug, Clone)]
pub(crate) struct ScriptFile {
    pub path: PathBuf,
    /// As configured, e.g. `scripts/default.lua`: used in chunk names, hence in errors.
    pub display: String,
    /// Where `require` looks.
    dir: PathBuf,
    /// `dir` as it appears in messages.
    dir_display: PathBuf,
}

impl ScriptFile {
    pub fn new(path: &Path) -> ScriptFile {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        ScriptFile {
            path: path.to_path_buf(),
            display: path.display().to_string(),
            dir_display: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            dir,
        }
    }

    pub fn read(&self) -> Result<Vec<u8>, ScriptError> {
        match std::fs::read(&self.path) {
            // Like the configuration, the default dial plan is built into the binary so
            // that `strowger run` works from any directory; a file on disk wins.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && self.path == Path::new(super::DEFAULT_SCRIPT_PATH) =>
            {
                Ok(super::EMBEDDED_DEFAULT_SCRIPT.as_bytes().to_vec())
            }
            r => r.map_err(|source| ScriptError::Io {
                file: self.display.clone(),
                source,
            }),
        }
    }
}

/// The instruction budget and last known script position of one hook run.
pub(crate) struct Budget {
    limit: u64,
    remaining: AtomicI64,
    exhausted: AtomicBool,
    /// Last script position the count hook saw (file, line).
    last_pos: Mutex<Option<(String, usize)>>,
    message: Mutex<Option<String>>,
    /// Time spent executing Lua for this run, nanoseconds (the hook duration metric).
    busy_ns: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            remaining: AtomicI64::new(i64::try_from(limit).unwrap_or(i64::MAX)),
            exhausted: AtomicBool::new(false),
            last_pos: Mutex::new(None),
            message: Mutex::new(None),
            busy_ns: AtomicU64::new(0),
        }
    }

    /// Seconds this run has spent executing Lua so far.
    pub fn busy_secs(&self) -> f64 {
        self.busy_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn is_exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }

    /// The last script position seen, as `file:line`.
    pub fn last_pos(&self) -> Option<String> {
        self.last_pos
            .lock()
            .as_ref()
            .map(|(f, l)| format!("{f}:{l}"))
    }

    /// The text of the budget error (set once exhausted).
    pub fn message(&self) -> Option<String> {
        self.message.lock().clone()
    }

    fn note(&self, debug: &Debug) {
        let Some(line) = debug.current_line() else {
            return;
        };
        let source = debug.source();
        let Some(src) = source.short_src else {
            return;
        };
        if is_internal(&src) {
            return;
        }
        let mut pos = self.last_pos.lock();
        match &mut *pos {
            Some((f, l)) if *f == src => *l = line,
            _ => *pos = Some((src.into_owned(), line)),
        }
    }

    fn charge(&self, step: u32) -> mlua::Result<VmState> {
        if self.limit == 0 {
            return Ok(VmState::Continue);
        }
        let step = i64::from(step);
        if self.remaining.fetch_sub(step, Ordering::Relaxed) - step >= 0 {
            return Ok(VmState::Continue);
        }
        let mut message = self.message.lock();
        let text = message.get_or_insert_with(|| {
            let pos = self.last_pos().unwrap_or_else(|| "script".to_owned());
            format!(
                "{pos}: instruction limit exceeded ({} instructions)",
                self.limit
            )
        });
        self.exhausted.store(true, Ordering::Relaxed);
        Err(LuaError::runtime(text.clone()))
    }
}

fn is_internal(short_src: &str) -> bool {
    short_src.starts_with(INTERNAL_SOURCE) || short_src.starts_with("__mlua")
}

/// State the count hook reads: whose budget to charge.
struct VmShared {
    current: Mutex<Option<Arc<Budget>>>,
    /// Charged when Lua runs outside any hook run (finalizers at close, ...).
    idle: Budget,
    step: u32,
}

impl VmShared {
    fn on_hook(&self, debug: &Debug) -> mlua::Result<VmState> {
        let current = self.current.lock();
        let budget = current.as_deref().unwrap_or(&self.idle);
        budget.note(debug);
        budget.charge(self.step)
    }

    fn exhausted(&self) -> bool {
        let current = self.current.lock();
        current.as_deref().unwrap_or(&self.idle).is_exhausted()
    }
}

/// One Lua VM with the script loaded.
pub(crate) struct Vm {
    pub lua: Lua,
    exec: ReentrantMutex<()>,
    shared: Arc<VmShared>,
    /// `run_invite(call_ud)`: the sandbox's runner with the script's `on_invite` bound (it
    /// builds the `call` table around the call's userdata and remembers which coroutine runs
    /// the call's hook). `None` when the script has no `on_invite`.
    pub on_invite: Option<Function>,
    /// `run_end(call_ud, record fields...)`: likewise for `on_call_end`.
    pub on_call_end: Option<Function>,
    /// `file:line` where each hook is defined (fallback error position).
    pub on_invite_pos: String,
    pub on_call_end_pos: String,
    /// `on_register(req)`, wrapped by the sandbox.
    pub on_register: Option<Function>,
    pub on_register_pos: String,
    /// `run_refer(call_ud, by, target, referred_by, replaces)`: `on_refer(call, refer)`.
    pub on_refer: Option<Function>,
    pub on_refer_pos: String,
    /// presence: `on_message(req)` and `on_subscribe(req)`, called as they are
    /// (`script::presence` builds `req`).
    pub on_message: Option<Function>,
    pub on_message_pos: String,
    pub on_subscribe: Option<Function>,
    pub on_subscribe_pos: String,
    pub file: Arc<str>,
    pub instruction_limit: u64,
    pub memory_limit: usize,
}

impl Vm {
    /// A fresh sandboxed VM running `source` (the contents of `file`).
    pub fn new(
        file: &ScriptFile,
        source: &[u8],
        opts: &EngineOptions,
        services: &super::Services,
    ) -> Result<Vm, ScriptError> {
        let internal = |e: LuaError| ScriptError::Internal(e.to_string());
        let libs = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::MATH
            | StdLib::OS;
        // Hook runs are coroutines: without a pool mlua makes (and the GC later frees) a new
        // Lua thread, with a fresh stack to grow, for every run.
        let lua = Lua::new_with(libs, LuaOptions::new().thread_pool_size(THREAD_POOL))
            .map_err(internal)?;

        let step = match opts.instruction_limit {
            0 => HOOK_STEP,
            n => u32::try_from(n).unwrap_or(HOOK_STEP).clamp(1, HOOK_STEP),
        };
        let shared = Arc::new(VmShared {
            current: Mutex::new(None),
            idle: Budget::new(opts.instruction_limit),
            step,
        });
        let hook_shared = shared.clone();
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(step),
            move |_, debug| hook_shared.on_hook(debug),
        )
        .map_err(internal)?;

        let file_name: Arc<str> = Arc::from(file.display.as_str());
        let setup = || -> mlua::Result<Function> {
            let helpers = lua.create_table()?;
            let ex = shared.clone();
            helpers.raw_set(
                "exhausted",
                lua.create_function(move |_, ()| Ok(ex.exhausted()))?,
            )?;
            helpers.raw_set("find_module", find_module_fn(&lua, file)?)?;
            helpers.raw_set("log", log_table(&lua, file_name.clone())?)?;
            helpers.raw_set("call", call::raw_api(&lua, &opts.routes)?)?;
            let svc = services.clone();
            helpers.raw_set(
                "registrar_lookup",
                lua.create_function(move |lua, aor: Value| {
                    let aor = match &aor {
                        Value::String(s) => s.to_str()?.to_owned(),
                        Value::Table(t) => t.raw_get::<String>("uri")?,
                        other => {
                            return Err(mlua::Error::runtime(format!(
                            "registrar.lookup: expected an address (string or call.ruri), got a {}",
                            other.type_name()
                        )))
                        }
                    };
                    lua.create_sequence_from(svc.lookup(&aor))
                })?,
            )?;
            super::huntgroup::register(&lua, &helpers, services)?;
            lua.load(SANDBOX)
                .set_name(format!("={INTERNAL_SOURCE}sandbox"))
                .set_mode(ChunkMode::Text)
                .call(helpers)
        };
        let budget = Arc::new(Budget::new(opts.instruction_limit));
        let bind = {
            let _g = enter(&shared, &budget);
            setup().map_err(internal)?
        };

        if opts.memory_limit > 0 {
            lua.set_memory_limit(opts.memory_limit).map_err(internal)?;
        }

        let main = lua
            .load(source)
            .set_name(format!("@{}", file.display))
            .set_mode(ChunkMode::Text)
            .into_function()
            .map_err(|e| load_error(&e, file, &budget, opts.memory_limit))?;
        {
            let _g = enter(&shared, &budget);
            main.call::<()>(())
                .map_err(|e| load_error(&e, file, &budget, opts.memory_limit))?;
        }

        let globals = lua.globals();
        let hook = |name: &str| -> Result<Option<Function>, ScriptError> {
            match globals.raw_get::<Value>(name) {
                Ok(Value::Nil) => Ok(None),
                Ok(Value::Function(f)) => Ok(Some(f)),
                Ok(other) => Err(ScriptError::Init {
                    file: file.display.clone(),
                    line: None,
                    message: format!("`{name}` must be a function, not a {}", other.type_name()),
                }),
                Err(e) => Err(internal(e)),
            }
        };
        let on_invite = hook("on_invite")?;
        let on_call_end = hook("on_call_end")?;
        let on_register = hook("on_register")?;
        let on_refer = hook("on_refer")?;
        let on_message = hook("on_message")?; // presence
        let on_subscribe = hook("on_subscribe")?; // presence
        let def_pos = |f: &Option<Function>| match f {
            Some(f) => {
                let info = f.info();
                format!(
                    "{}:{}",
                    info.short_src.unwrap_or_else(|| file.display.clone()),
                    info.line_defined.unwrap_or(0)
                )
            }
            None => file.display.clone(),
        };
        let on_invite_pos = def_pos(&on_invite);
        let on_call_end_pos = def_pos(&on_call_end);
        let on_register_pos = def_pos(&on_register);
        let (on_message_pos, on_subscribe_pos) = (def_pos(&on_message), def_pos(&on_subscribe));
        let on_refer_pos = def_pos(&on_refer);
        type Runners = (
            Option<Function>,
            Option<Function>,
            Option<Function>,
            Option<Function>,
        );
        let (on_invite, on_call_end, on_register, on_refer) = {
            let _g = enter(&shared, &budget);
            bind.call::<Runners>((on_invite, on_call_end, on_register, on_refer))
                .map_err(internal)?
        };

        Ok(Vm {
            exec: ReentrantMutex::new(()),
            shared,
            on_invite,
            on_call_end,
            on_invite_pos,
            on_call_end_pos,
            on_register,
            on_register_pos,
            on_refer,
            on_refer_pos,
            on_message,
            on_message_pos,
            on_subscribe,
            on_subscribe_pos,
            file: file_name,
            instruction_limit: opts.instruction_limit,
            memory_limit: opts.memory_limit,
            lua,
        })
    }

    /// A fresh budget for one hook run.
    pub fn budget(&self) -> Arc<Budget> {
        Arc::new(Budget::new(self.instruction_limit))
    }

    /// Runs `f` (which touches Lua) as part of the run owning `budget`.
    pub fn enter<R>(&self, budget: &Arc<Budget>, f: impl FnOnce() -> R) -> R {
        let _exec = self.exec.lock();
        let _g = enter(&self.shared, budget);
        let started = std::time::Instant::now();
        let out = f();
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        budget.busy_ns.fetch_add(ns, Ordering::Relaxed);
        out
    }

    /// Wraps a hook future so each poll (and its drop) runs as part of `budget`'s run.
    pub fn guard<F: Future>(self: &Arc<Self>, budget: &Arc<Budget>, fut: F) -> Guarded<F> {
        Guarded {
            vm: self.clone(),
            budget: budget.clone(),
            fut: Some(Box::pin(fut)),
        }
    }

    /// Runs a full GC (twice, to also collect what finalizers freed).
    pub fn full_gc(&self, budget: &Arc<Budget>) {
        self.enter(budget, || {
            let _ = self.lua.gc_collect();
            let _ = self.lua.gc_collect();
        });
    }
}

/// Names `budget` as the running one until dropped (restores the previous one: runs nest
/// when a poll of one hook drops or polls another on the same thread).
fn enter<'a>(shared: &'a VmShared, budget: &Arc<Budget>) -> EnterGuard<'a> {
    let prev = shared.current.lock().replace(budget.clone());
    EnterGuard { shared, prev }
}

struct EnterGuard<'a> {
    shared: &'a VmShared,
    prev: Option<Arc<Budget>>,
}

impl Drop for EnterGuard<'_> {
    fn drop(&mut self) {
        *self.shared.current.lock() = self.prev.take();
    }
}

/// A hook future that holds its VM's exec lock and names its budget while polled.
pub(crate) struct Guarded<F> {
    vm: Arc<Vm>,
    budget: Arc<Budget>,
    fut: Option<Pin<Box<F>>>,
}

impl<F: Future> Future for Guarded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.fut.is_none() {
            panic!("Guarded polled after completion");
        }
        // The finished future is dropped under the same lock (one `enter` per poll).
        let fut_slot = &mut this.fut;
        this.vm.enter(&this.budget, || {
            let fut = fut_slot.as_mut().expect("checked above");
            let out = fut.as_mut().poll(cx);
            if out.is_ready() {
                drop(fut_slot.take());
            }
            out
        })
    }
}

impl<F> Drop for Guarded<F> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            // Dropping a suspended hook resumes its coroutine to close it: charge that too.
            self.vm.enter(&self.budget, || drop(fut));
        }
    }
}

/// How a hook run failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailKind {
    Error,
    Timeout,
    Memory,
}

impl FailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailKind::Error => "error",
            FailKind::Timeout => "instruction_limit",
            FailKind::Memory => "memory",
        }
    }
}

/// Turns a Lua error into one line with `file:line` first. `fallback` is the position to
/// use when neither the error nor the budget knows one.
pub(crate) fn describe(
    err: &LuaError,
    budget: &Budget,
    fallback: &str,
    memory_limit: usize,
) -> (FailKind, String) {
    let pos = || budget.last_pos().unwrap_or_else(|| fallback.to_owned());
    if budget.is_exhausted() {
        let msg = budget.message().unwrap_or_else(|| root_message(err));
        return (FailKind::Timeout, msg);
    }
    if has_memory_error(err) {
        let limit = if memory_limit > 0 {
            format!(" (VM memory limit {} KiB)", memory_limit / 1024)
        } else {
            String::new()
        };
        return (
            FailKind::Memory,
            format!("{}: not enough memory{limit}", pos()),
        );
    }
    let msg = root_message(err);
    // mlua appends a traceback to non-string error values: keep one line, but use the
    // traceback's first script frame as the position.
    let (head, traceback) = match msg.split_once("\nstack traceback:") {
        Some((head, tb)) => (head.to_owned(), Some(tb.to_owned())),
        None => (msg, None),
    };
    if split_location(&head).is_some() {
        return (FailKind::Error, head);
    }
    let frame = traceback.as_deref().and_then(|tb| {
        tb.lines()
            .filter_map(|l| split_location(l.trim()))
            .find(|(file, _, _)| !is_internal(file))
            .map(|(file, line, _)| format!("{file}:{line}"))
    });
    (
        FailKind::Error,
        format!("{}: {head}", frame.unwrap_or_else(pos)),
    )
}

fn root_error(err: &LuaError) -> &LuaError {
    match err {
        LuaError::CallbackError { cause, .. } | LuaError::WithContext { cause, .. } => {
            root_error(cause)
        }
        e => e,
    }
}

fn has_memory_error(err: &LuaError) -> bool {
    matches!(root_error(err), LuaError::MemoryError(_))
}

/// The message of the innermost error, without mlua's decoration.
pub(crate) fn root_message(err: &LuaError) -> String {
    match root_error(err) {
        LuaError::RuntimeError(m) | LuaError::MemoryError(m) => m.clone(),
        LuaError::SyntaxError { message, .. } => message.clone(),
        LuaError::ExternalError(e) => e.to_string(),
        e => e.to_string(),
    }
}

/// Splits `"file:12: message"` into its parts.
pub(crate) fn split_location(msg: &str) -> Option<(&str, u32, &str)> {
    let bytes = msg.as_bytes();
    let mut i = 0;
    while let Some(off) = msg[i..].find(':') {
        let colon = i + off;
        let digits = bytes[colon + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let end = colon + 1 + digits;
        if colon > 0 && digits > 0 && bytes.get(end) == Some(&b':') {
            let file = &msg[..colon];
            if file.contains('\n') {
                return None;
            }
            let line = msg[colon + 1..end].parse().ok()?;
            return Some((file, line, msg[end + 1..].trim_start()));
        }
        i = colon + 1;
    }
    None
}

/// A load-time error as a [`ScriptError`].
fn load_error(
    err: &LuaError,
    file: &ScriptFile,
    budget: &Budget,
    memory_limit: usize,
) -> ScriptError {
    if let LuaError::SyntaxError { message, .. } = root_error(err) {
        if let Some((f, line, rest)) = split_location(message) {
            return ScriptError::Compile {
                file: f.to_owned(),
                line,
                message: rest.to_owned(),
            };
        }
        return ScriptError::Compile {
            file: file.display.clone(),
            line: 0,
            message: message.clone(),
        };
    }
    let (_, msg) = describe(err, budget, &file.display, memory_limit);
    match split_location(&msg) {
        Some((f, line, rest)) => ScriptError::Init {
            file: f.to_owned(),
            line: Some(line),
            message: rest.to_owned(),
        },
        None => ScriptError::Init {
            file: file.display.clone(),
            line: None,
            message: msg,
        },
    }
}

/// The first script frame above the running Rust function: (file, line).
fn caller_pos(lua: &Lua) -> Option<(String, usize)> {
    for level in 1..12 {
        let frame = lua.inspect_stack(level, |d| {
            let line = d.current_line();
            let src = d.source().short_src.map(|s| s.into_owned());
            (line, src)
        })?;
        if let (Some(line), Some(src)) = frame {
            if !is_internal(&src) {
                return Some((src, line));
            }
        }
    }
    None
}

/// `log.debug/info/warn/error`.
fn log_table(lua: &Lua, file: Arc<str>) -> mlua::Result<Table> {
    let tostring: Function = lua.globals().raw_get("tostring")?;
    let log = lua.create_table()?;
    for level in ["debug", "info", "warn", "error"] {
        let tostring = tostring.clone();
        let file = file.clone();
        let f = lua.create_function(move |lua, args: MultiValue| {
            let mut msg = String::new();
            for (i, v) in args.iter().enumerate() {
                if i > 0 {
                    msg.push('\t');
                }
                match v {
                    Value::String(s) => msg.push_str(&s.to_string_lossy()),
                    v => msg.push_str(&tostring.call::<mlua::String>(v)?.to_string_lossy()),
                }
            }
            let (script, line) = caller_pos(lua).unwrap_or_else(|| (file.to_string(), 0));
            match level {
                "debug" => tracing::debug!(target: "script", script = %script, line, "{msg}"),
                "info" => tracing::info!(target: "script", script = %script, line, "{msg}"),
                "warn" => tracing::warn!(target: "script", script = %script, line, "{msg}"),
                _ => tracing::error!(target: "script", script = %script, line, "{msg}"),
            }
            Ok(())
        })?;
        log.raw_set(level, f)?;
    }
    Ok(log)
}

/// `find_module(name)` → the compiled chunk of `<script dir>/<name>.lua`, or nil and a
/// message. A syntax error is raised as such (so loading reports it as a compile error).
fn find_module_fn(lua: &Lua, file: &ScriptFile) -> mlua::Result<Function> {
    let dir = file.dir.clone();
    let dir_display = file.dir_display.clone();
    lua.create_function(move |lua, name: Value| {
        let name = match &name {
            Value::String(s) => s.to_str()?.to_owned(),
            other => {
                return Ok((
                    None,
                    Some(format!(
                        "require: module name must be a string, not a {}",
                        other.type_name()
                    )),
                ))
            }
        };
        let valid = !name.is_empty()
            && name.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if !valid {
            return Ok((
                None,
                Some(format!(
                    "require: bad module name '{name}' (letters, digits, '_', '-', and '.' between parts)"
                )),
            ));
        }
        let mut rel = PathBuf::new();
        for seg in name.split('.') {
            rel.push(seg);
        }
        rel.set_extension("lua");
        let shown = dir_display.join(&rel).display().to_string();
        let source = match std::fs::read(dir.join(&rel)) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((
                    None,
                    Some(format!(
                        "module '{name}' not found: no file '{shown}' (require loads .lua files from the script's directory only)"
                    )),
                ))
            }
            Err(e) => return Ok((None, Some(format!("module '{name}': {shown}: {e}")))),
        };
        let chunk = lua
            .load(source)
            .set_name(format!("@{shown}"))
            .set_mode(ChunkMode::Text)
            .into_function()?;
        Ok((Some(chunk), None))
    })
}

#[cfg(test)]
mod unit {
    use super::split_location;

    #[test]
    fn locations() {
        assert_eq!(
            split_location("a/b.lua:12: boom: x:1:"),
            Some(("a/b.lua", 12, "boom: x:1:"))
        );
        assert_eq!(split_location("no location"), None);
        assert_eq!(split_location(":12: x"), None);
        assert_eq!(split_location("a:b:3: x"), Some(("a:b", 3, "x")));
    }
}
