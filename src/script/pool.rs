//! Where Lua runs: each VM on its own OS thread, and a watchdog that gives up on a VM
//! stuck past the time limit.
//!
//! **Owns**: the VM threads (`strowger-lua`), the job queue into each, the watchdog thread
//! and the replacement of an abandoned VM. **Must not touch**: what a job does (that is
//! `hooks::run`).
//!
//! Why threads: a Lua hook can be stuck where no budget is checked (a long pattern match
//! is one C call; Lua runs `__gc` finalizers and some error handlers with hooks off). On a
//! tokio worker that would stop SIP and HTTP with it. On its own thread it costs only the
//! calls on that VM: the watchdog sees the VM busy in one entry for longer than
//! `time_limit` plus a grace, marks it abandoned (every run waiting on it fails at once,
//! the thread exits when Lua returns), and builds a fresh VM for the slot. A thread that
//! never returns stays parked in its loop; the process still exits on SIGTERM.
//!
//! The price is two hand-offs between threads per hook run (the job in, the answer out),
//! and as many when a verb's wait ends: about 6 system calls and 4 context switches per
//! call (`benches/callgrind.sh`). So with one SIP thread (the default; `script.vm_threads`
//! unset or false) the server instead runs every VM as a local task of the SIP thread
//! ([`run_vms_inline`]): no hand-off, the same budgets (instruction count, memory, time
//! checked by the count hook and by the pattern functions, `pattern.rs`; no `__gc`), and
//! one more: a run may execute Lua for 50 ms at one go (`vm.rs`), so that it holds SIP no
//! longer. One C call that runs no Lua and checks nothing (a sort without comparator)
//! still holds the thread until it returns: the watchdog then only reports it (giving the
//! VM up would not free the thread); the run fails with the time-limit error when it
//! returns.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use super::hooks::HookInfo;
use super::vm::{ScriptFile, Vm};
use super::{EngineOptions, ScriptError, ScriptStats, ScriptVersion, Services};

/// Stack of a VM thread: Lua recursion (200 C levels) and mlua callbacks.
const VM_STACK: usize = 8 * 1024 * 1024;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Monotonic nanoseconds since the first call (never 0 after the first nanosecond).
pub(crate) fn now_ns() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What the watchdog and the callers see of a VM, from any thread.
pub(crate) struct VmWatch {
    /// `now_ns()` when the VM thread entered Lua, 0 while it is not in Lua.
    busy_since: AtomicU64,
    abandoned: AtomicBool,
    dead: watch::Sender<bool>,
    /// The version and pool slot to rebuild when abandoned.
    owner: OnceLock<(Weak<ScriptVersion>, usize)>,
    /// Bytes the VM's Lua heap holds, as of its last job (the overload detector's view of
    /// how close the VM is to `script.memory_limit_kb`).
    used_memory: AtomicU64,
    /// The smallest time a job waited in this VM's queue since the overload probe last
    /// took it, in nanoseconds (`u64::MAX`: no job ran).
    queue_wait_min_ns: AtomicU64,
    /// The VM runs on the SIP thread ([`run_vms_inline`]): giving it up would not free
    /// that thread, so the watchdog only reports it (once per stuck entry, the
    /// `busy_since` it reported).
    inline: AtomicBool,
    reported_since: AtomicU64,
}

impl VmWatch {
    fn new() -> VmWatch {
        VmWatch {
            busy_since: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
            dead: watch::Sender::new(false),
            owner: OnceLock::new(),
            used_memory: AtomicU64::new(0),
            queue_wait_min_ns: AtomicU64::new(u64::MAX),
            inline: AtomicBool::new(false),
            reported_since: AtomicU64::new(0),
        }
    }

    pub fn set_busy(&self, since: u64) {
        self.busy_since.store(since, Ordering::Relaxed);
    }

    /// Bytes the VM's Lua heap held after its last job.
    pub fn used_memory(&self) -> u64 {
        self.used_memory.load(Ordering::Relaxed)
    }

