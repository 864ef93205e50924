//! One sandboxed Lua VM of the pool: creation (sandbox, `log`, `require`, the operator
//! script, then the freeze that makes the standard tables read-only and globals per run),
//! the budgets of a hook run (instructions, charged by a single global count hook, and
//! Lua execution time, and on the SIP thread the length of one stretch) and the switch of
//! the global environment at every poll of a run.
//!
//! A `Vm` lives on one thread (its own or the SIP thread, `pool.rs`) and is never touched
//! from another one.

use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use mlua::{
    ChunkMode, Debug, Error as LuaError, Function, HookTriggers, Lua, LuaOptions, MultiValue,
    StdLib, Table, Value, VmState,
};
use parking_lot::Mutex;

use super::hooks::{Hook, HookInfo};
use super::pool::{now_ns, VmWatch};
use super::wait::{wait_marker, HookThread, ThreadPool, Waits};
use super::{call, EngineOptions, ScriptError};

/// The count hook fires every this many VM instructions (or every `instruction_limit`
/// instructions when that is smaller).
const HOOK_STEP: u32 = 1000;

/// On the SIP thread (`script.vm_threads = false`), the longest a hook run may execute
/// Lua at one go (one entry: from its start or the end of a wait to its end or next wait):
/// past it the run fails with the time-limit error, so that one hook never holds SIP
/// longer. Lua running in a coroutine cannot be paused and resumed later here: mlua resumes
/// a coroutine that yielded from the count hook with a cut stack (it takes the paused
/// frame's registers for resume arguments), so a run is cut, not paused.
pub(crate) const INLINE_STRETCH_NS: u64 = 50_000_000;

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

/// Why a run's budget is spent (`Budget::spent`).
const SPENT_NONE: u8 = 0;
const SPENT_INSTRUCTIONS: u8 = 1;
const SPENT_TIME: u8 = 2;
const SPENT_ABANDONED: u8 = 3;

