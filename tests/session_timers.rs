//! RFC 4028 session timers through the B2BUA, with SIPp on both legs: 422 for a too-brief
//! interval, a callee that stops refreshing ends both legs, refreshes from the callee are
//! relayed so the call outlives several intervals, and the server refreshes a callee
//! that makes it the refresher.
//!
//! Intervals of 4 s keep the tests short: the test config is built directly (not through
//! the file loader, whose check holds `call.min_se_s` to RFC 4028's 90 s floor).

mod common;

use common::sipp::{self, SeenMessage};
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(40);

fn script(dir: &Path, callee: u16) -> PathBuf {
    let path = dir.join("plan.lua");
    std::fs::write(
        &path,
        format!("function on_invite(call)\n  call:dial(\"sip:callee@127.0.0.1:{callee}\")\nend\n"),
    )
    .unwrap();
    path
}

async fn setup(tag: &str, session_expires: u32, min_se: u32) -> (TestServer, PathBuf, u16) {
    let dir = sipp::workdir(tag);
    let callee = sipp::free_udp_port();
    let mut config = test_config();
    config.script.path = script(&dir, callee).display().to_string();
    config.call.session_expires_s = session_expires;
    config.call.min_se_s = min_se;
    config.call.records_file = dir.join("records.jsonl").display().to_string();
    (start_with(config).await, dir, callee)
}

fn sipp_at(
    dir: &Path,
    name: &str,
    scenario: &str,
    port: u16,
    server: Option<&TestServer>,
    extra: &[&str],
) -> sipp::Sipp {
    sipp::start(
        dir,
        name,
        Path::new(scenario),
        port,
        server.map(|s| s.udp),
        extra,
    )
}

fn requests<'a>(seen: &'a [SeenMessage], method: &str) -> Vec<&'a SeenMessage> {
    seen.iter()
        .filter(|m| !m.sent && m.kind() == method)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_brief_interval_gets_422_with_min_se() {
    let (server, dir, _) = setup("st-brief", 1800, 90).await;
    let caller = sipp_at(
        &dir,
        "caller",
        "uac_se_brief.xml",
        sipp::free_udp_port(),
        Some(&server),
        &["-s", "100"],
    );
    let seen = caller.expect_success(LIMIT).await;
    let resp = seen
        .iter()
        .find(|m| !m.sent && m.kind() == "422")
        .expect("422");
    assert_eq!(resp.header("Min-SE"), Some("90"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_that_stops_refreshing_is_ended_on_both_legs() {
    let (server, dir, callee_port) = setup("st-silent", 4, 2).await;
    let callee = sipp_at(
        &dir,
        "callee",
        "uas_timer_silent.xml",
        callee_port,
        None,
        &[],
    );
    let started = Instant::now();
    let caller = sipp_at(
        &dir,
        "caller",
        "uac_wait_bye.xml",
        sipp::free_udp_port(),
        Some(&server),
        &["-s", "100"],
    );
    let seen_a = caller.expect_success(LIMIT).await;
    let seen_b = callee.expect_success(LIMIT).await;
    let took = started.elapsed();
    assert_eq!(requests(&seen_a, "BYE").len(), 1);
    assert_eq!(requests(&seen_b, "BYE").len(), 1);
    // 4 - min(32, 4/3) = 3 s after the answer (RFC 4028 10).
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // Our INVITE offered the timer, the callee took the refresher's part.
    let invite = requests(&seen_b, "INVITE")[0];
    assert_eq!(invite.header("Session-Expires"), Some("4;refresher=uas"));
    let records = std::fs::read_to_string(dir.join("records.jsonl")).unwrap_or_default();
    assert!(
        records.contains("\"hangup_by\":\"session_timer\""),
        "the record says why: {records}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_from_the_callee_are_relayed_and_keep_the_call_up() {
    let (server, dir, callee_port) = setup("st-refresh", 4, 2).await;
    let callee = sipp_at(
        &dir,
        "callee",
        "uas_timer_refresh.xml",
        callee_port,
        None,
        &[],
    );
    let started = Instant::now();
    let caller = sipp_at(
        &dir,
        "caller",
        "uac_updates.xml",
        sipp::free_udp_port(),
        Some(&server),
        &["-s", "100"],
    );
    let seen_a = caller.expect_success(LIMIT).await;
    let seen_b = callee.expect_success(LIMIT).await;
    // Four refreshes 1.5 s apart: the call lived past the 4 s interval (and its 3 s
    // expiry) more than once, and ended with the caller's BYE, not ours.
    assert!(started.elapsed() >= Duration::from_secs(6));
    assert_eq!(
        requests(&seen_a, "UPDATE").len(),
        4,
        "relayed to the caller"
    );
    assert_eq!(requests(&seen_b, "BYE").len(), 1);
    assert!(
        requests(&seen_a, "BYE").is_empty(),
        "the caller hung up itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refreshes_when_the_callee_makes_it_the_refresher() {
    let (server, dir, callee_port) = setup("st-uac", 4, 2).await;
    let callee = sipp_at(&dir, "callee", "uas_timer_uac.xml", callee_port, None, &[]);
    let caller = sipp_at(
        &dir,
        "caller",
        "uac_call.xml",
        sipp::free_udp_port(),
        Some(&server),
        &["-s", "100", "-d", "5000"],
    );
    caller.expect_success(LIMIT).await;
    let seen_b = callee.expect_success(LIMIT).await;
    let updates = requests(&seen_b, "UPDATE");
    assert_eq!(updates.len(), 2, "UPDATE refreshes at half the interval");
    assert_eq!(
        updates[0].header("Session-Expires"),
        Some("4;refresher=uac")
    );
}
