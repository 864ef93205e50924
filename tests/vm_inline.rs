//! `script.vm_threads = false`: the Lua VMs run on the one SIP thread (issue 14: no thread
//! hand-off per hook). The binary itself is run (the runtime is chosen in `main`): SIPp
//! calls through a dial plan that dials SIPp, a reload from the admin API (the new VMs are
//! built on the SIP thread), a pathological pattern match cut at 50 ms, a hook stuck in
//! one long library call (its call gets 500, the next calls are served), and the refusal
//! of `vm_threads = false` with two SIP workers.

mod common;

use common::sipp::{self, received};
use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOKEN: &str = "inline-test";

fn plan(b: u16, version: &str) -> String {
    format!(
        r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "bob" then
    call:dial("sip:callee@127.0.0.1:{b}", {{ timeout = 15 }})
  elseif u == "slow-match" then
    -- Seconds with Lua's own matcher; ours checks the time as it goes.
    local s = "x" .. string.rep(" ", 20000) .. "y"
    s = s:match("^%s*(.-)%s*$")
  elseif u == "stuck" then
    -- One C call that runs no Lua (about a second in a debug build): no budget is
    -- checked inside it.
    local s = string.rep("qwertyuiopasdfghjklzxcvbnm", 34000)
    local t = {{ s:byte(1, -1) }}
    table.move(t, 1, #t, #t + 1)
    table.sort(t)
  else
    call:reject(486, "{version}")
  end
end
"#
    )
}

struct Server {
    child: std::process::Child,
    sip: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(dir: &Path, sip: SocketAddr, http: SocketAddr, extra: &str) -> String {
    format!(
        "[sip]\nlisten = [\"udp:{sip}\"]\ndomain = \"strowger.test\"\n{extra}\
         [http]\nlisten = \"{http}\"\ntoken = \"{TOKEN}\"\n\
         [script]\npath = {plan:?}\nvm_threads = false\nvm_pool_size = 1\ntime_limit_ms = 100\n\
         [storage]\ndir = {data:?}\n",
        plan = dir.join("plan.lua").display().to_string(),
        data = dir.join("data").display().to_string(),
    )
}

async fn start(dir: &Path) -> Server {
    let (sip, http) = free_sip_and_http();
    let config = dir.join("strowger.toml");
    std::fs::write(&config, config_text(dir, sip, http, "")).unwrap();
    let log = dir.join("server.log");
    let child = spawn_strowger(&config, &log);
    let up = eventually(Duration::from_secs(20), || async move {
        strowger::admin::get(http, "/healthz").await.is_ok()
    })
    .await;
    let server = Server {
        child,
        sip,
        http,
        log,
    };
    assert!(
        up,
        "the server came up: {}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
    server
}

/// Sends an INVITE for `user` and returns its final response (bounded).
async fn invite(server: &Server, peer: &UdpPeer, user: &str) -> String {
    let call_id = unique("inline");
    let msg = request(
        "INVITE",
        &format!("sip:{user}@strowger.test"),
        peer.addr,
        "UDP",
        &call_id,
        "Contact: <sip:caller@127.0.0.1>\r\n",
        "",
    );
    peer.send(server.sip, msg.as_bytes()).await;
    loop {
        let resp = peer
            .recv_final(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("a final response for {user}"));
        if header(&resp, "Call-ID") == Some(call_id.as_str()) {
            return resp;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reload_and_a_stuck_hook_with_the_vms_on_the_sip_thread() {
    let dir = sipp::workdir("inline");
    let b = sipp::free_udp_port();
    std::fs::write(dir.join("plan.lua"), plan(b, "v1")).unwrap();
    let server = start(&dir).await;

    // 1. Calls dialled by the script, answered by SIPp, hung up by the caller.
    let (callee, callee_msgs) = sipp::spawn(sipp::Run {
        dir: &dir,
        name: "callee",
        scenario: Path::new("uas_answer.xml"),
        port: b,
        remote: None,
        timeout: "60s",
        args: &["-m", "20"],
    });
    let (caller, caller_msgs) = sipp::spawn(sipp::Run {
        dir: &dir,
        name: "caller",
        scenario: Path::new("uac_call.xml"),
        port: sipp::free_udp_port(),
        remote: Some(server.sip),
        timeout: "60s",
        args: &["-m", "20", "-r", "20", "-s", "bob", "-d", "100"],
    });
    let a = sipp::finish(caller, "caller", &caller_msgs, Duration::from_secs(60)).await;
    let bm = sipp::finish(callee, "callee", &callee_msgs, Duration::from_secs(60)).await;
    let a_got = received(&a);
    assert_eq!(
        a_got.iter().filter(|s| *s == "200").count(),
        40,
        "20 calls answered and hung up: {a_got:?}"
    );
    assert_eq!(received(&bm).iter().filter(|s| *s == "BYE").count(), 20);

    // 2. A reload builds the new version's VM on the SIP thread; new calls use it.
    let peer = UdpPeer::bind("127.0.0.1").await;
    assert_eq!(reason(&invite(&server, &peer, "alice").await), "v1");
    std::fs::write(dir.join("plan.lua"), plan(b, "v2")).unwrap();
    strowger::admin::request_reload(server.http, TOKEN)
        .await
        .expect("reload accepted");
    let resp = invite(&server, &peer, "alice").await;
    assert_eq!((status(&resp), reason(&resp)), (486, "v2"), "{resp}");

    // 3. A pathological pattern match is cut at 50 ms (the stretch a hook may run on the
    // SIP thread at one go): 500 at once.
    let started = Instant::now();
    let resp = invite(&server, &peer, "slow-match").await;
    assert_eq!(status(&resp), 500, "{resp}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("ran 50 ms at one go on the SIP thread"),
        "{log}"
    );
    assert!(!log.contains("stuck on the SIP thread"), "{log}");

    // A hook stuck in one C call that checks no budget holds the SIP thread until the
    // call returns (about a second here); its call then fails with 500, and the next calls
    // are served.
    let started = Instant::now();
    let resp = invite(&server, &peer, "stuck").await;
    assert_eq!(status(&resp), 500, "{resp}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let served = eventually(Duration::from_secs(10), || {
        let (server, peer) = (&server, &peer);
        async move { reason(&invite(server, peer, "alice").await) == "v2" }
    })
    .await;
    assert!(served, "calls are served after the stuck hook");
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("stuck on the SIP thread") && !log.contains("abandoned"),
        "the watchdog reports the stuck SIP thread (and gives no VM up): {log}"
    );
    let m = strowger::admin::get(server.http, "/metrics").await.unwrap();
    assert!(
        m.lines()
            .filter_map(|l| l.strip_prefix("strowger_script_time_limits_total "))
            .any(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)),
        "{m}"
    );

    // 4. SIGTERM: a clean exit.
    let mut server = server;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "SIGTERM stops the server");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vm_threads_false_with_two_sip_workers_is_refused_at_start() {
    let dir = sipp::workdir("inline-refused");
    std::fs::write(dir.join("plan.lua"), plan(9, "v1")).unwrap();
    let config = dir.join("strowger.toml");
    let sip: SocketAddr = "127.0.0.1:1".parse().unwrap();
    std::fs::write(&config, config_text(&dir, sip, sip, "workers = 2\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strowger"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .expect("strowger runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("script.vm_threads") && err.contains("sip.workers = 1"),
        "{err}"
    );
    assert!(err.contains("strowger.toml"), "names the file: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}
