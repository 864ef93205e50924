//! Script safety end to end: a Lua error, a runaway loop and a memory bomb each fail only
//! their own call with 500 and are counted; the next call still runs. Reload while a call
//! is up: the call keeps its version and ends normally; new calls use the new script; a
//! broken script is refused and the running one stays.
//!
//! Issue 13 (item 15), hooks stuck where no instruction budget is checked: a looping
//! `xpcall` handler, a looping `__gc` finalizer, a quadratic pattern match (on a
//! caller-supplied header, and on a string the script makes), a long sort in one C call, a
//! slow top level at reload. Each fails its own call (or reload) while SIP and the admin API keep being
//! served, and SIGTERM still stops the real binary. These run on a current-thread runtime:
//! before the fix a stuck hook held the runtime's only thread, so they hung (a watchdog
//! thread turns a hang into a failure).

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

const PLAN: &str = r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "error" then
    error("deliberate failure")
  elseif u == "loop" then
    while true do end
  elseif u == "bomb" then
    local t = {}
    for i = 1, 100000000 do t[i] = string.rep("x", 1024) .. i end
  elseif u == "version" then
    call:reject(486, "Busy from version one")
  else
    call:reject(486, "Busy Here")
  end
end
"#;

async fn start(plan: &str) -> (TestServer, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(unique("strowger-safety"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plan.lua");
    std::fs::write(&path, plan).unwrap();
    let mut config = test_config();
    config.script.path = path.display().to_string();
    config.script.instruction_limit = 1_000_000;
    config.script.memory_limit_kb = 8 * 1024;
    (start_with(config).await, path)
}

/// Sends an INVITE to `user` and returns the final response; ACKs it (hop by hop).
async fn invite(server: &TestServer, peer: &UdpPeer, user: &str) -> String {
    invite_with(server, peer, user, "").await
}

/// Like [`invite`], with extra header lines (each ending in CRLF).
async fn invite_with(server: &TestServer, peer: &UdpPeer, user: &str, extra: &str) -> String {
    let call_id = unique("safety");
    let inv = request(
        "INVITE",
        &format!("sip:{user}@strowger.test"),
        peer.addr,
        "UDP",
        &call_id,
        &format!("Contact: <sip:caller@127.0.0.1>\r\nContent-Type: application/sdp\r\n{extra}"),
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n",
    );
    peer.send(server.udp, inv.as_bytes()).await;
    // The final response to this INVITE: retransmissions of earlier calls' answers (they
    // are not ACKed here) can arrive on the same socket meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let resp = peer.recv_final(left).await.expect("a final response");
        if header(&resp, "Call-ID") == Some(call_id.as_str()) {
            return resp;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_failures_give_500_and_the_next_call_works() {
    let (server, _path) = start(PLAN).await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let stats = server.handle.scripts().stats();
    for (user, what) in [
        ("error", "Lua error"),
        ("loop", "runaway loop"),
        ("bomb", "memory bomb"),
    ] {
        let before = stats.hook_errors_total.load(Ordering::Relaxed);
        let resp = invite(&server, &peer, user).await;
        assert_eq!(status(&resp), 500, "{what}: {resp}");
        assert!(
            stats.hook_errors_total.load(Ordering::Relaxed) > before,
            "{what} is counted: {resp}"
        );
        // The next call runs the script normally.
        let resp = invite(&server, &peer, "alice").await;
        assert_eq!(status(&resp), 486, "after the {what}: {resp}");
        assert_eq!(reason(&resp), "Busy Here");
    }
    assert_eq!(stats.hook_timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(stats.memory_errors.load(Ordering::Relaxed), 1);
    // The same figures on /metrics.
    // A call is counted when it is over, just after its final response went out.
    for _ in 0..100 {
        if server.handle.active_calls() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = strowger::admin::get(server.handle.admin_addr(), "/metrics")
        .await
        .unwrap();
    assert!(
        m.contains(r#"strowger_script_errors_total{hook="on_invite"} 3"#),
        "{m}"
    );
    assert!(
        m.contains("strowger_calls_failed_total{class=\"5xx\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("strowger_calls_failed_total{class=\"4xx\"} 3"),
        "{m}"
    );
    assert!(m.contains("strowger_calls_total 6"), "{m}");
    assert!(
        m.contains("strowger_sip_requests_total{direction=\"in\",method=\"INVITE\"}"),
        "{m}"
    );
    assert!(m.contains("strowger_process_open_fds"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_new_calls_and_refuses_a_broken_script() {
    let (server, path) = start(PLAN).await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let resp = invite(&server, &peer, "version").await;
    assert_eq!(reason(&resp), "Busy from version one");

    std::fs::write(&path, PLAN.replace("version one", "version two")).unwrap();
    server
        .handle
        .scripts()
        .reload()
        .await
        .expect("new script loads");
    let resp = invite(&server, &peer, "version").await;
    assert_eq!(reason(&resp), "Busy from version two");

    std::fs::write(&path, "function on_invite(call) call:reject(404 end").unwrap();
    let err = server
        .handle
        .scripts()
        .reload()
        .await
        .expect_err("broken script refused");
    assert!(
        err.to_string().contains("plan.lua"),
        "names the file: {err}"
    );
    let resp = invite(&server, &peer, "version").await;
    assert_eq!(
        reason(&resp),
        "Busy from version two",
        "the running script stays"
    );
}

// ---------------------------------------------------------------- issue 13, item 15

const STUCK_PLAN: &str = r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "xpcall" then
    xpcall(function() error("x") end, function() while true do end end)
  elseif u == "gc" then
    setmetatable({}, { __gc = function() while true do end end })
    collectgarbage()
  elseif u == "match" then
    -- Backtracking: quadratic in the spaces between the two words (seconds in Lua's own
    -- matcher, one C call; the server's checks the time as it goes).
    local s = "x" .. string.rep(" ", 40000) .. "y"
    s = s:match("^%s*(.-)%s*$")
  elseif u == "sort" then
    -- One C call that runs no Lua and checks no budget (about a second in a debug build).
    local s = string.rep("qwertyuiopasdfghjklzxcvbnm", 34000)
    local t = { s:byte(1, -1) }
    table.move(t, 1, #t, #t + 1)
    table.sort(t)
  elseif u == "subject" then
    local s = call:header("Subject") or ""
    call:reject(486, "trimmed " .. #s:match("^%s*(.-)%s*$"))
    return
  elseif u == "change" then
    string.upper = function() return "evil" end
  elseif u == "pollute" then
    tenant = "evil"
    call:reject(486, "polluted")
    return
  elseif u == "pristine" then
    call:reject(486, ("ok"):upper() .. " " .. tostring(tenant))
    return
  end
  call:reject(486, "Busy Here")
end
"#;

/// Exits the test process if the test has not finished in `limit`: a stuck runtime
/// thread cannot fire its own timeouts.
fn hang_guard(
    limit: Duration,
    what: &'static str,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{what}: hung for {limit:?} (the server's runtime thread is stuck)");
        std::process::exit(101);
    });
    done
}

/// The stuck-hooks plan's server, a phone, and a 60 s hang guard named `what`.
async fn stuck_plan_call(
    what: &'static str,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    TestServer,
    UdpPeer,
) {
    let guard = hang_guard(Duration::from_secs(60), what);
    let server = start_stuck_plan().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    (guard, server, peer)
}

async fn start_stuck_plan() -> TestServer {
    let dir = std::env::temp_dir().join(unique("strowger-stuck"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plan.lua");
    std::fs::write(&path, STUCK_PLAN).unwrap();
    let mut config = test_config();
    // `POST /reload` without a token (loopback, the operator's opt-in).
    config.http.open_local_writes = true;
    config.script.path = path.display().to_string();
    config.script.vm_pool_size = 2;
    config.script.time_limit_ms = 200;
    start_with(config).await
}

#[tokio::test(flavor = "current_thread")]
async fn hooks_stuck_where_no_budget_is_checked_fail_only_their_call() {
    let (guard, server, peer) = stuck_plan_call("stuck hooks").await;
    let other = UdpPeer::bind("127.0.0.1").await;
    let stats = server.handle.scripts().stats();
    for user in ["xpcall", "gc", "match", "sort"] {
        let started = std::time::Instant::now();
        let call_id = unique("stuck");
        let inv = request(
            "INVITE",
            &format!("sip:{user}@strowger.test"),
            peer.addr,
            "UDP",
            &call_id,
            "Contact: <sip:caller@127.0.0.1>\r\n",
            "",
        );
        peer.send(server.udp, inv.as_bytes()).await;
        // Meanwhile other calls and the admin API are served.
        let resp = invite(&server, &other, "alice").await;
        assert_eq!(status(&resp), 486, "{user}: another call meanwhile: {resp}");
        let metrics = tokio::time::timeout(
            Duration::from_secs(2),
            strowger::admin::get(server.handle.admin_addr(), "/metrics"),
        )
        .await
        .expect("the admin API answers meanwhile")
        .unwrap();
        assert!(metrics.contains("strowger_script_errors_total"));
        // The stuck call itself gets 500, within the time limit and its grace.
        let resp = loop {
            let resp = peer
                .recv_final(Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("{user}: a final response"));
            if header(&resp, "Call-ID") == Some(call_id.as_str()) {
                break resp;
            }
        };
        assert_eq!(status(&resp), 500, "{user}: {resp}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{user}: answered after {:?}",
            started.elapsed()
        );
        let resp = invite(&server, &peer, "alice").await;
        assert_eq!(status(&resp), 486, "after {user}: {resp}");
    }
    assert!(stats.hook_errors_total.load(Ordering::Relaxed) >= 4);
    assert_eq!(
        stats.vms_abandoned.load(Ordering::Relaxed),
        1,
        "the sort cost its VM (the match only its call)"
    );
    // The operator sees the same on /metrics.
    let m = strowger::admin::get(server.handle.admin_addr(), "/metrics")
        .await
        .expect("/metrics");
    assert!(
        m.lines()
            .any(|l| l == "strowger_script_vms_abandoned_total 1"),
        "{m}"
    );
    assert!(
        m.lines()
            .filter_map(|l| l.strip_prefix("strowger_script_time_limits_total "))
            .any(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)),
        "{m}"
    );
    guard.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "current_thread")]
async fn a_long_header_cannot_make_the_trim_idiom_slow() {
    let (guard, server, peer) = stuck_plan_call("long Subject").await;
    // 60 000 spaces between two words: quadratic backtracking in the trim pattern.
    let subject = format!("Subject: x{}y\r\n", " ".repeat(60_000));
    let started = std::time::Instant::now();
    let resp = invite_with(&server, &peer, "subject", &subject).await;
    assert_eq!(status(&resp), 486, "{resp}");
    assert_eq!(
        reason(&resp),
        "trimmed 1",
        "the value reached Lua cut to 4096 bytes"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    guard.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "current_thread")]
async fn a_change_one_call_makes_is_invisible_to_the_next() {
    let (guard, server, peer) = stuck_plan_call("pristine").await;
    let resp = invite(&server, &peer, "change").await;
    assert_eq!(status(&resp), 500, "string is read-only in a hook: {resp}");
    let resp = invite(&server, &peer, "pollute").await;
    assert_eq!(reason(&resp), "polluted");
    // Both VMs of the pool, several times.
    for _ in 0..4 {
        let resp = invite(&server, &peer, "pristine").await;
        assert_eq!(reason(&resp), "OK nil", "{resp}");
    }
    guard.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "current_thread")]
async fn a_slow_top_level_at_reload_leaves_sip_served() {
    let guard = hang_guard(Duration::from_secs(60), "slow reload");
    let server = start_stuck_plan().await;
    let path = server.handle.scripts().current().path().to_path_buf();
    std::fs::write(
        &path,
        format!("local s = 'x' .. string.rep(' ', 40000) .. 'y'\ns = s:match('^%s*(.-)%s*$')\n{STUCK_PLAN}"),
    )
    .unwrap();
    let admin = server.handle.admin_addr();
    let reload = tokio::spawn(async move {
        strowger::admin::send(admin, hyper::Method::POST, "/reload", None).await
    });
    let peer = UdpPeer::bind("127.0.0.1").await;
    let started = std::time::Instant::now();
    let resp = invite(&server, &peer, "alice").await;
    assert_eq!(status(&resp), 486, "{resp}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "SIP answered during the reload"
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), reload)
        .await
        .expect("reload answers in bounded time")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 422, "{}", answer.body());
    // The pattern functions check the time as they go: the reload fails at the limit.
    assert!(
        answer.body().contains("plan.lua:2: time limit exceeded"),
        "{}",
        answer.body()
    );
    assert_eq!(server.handle.scripts().current().version(), 1);
    guard.store(true, Ordering::Relaxed);
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

#[test]
fn sigterm_stops_the_binary_while_a_hook_is_stuck() {
    let dir = std::env::temp_dir().join(unique("strowger-sigterm"));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("plan.lua");
    // Two seconds or so of one C call that checks no budget (a sort of 3.5 million
    // numbers), on a VM thread of its own: the process exits without waiting for it.
    std::fs::write(
        &script,
        "function on_invite(call)\n  local s = string.rep('qwertyuiopasdfghjklzxcvbnm', 34000)\n  local t = { s:byte(1, -1) }\n  for _ = 1, 2 do table.move(t, 1, #t, #t + 1) end\n  table.sort(t)\nend\n",
    )
    .unwrap();
    let sip = free_port(true);
    let http = free_port(false);
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:{sip}\"]\ndomain = \"strowger.test\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[script]\npath = {:?}\nvm_pool_size = 1\nvm_threads = true\nmemory_limit_kb = 0\n[storage]\ndir = {:?}\n[shutdown]\ndrain_timeout_s = 0\n",
            script.display().to_string(),
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_strowger"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("server starts");
    // Wait until it listens (the admin port answers), bounded.
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "the server came up");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = sock.local_addr().unwrap();
    let inv = request(
        "INVITE",
        "sip:stuck@strowger.test",
        from,
        "UDP",
        &unique("sigterm"),
        "Contact: <sip:caller@127.0.0.1>\r\n",
        "",
    );
    sock.send_to(inv.as_bytes(), ("127.0.0.1", sip)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let signalled = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            let _ = server.wait();
            panic!("SIGTERM did not stop the server within 15 s while a hook was stuck");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = signalled.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(0));
    // Nothing owes an answer past the drain (0 s here): the exit does not wait for the
    // sort, which goes on for more than a second after the signal.
    eprintln!("exited {took:?} after SIGTERM");
    assert!(
        took < Duration::from_millis(1200),
        "exited {took:?} after SIGTERM"
    );
}

/// Issue 15: an answer no datagram can carry (a 70 KB reject reason, a redirect to 2,500
/// contacts) used to leave the caller with no answer at all; it gets a short 500 now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_for_udp_becomes_a_500() {
    let (server, _path) = start(
        r#"
        function on_invite(call)
          if call.ruri.user == "reason" then
            return call:reject(486, string.rep("x", 70000))
          end
          local list = {}
          for i = 1, 2500 do
            list[i] = "sip:user" .. i .. "@192.0.2." .. (i % 250) .. ":5060;transport=udp"
          end
          call:redirect(list)
        end
        "#,
    )
    .await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    for user in ["reason", "redirect"] {
        let resp = invite(&server, &peer, user).await;
        assert_eq!(status(&resp), 500, "{user}: {resp}");
        assert_eq!(reason(&resp), "Response Too Large", "{user}");
    }
}
