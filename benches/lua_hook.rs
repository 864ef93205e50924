//! Lua hook overhead per call: what `on_invite` costs the server beyond the SIP work, for
//! the shipped dial plan's shape (look up the extension, dial it, answered). The dial is
//! answered at once by a fake `CallControl`, so the figure is the script engine's own cost:
//! taking a pooled VM, building the `call` object, running the hook, returning the outcome.
//! Target (issue 3): under 5 us per call.
//!
//! The server's allocator (mimalloc, `src/allocator.rs`) is this bench's too: Lua's heap goes
//! through it, and with the system allocator a fifth of the time was glibc's malloc.
//!
//! With `script.vm_threads = true` each VM runs on its own thread, so a hook run is two
//! hand-offs between threads. Two figures:
//! - `on_invite dial plan ...`: one call at a time, waiting for each: the latency of one
//!   hook run, including both thread wake-ups (scheduler latency dominates it);
//! - `... 64 calls in flight`: 64 calls started together and awaited, per call: the cost
//!   of a hook run when the server is busy (the VM thread drains its queue without
//!   sleeping between calls), which is what a call costs the server.
//!
//! - `... VM on the calling thread`: the default (`script.vm_threads` unset with one SIP
//!   worker), the VM a local task of the thread that runs the hook (the SIP thread in the
//!   server): no hand-off.
//!
//! Run: cargo bench --bench lua_hook (PLAN_FILE=other.lua to measure another plan)
//!
//! `LUA_HOOK_CALLS=n`: no criterion; n hook runs with the VM on the calling thread (after
//! 2,000 to warm up) in `measured_calls`, then the time per run. `bash
//! benches/lua_hook_callgrind.sh` runs that under callgrind for the instructions per
//! `on_invite`, the figure the machine's load does not move.

mod counting;

use criterion::{criterion_group, Criterion, Throughput};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use strowger::b2bua::{
    CallControl, CallInfo, DialOptions, DialOutcome, DialSource, DialTarget, HeaderList, UriInfo,
};
use strowger::script::{EngineOptions, ScriptEngine};

#[global_allocator]
static GLOBAL: strowger::allocator::Allocator = strowger::allocator::Allocator;

struct AnswerAtOnce;

impl CallControl for AnswerAtOnce {
    fn dial(
        &self,
        _targets: Vec<DialTarget>,
        _opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        Box::pin(async {
            DialOutcome {
                answered: true,
                status: 200,
                reason: "OK".into(),
                source: DialSource::Callee,
                target: Some(0),
            }
        })
    }
}

const PLAN: &str = r#"
local extensions = {}
for n = 1000, 1099 do extensions[tostring(n)] = "sip:" .. n .. "@127.0.0.1:5080" end
function on_invite(call)
  local target = extensions[call.ruri.user]
  if not target then
    call:reject(404, "No such extension")
    return
  end
  local r = call:dial(target, { timeout = 20 })
  if not r.answered then call:reject(r.status, r.reason) end
end
"#;

/// The facts of call `n`, made as the B2BUA makes them from a parsed INVITE (text written
/// into presized strings, not through `format!`).
fn call_info(n: u64) -> CallInfo {
    let uri = |user: &str| UriInfo {
        uri: ["sip:", user, "@127.0.0.1"].concat(),
        user: Some(user.into()),
        host: "127.0.0.1".into(),
    };
    // Filled from the INVITE's parsed headers, as the B2BUA does.
    let headers = HeaderList::of(
        [
            ("Contact", "<sip:alice@127.0.0.1:5061>"),
            ("Content-Type", "application/sdp"),
        ]
        .into_iter(),
    );
    CallInfo {
        id: ["bench-", itoa::Buffer::new().format(n)].concat(),
        from: uri("alice"),
        to: uri("1042"),
        ruri: uri("1042"),
        source: "udp:127.0.0.1:5061".into(),
        headers,
        trunk: None,
    }
}

/// CPU time of the whole process (user + system, every thread) from /proc/self/stat, in
/// clock ticks of 10 ms (Linux's USER_HZ): the cost a call puts on the machine, whatever
/// thread it ran on, without the time spent waiting for a scheduler.
fn process_cpu() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// Prints the CPU per `on_invite` over `calls` calls, one at a time and 64 in flight.
fn cpu_per_call(
    rt: &tokio::runtime::Runtime,
    engine: &ScriptEngine,
    control: &Arc<dyn CallControl>,
    calls: u64,
) {
    let (Some(start), mut n) = (process_cpu(), 0u64) else {
        return;
    };
    for _ in 0..calls {
        n += 1;
        let out = rt.block_on(engine.current().on_invite(call_info(n), control.clone()));
        std::hint::black_box(out);
    }
    let one = process_cpu().unwrap_or(start) - start;
    let start = process_cpu().unwrap_or_default();
    for _ in 0..calls / 64 {
        let version = engine.current();
        let outs = rt.block_on(async {
            let mut runs = tokio::task::JoinSet::new();
            for _ in 0..64 {
                n += 1;
                runs.spawn(version.on_invite(call_info(n), control.clone()));
            }
            runs.join_all().await
        });
        std::hint::black_box(outs);
    }
    let batch = process_cpu().unwrap_or(start) - start;
    println!(
        "CPU per on_invite (process, all threads; {calls} calls): one at a time {:.1} us, 64 in flight {:.1} us",
        one.as_secs_f64() * 1e6 / calls as f64,
        batch.as_secs_f64() * 1e6 / (calls / 64 * 64) as f64,
    );
}

