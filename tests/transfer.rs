//! Call transfer end to end (RFC 3515 REFER, RFC 4488, RFC 3891): SIPp caller, callee and
//! transfer target through the server. Each test checks what every party saw: the
//! transferee's re-INVITE carries the target's SDP, the target's ACK carries the
//! transferee's answer, the transferor gets its NOTIFYs (message/sipfrag) and then BYE.

mod common;

use common::sipp::{self, received, SeenMessage};
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(40);

struct Setup {
    server: TestServer,
    dir: PathBuf,
    /// The callee's and the transfer target's ports.
    b: u16,
    c: u16,
}

async fn setup(tag: &str) -> Setup {
    let dir = sipp::workdir(tag);
    let (b, c) = (sipp::free_udp_port(), sipp::free_udp_port());
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            r#"
function on_invite(call)
  local r = call:dial("sip:callee@127.0.0.1:{b}")
  if r.answered and call.ruri.user == "xfer" then
    -- A transfer the dial plan starts: the caller goes to the target.
    local t = call:transfer("sip:target@127.0.0.1:{c}")
    assert(t.answered and t.status == 200, t.reason)
  end
end
function on_refer(call, refer)
  log.info("transfer by ", refer.by, " to ", refer.target)
  if refer.target:find("nobody", 1, true) then
    return refer:deny(603, "Decline")
  end
  if refer.target:find("alias", 1, true) then
    refer.target = "sip:target@127.0.0.1:{c}"
  end
end
"#
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.script.path = plan.display().to_string();
    let server = start_with(config).await;
    Setup { server, dir, b, c }
}

fn party(s: &Setup, name: &str, scenario: &str, port: u16, extra: &[&str]) -> sipp::Sipp {
    sipp::start(&s.dir, name, Path::new(scenario), port, None, extra)
}

fn caller(s: &Setup, scenario: &str, extra: &[&str]) -> sipp::Sipp {
    caller_to(s, "bob", scenario, extra)
}

fn caller_to(s: &Setup, service: &str, scenario: &str, extra: &[&str]) -> sipp::Sipp {
    let mut args = vec!["-s", service];
    args.extend_from_slice(extra);
    sipp::start(
        &s.dir,
        "caller",
        Path::new(scenario),
        sipp::free_udp_port(),
        Some(s.server.udp),
        &args,
    )
}

fn target_uri(s: &Setup) -> String {
    format!("sip:target@127.0.0.1:{}", s.c)
}

fn got<'a>(seen: &'a [SeenMessage], kind: &str) -> Vec<&'a SeenMessage> {
    seen.iter()
        .filter(|m| !m.sent && m.kind() == kind)
        .collect()
}

async fn metrics(s: &Setup) -> String {
    strowger::admin::get(s.server.handle.admin_addr(), "/metrics")
        .await
        .unwrap()
}

