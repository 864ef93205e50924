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
    setup_with(tag, |_| {}).await
}

async fn setup_with(tag: &str, tweak: impl FnOnce(&mut strowger::config::Config)) -> Setup {
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
    config.call.records_file = dir.join("calls.jsonl").display().to_string();
    // `POST /calls/{id}/transfer` without a token (loopback, the operator's opt-in).
    config.http.open_local_writes = true;
    tweak(&mut config);
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

/// One call through the server with SIPp as caller (`a`, service `bob`), callee (`b`) and
/// transfer target (`c`, None: no target party); `-key target <uri of c>` goes to the
/// party named by `asks` ("caller" or "callee"). Returns what each saw.
async fn three_parties(
    s: &Setup,
    a: &str,
    b: &str,
    c: Option<&str>,
    asks: &str,
    target: &str,
) -> (Vec<SeenMessage>, Vec<SeenMessage>, Vec<SeenMessage>) {
    let key = ["-key", "target", target];
    let (a_extra, b_extra): (&[&str], &[&str]) = if asks == "caller" {
        (&key, &[])
    } else {
        (&[], &key)
    };
    let c = c.map(|sc| party(s, "target", sc, s.c, &[]));
    let b = party(s, "callee", b, s.b, b_extra);
    let a = caller(s, a, a_extra).expect_success(LIMIT).await;
    let b = b.expect_success(LIMIT).await;
    let c = match c {
        Some(c) => c.expect_success(LIMIT).await,
        None => Vec::new(),
    };
    (a, b, c)
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
    let (a, b, c) = three_parties(
        &s,
        "uac_reinvited.xml",
        "uas_refer.xml",
        Some("uas_target.xml"),
        "callee",
        &target,
    )
    .await;
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
    // The call record shows the transfer.
    let mut record = serde_json::Value::Null;
    for _ in 0..50 {
        let text = std::fs::read_to_string(s.dir.join("calls.jsonl")).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            record = serde_json::from_str(line).unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = &record["transfers"][0];
    assert_eq!(t["kind"], "blind", "{record}");
    assert_eq!(t["by"], "callee", "{record}");
    assert_eq!(t["status"], 200, "{record}");
    assert_eq!(t["target"], target, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_transfers_the_callee_blind() {
    let s = setup("xfer-caller").await;
    let target = target_uri(&s);
    let (a, b, c) = three_parties(
        &s,
        "uac_refer.xml",
        "uas_reinvited.xml",
        Some("uas_target.xml"),
        "caller",
        &target,
    )
    .await;
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
    let (a, b, _) = three_parties(
        &s,
        "uac_wait_bye.xml",
        "uas_refer_fail.xml",
        Some("uas_reject.xml"),
        "callee",
        &target,
    )
    .await;
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
    let (a, b, _) = three_parties(
        &s,
        "uac_wait_bye.xml",
        "uas_refer_denied.xml",
        None,
        "callee",
        "sip:nobody@127.0.0.1:9",
    )
    .await;
    assert!(got(&b, "NOTIFY").is_empty());
    assert_eq!(received(&a).last().map(String::as_str), Some("BYE"));
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refer_sub_false_gets_no_notify_and_the_script_may_rewrite_the_target() {
    let s = setup("xfer-nosub").await;
    // The script turns "alias" into the target's address.
    let (a, b, c) = three_parties(
        &s,
        "uac_reinvited.xml",
        "uas_refer_nosub.xml",
        Some("uas_target.xml"),
        "callee",
        "sip:alias@127.0.0.1:9",
    )
    .await;
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
    let before = strowger::admin::get(admin, "/calls").await.unwrap();
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
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
    // The call list shows the caller with the target now, not with the callee it had
    // (issue 13 item 14); the caller holds the call a second after the switch.
    let after = strowger::admin::get(admin, "/calls").await.unwrap();
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    let (was, now) = (&before[0], &after[0]);
    assert_eq!(now["id"], was["id"], "{after}");
    assert_eq!(now["to"], target.as_str(), "{after}");
    assert_eq!(now["from"], was["from"], "{after}");
    assert_ne!(now["b_call_id"], was["b_call_id"], "{after}");
    assert_eq!(
        now["b_target"],
        format!("udp:127.0.0.1:{}", s.c).as_str(),
        "{after}"
    );
    let a = a.expect_success(LIMIT).await;
    let b = b.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    assert!(got(&a, "INVITE")[0].body().contains("s=third-party"));
    assert_eq!(received(&b).last().map(String::as_str), Some("BYE"));
    assert_eq!(received(&c), ["INVITE", "ACK", "BYE"]);
    wait_idle(&s).await;
}

/// A phone driven by hand over UDP (the transferor of an attended transfer holds two
/// calls at once, which one SIPp scenario cannot).
struct Phone {
    peer: UdpPeer,
    server: std::net::SocketAddr,
}

const SDP: &str = "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=phone\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n";

impl Phone {
    /// The next request, answering the ones it does not wait for with 200.
    async fn next(&self) -> String {
        self.peer
            .recv(Duration::from_secs(10))
            .await
            .expect("a message from the server")
    }

    async fn answer(&self, req: &str, status_line: &str, to_tag: Option<&str>, body: &str) {
        let mut out = format!("SIP/2.0 {status_line}\r\n");
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            for line in req.split("\r\n\r\n").next().unwrap().lines().skip(1) {
                if let Some((n, _)) = line.split_once(':') {
                    if n.trim().eq_ignore_ascii_case(name) {
                        out.push_str(line);
                        if name == "To" {
                            if let Some(t) = to_tag {
                                out.push_str(&format!(";tag={t}"));
                            }
                        }
                        out.push_str("\r\n");
                    }
                }
            }
        }
        out.push_str(&format!("Contact: <sip:phone@{}>\r\n", self.peer.addr));
        if !body.is_empty() {
            out.push_str("Content-Type: application/sdp\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        self.peer.send(self.server, out.as_bytes()).await;
    }

    async fn send(&self, msg: String) {
        self.peer.send(self.server, msg.as_bytes()).await;
    }
}

fn contact_uri(msg: &str) -> String {
    let c = header(msg, "Contact").expect("Contact");
    c.trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_owned()
}

fn tag_of(value: &str) -> String {
    value
        .split(";tag=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attended_transfer_joins_the_two_other_parties() {
    // B (by hand) is the callee of call 1 (from A) and the caller of call 2 (to C); B
    // REFERs A to C with Replaces naming call 2: A ends up with C, B's legs both end.
    let dir = sipp::workdir("xfer-attended");
    let phone = UdpPeer::bind("127.0.0.1").await;
    let c_port = sipp::free_udp_port();
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            r#"
function on_invite(call)
  if call.ruri.user == "carol" then
    call:dial("sip:carol@127.0.0.1:{c_port}")
  else
    call:dial("sip:b@{}")
  end
end
"#,
            phone.addr
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.script.path = plan.display().to_string();
    let server = start_with(config).await;
    let s = Setup {
        server,
        dir,
        b: phone.addr.port(),
        c: c_port,
    };
    let b = Phone {
        peer: phone,
        server: s.server.udp,
    };
    let c = party(&s, "target", "uas_replaced_target.xml", s.c, &[]);
    let a = caller(&s, "uac_reinvited.xml", &[]);

    // Call 1 reaches B: answer it.
    let inv1 = b.next().await;
    assert!(inv1.starts_with("INVITE"), "{inv1}");
    b.answer(&inv1, "200 OK", Some("b1tag"), SDP).await;
    let ack = b.next().await;
    assert!(ack.starts_with("ACK"), "{ack}");

    // B calls C (call 2).
    let call2 = unique("call2");
    let invite2 = format!(
        "INVITE sip:carol@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP {addr};branch=z9hG4bK{br};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:b@strowger.test>;tag=b2tag\r\n\
         To: <sip:carol@strowger.test>\r\nCall-ID: {call2}\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:phone@{addr}>\r\nContent-Type: application/sdp\r\n\
         Content-Length: {len}\r\n\r\n{SDP}",
        addr = b.peer.addr,
        br = unique("b"),
        len = SDP.len()
    );
    b.send(invite2).await;
    let ok2 = loop {
        let m = b.next().await;
        if status(&m) == 200 {
            break m;
        }
        assert!(status(&m) < 200, "{m}");
    };
    let srv_tag2 = tag_of(header(&ok2, "To").unwrap());
    b.send(format!(
        "ACK {} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch=z9hG4bK{br};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:b@strowger.test>;tag=b2tag\r\n\
         To: <sip:carol@strowger.test>;tag={srv_tag2}\r\nCall-ID: {call2}\r\n\
         CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        contact_uri(&ok2),
        addr = b.peer.addr,
        br = unique("b"),
    ))
    .await;

    // B REFERs A (call 1) to C, replacing call 2.
    let srv_tag1 = tag_of(header(&inv1, "From").unwrap());
    let replaces = format!("{call2}%3Bto-tag%3D{srv_tag2}%3Bfrom-tag%3Db2tag");
    b.send(format!(
        "REFER {} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch=z9hG4bK{br};rport\r\n\
         Max-Forwards: 70\r\nFrom: {to};tag=b1tag\r\nTo: {from}\r\n\
         Call-ID: {cid}\r\nCSeq: 1 REFER\r\nContact: <sip:phone@{addr}>\r\n\
         Refer-To: <sip:carol@127.0.0.1?Replaces={replaces}>\r\n\
         Referred-By: <sip:b@strowger.test>\r\nContent-Length: 0\r\n\r\n",
        contact_uri(&inv1),
        addr = b.peer.addr,
        br = unique("b"),
        to = header(&inv1, "To").unwrap(),
        from = header(&inv1, "From").unwrap(),
        cid = header(&inv1, "Call-ID").unwrap(),
    ))
    .await;
    assert!(!srv_tag1.is_empty());

    // B sees: 202, BYE on call 2, NOTIFY 100 and 200 on call 1, BYE on call 1.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        let Some(m) = b.peer.recv(Duration::from_secs(2)).await else {
            continue;
        };
        let first = m.lines().next().unwrap_or("").to_owned();
        let cid = header(&m, "Call-ID").unwrap_or("").to_owned();
        let which = if cid == call2 { "call2" } else { "call1" };
        if first.starts_with("SIP/2.0") {
            seen.push(format!("{which} {}", status(&m)));
            continue;
        }
        let method = first.split(' ').next().unwrap().to_owned();
        let body_line = m
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        seen.push(format!("{which} {method} {body_line}").trim().to_owned());
        b.answer(&m, "200 OK", None, "").await;
        if which == "call1" && method == "BYE" {
            break;
        }
    }
    for want in [
        "call1 202",
        "call2 BYE",
        "call1 NOTIFY SIP/2.0 100 Trying",
        "call1 NOTIFY SIP/2.0 200 OK",
        "call1 BYE",
    ] {
        assert!(seen.contains(&want.to_string()), "{want} not in {seen:?}");
    }
    // A got C's new offer in a re-INVITE; C its answer in the ACK; A's BYE reached C.
    let a = a.expect_success(LIMIT).await;
    let c = c.expect_success(LIMIT).await;
    assert!(got(&a, "INVITE")[0].body().contains("s=third-party"));
    let c_invites = got(&c, "INVITE");
    assert!(c_invites[1].body().trim().is_empty(), "offerless re-INVITE");
    assert!(got(&c, "ACK")[1].body().contains("s=transferee"));
    assert_eq!(received(&c).last().map(String::as_str), Some("BYE"));
    wait_idle(&s).await;
    let m = metrics(&s).await;
    assert!(
        m.contains(r#"strowger_transfers_total{kind="attended",result="succeeded"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_with_replaces_takes_over_a_leg() {
    // A (SIPp) calls B (by hand); D (by hand) sends an INVITE with Replaces naming B's
    // dialog: A is re-INVITEd with D's offer, D gets A's answer, B gets BYE.
    let dir = sipp::workdir("xfer-replaces");
    let phone = UdpPeer::bind("127.0.0.1").await;
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            "function on_invite(call) call:dial(\"sip:b@{}\") end\n",
            phone.addr
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.script.path = plan.display().to_string();
    let server = start_with(config).await;
    let s = Setup {
        server,
        dir,
        b: phone.addr.port(),
        c: 0,
    };
    let b = Phone {
        peer: phone,
        server: s.server.udp,
    };
    let d = Phone {
        peer: UdpPeer::bind("127.0.0.1").await,
        server: s.server.udp,
    };
    let a = caller(&s, "uac_reinvited.xml", &[]);
    let inv1 = b.next().await;
    b.answer(&inv1, "200 OK", Some("b1tag"), SDP).await;
    assert!(b.next().await.starts_with("ACK"));

    let replaces_invite = |replaces: &str, call_id: &str| {
        format!(
            "INVITE sip:b@strowger.test SIP/2.0\r\n\
             Via: SIP/2.0/UDP {addr};branch=z9hG4bK{br};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:d@strowger.test>;tag=dtag\r\n\
             To: <sip:b@strowger.test>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n\
             Contact: <sip:phone@{addr}>\r\nReplaces: {replaces}\r\n\
             Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{SDP}",
            addr = d.peer.addr,
            br = unique("b"),
            len = SDP.len()
        )
    };
    // Naming nothing: 481 (RFC 3891 3).
    d.send(replaces_invite(
        "nonesuch;to-tag=x;from-tag=y",
        &unique("d0"),
    ))
    .await;
    let r = d.peer.recv_final(WAIT).await.expect("an answer");
    assert_eq!(status(&r), 481, "{r}");

    // Naming B's dialog with the server (our tag is the From tag of the INVITE B got).
    let srv_tag = tag_of(header(&inv1, "From").unwrap());
    let cid = header(&inv1, "Call-ID").unwrap();
    let d_call = unique("d1");
    d.send(replaces_invite(
        &format!("{cid};to-tag={srv_tag};from-tag=b1tag"),
        &d_call,
    ))
    .await;
    let ok = d
        .peer
        .recv_final(Duration::from_secs(10))
        .await
        .expect("200");
    assert_eq!(status(&ok), 200, "{ok}");
    assert!(ok.contains("s=transferee"), "D gets A's answer: {ok}");
    let to_tag = tag_of(header(&ok, "To").unwrap());
    d.send(format!(
        "ACK {} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch=z9hG4bK{br};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:d@strowger.test>;tag=dtag\r\n\
         To: <sip:b@strowger.test>;tag={to_tag}\r\nCall-ID: {d_call}\r\n\
         CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        contact_uri(&ok),
        addr = d.peer.addr,
        br = unique("b"),
    ))
    .await;
    // B's leg ends.
    let bye = b.next().await;
    assert!(bye.starts_with("BYE"), "{bye}");
    b.answer(&bye, "200 OK", None, "").await;
    // A was re-INVITEd with D's offer; its BYE reaches D.
    let a = a.expect_success(LIMIT).await;
    assert!(got(&a, "INVITE")[0].body().contains("s=phone"));
    let bye = d.next().await;
    assert!(bye.starts_with("BYE"), "{bye}");
    d.answer(&bye, "200 OK", None, "").await;
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refer_outside_a_dialog_is_refused_with_a_reason() {
    let s = setup("xfer-ood").await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    for (extra, want) in [
        ("", 400),
        (
            "Refer-To: <sip:a@127.0.0.1>\r\nRefer-To: <sip:b@127.0.0.1>\r\n",
            400,
        ),
        ("Refer-To: not a uri at all <\r\n", 400),
        ("Refer-To: <mailto:someone@example.com>\r\n", 488),
        ("Refer-To: <sip:a@127.0.0.1>\r\n", 403),
    ] {
        let msg = request(
            "REFER",
            "sip:bob@strowger.test",
            peer.addr,
            "UDP",
            &unique("ood"),
            extra,
            "",
        );
        peer.send(s.server.udp, msg.as_bytes()).await;
        let r = peer.recv_final(WAIT).await.expect("an answer");
        assert_eq!(status(&r), want, "{extra:?}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transfer_takes_the_held_party_off_hold() {
    let s = setup("xfer-hold").await;
    let target = target_uri(&s);
    let (a, b, _) = three_parties(
        &s,
        "uac_held_resumed.xml",
        "uas_hold_refer_fail.xml",
        Some("uas_reject.xml"),
        "callee",
        &target,
    )
    .await;
    assert_notifies(&b, &["SIP/2.0 100 Trying", "SIP/2.0 486 Busy Here"]);
    let invites = got(&a, "INVITE");
    assert_eq!(invites.len(), 2, "hold, then resume: {:?}", received(&a));
    assert!(
        invites[0].body().contains("a=sendonly"),
        "{}",
        invites[0].text
    );
    let resume = invites[1].body();
    assert!(
        resume.contains("a=sendrecv") && !resume.contains("sendonly"),
        "{resume}"
    );
    assert!(resume.contains("2353687639"), "a new o= version: {resume}");
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_lamps_follow_a_transfer() {
    // Every change its own NOTIFY.
    let s = setup_with("xfer-blf", |c| c.presence.min_notify_interval_ms = 0).await;
    let target = target_uri(&s);
    // A desk phone watches the target's lamp (dialog event package, RFC 4235).
    let watcher = UdpPeer::bind("127.0.0.1").await;
    let sub = request(
        "SUBSCRIBE",
        "sip:target@strowger.test",
        watcher.addr,
        "UDP",
        &unique("blf"),
        &format!(
            "Event: dialog\r\nAccept: application/dialog-info+xml\r\nExpires: 600\r\n\
             Contact: <sip:w@{}>\r\n",
            watcher.addr
        ),
        "",
    );
    watcher.send(s.server.udp, sub.as_bytes()).await;
    // Answer every NOTIFY and keep its body, until the call is over.
    let server = s.server.udp;
    let collect = tokio::spawn(async move {
        let mut bodies = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            let Some(m) = watcher.recv(Duration::from_millis(500)).await else {
                if bodies
                    .iter()
                    .any(|b: &String| b.contains("<state>terminated</state>"))
                {
                    break;
                }
                continue;
            };
            if !m.starts_with("NOTIFY") {
                continue;
            }
            let mut ok = String::from("SIP/2.0 200 OK\r\n");
            for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                if let Some(v) = header(&m, name) {
                    ok.push_str(&format!("{name}: {v}\r\n"));
                }
            }
            ok.push_str("Content-Length: 0\r\n\r\n");
            watcher.send(server, ok.as_bytes()).await;
            bodies.push(m.split("\r\n\r\n").nth(1).unwrap_or("").to_owned());
        }
        bodies
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, _, _) = three_parties(
        &s,
        "uac_reinvited.xml",
        "uas_refer.xml",
        Some("uas_target.xml"),
        "callee",
        &target,
    )
    .await;
    let bodies = collect.await.unwrap();
    // The target's lamp: lit (confirmed) once it took the call over, off at the end.
    let confirmed = bodies
        .iter()
        .position(|b| b.contains("<state>confirmed</state>"));
    let terminated = bodies
        .iter()
        .rposition(|b| b.contains("<state>terminated</state>"));
    assert!(
        matches!((confirmed, terminated), (Some(c), Some(t)) if c < t),
        "{bodies:#?}"
    );
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_an_extension_rings_its_registered_phone() {
    let s = setup("xfer-ext").await;
    // Extension 2002 is the target's SIPp, registered (no users file: no challenge).
    let phone = UdpPeer::bind("127.0.0.1").await;
    let reg = request(
        "REGISTER",
        "sip:strowger.test",
        phone.addr,
        "UDP",
        &unique("reg"),
        &format!(
            "To: <sip:2002@strowger.test>\r\nContact: <sip:target@127.0.0.1:{}>;expires=300\r\n",
            s.c
        ),
        "",
    )
    // The helper's To names bob; this REGISTER is for 2002.
    .replace("To: <sip:bob@strowger.test>\r\n", "");
    phone.send(s.server.udp, reg.as_bytes()).await;
    let r = phone.recv_final(WAIT).await.expect("REGISTER answered");
    assert_eq!(status(&r), 200, "{r}");
    let (a, b, c) = three_parties(
        &s,
        "uac_reinvited.xml",
        "uas_refer.xml",
        Some("uas_target.xml"),
        "callee",
        "sip:2002@strowger.test",
    )
    .await;
    assert!(got(&a, "INVITE")[0].body().contains("s=third-party"));
    assert_notifies(&b, &["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
    let invite = got(&c, "INVITE")[0];
    assert!(
        invite
            .first_line()
            .starts_with("INVITE sip:target@127.0.0.1"),
        "rung at its contact: {}",
        invite.text
    );
    assert!(invite.header("To").unwrap().contains("2002@strowger.test"));
    wait_idle(&s).await;
}
