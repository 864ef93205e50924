//! Script safety (issue 13, item 15): a hook stuck where no instruction hook runs, a
//! slow top level, and changes one call makes to the environment the next call sees.
//! Each test would hang (or see the change) without the fix; they are bounded by
//! `tokio::time::timeout` so that they fail instead.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn write_script(src: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "strowger-safety-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("main.lua");
    std::fs::write(&path, src).unwrap();
    path
}

fn opts(path: &std::path::Path, time_limit_ms: u64) -> EngineOptions {
    let mut o = EngineOptions::new(path);
    o.pool_size = 1;
    o.time_limit = Duration::from_millis(time_limit_ms);
    o
}

fn engine(src: &str, time_limit_ms: u64) -> ScriptEngine {
    ScriptEngine::load(opts(&write_script(src), time_limit_ms)).unwrap()
}

/// A call control nobody answers (these scripts never dial).
struct NoDial;

impl CallControl for NoDial {
    fn dial(
        &self,
        _targets: Vec<DialTarget>,
        _opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        Box::pin(std::future::pending())
    }
}

fn call(user: &str, headers: Vec<(String, String)>) -> CallInfo {
    let uri = UriInfo {
        uri: format!("sip:{user}@example.com"),
        user: Some(user.into()),
        host: "example.com".into(),
    };
    CallInfo {
        id: format!("call-{user}"),
        from: uri.clone(),
        to: uri.clone(),
        ruri: uri,
        source: "udp:192.0.2.7:5060".into(),
        headers: headers.into(),
        trunk: None,
    }
}

/// Runs `on_invite` for `user`, failing the test if it takes more than 10 s.
async fn invite(e: &ScriptEngine, user: &str, headers: Vec<(String, String)>) -> InviteOutcome {
    let run = e.current().on_invite(call(user, headers), Arc::new(NoDial));
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the hook run ends within 10 s")
}

#[track_caller]
fn status(outcome: &InviteOutcome) -> (u16, String) {
    match outcome {
        InviteOutcome::Rejected { status, reason, .. } => (*status, reason.clone()),
        InviteOutcome::Failed { error, .. } => (500, error.clone()),
        other => panic!("unexpected {other:?}"),
    }
}