    /// The smallest wait of a job in this VM's queue since the last call (`None`: no job
    /// ran meanwhile).
    pub fn take_queue_wait(&self) -> Option<Duration> {
        let ns = self.queue_wait_min_ns.swap(u64::MAX, Ordering::Relaxed);
        (ns != u64::MAX).then(|| Duration::from_nanos(ns))
    }

    /// The VM runs on the SIP thread ([`run_vms_inline`]).
    pub fn is_inline(&self) -> bool {
        self.inline.load(Ordering::Relaxed)
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Gives the VM up: `before_waiters_fail` runs (e.g. counting it) and then runs waiting
    /// on it fail, so a caller that sees its run fail also sees it counted. Returns false
    /// if it already was given up.
    fn abandon(&self, before_waiters_fail: impl FnOnce()) -> bool {
        if self.abandoned.swap(true, Ordering::Relaxed) {
            return false;
        }
        before_waiters_fail();
        self.dead.send_replace(true);
        true
    }
}

/// A job for a VM thread, with when it was queued (`now_ns()`).
type Job = (u64, Box<dyn FnOnce(&Rc<Vm>) + Send>);

/// The run could not finish: the VM was abandoned or is gone.
#[derive(Debug)]
pub(crate) struct Lost;

/// A VM as the rest of the server holds it: a queue into its thread.
pub(crate) struct VmHandle {
    jobs: mpsc::UnboundedSender<Job>,
    pub watch: Arc<VmWatch>,
    pub info: Arc<HookInfo>,
}

impl VmHandle {
    pub fn is_alive(&self) -> bool {
        !self.watch.is_abandoned() && !self.jobs.is_closed()
    }

    /// Runs `job` on the VM thread; it answers through the sender it is given.
    pub async fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Rc<Vm>, oneshot::Sender<T>) + Send + 'static,
    ) -> Result<T, Lost> {
        if self.watch.is_abandoned() {
            return Err(Lost);
        }
        let job = match self.try_run_here(job) {
            Ok(answer) => return answer.await.map_err(|_| Lost),
            Err(job) => job,
        };
        let mut dead = self.watch.dead.subscribe();
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((now_ns(), Box::new(move |vm: &Rc<Vm>| job(vm, tx))))
            .map_err(|_| Lost)?;
        tokio::select! {
            biased;
            r = rx => r.map_err(|_| Lost),
            _ = dead.wait_for(|d| *d) => Err(Lost),
        }
    }

    /// Runs `job` at once when this VM is served on this thread and idle (no trip through
    /// the queue and its task, and no queue wait to report); else gives it back.
    fn try_run_here<T: Send + 'static, J: FnOnce(&Rc<Vm>, oneshot::Sender<T>)>(
        &self,
        job: J,
    ) -> Result<oneshot::Receiver<T>, J> {
        if !self.watch.inline.load(Ordering::Relaxed) {
            return Err(job);
        }
        let Some(vm) = idle_local_vm(&self.watch) else {
            return Err(job);
        };
        let (tx, rx) = oneshot::channel();
        run_job(&self.watch, &vm, 0, |vm| job(vm, tx));
        Ok(rx)
    }
}