/// The budgets and last known script position of one hook run.
pub(crate) struct Budget {
    limit: u64,
    remaining: AtomicI64,
    spent: AtomicU8,
    /// Last script position the count hook saw (file, line).
    last_pos: Mutex<Option<(String, usize)>>,
    message: Mutex<Option<String>>,
    /// Time spent executing Lua for this run, nanoseconds (the time limit and the hook
    /// duration metric).
    busy_ns: AtomicU64,
    /// The run's own globals (created on its first global assignment), see `sandbox.lua`.
    pub env: Mutex<Option<Table>>,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            remaining: AtomicI64::new(i64::try_from(limit).unwrap_or(i64::MAX)),
            spent: AtomicU8::new(SPENT_NONE),
            last_pos: Mutex::new(None),
            message: Mutex::new(None),
            busy_ns: AtomicU64::new(0),
            env: Mutex::new(None),
        }
    }

    /// Seconds this run has spent executing Lua so far.
    pub fn busy_secs(&self) -> f64 {
        self.busy_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn is_exhausted(&self) -> bool {
        self.spent.load(Ordering::Relaxed) != SPENT_NONE
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

    /// Marks the run as stopped (the first reason wins) and returns the error to raise.
    fn stop(&self, why: u8, what: impl FnOnce() -> String) -> LuaError {
        let mut message = self.message.lock();
        let text = message.get_or_insert_with(|| {
            let pos = self.last_pos().unwrap_or_else(|| "script".to_owned());
            format!("{pos}: {}", what())
        });
        let _ = self
            .spent
            .compare_exchange(SPENT_NONE, why, Ordering::Relaxed, Ordering::Relaxed);
        LuaError::runtime(text.clone())
    }

    fn charge(&self, step: u32) -> mlua::Result<()> {
        if self.is_exhausted() {
            // Once spent, every later check raises again (a pcall cannot resume the run).
            return Err(LuaError::runtime(self.message().unwrap_or_default()));
        }
        if self.limit == 0 {
            return Ok(());
        }
        let step = i64::from(step);
        if self.remaining.fetch_sub(step, Ordering::Relaxed) - step >= 0 {
            return Ok(());
        }
        let limit = self.limit;
        Err(self.stop(SPENT_INSTRUCTIONS, || {
            format!("instruction limit exceeded ({limit} instructions)")
        }))
    }
}

fn is_internal(short_src: &str) -> bool {
    short_src.starts_with(INTERNAL_SOURCE) || short_src.starts_with("__mlua")
}

/// State the count hook reads: whose budget to charge, and since when Lua runs.
struct VmShared {
    current: Mutex<Option<Arc<Budget>>>,
    /// Charged when Lua runs outside any hook run (finalizers at close, ...).
    idle: Budget,
    step: u32,
    /// Lua execution time one run may use, ns; 0 = unlimited.
    time_limit_ns: u64,
    /// When the current (outermost) entry into Lua started, `now_ns()`.
    poll_start: AtomicU64,
    /// The global table's metatable points at a run's own globals (see `apply_env`).
    env_set: AtomicBool,
    watch: Arc<VmWatch>,
}

impl VmShared {
    fn on_hook(&self, debug: &Debug) -> mlua::Result<VmState> {
        let current = self.current.lock();
        let budget = current.as_deref().unwrap_or(&self.idle);
        if self.watch.is_abandoned() {
            return Err(budget.stop(SPENT_ABANDONED, || {
                "time limit exceeded: the VM was abandoned".to_owned()
            }));
        }
        budget.note(debug);
        budget.charge(self.step)?;
        let this_entry = now_ns().saturating_sub(self.poll_start.load(Ordering::Relaxed));
        self.check_time(budget, this_entry)?;
        Ok(VmState::Continue)
    }

    /// Err (the time-limit error) if the current run has used up its Lua time, or, on the
    /// SIP thread, has run `INLINE_STRETCH_NS` in this entry. `this_entry`: nanoseconds
    /// since the current outermost entry into Lua.
    fn check_time(&self, budget: &Budget, this_entry: u64) -> mlua::Result<()> {
        if self.time_limit_ns > 0 {
            let busy = budget.busy_ns.load(Ordering::Relaxed) + this_entry;
            if busy > self.time_limit_ns {
                let ms = self.time_limit_ns / 1_000_000;
                return Err(budget.stop(SPENT_TIME, || {
                    format!("time limit exceeded ({ms} ms of Lua execution)")
                }));
            }
        }
        if this_entry > INLINE_STRETCH_NS && self.watch.is_inline() {
            let ms = INLINE_STRETCH_NS / 1_000_000;
            return Err(budget.stop(SPENT_TIME, || {
                format!(
                    "time limit exceeded: ran {ms} ms at one go on the SIP thread (script.vm_threads = true lets a hook compute longer)"
                )
            }));
        }
        Ok(())
    }

    /// The check a pattern match makes every so many steps (`pattern::install`): the run's
    /// budgets, as the count hook would check them, which cannot fire inside a C call.
    fn check_in_c_call(&self, lua: &Lua) -> mlua::Result<()> {
        let current = self.current.lock();
        let budget = current.as_deref().unwrap_or(&self.idle);
        // The script's line that called the pattern function, for the error (the count
        // hook may not have run in this hook yet): the first frame that is not ours.
        for level in 1..8 {
            match lua.inspect_stack(level, |debug| {
                let internal = debug.source().short_src.is_none_or(|src| is_internal(&src));
                if !internal {
                    budget.note(debug);
                }
                internal
            }) {
                Some(true) => continue,
                _ => break,
            }
        }
        if self.watch.is_abandoned() {
            return Err(budget.stop(SPENT_ABANDONED, || {
                "time limit exceeded: the VM was abandoned".to_owned()
            }));
        }
        if budget.is_exhausted() {
            return Err(LuaError::runtime(budget.message().unwrap_or_default()));
        }
        let this_entry = now_ns().saturating_sub(self.poll_start.load(Ordering::Relaxed));
        self.check_time(budget, this_entry)
    }

    fn exhausted(&self) -> bool {
        let current = self.current.lock();
        self.watch.is_abandoned() || current.as_deref().unwrap_or(&self.idle).is_exhausted()
    }
}

/// One Lua VM with the script loaded. Lives on its VM thread.
pub(crate) struct Vm {
    pub lua: Lua,
    shared: Arc<VmShared>,
    /// The sandbox's runner of each hook the script defines (indexed by [`Hook`]): it
    /// builds the hook's arguments (the `call` table around a call's handle, `req`
    /// tables) and calls the operator's function.
    runners: [Option<Function>; Hook::COUNT],
    /// Where the verbs that wait hand their futures to the run's driver.
    waits: Waits,
    /// Finished hook coroutines, for the next runs.
    threads: Rc<ThreadPool>,
    /// The calls this VM's scripts act on, by the handle the sandbox keeps for each.
    pub calls: Arc<call::CallSlots>,
    /// The metatable of the sandbox's `call` tables and its weak table of their private
    /// records: Rust makes a call's table and record as its `on_invite` starts
    /// (`call::new_call_table`).
    pub call_meta: Table,
    pub call_private: Table,
    /// What the script defines (shared with the pool's handle).
    pub info: Arc<HookInfo>,
    /// The global table's metatable, the frozen globals, and the `__newindex` that gives
    /// a run its own globals: `apply_env` switches between them.
    globals_meta: Table,
    base: Table,
    first_global: Function,
    depth: Cell<u32>,
    pub instruction_limit: u64,
    pub memory_limit: usize,
}

impl Vm {
    /// A fresh sandboxed VM running `source` (the contents of `file`). Runs the script's
    /// top-level code: call it on the VM's own thread.
    pub fn new(
        file: &ScriptFile,
        source: &[u8],
        opts: &EngineOptions,
        services: &super::Services,
        watch: Arc<VmWatch>,
    ) -> Result<Vm, ScriptError> {
        let internal = |e: LuaError| ScriptError::Internal(e.to_string());
        let libs = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::MATH
            | StdLib::OS;
        // Hook runs are coroutines of our own (`wait.rs`, with its pool of them), not
        // mlua's async threads: no pool of mlua's.
        let lua = Lua::new_with(libs, LuaOptions::new()).map_err(internal)?;
        let waits = Waits::default();
        let calls = Arc::new(call::CallSlots::default());

        let step = match opts.instruction_limit {
            0 => HOOK_STEP,
            n => u32::try_from(n).unwrap_or(HOOK_STEP).clamp(1, HOOK_STEP),
        };
        let shared = Arc::new(VmShared {
            current: Mutex::new(None),
            idle: Budget::new(opts.instruction_limit),
            step,
            time_limit_ns: opts.time_limit.as_nanos().try_into().unwrap_or(u64::MAX),
            poll_start: AtomicU64::new(now_ns()),
            env_set: AtomicBool::new(false),
            watch,
        });
        let hook_shared = shared.clone();
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(step),
            move |_, debug| hook_shared.on_hook(debug),
        )
        .map_err(internal)?;

        let matcher = shared.clone();
        super::pattern::install(
            &lua,
            Arc::new(move |lua: &Lua| matcher.check_in_c_call(lua)),
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
            let envs = shared.clone();
            helpers.raw_set(
                "set_env",
                lua.create_function(move |_, env: Table| {
                    let current = envs.current.lock();
                    match current.as_deref() {
                        Some(run) => {
                            *run.env.lock() = Some(env);
                            envs.env_set.store(true, Ordering::Relaxed);
                            Ok(true)
                        }
                        None => Ok(false),
                    }
                })?,
            )?;
            helpers.raw_set("find_module", find_module_fn(&lua, file)?)?;
            helpers.raw_set("log", log_table(&lua, file_name.clone())?)?;
            helpers.raw_set("call", call::raw_api(&lua, &opts.routes, &waits, &calls)?)?;
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
            super::huntgroup::register(&lua, &helpers, services, &waits, &calls)?;
            helpers.raw_set("wait", wait_marker())?;
            lua.load(SANDBOX)
                .set_name(format!("={INTERNAL_SOURCE}sandbox"))
                .set_mode(ChunkMode::Text)
                .call(helpers)
        };
        let budget = Arc::new(Budget::new(opts.instruction_limit));
        let bind = {
            let _g = enter_budget(&shared, &budget);
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
            let _g = enter_budget(&shared, &budget);
            main.call::<()>(())
                .map_err(|e| load_error(&e, file, &budget, opts.memory_limit))?;
        }

        let globals = lua.globals();
        let hooks = lua.create_table().map_err(internal)?;
        let mut info = HookInfo::default();
        for hook in Hook::ALL {
            match globals.raw_get::<Value>(hook.name()) {
                Ok(Value::Nil) => {}
                Ok(Value::Function(f)) => {
                    let fi = f.info();
                    info.pos[hook.index()] = Some(format!(
                        "{}:{}",
                        fi.short_src.unwrap_or_else(|| file.display.clone()),
                        fi.line_defined.unwrap_or(0)
                    ));
                    hooks.raw_set(hook.name(), f).map_err(internal)?;
                }
                Ok(other) => {
                    return Err(ScriptError::Init {
                        file: file.display.clone(),
                        line: None,
                        message: format!(
                            "`{}` must be a function, not a {}",
                            hook.name(),
                            other.type_name()
                        ),
                    })
                }
                Err(e) => return Err(internal(e)),
            }
        }
        // Every global function, for the misspelled-hook warning of `strowger check`.
        for pair in globals.pairs::<Value, Value>() {
            if let Ok((Value::String(k), Value::Function(_))) = pair {
                if let Ok(k) = k.to_str() {
                    info.functions.push(k.to_owned());
                }
            }
        }
        info.file = file.display.clone();
        // The sandbox binds the runners, then freezes the standard tables and moves the
        // globals behind the global table's metatable.
        let (runners_table, globals_meta, base, first_global, call_meta, call_private) = {
            let _g = enter_budget(&shared, &budget);
            bind.call::<(Table, Table, Table, Function, Table, Table)>(hooks)
                .map_err(internal)?
        };
        let mut runners: [Option<Function>; Hook::COUNT] = Default::default();
        for hook in Hook::ALL {
            runners[hook.index()] = runners_table.raw_get(hook.name()).map_err(internal)?;
        }

        Ok(Vm {
            shared,
            runners,
            waits,
            threads: Rc::new(ThreadPool::new(&lua).map_err(internal)?),
            calls,
            info: Arc::new(info),
            globals_meta,
            base,
            first_global,
            call_meta,
            call_private,
            depth: Cell::new(0),
            instruction_limit: opts.instruction_limit,
            memory_limit: opts.memory_limit,
            lua,
        })
    }

    /// The sandbox's runner of `hook`, if the script defines it.
    pub fn runner(&self, hook: Hook) -> Option<&Function> {
        self.runners[hook.index()].as_ref()
    }

    /// Starts `hook`'s runner with `args` in a coroutine of its own (call it inside the
    /// run's budget): the future resolves to what the hook returns, after its waits.
    pub fn start_hook<R: mlua::FromLuaMulti>(
        &self,
        hook: Hook,
        args: impl mlua::IntoLuaMulti,
    ) -> mlua::Result<HookThread<R>> {
        self.start_hook_with(hook, |_| Ok(args))
    }

    /// [`Vm::start_hook`] with arguments made from the hook's coroutine.
    pub fn start_hook_with<R: mlua::FromLuaMulti, A: mlua::IntoLuaMulti>(
        &self,
        hook: Hook,
        args: impl FnOnce(&mlua::Thread) -> mlua::Result<A>,
    ) -> mlua::Result<HookThread<R>> {
        let runner = self
            .runner(hook)
            .ok_or_else(|| LuaError::runtime(format!("the script has no {}", hook.name())))?;
        HookThread::start(&self.lua, &self.waits, &self.threads, runner, args)
    }

    /// A fresh budget for one hook run.
    pub fn budget(&self) -> Arc<Budget> {
        Arc::new(Budget::new(self.instruction_limit))
    }

    /// Runs `f` (which touches Lua) as part of the run owning `budget`: its instruction and
    /// time budgets are charged, its globals are the global environment, and the watchdog
    /// sees the VM busy.
    pub fn enter<R>(&self, budget: &Arc<Budget>, f: impl FnOnce() -> R) -> R {
        let depth = self.depth.get();
        self.depth.set(depth + 1);
        let started = now_ns();
        if depth == 0 {
            self.shared.poll_start.store(started, Ordering::Relaxed);
            self.shared.watch.set_busy(started);
        }
        let prev = self.shared.current.lock().replace(budget.clone());
        self.apply_env(budget);
        let out = f();
        let ns = now_ns().saturating_sub(started);
        budget.busy_ns.fetch_add(ns, Ordering::Relaxed);
        *self.shared.current.lock() = prev.clone();
        if let Some(prev) = prev {
            if !Arc::ptr_eq(&prev, budget) {
                self.apply_env(&prev);
            }
        }
        if depth == 0 {
            self.shared.watch.set_busy(0);
        }
        self.depth.set(depth);
        out
    }

    /// Points the global table at `budget`'s own globals, or back at the frozen ones.
    /// Cheap when neither this run nor the previous one assigned a global.
    fn apply_env(&self, budget: &Budget) {
        let env = budget.env.lock().clone();
        let set = |index: Value, newindex: Value| {
            let _ = self.globals_meta.raw_set("__index", index);
            let _ = self.globals_meta.raw_set("__newindex", newindex);
        };
        match env {
            Some(env) => {
                set(Value::Table(env.clone()), Value::Table(env));
                self.shared.env_set.store(true, Ordering::Relaxed);
            }
            None if self.shared.env_set.load(Ordering::Relaxed) => {
                set(
                    Value::Table(self.base.clone()),
                    Value::Function(self.first_global.clone()),
                );
                self.shared.env_set.store(false, Ordering::Relaxed);
            }
            None => {}
        }
    }

    /// Wraps a hook future so each poll (and its drop) runs as part of `budget`'s run.
    pub fn guard<F: Future>(self: &Rc<Self>, budget: &Arc<Budget>, fut: F) -> Guarded<F> {
        Guarded {
            vm: self.clone(),
            budget: budget.clone(),
            fut: Some(Box::pin(fut)),
        }
    }

    /// Whether Lua (or a job around it) is running on this VM right now.
    pub fn is_entered(&self) -> bool {
        self.depth.get() > 0
    }

    /// Err (the time-limit error) if `budget`'s run has used more Lua execution time than
    /// `script.time_limit_ms`: the count hook checks it between instructions, this after
    /// the run returned (its overrun may have been one long C call).
    pub fn within_time(&self, budget: &Budget) -> mlua::Result<()> {
        let limit = self.shared.time_limit_ns;
        if limit == 0 || budget.busy_ns.load(Ordering::Relaxed) <= limit {
            return Ok(());
        }
        let ms = limit / 1_000_000;
        Err(budget.stop(SPENT_TIME, || {
            format!("time limit exceeded ({ms} ms of Lua execution)")
        }))
    }

    /// Runs a full GC (twice, to also collect what finalizers freed).
    pub fn full_gc(&self, budget: &Arc<Budget>) {
        self.enter(budget, || {
            let _ = self.lua.gc_collect();
            let _ = self.lua.gc_collect();
        });
    }
}