const PLAN: &str = r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "xpcall" then
    xpcall(function() error("x") end, function() while true do end end)
  elseif u == "gc" then
    setmetatable({}, { __gc = function() while true do end end })
    collectgarbage()
  elseif u == "trim" then
    local s = "x" .. string.rep(" ", 30000) .. "y"
    s = s:match("^%s*(.-)%s*$")
  elseif u == "bigsort" then
    -- One C call that runs no Lua (a second or so): no budget is checked inside it.
    local s = string.rep("qwertyuiopasdfghjklzxcvbnm", 34000)
    local t = { s:byte(1, -1) }
    table.move(t, 1, #t, #t + 1)
    table.sort(t)
  elseif u == "subject" then
    local s = call:header("Subject")
    local t = s:match("^%s*(.-)%s*$")
    call:reject(486, "subject " .. #s .. " " .. #t)
    return
  end
  call:reject(486, "fine")
end
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_xpcall_handler_fails_its_call_only() {
    let e = engine(PLAN, 1000);
    let started = Instant::now();
    let out = invite(&e, "xpcall", vec![]).await;
    let (code, text) = status(&out);
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("instruction limit exceeded"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status(&invite(&e, "next", vec![]).await).1, "fine");
    assert_eq!(e.stats().vms_abandoned.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_finalizer_cannot_be_installed() {
    let e = engine(PLAN, 1000);
    let out = invite(&e, "gc", vec![]).await;
    let (code, text) = status(&out);
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("__gc"), "{text}");
    assert!(text.contains("main.lua:7:"), "{text}");
    assert_eq!(status(&invite(&e, "next", vec![]).await).1, "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pattern_match_fails_at_the_time_limit() {
    // 50 ms of Lua per run: the match below would take about a second; the pattern
    // functions check the time as they go (`pattern.rs`).
    let e = engine(PLAN, 50);
    let started = Instant::now();
    let (code, text) = status(&invite(&e, "trim", vec![]).await);
    let took = started.elapsed();
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("time limit exceeded (50 ms"), "{text}");
    assert!(text.contains("main.lua:"), "names the line: {text}");
    assert!(took < Duration::from_millis(500), "failed after {took:?}");
    assert_eq!(e.stats().vms_abandoned.load(Ordering::Relaxed), 0);
    assert_eq!(status(&invite(&e, "next", vec![]).await).1, "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_stuck_in_one_library_call_costs_its_vm_not_the_engine() {
    // 50 ms of Lua per run: the sort takes far longer, and no budget is checked in it.
    let e = engine(PLAN, 50);
    let started = Instant::now();
    let out = invite(&e, "bigsort", vec![]).await;
    let took = started.elapsed();
    let (code, text) = status(&out);
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("time limit exceeded"), "{text}");
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
    assert_eq!(e.stats().vms_abandoned.load(Ordering::Relaxed), 1);
    assert!(e.stats().time_limits.load(Ordering::Relaxed) >= 1);
    // The pool's only VM is replaced by a fresh one: the next calls work.
    let mut next = None;
    for _ in 0..200 {
        let out = invite(&e, "next", vec![]).await;
        if status(&out).0 == 486 {
            next = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&next.expect("a fresh VM serves")).1, "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_reach_lua_bounded() {
    let e = engine(PLAN, 1000);
    // Backtracking makes the trim quadratic in the spaces between two words.
    let subject = format!("x{}y", " ".repeat(60_000));
    let started = Instant::now();
    let out = invite(&e, "subject", vec![("Subject".into(), subject)]).await;
    assert_eq!(
        status(&out),
        (486, format!("subject {MAX_HEADER_VALUE} 1")),
        "the value is cut to {MAX_HEADER_VALUE} bytes"
    );
    // Trimming 4 KiB of spaces is cheap; 60 KB took seconds.
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(bounded("é".repeat(3000).as_str()).len(), MAX_HEADER_VALUE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_sees_a_pristine_environment() {
    let e = engine(
        r#"
        counter_at_load = 0
        function string.shout(s) return s:upper() .. "!" end  -- top level may extend
        local function changes()
          local refused = {}
          local function try(what, f)
            local ok = pcall(f)
            if not ok then refused[#refused + 1] = what end
          end
          try("string", function() string.upper = function() return "evil" end end)
          try("table", function() table.concat = nil end)
          try("math", function() math.pi = 3 end)
          try("metatable", function() getmetatable("").__index = { upper = function() return "evil" end } end)
          try("setmetatable", function() setmetatable(_G, {}) end)
          try("rawset", function() rawset(_G, "tenant", "evil") end)
          try("rawset string", function() rawset(string, "upper", nil) end)
          tenant = "acme"
          counter_at_load = counter_at_load + 1
          return table.concat(refused, ",")
        end
        function on_invite(call)
          if call.ruri.user == "change" then
            local refused = changes()
            call.vars.tenant_seen = tenant
            call:reject(486, refused)
            return
          end
          call:reject(486, table.concat({
            ("abc"):upper(), tostring(tenant), tostring(counter_at_load),
            tostring(math.pi > 3.14), ("x"):shout(), tostring(rawget(_G, "tenant")),
          }, " "))
        end
        function on_call_end(call)
          -- the call's own globals carry to its other hooks
          log.info("end sees", tenant, call.vars.tenant_seen)
        end
        "#,
        1000,
    );
    let out = invite(&e, "change", vec![]).await;
    assert_eq!(
        status(&out).1,
        "string,table,math,metatable,setmetatable,rawset,rawset string"
    );
    for _ in 0..3 {
        let out = invite(&e, "check", vec![]).await;
        assert_eq!(status(&out).1, "ABC nil 0 true X! nil");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_top_level_is_refused_in_bounded_time() {
    // One C call (a sort of 3.5 million numbers, two seconds or so) at top level: no
    // budget is checked in it.
    let slow = "local s = string.rep('qwertyuiopasdfghjklzxcvbnm', 34000)\nlocal t = { s:byte(1, -1) }\nfor _ = 1, 2 do table.move(t, 1, #t, #t + 1) end\ntable.sort(t)\nfunction on_invite(call) end\n";
    let unlimited = |path: &std::path::Path| {
        let mut o = opts(path, 100);
        o.memory_limit = 0;
        o
    };
    let path = write_script(slow);
    let started = Instant::now();
    let err = ScriptEngine::check(&unlimited(&path)).expect_err("refused");
    assert!(err.to_string().contains("did not finish"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A reload of such a script is refused without stalling the caller's runtime.
    let ok = write_script("function on_invite(call) call:reject(486, 'v1') end");
    let e = ScriptEngine::load(unlimited(&ok)).unwrap();
    std::fs::write(&ok, slow).unwrap();
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let reload = tokio::time::timeout(Duration::from_secs(5), e.reload())
        .await
        .expect("reload ends");
    assert!(reload.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        ticks.load(Ordering::Relaxed) >= 5,
        "the runtime kept running"
    );
    ticker.abort();
    assert_eq!(e.current().version(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_misspelled_hooks() {
    let path = write_script(
        "function onInvite(call) end\nfunction on_regster(req) end\nfunction helper() end\n",
    );
    let info = ScriptEngine::check(&EngineOptions::new(&path)).unwrap();
    let warnings = info.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].contains("no on_invite"), "{warnings:?}");
    assert!(warnings
        .iter()
        .any(|w| w.contains("`onInvite`") && w.contains("`on_invite`")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("`on_regster`") && w.contains("`on_register`")));
}

/// Hooks that run long with the VMs on the calling thread (`script.vm_threads = false`).
const LONG_PLAN: &str = r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "loop" then
    local n = 0
    while true do n = n + 1 end
  elseif u == "sort" then
    local t = { 3, 1, 2 }
    table.sort(t, function(a, b) while true do end end)
  elseif u == "in-coroutine" then
    coroutine.wrap(function() while true do end end)()
  elseif u == "trim" then
    local s = "x" .. string.rep(" ", 30000) .. "y"
    s = s:match("^%s*(.-)%s*$")
  end
  call:reject(486, "fine")
end
"#;

/// Runs `f` with the engine's VMs served on this thread, as the server does with
/// `script.vm_threads = false`.
async fn on_this_thread<F: Future>(f: impl FnOnce() -> F) -> F::Output {
    tokio::task::LocalSet::new()
        .run_until(async move {
            run_vms_inline();
            f().await
        })
        .await
}

#[tokio::test(flavor = "current_thread")]
async fn on_the_sip_thread_a_hook_computes_50_ms_at_one_go_at_most() {
    on_this_thread(|| async {
        // No instruction budget and 5 s of Lua per run: only the stretch limit stops these.
        let mut o = opts(&write_script(LONG_PLAN), 5000);
        o.instruction_limit = 0;
        let e = ScriptEngine::load(o).unwrap();
        for user in ["loop", "sort", "in-coroutine", "trim"] {
            let started = Instant::now();
            let (code, text) = status(&invite(&e, user, vec![]).await);
            let took = started.elapsed();
            assert_eq!(code, 500, "{user}: {text}");
            assert!(
                text.contains("ran 50 ms at one go on the SIP thread"),
                "{user}: {text}"
            );
            assert!(text.contains("main.lua:"), "{user}: names the line: {text}");
            assert!(took < Duration::from_millis(400), "{user}: {took:?}");
        }
        assert_eq!(status(&invite(&e, "next", vec![]).await).1, "fine");
        assert_eq!(e.stats().vms_abandoned.load(Ordering::Relaxed), 0);
        assert_eq!(e.stats().time_limits.load(Ordering::Relaxed), 4);
    })
    .await;
}