/// Runs a future of the VM thread: polled once at once (most hook runs finish without
/// waiting, so no task is made for them), spawned on the thread's local set otherwise.
pub(crate) fn run_local(fut: impl Future<Output = ()> + 'static) {
    let mut fut = Box::pin(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if fut.as_mut().poll(&mut cx).is_pending() {
        // The next poll registers the task's real waker (a future wakes the waker of its
        // latest poll). On a thread that serves its VMs inline the run may have started in
        // a task outside the LocalSet (`VmHandle::try_run_here`), where `spawn_local` is
        // refused: the host task spawns it.
        let fut: LocalTask = fut;
        let left = HOST.with(|h| match h.borrow().as_ref() {
            // A host that is gone (the LocalSet is stopping): the run is dropped, which
            // closes its coroutine and fails its caller.
            Some(host) => {
                let _ = host.send(fut);
                None
            }
            None => Some(fut),
        });
        if let Some(fut) = left {
            tokio::task::spawn_local(fut);
        }
    }
}

/// What building a VM needs; shared by a version's VMs and their replacements.
pub(crate) struct BuildCtx {
    pub file: ScriptFile,
    pub source: Arc<[u8]>,
    pub opts: EngineOptions,
    pub services: Services,
    pub watchdog: Option<Arc<Watchdog>>,
}

impl BuildCtx {
    /// How long loading one VM (its top-level code) may take before it is refused.
    pub fn load_timeout(&self) -> Duration {
        match self.opts.time_limit {
            d if d.is_zero() => Duration::from_secs(60),
            d => d + grace(d) + Duration::from_millis(500),
        }
    }
}

/// A future to be spawned on the thread's LocalSet: a VM's serving loop, or a hook run
/// that waits.
type LocalTask = std::pin::Pin<Box<dyn Future<Output = ()>>>;

thread_local! {
    /// Set by [`run_vms_inline`]: VMs built on this thread run as its local tasks.
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where a VM built on this thread goes to be served: a task of the LocalSet. A VM may
    /// be built from a task that is not the LocalSet's (a reload from an admin request
    /// runs on the runtime, where `spawn_local` is refused), so it is handed to this host.
    static HOST: std::cell::RefCell<Option<mpsc::UnboundedSender<LocalTask>>> =
        const { std::cell::RefCell::new(None) };
    /// The VMs served on this thread, by the address of their [`VmWatch`]: a job submitted
    /// here to one of them that is idle runs at once (see [`VmHandle::submit`]).
    static LOCAL_VMS: std::cell::RefCell<Vec<(usize, Rc<Vm>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn watch_key(watch: &Arc<VmWatch>) -> usize {
    Arc::as_ptr(watch) as usize
}

/// The VM of `watch` if it is served on this thread and not running anything.
fn idle_local_vm(watch: &Arc<VmWatch>) -> Option<Rc<Vm>> {
    let key = watch_key(watch);
    LOCAL_VMS.with(|vms| {
        vms.borrow()
            .iter()
            .find(|(k, vm)| *k == key && !vm.is_entered())
            .map(|(_, vm)| vm.clone())
    })
}

/// VMs built on this thread afterwards run as tasks of the thread's
/// [`tokio::task::LocalSet`] (which must be running them) rather than on threads of their
/// own. The server does this with `script.vm_threads = false`; test mode (`strowger
/// test`) always: a paused tokio clock then covers the script too (Lua runs while the
/// runtime is busy, so the clock cannot jump in the middle of a hook, and a verb's wait,
/// a 20 s ring, takes no wall time).
///
/// Call it from within the LocalSet (e.g. the future given to `LocalSet::block_on`).
pub fn run_vms_inline() {
    INLINE.with(|c| c.set(true));
    let (host, mut tasks) = mpsc::unbounded_channel::<LocalTask>();
    HOST.with(|h| *h.borrow_mut() = Some(host));
    tokio::task::spawn_local(async move {
        while let Some(task) = tasks.recv().await {
            tokio::task::spawn_local(task);
        }
    });
}

/// Whether VMs built on this thread run inline ([`run_vms_inline`]).
pub(crate) fn inline_here() -> bool {
    INLINE.with(|c| c.get())
}

/// Starts a VM thread that loads the script; `ready` gets the result (return false from
/// it to have the thread exit, e.g. when nobody waits any more). In test mode
/// ([`run_vms_inline`]) the VM is built at once on this thread and `ready` is called
/// before this returns.
pub(crate) fn spawn_vm(
    ctx: Arc<BuildCtx>,
    ready: impl FnOnce(Result<Arc<VmHandle>, ScriptError>) -> bool + Send + 'static,
) {
    if inline_here() {
        if let Some((vm, queue, watch)) = build_vm(&ctx, ready) {
            watch.inline.store(true, Ordering::Relaxed);
            let key = watch_key(&watch);
            LOCAL_VMS.with(|vms| vms.borrow_mut().push((key, vm.clone())));
            let task: LocalTask = Box::pin(async move {
                serve_vm(vm, queue, watch).await;
                LOCAL_VMS.with(|vms| vms.borrow_mut().retain(|(k, _)| *k != key));
            });
            let hosted = HOST.with(|h| match h.borrow().as_ref() {
                Some(host) => host.send(task).map_err(|e| e.0),
                None => Err(task),
            });
            if let Err(task) = hosted {
                // The host is gone (the LocalSet is shutting down): nothing will run the
                // VM; dropping it fails every run sent to it.
                drop(task);
                tracing::warn!(target: "script", "a Lua VM was built while its thread stops: not served");
            }
        }
        return;
    }
    // The VM logs where its creator logs (the global subscriber in the server; a test's
    // own subscriber in tests).
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    let spawned = std::thread::Builder::new()
        .name("strowger-lua".into())
        .stack_size(VM_STACK)
        .spawn(move || {
            let _log = tracing::dispatcher::set_default(&dispatch);
            vm_thread(ctx, ready)
        });
    if let Err(e) = spawned {
        tracing::error!(target: "script", error = %e, "cannot start a Lua VM thread");
    }
}

fn vm_thread(ctx: Arc<BuildCtx>, ready: impl FnOnce(Result<Arc<VmHandle>, ScriptError>) -> bool) {
    // Timers only (a verb's future may sleep): without an I/O driver the thread parks on
    // a futex, cheaper than epoll.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ready(Err(ScriptError::Internal(format!(
                "VM thread runtime: {e}"
            ))));
            return;
        }
    };
    let Some((vm, queue, watch)) = build_vm(&ctx, ready) else {
        return;
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve_vm(vm.clone(), queue, watch));
    // Suspended hooks are dropped here, each closing its coroutine on this thread.
    drop(local);
    drop(vm);
}