/// Names `budget` as the running one until dropped (for loading, before the `Vm` exists).
fn enter_budget<'a>(shared: &'a VmShared, budget: &Arc<Budget>) -> EnterGuard<'a> {
    let prev = shared.current.lock().replace(budget.clone());
    shared.poll_start.store(now_ns(), Ordering::Relaxed);
    shared.watch.set_busy(now_ns());
    EnterGuard { shared, prev }
}

struct EnterGuard<'a> {
    shared: &'a VmShared,
    prev: Option<Arc<Budget>>,
}

impl Drop for EnterGuard<'_> {
    fn drop(&mut self) {
        *self.shared.current.lock() = self.prev.take();
        self.shared.watch.set_busy(0);
    }
}

/// A hook future that names its budget while polled.
pub(crate) struct Guarded<F> {
    vm: Rc<Vm>,
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
        // The finished future is dropped under the same entry (one `enter` per poll).
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
    /// The instruction budget ran out.
    Timeout,
    /// The run used up its Lua execution time (checked by the count hook).
    TimeLimit,
    /// The watchdog gave the VM up: the run was stuck where no hook could stop it.
    Abandoned,
    Memory,
}

impl FailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailKind::Error => "error",
            FailKind::Timeout => "instruction_limit",
            FailKind::TimeLimit => "time_limit",
            FailKind::Abandoned => "abandoned",
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
        let kind = match budget.spent.load(Ordering::Relaxed) {
            SPENT_TIME => FailKind::TimeLimit,
            SPENT_ABANDONED => FailKind::Abandoned,
            _ => FailKind::Timeout,
        };
        return (kind, msg);
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
        // A link (of the file or of a folder on the way) may point out of the script's
        // directory, e.g. to /etc/shadow, whose text a syntax error would then echo
        // (issue 15): only files that really are inside it load.
        let inside = match (dir.canonicalize(), dir.join(&rel).canonicalize()) {
            (Ok(d), Ok(f)) => f.starts_with(&d),
            // Missing: reported as not found below.
            _ => true,
        };
        if !inside {
            return Ok((
                None,
                Some(format!(
                    "module '{name}': '{shown}' leads out of the script's directory (a link); require loads files inside it only"
                )),
            ));
        }
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