async fn wait_idle(s: &Setup) {
    for _ in 0..100 {
        if s.server.handle.active_calls() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("calls still active");
}

/// The transferor's NOTIFYs: sipfrag bodies in order, and the last one ends the
/// subscription.
fn assert_notifies(seen: &[SeenMessage], want: &[&str]) {
    let notifies = got(seen, "NOTIFY");
    let bodies: Vec<String> = notifies
        .iter()
        .map(|n| n.body().lines().next().unwrap_or("").trim().to_owned())
        .collect();
    assert_eq!(bodies, want, "NOTIFY bodies");
    for n in &notifies {
        assert!(
            n.header("Event").unwrap().starts_with("refer"),
            "{}",
            n.text
        );
        assert!(
            n.header("Content-Type")
                .unwrap()
                .starts_with("message/sipfrag"),
            "{}",
            n.text
        );
    }
    let last = notifies.last().unwrap();
    assert!(
        last.header("Subscription-State")
            .unwrap()
            .starts_with("terminated"),
        "{}",
        last.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_transfers_the_caller_blind() {
    let s = setup("xfer-callee").await;
    let target = target_uri(&s);
    let c = party(&s, "target", "uas_target.xml", s.c, &[]);
    let b = party(
        &s,
        "callee",
        "uas_refer.xml",
        s.b,
        &["-key", "target", &target],
    );
    let a = caller(&s, "uac_reinvited.xml", &[])
        .expect_success(LIMIT)
        .await;
    let b = b.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    // The caller is now in a dialog with the target: its re-INVITE has the target's SDP.
    let reinvite = got(&a, "INVITE");
    assert_eq!(reinvite.len(), 1, "{:?}", received(&a));
    assert!(
        reinvite[0].body().contains("s=third-party"),
        "{}",
        reinvite[0].text
    );
    // The target got an INVITE without SDP (its 200 makes the offer), the caller's answer
    // in the ACK, Referred-By, and the caller's BYE at the end.
    assert_eq!(received(&c), ["INVITE", "ACK", "BYE"]);
    let invite = got(&c, "INVITE")[0];
    assert!(invite.body().trim().is_empty(), "{}", invite.text);
    assert!(invite.header("Referred-By").is_some(), "{}", invite.text);
    assert!(got(&c, "ACK")[0].body().contains("s=transferee"));
    // The transferor: 202, NOTIFY 100 and 200, then BYE.
    assert_eq!(
        received(&b),
        ["INVITE", "ACK", "202", "NOTIFY", "NOTIFY", "BYE"]
    );
    assert_notifies(&b, &["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
    wait_idle(&s).await;
    let m = metrics(&s).await;
    assert!(
        m.contains(r#"strowger_transfers_total{kind="blind",result="succeeded"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_transfers_the_callee_blind() {
    let s = setup("xfer-caller").await;
    let target = target_uri(&s);
    let c = party(&s, "target", "uas_target.xml", s.c, &[]);
    let b = party(&s, "callee", "uas_reinvited.xml", s.b, &[]);
    let a = caller(&s, "uac_refer.xml", &["-key", "target", &target])
        .expect_success(LIMIT)
        .await;
    let b = b.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    let reinvite = got(&b, "INVITE");
    assert_eq!(reinvite.len(), 2, "{:?}", received(&b));
    assert!(
        reinvite[1].body().contains("s=third-party"),
        "{}",
        reinvite[1].text
    );
    assert!(got(&c, "ACK")[0].body().contains("s=transferee"));
    assert_eq!(received(&c), ["INVITE", "ACK", "BYE"]);
    assert!(
        received(&a).ends_with(&["202", "NOTIFY", "NOTIFY", "BYE"].map(String::from)),
        "{:?}",
        received(&a)
    );
    assert_notifies(&a, &["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_target_leaves_the_call_as_it_was() {
    let s = setup("xfer-busy").await;
    let target = target_uri(&s);
    let c = party(&s, "target", "uas_reject.xml", s.c, &[]);
    let b = party(
        &s,
        "callee",
        "uas_refer_fail.xml",
        s.b,
        &["-key", "target", &target],
    );
    let a = caller(&s, "uac_wait_bye.xml", &[])
        .expect_success(LIMIT)
        .await;
    let b = b.expect_success(LIMIT).await;
    c.expect_success(LIMIT).await;
    assert_notifies(&b, &["SIP/2.0 100 Trying", "SIP/2.0 486 Busy Here"]);
    // The caller saw nothing of it until the callee hung up.
    assert!(got(&a, "INVITE").is_empty(), "{:?}", received(&a));
    assert_eq!(received(&a).last().map(String::as_str), Some("BYE"));
    wait_idle(&s).await;
    let m = metrics(&s).await;
    assert!(
        m.contains(r#"strowger_transfers_total{kind="blind",result="failed"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_denies_a_transfer_with_603() {
    let s = setup("xfer-deny").await;
    let b = party(
        &s,
        "callee",
        "uas_refer_denied.xml",
        s.b,
        &["-key", "target", "sip:nobody@127.0.0.1:9"],
    );
    let a = caller(&s, "uac_wait_bye.xml", &[])
        .expect_success(LIMIT)
        .await;
    let b = b.expect_success(LIMIT).await;
    assert!(got(&b, "NOTIFY").is_empty());
    assert_eq!(received(&a).last().map(String::as_str), Some("BYE"));
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refer_sub_false_gets_no_notify_and_the_script_may_rewrite_the_target() {
    let s = setup("xfer-nosub").await;
    let c = party(&s, "target", "uas_target.xml", s.c, &[]);
    // The script turns "alias" into the target's address.
    let b = party(
        &s,
        "callee",
        "uas_refer_nosub.xml",
        s.b,
        &["-key", "target", "sip:alias@127.0.0.1:9"],
    );
    let a = caller(&s, "uac_reinvited.xml", &[])
        .expect_success(LIMIT)
        .await;
    let b = b.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    assert_eq!(received(&b), ["INVITE", "ACK", "202", "BYE"]);
    let accepted = got(&b, "202")[0];
    assert_eq!(
        accepted.header("Refer-Sub"),
        Some("false"),
        "{}",
        accepted.text
    );
    assert!(got(&a, "INVITE")[0].body().contains("s=third-party"));
    assert_eq!(received(&c), ["INVITE", "ACK", "BYE"]);
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dial_plan_transfers_the_caller_with_call_transfer() {
    let s = setup("xfer-lua").await;
    let c = party(&s, "target", "uas_target.xml", s.c, &[]);
    let b = party(&s, "callee", "uas_answer.xml", s.b, &[]);
    let a = caller_to(&s, "xfer", "uac_reinvited.xml", &[])
        .expect_success(LIMIT)
        .await;
    let b = b.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    assert!(got(&a, "INVITE")[0].body().contains("s=third-party"));
    assert_eq!(
        received(&b).last().map(String::as_str),
        Some("BYE"),
        "the callee is released"
    );
    assert_eq!(received(&c), ["INVITE", "ACK", "BYE"]);
    wait_idle(&s).await;
    let m = metrics(&s).await;
    assert!(
        m.contains(r#"strowger_transfers_total{kind="server",result="succeeded"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_transfers_a_call() {
    let s = setup("xfer-admin").await;
    let target = target_uri(&s);
    let c = party(&s, "target", "uas_target.xml", s.c, &[]);
    let b = party(&s, "callee", "uas_answer.xml", s.b, &[]);
    // The caller holds the call until the server re-INVITEs it to the target.
    let a = caller(&s, "uac_reinvited.xml", &[]);
    let admin = s.server.handle.admin_addr();
    let mut id = None;
    for _ in 0..100 {
        let list = strowger::admin::get(admin, "/calls").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        if v[0]["state"] == "answered" {
            id = v[0]["id"].as_str().map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = id.expect("the call is up");
    let post = |path: String, body: String| async move {
        strowger::admin::send_body(admin, hyper::Method::POST, &path, None, body.into())
            .await
            .unwrap()
    };
    // Bad requests first: unknown call, bad party.
    let r = post(
        "/calls/nonesuch/transfer".into(),
        format!(r#"{{"target":"{target}"}}"#),
    )
    .await;
    assert_eq!(r.status(), 404, "{}", r.body());
    let r = post(
        format!("/calls/{id}/transfer"),
        format!(r#"{{"target":"{target}","party":"boss"}}"#),
    )
    .await;
    assert_eq!(r.status(), 400, "{}", r.body());
    let r = post(
        format!("/calls/{id}/transfer"),
        format!(r#"{{"target":"{target}","party":"caller"}}"#),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.body());
    let outcome: serde_json::Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(outcome["answered"], true, "{outcome}");
    let a = a.expect_success(LIMIT).await;
    let b = b.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    assert!(got(&a, "INVITE")[0].body().contains("s=third-party"));
    assert_eq!(received(&b).last().map(String::as_str), Some("BYE"));
    assert_eq!(received(&c), ["INVITE", "ACK", "BYE"]);
    wait_idle(&s).await;
}