type JobQueue = mpsc::UnboundedReceiver<Job>;

/// Loads the script into a new VM and hands its handle to `ready`; `None` when loading
/// failed or nobody wants the VM any more.
fn build_vm(
    ctx: &Arc<BuildCtx>,
    ready: impl FnOnce(Result<Arc<VmHandle>, ScriptError>) -> bool,
) -> Option<(Rc<Vm>, JobQueue, Arc<VmWatch>)> {
    let watch = Arc::new(VmWatch::new());
    if let Some(w) = &ctx.watchdog {
        w.register(&watch);
    }
    let vm = match Vm::new(
        &ctx.file,
        &ctx.source,
        &ctx.opts,
        &ctx.services,
        watch.clone(),
    ) {
        Ok(vm) => Rc::new(vm),
        Err(e) => {
            ready(Err(e));
            return None;
        }
    };
    let (jobs, queue) = mpsc::unbounded_channel::<Job>();
    let handle = Arc::new(VmHandle {
        jobs,
        watch: watch.clone(),
        info: vm.info.clone(),
    });
    if !ready(Ok(handle)) {
        return None;
    }
    Some((vm, queue, watch))
}

/// Runs a VM's jobs until it is abandoned or its queue closes.
async fn serve_vm(vm: Rc<Vm>, mut queue: JobQueue, watch: Arc<VmWatch>) {
    let mut dead = watch.dead.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = dead.wait_for(|d| *d) => break,
            job = queue.recv() => match job {
                Some((queued, job)) => {
                    run_job(&watch, &vm, now_ns().saturating_sub(queued), job);
                }
                None => break,
            },
        }
    }
}

/// Runs one job on `vm` and notes what the overload detector reads: how long it waited
/// to run, and the VM's heap after it.
fn run_job(watch: &VmWatch, vm: &Rc<Vm>, waited_ns: u64, job: impl FnOnce(&Rc<Vm>)) {
    watch
        .queue_wait_min_ns
        .fetch_min(waited_ns, Ordering::Relaxed);
    job(vm);
    let used = vm.lua.used_memory() as u64;
    watch.used_memory.store(used, Ordering::Relaxed);
}

/// How much longer than the time limit an entry into Lua may last before the VM is
/// abandoned: the count hook stops ordinary runs at the limit itself.
fn grace(limit: Duration) -> Duration {
    (limit / 2).max(Duration::from_millis(100))
}

