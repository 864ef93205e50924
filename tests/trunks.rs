//! Trunks to carriers end to end, with SIPp as the carrier: outbound registration (a 401
//! answered with digest that SIPp verifies, a short grant refreshed in time, the state in
//! `GET /trunks` and the metrics), refused credentials (one answer per attempt, a backoff
//! between attempts, never a loop), and OPTIONS pings (a carrier that stops answering is
//! down, and up again when it answers).
//!
//! The server runs with T1 = 20 ms, so a REGISTER or ping times out after timer F =
//! 64*T1 = 1.28 s.

mod common;

use common::sipp::{free_udp_port, start as start_sipp, workdir, SeenMessage};
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use strowger::trunk::TrunkConfig;

fn config(port: u16, f: impl FnOnce(&mut TrunkConfig)) -> strowger::config::Config {
    let mut c = test_config();
    c.sip.timers.t1_ms = 20;
    let mut t = TrunkConfig {
        uri: format!("sip:127.0.0.1:{port}"),
        username: "pbx".into(),
        password: "secret".into(),
        ..TrunkConfig::default()
    };
    f(&mut t);
    c.trunks.insert("carrier1".into(), t);
    c
}

/// The trunk's entry in `GET /trunks`.
async fn trunk_state(server: &TestServer) -> Value {
    let body = strowger::admin::get(server.handle.admin_addr(), "/trunks")
        .await
        .expect("GET /trunks");
    let list: Value = serde_json::from_str(&body).expect("JSON");
    list.as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "carrier1"))
        .cloned()
        .unwrap_or_else(|| panic!("carrier1 in {body}"))
}