/// The dial plan in a temporary folder (the folder, the file): the bench's own, or
/// `PLAN_FILE`'s (another dial plan, e.g. an empty on_invite: the fixed cost).
fn write_plan() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("strowger-bench-lua-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("plan.lua");
    let plan = match std::env::var("PLAN_FILE") {
        Ok(file) => std::fs::read_to_string(&file).expect("PLAN_FILE is readable"),
        Err(_) => PLAN.to_owned(),
    };
    std::fs::write(&path, plan).expect("write plan");
    (dir, path)
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One VM served inline on `local` (`script.vm_threads = false`, the default).
fn inline_engine(
    rt: &tokio::runtime::Runtime,
    local: &tokio::task::LocalSet,
    path: &std::path::Path,
) -> ScriptEngine {
    local
        .block_on(rt, async {
            strowger::script::run_vms_inline();
            let mut opts = EngineOptions::new(path);
            opts.pool_size = 1;
            ScriptEngine::load(opts)
        })
        .expect("plan loads")
}

fn bench(c: &mut Criterion) {
    let (dir, path) = write_plan();
    let rt = current_thread_runtime();
    let engine = rt
        .block_on(async { ScriptEngine::load(EngineOptions::new(&path)) })
        .expect("plan loads");
    let control: Arc<dyn CallControl> = Arc::new(AnswerAtOnce);
    cpu_per_call(&rt, &engine, &control, 50_000);
    let mut n = 0u64;
    c.bench_function("on_invite dial plan (lookup + dial answered)", |b| {
        b.iter(|| {
            n += 1;
            let version = engine.current();
            let outcome = rt.block_on(version.on_invite(call_info(n), control.clone()));
            std::hint::black_box(outcome);
        })
    });
    const IN_FLIGHT: u64 = 64;
    // One VM, so that the figure is one VM thread's work per call.
    let one_vm = rt
        .block_on(async {
            let mut opts = EngineOptions::new(&path);
            opts.pool_size = 1;
            ScriptEngine::load(opts)
        })
        .expect("plan loads");
    let mut group = c.benchmark_group("on_invite dial plan, 64 calls in flight on one VM");
    group.throughput(Throughput::Elements(IN_FLIGHT));
    group.bench_function("per batch", |b| {
        b.iter(|| {
            let version = one_vm.current();
            let outcomes = rt.block_on(async {
                let mut runs = tokio::task::JoinSet::new();
                for _ in 0..IN_FLIGHT {
                    n += 1;
                    runs.spawn(version.on_invite(call_info(n), control.clone()));
                }
                runs.join_all().await
            });
            std::hint::black_box(outcomes);
        })
    });
    group.finish();
    inline(c, &path, &control);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `script.vm_threads = false`: the VMs are local tasks of the thread that runs the hooks
/// (the SIP thread in the server), so a hook run is no hand-off at all.
fn inline(c: &mut Criterion, path: &std::path::Path, control: &Arc<dyn CallControl>) {
    let rt = current_thread_runtime();
    let local = tokio::task::LocalSet::new();
    let engine = inline_engine(&rt, &local, path);
    let calls = 50_000u64;
    let mut n = 0u64;
    if let Some(start) = process_cpu() {
        let wall = std::time::Instant::now();
        local.block_on(&rt, async {
            for _ in 0..calls {
                n += 1;
                let out = engine
                    .current()
                    .on_invite(call_info(n), control.clone())
                    .await;
                std::hint::black_box(out);
            }
        });
        let cpu = process_cpu().unwrap_or(start) - start;
        println!(
            "VMs on the calling thread (script.vm_threads = false; {calls} calls one at a time): {:.1} us per on_invite, process CPU {:.1} us",
            wall.elapsed().as_secs_f64() * 1e6 / calls as f64,
            cpu.as_secs_f64() * 1e6 / calls as f64,
        );
    }
    c.bench_function(
        "on_invite dial plan, VM on the calling thread (script.vm_threads = false)",
        |b| {
            b.iter(|| {
                n += 1;
                let version = engine.current();
                let outcome = local.block_on(&rt, version.on_invite(call_info(n), control.clone()));
                std::hint::black_box(outcome);
            })
        },
    );
}

/// Hook runs `from..from + calls`, one at a time, the VM on the calling thread: what
/// `LUA_HOOK_CALLS` measures (callgrind counts only inside this function).
#[inline(never)]
fn measured_calls(
    rt: &tokio::runtime::Runtime,
    local: &tokio::task::LocalSet,
    engine: &ScriptEngine,
    control: &Arc<dyn CallControl>,
    from: u64,
    calls: u64,
) {
    local.block_on(rt, async {
        for n in from..from + calls {
            let out = engine
                .current()
                .on_invite(call_info(n), control.clone())
                .await;
            std::hint::black_box(out);
        }
    });
}

/// `LUA_HOOK_CALLS=n`: see the module's documentation.
fn calls_only(calls: u64) {
    let (dir, path) = write_plan();
    let rt = current_thread_runtime();
    let local = tokio::task::LocalSet::new();
    let engine = inline_engine(&rt, &local, &path);
    let control: Arc<dyn CallControl> = Arc::new(AnswerAtOnce);
    const WARM_UP: u64 = 2_000;
    measured_calls(&rt, &local, &engine, &control, 0, WARM_UP);
    let start = std::time::Instant::now();
    measured_calls(&rt, &local, &engine, &control, WARM_UP, calls);
    println!(
        "{calls} calls after {WARM_UP} to warm up: {:.2} us per on_invite",
        start.elapsed().as_secs_f64() * 1e6 / calls.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);

fn main() {
    counting::main_with("LUA_HOOK_CALLS", calls_only, benches);
}
