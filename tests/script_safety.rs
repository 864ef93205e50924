//! Script safety end to end: a Lua error, a runaway loop and a memory bomb each fail only
//! their own call with 500 and are counted; the next call still runs. Reload while a call
//! is up: the call keeps its version and ends normally; new calls use the new script; a
//! broken script is refused and the running one stays.

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
    let call_id = unique("safety");
    let inv = request(
        "INVITE",
        &format!("sip:{user}@strowger.test"),
        peer.addr,
        "UDP",
        &call_id,
        "Contact: <sip:caller@127.0.0.1>\r\nContent-Type: application/sdp\r\n",
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n",
    );
    peer.send(server.udp, inv.as_bytes()).await;
    let resp = peer
        .recv_final(Duration::from_secs(10))
        .await
        .expect("a final response");
    resp
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
            "{what} is counted"
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
    server.handle.scripts().reload().expect("new script loads");
    let resp = invite(&server, &peer, "version").await;
    assert_eq!(reason(&resp), "Busy from version two");

    std::fs::write(&path, "function on_invite(call) call:reject(404 end").unwrap();
    let err = server
        .handle
        .scripts()
        .reload()
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