/// Polls `GET /trunks` until `want` holds (bounded by `within`); the last state.
async fn wait_for(server: &TestServer, within: Duration, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let state = trunk_state(server).await;
        if want(&state) || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(server: &TestServer) -> String {
    strowger::admin::get(server.handle.admin_addr(), "/metrics")
        .await
        .expect("GET /metrics")
}

fn registers(seen: &[SeenMessage]) -> Vec<&SeenMessage> {
    seen.iter()
        .filter(|m| !m.sent && m.first_line().starts_with("REGISTER "))
        .collect()
}

fn cseq(m: &SeenMessage) -> u32 {
    header(&m.text, "CSeq")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trunk_registers_answers_the_challenge_and_refreshes() {
    let dir = workdir("trunk-reg");
    let port = free_udp_port();
    let carrier = start_sipp(
        &dir,
        "carrier",
        Path::new("carrier_register.xml"),
        port,
        None,
        &[],
    );
    // SIPp binds before the server sends its first REGISTER.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = start_with(config(port, |t| {
        t.register = true;
        t.expires = 600;
    }))
    .await;

    let state = wait_for(&server, Duration::from_secs(5), |s| s["registered"] == true).await;
    assert_eq!(state["registered"], true, "{state}");
    assert_eq!(state["register"], true, "{state}");
    assert_eq!(state["registration"]["last_status"], 200, "{state}");
    assert!(
        state["registration"]["expires_at"].as_u64().is_some(),
        "{state}"
    );
    assert!(server
        .handle
        .trunks()
        .get("carrier1")
        .unwrap()
        .is_registered());

    // SIPp granted 4 s: the refresh comes 2 s later, SIPp checks its credentials and
    // grants an hour.
    let state = wait_for(&server, Duration::from_secs(6), |s| {
        s["registration"]["expires_at"].as_u64().unwrap_or(0) > now() + 3000
    })
    .await;
    assert_eq!(state["registered"], true, "{state}");
    assert_eq!(
        server
            .handle
            .trunks()
            .from_line("carrier1")
            .map(|t| t.name()),
        Some("carrier1")
    );
    let text = metrics(&server).await;
    assert!(
        text.contains("strowger_trunk_registered{trunk=\"carrier1\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("strowger_trunk_registrations_total{result=\"ok\",trunk=\"carrier1\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("strowger_trunk_up{trunk=\"carrier1\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("strowger_trunk_auth_failures_total{trunk=\"carrier1\"} 0"),
        "{text}"
    );

    // A graceful stop unregisters (Expires: 0, credentials up front).
    let trunks = server.handle.trunks().clone();
    server.handle.shutdown(Duration::from_secs(3)).await;
    assert!(!trunks.get("carrier1").unwrap().is_registered());

    let seen = carrier.expect_success(Duration::from_secs(15)).await;
    let regs = registers(&seen);
    assert_eq!(
        regs.len(),
        4,
        "REGISTERs: challenged, answered, refresh, unregister"
    );
    let call_ids: Vec<_> = regs.iter().map(|m| header(&m.text, "Call-ID")).collect();
    assert!(call_ids.iter().all(|c| *c == call_ids[0]), "{call_ids:?}");
    let cseqs: Vec<u32> = regs.iter().map(|m| cseq(m)).collect();
    assert!(cseqs.windows(2).all(|w| w[1] > w[0]), "{cseqs:?}");
    assert!(header(&regs[0].text, "Authorization").is_none());
    assert!(
        header(&regs[2].text, "Authorization").is_some(),
        "credentials up front"
    );
    assert_eq!(header(&regs[3].text, "Expires"), Some("0"));
    let contact = header(&regs[0].text, "Contact").unwrap();
    assert!(contact.starts_with("<sip:pbx@127.0.0.1:"), "{contact}");
    assert!(contact.contains(";line=carrier1"), "{contact}");
    assert_eq!(header(&regs[0].text, "To"), Some("<sip:pbx@127.0.0.1>"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_once_per_attempt_and_back_off() {
    let dir = workdir("trunk-refused");
    let port = free_udp_port();
    let carrier = start_sipp(
        &dir,
        "carrier",
        Path::new("carrier_register_refused.xml"),
        port,
        None,
        &[],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = start_with(config(port, |t| {
        t.register = true;
        t.password = "not-the-secret".into();
    }))
    .await;

    let state = wait_for(&server, Duration::from_secs(5), |s| s["auth_failures"] == 1).await;
    let failed_at = Instant::now();
    assert_eq!(state["auth_failures"], 1, "{state}");
    assert_eq!(state["registered"], false, "{state}");
    assert_eq!(state["registration"]["last_status"], 401, "{state}");
    let retry = state["registration"]["next_retry"]
        .as_u64()
        .expect("next_retry");
    assert!(retry >= now() + 3 && retry <= now() + 8, "{state}");
    // No loop: nothing more for a while (a loop would fail again within milliseconds).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = trunk_state(&server).await;
    assert_eq!(state["auth_failures"], 1, "{state}");

    // The second attempt comes after the backoff (5 s, up to 25% more), answered once.
    let seen = carrier.expect_success(Duration::from_secs(20)).await;
    assert!(
        failed_at.elapsed() >= Duration::from_millis(4500),
        "retried after {:?}",
        failed_at.elapsed()
    );
    assert_eq!(registers(&seen).len(), 4);
    let state = wait_for(&server, Duration::from_secs(3), |s| s["auth_failures"] == 2).await;
    assert_eq!(state["auth_failures"], 2, "{state}");
    assert_eq!(state["registered"], false, "{state}");
    let text = metrics(&server).await;
    assert!(
        text.contains("strowger_trunk_auth_failures_total{trunk=\"carrier1\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("strowger_trunk_registrations_total{result=\"failed\",trunk=\"carrier1\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("strowger_trunk_registered{trunk=\"carrier1\"} 0"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_trunk_goes_down_and_comes_back_up() {
    let dir = workdir("trunk-ping");
    let port = free_udp_port();
    let first = start_sipp(
        &dir,
        "carrier1",
        Path::new("carrier_options.xml"),
        port,
        None,
        &[],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = start_with(config(port, |t| t.ping_interval_s = 5)).await;
    // The first ping goes out at start; SIPp answers it and ends.
    let seen = first.expect_success(Duration::from_secs(5)).await;
    assert!(seen
        .iter()
        .any(|m| m.first_line().starts_with("OPTIONS sip:127.0.0.1:")));
    assert_eq!(trunk_state(&server).await["up"], true);

    // The next ping (5 s later) goes unanswered: down after timer F.
    let state = wait_for(&server, Duration::from_secs(10), |s| s["up"] == false).await;
    assert_eq!(state["up"], false, "{state}");
    assert!(!server.handle.trunks().get("carrier1").unwrap().is_up());
    let text = metrics(&server).await;
    assert!(
        text.contains("strowger_trunk_up{trunk=\"carrier1\"} 0"),
        "{text}"
    );

    // A carrier answering again: up at the next ping.
    let second = start_sipp(
        &dir,
        "carrier2",
        Path::new("carrier_options.xml"),
        port,
        None,
        &[],
    );
    let state = wait_for(&server, Duration::from_secs(10), |s| s["up"] == true).await;
    assert_eq!(state["up"], true, "{state}");
    second.expect_success(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_through_the_outbound_proxy_with_a_route() {
    let dir = workdir("trunk-proxy");
    let port = free_udp_port();
    let proxy = start_sipp(
        &dir,
        "proxy",
        Path::new("carrier_options.xml"),
        port,
        None,
        &[],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The carrier's name is never looked up: everything goes to the proxy.
    let server = start_with(config(port, |t| {
        t.uri = "sip:carrier.invalid".into();
        t.outbound_proxy = format!("sip:127.0.0.1:{port}");
        t.ping_interval_s = 5;
    }))
    .await;
    let seen = proxy.expect_success(Duration::from_secs(5)).await;
    let ping = seen
        .iter()
        .find(|m| !m.sent && m.first_line().starts_with("OPTIONS "))
        .expect("the ping reached the proxy");
    assert_eq!(ping.first_line(), "OPTIONS sip:carrier.invalid SIP/2.0");
    assert_eq!(
        header(&ping.text, "Route"),
        Some(&*format!("<sip:127.0.0.1:{port};lr>"))
    );
    assert_eq!(trunk_state(&server).await["up"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
