//! `call.records_file`: every ended call appends one JSON line to the file.

mod common;

use common::sipp;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(40);

/// A fresh directory with `plan.lua`, and a config that runs it and writes records to
/// `calls.jsonl` there.
fn setup(tag: &str, plan: &str) -> (PathBuf, PathBuf, strowger::config::Config) {
    let dir = sipp::workdir(tag);
    let script = dir.join("plan.lua");
    std::fs::write(&script, plan).unwrap();
    let records = dir.join("calls.jsonl");
    let mut config = test_config();
    config.script.path = script.display().to_string();
    config.call.records_file = records.display().to_string();
    (dir, records, config)
}

/// The file's lines once it has `n` of them (polled for a few seconds), parsed.
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n || tokio::time::Instant::now() >= deadline {
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "torn line: {text:?}"
            );
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_rfc3339_utc(v: &Value) -> bool {
    // 2026-11-30T15:23:37.123Z
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_call_writes_one_line() {
    let (_dir, records, config) = setup(
        "records-reject",
        "function on_invite(call) call:reject(486) end\n",
    );
    let server = start_with(config).await;
    // Opened at start-up: the file exists before any call.
    assert!(records.exists());
    let peer = UdpPeer::bind("127.0.0.1").await;
    let call_id = unique("records");
    let inv = request(
        "INVITE",
        "sip:bob@strowger.test",
        peer.addr,
        "UDP",
        &call_id,
        "Contact: <sip:caller@127.0.0.1>\r\n",
        "",
    );
    peer.send(server.udp, inv.as_bytes()).await;
    let resp = peer.recv_final(WAIT).await.expect("a final response");
    assert_eq!(status(&resp), 486, "{resp}");

    let lines = wait_lines(&records, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let r = &lines[0];
    assert_eq!(r["final_status"], 486, "{r}");
    assert_eq!(r["hangup_by"], "system", "{r}");
    assert!(r["answer"].is_null(), "{r}");
    assert!(r["b_call_id"].is_null(), "{r}");
    assert_eq!(r["duration_s"].as_f64(), Some(0.0), "{r}");
    assert_eq!(r["a_call_id"], call_id.as_str(), "{r}");
    assert!(r["call_id"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
    assert_eq!(r["from"], "sip:alice@example.com", "{r}");
    assert_eq!(r["to"], "sip:bob@strowger.test", "{r}");
    assert_eq!(r["ruri"], "sip:bob@strowger.test", "{r}");
    assert_eq!(r["source"], format!("udp:{}", peer.addr), "{r}");
    assert_eq!(r["script_version"], 1, "{r}");
    assert!(is_rfc3339_utc(&r["start"]), "{r}");
    assert!(is_rfc3339_utc(&r["end"]), "{r}");
    assert!(r["start"].as_str() <= r["end"].as_str(), "{r}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_call_records_answer_and_duration() {
    let b1 = sipp::free_udp_port();
    let (dir, records, config) = setup(
        "records-call",
        &format!(
            "function on_invite(call) call:dial(\"sip:callee@127.0.0.1:{b1}\", {{ timeout = 15 }}) end\n"
        ),
    );
    let server = start_with(config).await;
    let b = sipp::start(&dir, "callee", Path::new("uas_answer.xml"), b1, None, &[]);
    let a = sipp::start(
        &dir,
        "caller",
        Path::new("uac_call.xml"),
        sipp::free_udp_port(),
        Some(server.udp),
        &["-s", "bob", "-d", "300"],
    )
    .expect_success(LIMIT)
    .await;
    b.expect_success(LIMIT).await;
    let a_call_id = sipp::call_ids(&a).pop().expect("caller's Call-ID");

    let lines = wait_lines(&records, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let r = &lines[0];
    assert_eq!(r["final_status"], 200, "{r}");
    assert_eq!(r["hangup_by"], "caller", "{r}");
    assert!(is_rfc3339_utc(&r["answer"]), "{r}");
    assert!(r["start"].as_str() <= r["answer"].as_str(), "{r}");
    assert!(r["answer"].as_str() <= r["end"].as_str(), "{r}");
    let duration = r["duration_s"].as_f64().expect("duration_s is a number");
    assert!(duration > 0.0 && duration < 30.0, "{r}");
    assert_eq!(r["a_call_id"], a_call_id.as_str(), "{r}");
    let b_call_id = r["b_call_id"].as_str().expect("b_call_id");
    assert!(!b_call_id.is_empty() && b_call_id != a_call_id, "{r}");
    assert!(
        r["ruri"]
            .as_str()
            .is_some_and(|u| u.starts_with("sip:bob@")),
        "{r}"
    );
    assert!(
        r["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("udp:127.0.0.1:")),
        "{r}"
    );
}

#[tokio::test]
async fn unwritable_records_file_stops_start_up() {
    let dir = std::env::temp_dir().join(unique("strowger-records-bad"));
    let path = dir.join("no-such-dir").join("calls.jsonl");
    let mut config = test_config();
    config.call.records_file = path.display().to_string();
    let err = match strowger::server::start(&config).await {
        Ok(_) => panic!("started with an unwritable call.records_file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("call.records_file"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}