/// Watches every VM of an engine for an entry into Lua that lasts too long.
pub(crate) struct Watchdog {
    vms: Mutex<Vec<Weak<VmWatch>>>,
    abandon_after: Duration,
    stats: Arc<ScriptStats>,
}

impl Watchdog {
    /// Starts the watchdog thread (None when there is no time limit).
    pub fn start(limit: Duration, stats: Arc<ScriptStats>) -> Option<Arc<Watchdog>> {
        if limit.is_zero() {
            return None;
        }
        let dog = Arc::new(Watchdog {
            vms: Mutex::new(Vec::new()),
            abandon_after: limit + grace(limit),
            stats,
        });
        let tick = (limit / 5).clamp(Duration::from_millis(10), Duration::from_millis(200));
        let weak = Arc::downgrade(&dog);
        let spawned = std::thread::Builder::new()
            .name("strowger-lua-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                match weak.upgrade() {
                    Some(dog) => dog.scan(),
                    None => return,
                }
            });
        if let Err(e) = spawned {
            tracing::error!(target: "script", error = %e, "cannot start the Lua watchdog thread");
        }
        Some(dog)
    }

    fn register(&self, vm: &Arc<VmWatch>) {
        self.vms.lock().push(Arc::downgrade(vm));
    }

    fn scan(&self) {
        let now = now_ns();
        let limit = u64::try_from(self.abandon_after.as_nanos()).unwrap_or(u64::MAX);
        let mut stuck = Vec::new();
        self.vms.lock().retain(|w| {
            let Some(vm) = w.upgrade() else {
                return false;
            };
            if vm.is_abandoned() {
                return false;
            }
            let since = vm.busy_since.load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since) > limit {
                if vm.inline.load(Ordering::Relaxed) {
                    if vm.reported_since.swap(since, Ordering::Relaxed) != since {
                        tracing::error!(
                            target: "script",
                            after_ms = self.abandon_after.as_millis() as u64,
                            "a Lua hook is stuck on the SIP thread in one library call that checks no budget (e.g. a sort of a large table): SIP waits until it returns; its call then fails (script.vm_threads = true would confine this to the VM)"
                        );
                    }
                    return true;
                }
                stuck.push(vm);
                return false;
            }
            true
        });
        for vm in stuck {
            if !vm.abandon(|| {
                self.stats.vms_abandoned.fetch_add(1, Ordering::Relaxed);
            }) {
                continue;
            }
            tracing::error!(
                target: "script",
                after_ms = self.abandon_after.as_millis() as u64,
                "a Lua VM was stuck past the time limit where no hook can stop it: abandoned; a fresh one replaces it"
            );
            if let Some((version, slot)) = vm.owner.get() {
                if let Some(version) = version.upgrade() {
                    version.replace_vm(*slot);
                }
            }
        }
    }
}

/// Records which version and slot `handle` serves (so it can be replaced).
pub(crate) fn set_owner(handle: &VmHandle, version: &Arc<ScriptVersion>, slot: usize) {
    let _ = handle.watch.owner.set((Arc::downgrade(version), slot));
}

/// Loads `n` VMs in parallel, each on its own thread, and waits for all (blocking: call
/// it off the SIP and HTTP threads).
pub(crate) fn load_blocking(
    ctx: &Arc<BuildCtx>,
    n: usize,
) -> Result<Vec<Arc<VmHandle>>, ScriptError> {
    let receivers: Vec<_> = (0..n)
        .map(|_| {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            spawn_vm(ctx.clone(), move |r| tx.send(r).is_ok());
            rx
        })
        .collect();
    let deadline = Instant::now() + ctx.load_timeout();
    let mut vms = Vec::with_capacity(n);
    for rx in receivers {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => vms.push(r?),
            Err(_) => {
                return Err(ScriptError::Init {
                    file: ctx.file.display.clone(),
                    line: None,
                    message: format!(
                        "the top-level code did not finish within {} ms (script.time_limit_ms)",
                        ctx.load_timeout().as_millis()
                    ),
                })
            }
        }
    }
    Ok(vms)
}
