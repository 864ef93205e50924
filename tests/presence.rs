//! Events, presence and messaging end to end: SIPp phones sending MESSAGE to a registered
//! user (delivered, 200) and to nobody (404), and inside a call (relayed to the other
//! party); the PUBLISH lifecycle with entity tags (initial, refresh, modify, remove, 412);
//! a presence watcher getting the published state at once, an update, and a terminated
//! NOTIFY when it unsubscribes; 489 for packages we do not serve; a desk phone's busy-lamp
//! field (dialog package) following a call to the extension through trying, early,
//! confirmed and terminated. Raw SIP for what SIPp cannot show: 413 and the script's say on
//! MESSAGE, NOTIFY coalescing and a refused NOTIFY ending the subscription, expiry of
//! publications and subscriptions, message-summary routed to a voicemail server; the
//! state surviving SIGKILL of the server; two nodes sharing presence and busy lamps through
//! a real redis-server. `fan_out_figure` (ignored) measures one PUBLISH to 1000 watchers.

mod common;

use common::sipp::{self, received, SeenMessage};
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;
use strowger::config::Config;

const LIMIT: Duration = Duration::from_secs(30);

/// Dials the registered phones of the called extension.
const PLAN: &str = r#"
function on_invite(call)
  local r = call:dial(registrar.lookup(call.ruri.uri), { timeout = 10 })
  if not r.answered then call:reject(r.status, r.reason) end
end
"#;

async fn server(dir: &Path, script: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let plan = dir.join("plan.lua");
    std::fs::write(&plan, script).unwrap();
    let mut c = test_config();
    c.script.path = plan.display().to_string();
    tweak(&mut c);
    start_with(c).await
}

/// A REGISTER for `user` with `contact`, from `peer`.
fn register(peer: SocketAddr, user: &str, contact: &str) -> String {
    format!(
        "REGISTER sip:strowger.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {peer};branch=z9hG4bK{b};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{user}@strowger.test>;tag=r{b}\r\n\
         To: <sip:{user}@strowger.test>\r\n\
         Call-ID: {b}\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <{contact}>\r\n\
         Content-Length: 0\r\n\r\n",
        b = unique("reg"),
    )
}

async fn ask(s: &TestServer, peer: &UdpPeer, msg: &str) -> String {
    peer.send(s.udp, msg.as_bytes()).await;
    peer.recv_final(WAIT).await.expect("an answer")
}

async fn register_phone(s: &TestServer, user: &str, port: u16) {
    let peer = UdpPeer::bind("127.0.0.1").await;
    let r = ask(
        s,
        &peer,
        &register(peer.addr, user, &format!("sip:{user}@127.0.0.1:{port}")),
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
}

fn phone(dir: &Path, scenario: &str, user: &str, server: SocketAddr) -> sipp::Sipp {
    sipp::start(
        dir,
        &format!("{}-{user}", scenario.trim_end_matches(".xml")),
        Path::new(scenario),
        sipp::free_udp_port(),
        Some(server),
        &["-s", user],
    )
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_to_a_registered_user_is_delivered_and_to_nobody_404() {
    let dir = sipp::workdir("msg");
    let s = server(&dir, PLAN, |_| {}).await;
    let port = sipp::free_udp_port();
    let dave = sipp::start(&dir, "dave", Path::new("msg_recv.xml"), port, None, &[]);
    register_phone(&s, "dave", port).await;
    let sender = phone(&dir, "msg_send.xml", "dave", s.udp)
        .expect_success(LIMIT)
        .await;
    let got = dave.expect_success(LIMIT).await;
    assert_eq!(received(&sender), ["200"]);
    assert_eq!(received(&got), ["MESSAGE"]);
    // A B2BUA regenerates the request: the phone sees our Call-ID, not the sender's.
    assert_ne!(sipp::call_ids(&sender), sipp::call_ids(&got));
    let nobody = phone(&dir, "msg_unknown.xml", "nobody", s.udp)
        .expect_success(LIMIT)
        .await;
    assert_eq!(received(&nobody), ["404"]);
    let st = s.handle.presence().stats();
    assert_eq!(load(&st.messages_routed), 1);
    assert_eq!(load(&st.messages_failed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_inside_a_call_goes_to_the_other_party() {
    let dir = sipp::workdir("msg-call");
    let s = server(&dir, PLAN, |_| {}).await;
    let port = sipp::free_udp_port();
    let callee = sipp::start(
        &dir,
        "kim",
        Path::new("msg_incall_uas.xml"),
        port,
        None,
        &[],
    );
    register_phone(&s, "kim", port).await;
    let caller = phone(&dir, "msg_incall_uac.xml", "kim", s.udp)
        .expect_success(LIMIT)
        .await;
    let got = callee.expect_success(LIMIT).await;
    assert_eq!(received(&caller), ["100", "180", "200", "200", "200"]);
    assert_eq!(received(&got), ["INVITE", "ACK", "MESSAGE", "BYE"]);
    // Relayed by the call (no on_message, not counted as page-mode).
    let st = s.handle.presence().stats();
    assert_eq!(load(&st.messages_routed), 0);
}

/// A MESSAGE from a raw peer; the final answer.
async fn message(s: &TestServer, peer: &UdpPeer, user: &str, body: &str) -> String {
    let msg = request(
        "MESSAGE",
        &format!("sip:{user}@strowger.test"),
        peer.addr,
        "UDP",
        &unique("m"),
        "Content-Type: text/plain\r\n",
        body,
    );
    ask(s, peer, &msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_limit_and_the_scripts_say() {
    let dir = sipp::workdir("msg-script");
    let inbox = UdpPeer::bind("127.0.0.1").await;
    let script = format!(
        r#"
function on_message(req)
  if req.body:find("spam") then return req:reject(403, "No spam") end
  if req.user == "desk" then return req:route("sip:inbox@{}") end
end
function on_subscribe(req)
  if req.package == "dialog" and req.subscriber ~= "sip:boss@strowger.test" then
    return req:reject(403, "Not your lamp")
  end
end
"#,
        inbox.addr
    );
    let users = dir.join("users.toml");
    std::fs::write(&users, "[users.zoe]\npassword = \"x\"\n").unwrap();
    let s = server(&dir, &script, |c| {
        c.presence.max_message_size = 64;
        c.registrar.users_file = users.display().to_string();
    })
    .await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    // RFC 3428 7: above the limit, 413.
    let r = message(&s, &peer, "bob", &"x".repeat(65)).await;
    assert_eq!(status(&r), 413, "{r}");
    let r = message(&s, &peer, "bob", "cheap spam").await;
    assert_eq!((status(&r), reason(&r)), (403, "No spam"), "{r}");
    // Nobody registered: a user we know is away (480), anyone else unknown (404).
    let r = message(&s, &peer, "zoe", "are you there?").await;
    assert_eq!(status(&r), 480, "{r}");
    let r = message(&s, &peer, "bob", "are you there?").await;
    assert_eq!(status(&r), 404, "{r}");
    // on_subscribe refuses a lamp to anyone but the boss (the request's From is alice).
    let sub = request(
        "SUBSCRIBE",
        "sip:1001@strowger.test",
        peer.addr,
        "UDP",
        &unique("s"),
        &format!("Event: dialog\r\nContact: <sip:a@{}>\r\n", peer.addr),
        "",
    );
    let r = ask(&s, &peer, &sub).await;
    assert_eq!((status(&r), reason(&r)), (403, "Not your lamp"), "{r}");
    // req:route: to the named target; its 202 is the sender's answer.
    let msg = request(
        "MESSAGE",
        "sip:desk@strowger.test",
        peer.addr,
        "UDP",
        &unique("m"),
        "Content-Type: text/plain\r\n",
        "to the desk",
    );
    peer.send(s.udp, msg.as_bytes()).await;
    let fwd = inbox.recv(WAIT).await.expect("routed MESSAGE");
    assert!(fwd.starts_with("MESSAGE sip:inbox@"), "{fwd}");
    assert!(fwd.ends_with("to the desk"), "{fwd}");
    assert_eq!(header(&fwd, "Content-Type"), Some("text/plain"));
    let ok = reply(&fwd, 202);
    inbox.send(s.udp, ok.as_bytes()).await;
    let r = peer.recv_final(WAIT).await.expect("answer");
    assert_eq!(status(&r), 202, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_lifecycle_with_entity_tags() {
    let dir = sipp::workdir("pub");
    let s = server(&dir, PLAN, |_| {}).await;
    let seen = phone(&dir, "pres_publish.xml", "carol", s.udp)
        .expect_success(LIMIT)
        .await;
    assert_eq!(received(&seen), ["200", "200", "200", "412", "200", "412"]);
    let tags: Vec<&str> = seen
        .iter()
        .filter(|m| !m.sent)
        .filter_map(|m| m.header("SIP-ETag"))
        .collect();
    assert_eq!(tags.len(), 3, "initial, refresh, modify each get a tag");
    assert!(tags[0] != tags[1] && tags[1] != tags[2] && tags[0] != tags[2]);
    let st = s.handle.presence().stats();
    let p: Vec<u64> = st.publish.iter().map(load).collect();
    // created, refreshed, modified, removed, unknown_etag, rejected
    assert_eq!(p, [1, 1, 1, 1, 2, 0]);
}

fn notifies(seen: &[SeenMessage]) -> Vec<&SeenMessage> {
    seen.iter()
        .filter(|m| !m.sent && m.kind() == "NOTIFY")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_watcher_gets_state_at_once_updates_and_a_terminated_notify() {
    let dir = sipp::workdir("watch");
    let s = server(&dir, PLAN, |_| {}).await;
    let seen = phone(&dir, "pres_watch.xml", "erin", s.udp)
        .expect_success(LIMIT)
        .await;
    let n = notifies(&seen);
    assert_eq!(n.len(), 3, "{:?}", received(&seen));
    assert!(n[0].body().contains("at my desk"));
    assert!(n[0].body().contains("entity=\"sip:erin@strowger.test\""));
    // The modification replaced the first document.
    assert!(n[1].body().contains("in a meeting"));
    assert!(!n[1].body().contains("at my desk"));
    assert!(n[2]
        .header("Subscription-State")
        .unwrap()
        .starts_with("terminated"));
    // Each NOTIFY a new CSeq of the subscription's dialog.
    let cseqs: Vec<&str> = n.iter().map(|m| m.header("CSeq").unwrap()).collect();
    assert_eq!(cseqs, ["1 NOTIFY", "2 NOTIFY", "3 NOTIFY"]);
    let st = s.handle.presence().stats();
    assert_eq!(load(&st.subscriptions[0]), 0, "unsubscribed");
    assert!(load(&st.notifies_sent) >= 3);
    let metrics =
        strowger::admin::send(s.handle.admin_addr(), hyper::Method::GET, "/metrics", None)
            .await
            .unwrap()
            .into_body();
    for line in [
        "strowger_presence_subscriptions{package=\"presence\"} 0",
        "strowger_presence_publish_total{result=\"created\"} 1",
        "strowger_presence_publish_total{result=\"modified\"} 1",
        "strowger_presence_notifies_total{result=\"sent\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_event_package_gets_489() {
    let dir = sipp::workdir("bad-event");
    let s = server(&dir, PLAN, |_| {}).await;
    let seen = phone(&dir, "pres_bad_event.xml", "frank", s.udp)
        .expect_success(LIMIT)
        .await;
    assert_eq!(received(&seen), ["489", "489"]);
    let allow = seen[1].header("Allow-Events").unwrap();
    assert_eq!(allow, "presence, dialog, message-summary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_lamp_field_follows_a_call_to_the_extension() {
    let dir = sipp::workdir("blf");
    // Every change its own NOTIFY (coalescing has its own test below).
    let s = server(&dir, PLAN, |c| c.presence.min_notify_interval_ms = 0).await;
    let watcher = phone(&dir, "blf_watch.xml", "1001", s.udp);
    // The call starts once the lamp is subscribed and its first NOTIFY is out.
    let st = s.handle.presence().stats();
    let mut ready = false;
    for _ in 0..100 {
        if load(&st.subscriptions[1]) == 1 && load(&st.notifies_sent) >= 1 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the watcher subscribed");
    let port = sipp::free_udp_port();
    let callee = sipp::start(
        &dir,
        "ext1001",
        Path::new("blf_callee.xml"),
        port,
        None,
        &[],
    );
    register_phone(&s, "1001", port).await;
    let caller = sipp::start(
        &dir,
        "caller",
        Path::new("uac_call.xml"),
        sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "1001", "-d", "500"],
    );
    caller.expect_success(LIMIT).await;
    callee.expect_success(LIMIT).await;
    let seen = watcher.expect_success(LIMIT).await;
    let n = notifies(&seen);
    let states: Vec<&str> = n
        .iter()
        .map(|m| {
            ["trying", "early", "confirmed", "terminated"]
                .into_iter()
                .find(|st| m.body().contains(&format!("<state>{st}</state>")))
                .unwrap_or("none")
        })
        .collect();
    assert_eq!(
        &states[..5],
        ["none", "trying", "early", "confirmed", "terminated"]
    );
    // The call's dialog as phones use it for pick-up: the caller's Call-ID.
    assert!(n[2].body().contains("call-id="), "{}", n[2].body());
    assert!(n[2]
        .body()
        .contains("<remote><identity>sip:caller@127.0.0.1"));
    assert_eq!(load(&st.subscriptions[1]), 0);
}

/// A SUBSCRIBE to presence from a raw peer; answers the initial NOTIFY and returns the
/// 200's To tag and that NOTIFY's body. The SUBSCRIBE comes as through a record-routing
/// proxy (at the peer's own address): the 200 must copy the Record-Route and the NOTIFY
/// follow it (RFC 3261 12.1.1, RFC 6665 4.1.3).
async fn raw_subscribe(server: SocketAddr, peer: &UdpPeer, user: &str) -> (String, String) {
    let proxy = format!("<sip:{};lr;proxy=1>", peer.addr);
    let msg = request(
        "SUBSCRIBE",
        &format!("sip:{user}@strowger.test"),
        peer.addr,
        "UDP",
        &unique("sub"),
        &format!(
            "Event: presence\r\nExpires: 600\r\nContact: <sip:w@{}>\r\nRecord-Route: {proxy}\r\n",
            peer.addr
        ),
        "",
    );
    peer.send(server, msg.as_bytes()).await;
    let mut tag = None;
    let mut body = None;
    while tag.is_none() || body.is_none() {
        let m = peer.recv(WAIT).await.expect("200 and NOTIFY");
        if m.starts_with("SIP/2.0 200") {
            assert_eq!(header(&m, "Record-Route"), Some(proxy.as_str()), "{m}");
            tag = header(&m, "To")
                .and_then(|t| t.split("tag=").nth(1))
                .map(str::to_owned);
        } else if m.starts_with("NOTIFY") {
            assert_eq!(header(&m, "Route"), Some(proxy.as_str()), "{m}");
            answer(server, peer, &m, 200).await;
            body = Some(m.split("\r\n\r\n").nth(1).unwrap_or("").to_owned());
        }
    }
    (tag.unwrap(), body.unwrap())
}

/// A response to a request the server sent us (its Via, From, To, Call-ID, CSeq).
fn reply(req: &str, code: u16) -> String {
    let head = req.split("\r\n\r\n").next().unwrap();
    let copied: Vec<&str> = head
        .lines()
        .skip(1)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["via:", "from:", "to:", "call-id:", "cseq:"]
                .iter()
                .any(|h| l.starts_with(h))
        })
        .collect();
    format!(
        "SIP/2.0 {code} Whatever\r\n{}\r\nContent-Length: 0\r\n\r\n",
        copied.join("\r\n")
    )
}

/// Answers a request from the server with `code`.
async fn answer(server: SocketAddr, peer: &UdpPeer, req: &str, code: u16) {
    peer.send(server, reply(req, code).as_bytes()).await;
}

fn pidf(note: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><presence xmlns=\"urn:ietf:params:xml:ns:pidf\" entity=\"sip:x@strowger.test\"><tuple id=\"t\"><status><basic>open</basic></status><note>{note}</note></tuple></presence>"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_are_coalesced_and_a_refused_notify_ends_the_subscription() {
    let dir = sipp::workdir("coalesce");
    // A long interval, so that three PUBLISHes fit in it even on a loaded machine.
    let s = server(&dir, PLAN, |c| c.presence.min_notify_interval_ms = 2000).await;
    let publisher = UdpPeer::bind("127.0.0.1").await;
    let watcher = UdpPeer::bind("127.0.0.1").await;
    let mut etag = publish_to(s.udp, &publisher, "gina", None, "one").await;
    let (_tag, body) = raw_subscribe(s.udp, &watcher, "gina").await;
    assert!(body.contains("<note>one</note>"), "{body}");
    assert_eq!(
        s.handle.dialogs(),
        1,
        "the subscription is in the dialog table"
    );
    // Three changes within the interval: one NOTIFY, with the last state.
    for note in ["two", "three", "four"] {
        etag = publish_to(s.udp, &publisher, "gina", Some(&etag), note).await;
    }
    let n = watcher
        .recv(Duration::from_secs(5))
        .await
        .expect("a NOTIFY");
    assert!(n.starts_with("NOTIFY"), "{n}");
    assert!(
        n.contains("<note>four</note>") && !n.contains("<note>two</note>"),
        "{n}"
    );
    // Nothing else within the interval but retransmissions of that NOTIFY (UDP, not
    // answered yet).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
    while let Some(again) = watcher
        .recv(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        assert_eq!(
            header(&again, "CSeq"),
            header(&n, "CSeq"),
            "only one NOTIFY: {again}"
        );
    }
    // RFC 6665 4.2.2: the subscriber says 481; the subscription is gone.
    answer(s.udp, &watcher, &n, 481).await;
    let st = s.handle.presence().stats();
    for _ in 0..50 {
        if load(&st.subscriptions[0]) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(load(&st.subscriptions[0]), 0);
    assert_eq!(load(&st.notifies_failed), 1);
    assert_eq!(s.handle.dialogs(), 0, "and out of the dialog table");
    publish_to(s.udp, &publisher, "gina", Some(&etag), "five").await;
    assert!(
        watcher.recv(Duration::from_millis(1000)).await.is_none(),
        "no NOTIFY after 481"
    );
}

/// The binary with a config in `dir` on a SIP port chosen now.
fn server_config(dir: &Path, sip_port: u16) -> std::path::PathBuf {
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:{sip_port}\"]\ndomain = \"strowger.test\"\n[http]\nlisten = {http:?}\n[storage]\ndir = {:?}\n[shutdown]\ndrain_timeout_s = 0\n[presence]\nmin_notify_interval_ms = 0\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    config
}

/// Kills (by its PID) the server child on drop, so a failed assertion leaves nothing.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_and_subscriptions_survive_sigkill() {
    let dir = sipp::workdir("pres-kill");
    let sip_port = sipp::free_udp_port();
    let config = server_config(&dir, sip_port);
    let bin = env!("CARGO_BIN_EXE_strowger");
    let spawn = || {
        Child(
            std::process::Command::new(bin)
                .args(["run", "--config", config.to_str().unwrap()])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("server starts"),
        )
    };
    let addr: SocketAddr = format!("127.0.0.1:{sip_port}").parse().unwrap();
    let publisher = UdpPeer::bind("127.0.0.1").await;
    let watcher = UdpPeer::bind("127.0.0.1").await;
    let mut child = spawn();
    // The first answer tells that the server is up.
    let first = request(
        "OPTIONS",
        "sip:strowger.test",
        publisher.addr,
        "UDP",
        &unique("o"),
        "",
        "",
    );
    let mut up = false;
    for _ in 0..50 {
        publisher.send(addr, first.as_bytes()).await;
        if publisher
            .recv_final(Duration::from_millis(200))
            .await
            .is_some()
        {
            up = true;
            break;
        }
    }
    assert!(up, "server started");
    let etag = publish_to(addr, &publisher, "hank", None, "before").await;
    let (_, body) = raw_subscribe(addr, &watcher, "hank").await;
    assert!(body.contains("<note>before</note>"), "{body}");
    // SIGKILL: no clean shutdown.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    drop(child);
    let _child = spawn();
    // The old entity-tag is still known (412 otherwise), and the old subscription still
    // gets NOTIFYs.
    let mut answered = None;
    for _ in 0..50 {
        let msg = publish_msg(&publisher, "hank", Some(&etag), "after");
        publisher.send(addr, msg.as_bytes()).await;
        if let Some(r) = publisher.recv_final(Duration::from_millis(200)).await {
            answered = Some(r);
            break;
        }
    }
    let r = answered.expect("restarted server answers");
    assert_eq!(status(&r), 200, "{r}");
    // After the restart every subscriber hears the current state once, then the change.
    let mut n = String::new();
    for _ in 0..5 {
        n = watcher
            .recv(Duration::from_secs(5))
            .await
            .expect("NOTIFY after restart");
        assert!(n.starts_with("NOTIFY"), "{n}");
        answer(addr, &watcher, &n, 200).await;
        if n.contains("<note>after</note>") {
            break;
        }
    }
    assert!(n.contains("<note>after</note>"), "{n}");
    let cseq: u32 = header(&n, "CSeq")
        .and_then(|c| c.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(cseq > 1, "CSeq goes on after the restart: {cseq}");
}

fn publish_msg(peer: &UdpPeer, user: &str, etag: Option<&str>, note: &str) -> String {
    let mut extra =
        "Event: presence\r\nExpires: 600\r\nContent-Type: application/pidf+xml\r\n".to_owned();
    if let Some(e) = etag {
        extra.push_str(&format!("SIP-If-Match: {e}\r\n"));
    }
    request(
        "PUBLISH",
        &format!("sip:{user}@strowger.test"),
        peer.addr,
        "UDP",
        &unique("pub"),
        &extra,
        &pidf(note),
    )
}

/// A PUBLISH that must succeed; its new entity-tag.
async fn publish_to(
    server: SocketAddr,
    peer: &UdpPeer,
    user: &str,
    etag: Option<&str>,
    note: &str,
) -> String {
    peer.send(server, publish_msg(peer, user, etag, note).as_bytes())
        .await;
    let r = peer.recv_final(WAIT).await.expect("answer");
    assert_eq!(status(&r), 200, "{r}");
    header(&r, "SIP-ETag").unwrap().to_owned()
}

/// Receives (and answers 200) NOTIFYs until one satisfies `want`; that one.
async fn notify_until(
    server: SocketAddr,
    peer: &UdpPeer,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = peer.recv(left).await?;
        if !m.starts_with("NOTIFY") {
            continue;
        }
        answer(server, peer, &m, 200).await;
        if want(&m) {
            return Some(m);
        }
    }
}

/// Which node sent a NOTIFY: the port of its Via.
fn via_port(msg: &str) -> u16 {
    let via = header(msg, "Via").unwrap();
    let hostport = via
        .split_whitespace()
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    hostport.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_presence_and_busy_lamps_through_redis() {
    let Some(redis) = common::redis::start_redis() else {
        panic!(
            "redis-server is needed (the test command installs it: apt-get install redis-server)"
        );
    };
    let dir = sipp::workdir("pres-redis");
    let node = |url: String| {
        let dir = dir.clone();
        async move {
            server(&dir, PLAN, |c| {
                c.registrar.store = strowger::registrar::RegistrarStore::Redis;
                c.redis.url = url;
                c.presence.min_notify_interval_ms = 0;
            })
            .await
        }
    };
    let n1 = node(redis.url()).await;
    let n2 = node(redis.url()).await;
    let publisher = UdpPeer::bind("127.0.0.1").await;
    let watcher = UdpPeer::bind("127.0.0.1").await;
    // Published through node 1, watched through node 2.
    let etag = publish_to(n1.udp, &publisher, "ivy", None, "one").await;
    let call_id = unique("sub");
    let msg = request(
        "SUBSCRIBE",
        "sip:ivy@strowger.test",
        watcher.addr,
        "UDP",
        &call_id,
        &format!(
            "Event: presence\r\nExpires: 600\r\nContact: <sip:w@{}>\r\n",
            watcher.addr
        ),
        "",
    );
    watcher.send(n2.udp, msg.as_bytes()).await;
    let n = notify_until(n2.udp, &watcher, |m| m.contains("<note>one</note>"))
        .await
        .expect("node 2 knows node 1's publication");
    assert_eq!(via_port(&n), n2.udp.port());
    let to_tag = header(&n, "From")
        .and_then(|f| f.split("tag=").nth(1))
        .unwrap()
        .to_owned();
    let etag = publish_to(n1.udp, &publisher, "ivy", Some(&etag), "two").await;
    let n = notify_until(n2.udp, &watcher, |m| m.contains("<note>two</note>"))
        .await
        .expect("node 2 hears node 1's change");
    assert_eq!(via_port(&n), n2.udp.port());

    // The watcher refreshes through node 1: node 1 serves the subscription from now on.
    let refresh = format!(
        "SUBSCRIBE sip:ivy@strowger.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {w};branch=z9hG4bK{b};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@example.com>;tag=a{b}\r\n\
         To: <sip:ivy@strowger.test>;tag={to_tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 2 SUBSCRIBE\r\n\
         Event: presence\r\nExpires: 600\r\n\
         Content-Length: 0\r\n\r\n",
        w = watcher.addr,
        b = unique("r"),
    );
    // The From tag of the original SUBSCRIBE is in the NOTIFY's To.
    let from_tag = header(&n, "To")
        .and_then(|t| t.split("tag=").nth(1))
        .unwrap()
        .to_owned();
    let refresh = refresh.replacen(
        &format!(
            "tag=a{}",
            refresh
                .split("tag=a")
                .nth(1)
                .unwrap()
                .split("\r\n")
                .next()
                .unwrap()
        ),
        &format!("tag={from_tag}"),
        1,
    );
    watcher.send(n1.udp, refresh.as_bytes()).await;
    let mut got_200 = false;
    let mut notify_from = 0;
    while !(got_200 && notify_from != 0) {
        let m = watcher
            .recv(WAIT)
            .await
            .expect("200 and NOTIFY from node 1");
        if m.starts_with("SIP/2.0 ") {
            assert_eq!(status(&m), 200, "{m}");
            got_200 = true;
        } else if m.starts_with("NOTIFY") && via_port(&m) == n2.udp.port() {
            // Sent by node 2 before the take-over (a retransmission at most).
            answer(n2.udp, &watcher, &m, 200).await;
        } else if m.starts_with("NOTIFY") {
            answer(n1.udp, &watcher, &m, 200).await;
            notify_from = via_port(&m);
        }
    }
    assert_eq!(notify_from, n1.udp.port());
    // Node 2 hears of the take-over through the store's change feed, which lags under load
    // (the whole suite running beside it): until then it still holds the subscription and
    // would notify a change it sees first. Wait (bounded) for it to let go.
    let deadline = tokio::time::Instant::now() + WAIT;
    while load(&n2.handle.presence().stats().subscriptions[0]) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 2 never heard that node 1 took the subscription over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publish_to(n2.udp, &publisher, "ivy", Some(&etag), "three").await;
    let n = notify_until(n1.udp, &watcher, |m| m.contains("<note>three</note>"))
        .await
        .expect("NOTIFY after the take-over");
    assert_eq!(
        via_port(&n),
        n1.udp.port(),
        "node 1 notifies now, not node 2"
    );
    assert!(
        watcher.recv(Duration::from_millis(500)).await.is_none(),
        "no second NOTIFY from the old owner"
    );

    // Busy lamps across nodes: watched through node 2, the call goes through node 1.
    let lamp = UdpPeer::bind("127.0.0.1").await;
    let msg = request(
        "SUBSCRIBE",
        "sip:1002@strowger.test",
        lamp.addr,
        "UDP",
        &unique("blf"),
        &format!(
            "Event: dialog\r\nExpires: 600\r\nContact: <sip:l@{}>\r\n",
            lamp.addr
        ),
        "",
    );
    lamp.send(n2.udp, msg.as_bytes()).await;
    notify_until(n2.udp, &lamp, |m| m.contains("dialog-info"))
        .await
        .expect("initial dialog NOTIFY");
    let port = sipp::free_udp_port();
    let callee = sipp::start(
        &dir,
        "ext1002",
        Path::new("uas_answer.xml"),
        port,
        None,
        &[],
    );
    register_phone(&n1, "1002", port).await;
    let caller = sipp::start(
        &dir,
        "caller",
        Path::new("uac_call.xml"),
        sipp::free_udp_port(),
        Some(n1.udp),
        &["-s", "1002", "-d", "300"],
    );
    for state in ["confirmed", "terminated"] {
        let n = notify_until(n2.udp, &lamp, |m| {
            m.contains(&format!("<state>{state}</state>"))
        })
        .await
        .unwrap_or_else(|| panic!("{state} seen through node 2"));
        assert_eq!(via_port(&n), n2.udp.port());
    }
    caller.expect_success(LIMIT).await;
    callee.expect_success(LIMIT).await;
    drop(redis);
}

/// A response to `req` with a To tag and extra header lines.
fn reply_tagged(req: &str, code: u16, tag: &str, extra: &str) -> String {
    let r = reply(req, code);
    let mut out = Vec::new();
    for line in r.split("\r\n") {
        if line.to_ascii_lowercase().starts_with("to:") && !line.contains("tag=") {
            out.push(format!("{line};tag={tag}"));
        } else if line.starts_with("Content-Length") {
            out.push(format!("{extra}Content-Length: 0"));
        } else {
            out.push(line.to_owned());
        }
    }
    out.join("\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_summary_is_routed_to_a_voicemail_server() {
    let dir = sipp::workdir("mwi");
    let vm = UdpPeer::bind("127.0.0.1").await;
    let script = format!(
        r#"
function on_subscribe(req)
  if req.package == "message-summary" then return req:route("sip:vm@{}") end
end
"#,
        vm.addr
    );
    let s = server(&dir, &script, |_| {}).await;
    let phone = UdpPeer::bind("127.0.0.1").await;
    let call_id = unique("mwi");
    let msg = request(
        "SUBSCRIBE",
        "sip:1003@strowger.test",
        phone.addr,
        "UDP",
        &call_id,
        &format!(
            "Event: message-summary\r\nExpires: 600\r\nContact: <sip:p@{}>\r\n",
            phone.addr
        ),
        "",
    );
    phone.send(s.udp, msg.as_bytes()).await;
    // The voicemail server gets our own SUBSCRIBE (a B2BUA: another Call-ID).
    let sub = vm
        .recv(WAIT)
        .await
        .expect("SUBSCRIBE at the voicemail server");
    assert!(sub.starts_with("SUBSCRIBE sip:vm@"), "{sub}");
    assert_eq!(header(&sub, "Event"), Some("message-summary"));
    assert_ne!(header(&sub, "Call-ID"), Some(call_id.as_str()));
    vm.send(
        s.udp,
        reply_tagged(
            &sub,
            200,
            "vm1",
            &format!("Expires: 600\r\nContact: <sip:vm@{}>\r\n", vm.addr),
        )
        .as_bytes(),
    )
    .await;
    let vm_notify = |cseq: u32, state: &str, body: &str| {
        format!(
            "NOTIFY sip:p@{s} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {v};branch=z9hG4bK{b};rport\r\n\
             Max-Forwards: 70\r\n\
             From: {to};tag=vm1\r\n\
             To: {from}\r\n\
             Call-ID: {cid}\r\n\
             CSeq: {cseq} NOTIFY\r\n\
             Contact: <sip:vm@{v}>\r\n\
             Event: message-summary\r\n\
             Subscription-State: {state}\r\n\
             Content-Type: application/simple-message-summary\r\n\
             Content-Length: {len}\r\n\r\n{body}",
            s = s.udp,
            v = vm.addr,
            b = unique("n"),
            to = header(&sub, "To").unwrap(),
            from = header(&sub, "From").unwrap(),
            cid = header(&sub, "Call-ID").unwrap(),
            len = body.len(),
        )
    };
    let waiting = "Messages-Waiting: yes\r\nVoice-Message: 2/8 (0/2)\r\n";
    vm.send(
        s.udp,
        vm_notify(1, "active;expires=600", waiting).as_bytes(),
    )
    .await;
    // The phone: the 200 for its SUBSCRIBE and the voicemail server's NOTIFY, relayed.
    let mut to_tag = None;
    let mut relayed = None;
    while to_tag.is_none() || relayed.is_none() {
        let m = phone.recv(WAIT).await.expect("200 and NOTIFY at the phone");
        if m.starts_with("SIP/2.0 ") {
            assert_eq!(status(&m), 200, "{m}");
            to_tag = header(&m, "To")
                .and_then(|t| t.split("tag=").nth(1))
                .map(str::to_owned);
        } else if m.starts_with("NOTIFY") {
            assert_eq!(header(&m, "Call-ID"), Some(call_id.as_str()));
            assert!(m.ends_with(waiting), "{m}");
            answer(s.udp, &phone, &m, 200).await;
            relayed = Some(m);
        }
    }
    let r = vm
        .recv(WAIT)
        .await
        .expect("the phone's 200 reaches the server");
    assert_eq!(status(&r), 200, "{r}");
    // Unsubscribe: relayed to the voicemail server, whose last NOTIFY ends it.
    let unsub = format!(
        "SUBSCRIBE sip:1003@strowger.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {p};branch=z9hG4bK{b};rport\r\n\
         Max-Forwards: 70\r\n\
         {from}\r\n\
         To: <sip:bob@strowger.test>;tag={tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 2 SUBSCRIBE\r\n\
         Event: message-summary\r\nExpires: 0\r\n\
         Content-Length: 0\r\n\r\n",
        p = phone.addr,
        b = unique("u"),
        from = msg.lines().find(|l| l.starts_with("From:")).unwrap(),
        tag = to_tag.unwrap(),
    );
    phone.send(s.udp, unsub.as_bytes()).await;
    let sub2 = vm.recv(WAIT).await.expect("unsubscribe at the server");
    assert!(sub2.starts_with("SUBSCRIBE"), "{sub2}");
    assert_eq!(header(&sub2, "Expires"), Some("0"));
    assert!(header(&sub2, "To").unwrap().contains("tag=vm1"), "{sub2}");
    vm.send(s.udp, reply(&sub2, 200).as_bytes()).await;
    let r = phone
        .recv_final(WAIT)
        .await
        .expect("200 for the unsubscribe");
    assert_eq!(status(&r), 200, "{r}");
    vm.send(
        s.udp,
        vm_notify(2, "terminated;reason=timeout", "Messages-Waiting: no\r\n").as_bytes(),
    )
    .await;
    let last = phone.recv(WAIT).await.expect("terminated NOTIFY");
    assert!(
        header(&last, "Subscription-State")
            .unwrap()
            .starts_with("terminated"),
        "{last}"
    );
    answer(s.udp, &phone, &last, 200).await;
    let r = vm.recv(WAIT).await.expect("200 for the last NOTIFY");
    assert_eq!(status(&r), 200, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_and_subscriptions_expire() {
    let dir = sipp::workdir("expiry");
    let s = server(&dir, PLAN, |c| {
        c.presence.min_expires = 2;
        c.presence.min_notify_interval_ms = 0;
    })
    .await;
    let publisher = UdpPeer::bind("127.0.0.1").await;
    let watcher = UdpPeer::bind("127.0.0.1").await;
    let mut msg = publish_msg(&publisher, "lena", None, "short");
    msg = msg.replace("Expires: 600", "Expires: 2");
    let r = ask(&s, &publisher, &msg).await;
    assert_eq!((status(&r), header(&r, "Expires")), (200, Some("2")), "{r}");
    let sub = |expires: u32| {
        request(
            "SUBSCRIBE",
            "sip:lena@strowger.test",
            watcher.addr,
            "UDP",
            &unique("sub"),
            &format!(
                "Event: presence\r\nExpires: {expires}\r\nContact: <sip:w@{}>\r\n",
                watcher.addr
            ),
            "",
        )
    };
    // Below presence.min_expires: 423 with Min-Expires (RFC 6665 4.2.1.1).
    let r = ask(&s, &watcher, &sub(1)).await;
    assert_eq!(
        (status(&r), header(&r, "Min-Expires")),
        (423, Some("2")),
        "{r}"
    );
    watcher.send(s.udp, sub(4).as_bytes()).await;
    let first = notify_until(s.udp, &watcher, |_| true)
        .await
        .expect("initial NOTIFY");
    assert!(first.contains("<note>short</note>"), "{first}");
    // The publication lapses: the watcher hears the entity is offline.
    let offline = notify_until(s.udp, &watcher, |m| m.contains("<basic>closed</basic>"))
        .await
        .expect("NOTIFY when the publication lapses");
    assert!(
        header(&offline, "Subscription-State")
            .unwrap()
            .starts_with("active"),
        "{offline}"
    );
    // The subscription lapses: a last NOTIFY says so (RFC 6665 4.2.2).
    let last = notify_until(s.udp, &watcher, |m| {
        header(m, "Subscription-State").is_some_and(|v| v.starts_with("terminated"))
    })
    .await
    .expect("terminated NOTIFY at expiry");
    assert_eq!(
        header(&last, "Subscription-State"),
        Some("terminated;reason=timeout")
    );
    let st = s.handle.presence().stats();
    for _ in 0..50 {
        if load(&st.subscriptions[0]) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(load(&st.subscriptions[0]), 0);
}

/// A figure, not a check: `cargo test --release --test presence fan_out -- --ignored
/// --nocapture`. N watchers of one presentity, then one PUBLISH: how long until every
/// watcher has its NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn fan_out_figure() {
    const N: usize = 1000;
    let dir = sipp::workdir("fanout");
    let s = server(&dir, PLAN, |c| c.presence.min_notify_interval_ms = 0).await;
    let publisher = UdpPeer::bind("127.0.0.1").await;
    let watcher = std::sync::Arc::new(UdpPeer::bind("127.0.0.1").await);
    let etag = publish_to(s.udp, &publisher, "max", None, "before").await;
    // A reader answers every NOTIFY as it comes and says which state it carried.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let reader = {
        let watcher = watcher.clone();
        let server = s.udp;
        tokio::spawn(async move {
            let mut answered = std::collections::HashSet::new();
            while let Some(m) = watcher.recv(Duration::from_secs(10)).await {
                if m.starts_with("NOTIFY") {
                    answer(server, &watcher, &m, 200).await;
                    let id = (
                        header(&m, "Call-ID").unwrap().to_owned(),
                        header(&m, "CSeq").unwrap().to_owned(),
                    );
                    if answered.insert(id) {
                        let _ = seen_tx.send(m.contains("<note>after</note>"));
                    }
                }
            }
        })
    };
    let t0 = std::time::Instant::now();
    for i in 0..N {
        let msg = request(
            "SUBSCRIBE",
            "sip:max@strowger.test",
            watcher.addr,
            "UDP",
            &format!("fan{i}"),
            &format!(
                "Event: presence\r\nExpires: 600\r\nContact: <sip:w@{}>\r\n",
                watcher.addr
            ),
            "",
        );
        watcher.send(s.udp, msg.as_bytes()).await;
        if i % 10 == 9 {
            // Keep the socket buffers from overflowing (a raw peer does not retransmit).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for i in 0..N {
        let got = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
        assert!(
            matches!(got, Ok(Some(false))),
            "initial NOTIFY {i} of {N}: {got:?}"
        );
    }
    let subscribed = t0.elapsed();
    let t1 = std::time::Instant::now();
    publish_to(s.udp, &publisher, "max", Some(&etag), "after").await;
    for _ in 0..N {
        assert!(seen.recv().await.expect("NOTIFYs after the PUBLISH"));
    }
    let fanned = t1.elapsed();
    reader.abort();
    println!(
        "{N} subscriptions (SUBSCRIBE, 200, NOTIFY, 200) in {subscribed:?}; one PUBLISH to {N} NOTIFYs answered in {fanned:?}"
    );
}

/// The same store suite on the embedded store and on a real redis-server: records round
/// trip, a rewrite replaces, a dropped write future still writes (in order), removal; and
/// on Redis a second instance (another node) hears the first one's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_stores_sqlite_and_redis() {
    use strowger::presence::{
        PresenceEvent, PresenceStore, RedisPresenceStore, SqlitePresenceStore, StoredPublication,
        StoredSubscription,
    };
    let Some(redis) = common::redis::start_redis() else {
        panic!(
            "redis-server is needed (the test command installs it: apt-get install redis-server)"
        );
    };
    let dir = sipp::workdir("pres-store");
    let pubn = |etag: &str, body: &str| StoredPublication {
        id: "p1".into(),
        etag: etag.into(),
        resource: "sip:a@strowger.test".into(),
        package: "presence".into(),
        content_type: "application/pidf+xml".into(),
        body: body.into(),
        expires_at: 4_000_000_000,
    };
    let sub = StoredSubscription {
        key: "c1;t1".into(),
        package: "dialog".into(),
        event_id: Some("7".into()),
        resource: "sip:1001@strowger.test".into(),
        call_id: "c1".into(),
        local_tag: "t1".into(),
        remote_tag: "r1".into(),
        local_uri: "<sip:1001@strowger.test>".into(),
        remote_uri: "<sip:boss@strowger.test>".into(),
        remote_target: "sip:boss@127.0.0.1:5070".into(),
        route_set: vec!["<sip:edge.example;lr>".into()],
        local_seq: 3,
        flow: "udp:127.0.0.1:5070".into(),
        connection: None,
        contact: "<sip:127.0.0.1:5060>".into(),
        expires_at: 4_000_000_000,
        version: 2,
        owner: "udp:127.0.0.1:5060".into(),
    };
    let sqlite: std::sync::Arc<dyn PresenceStore> =
        std::sync::Arc::new(SqlitePresenceStore::open(&dir).unwrap());
    let redis1: std::sync::Arc<dyn PresenceStore> =
        std::sync::Arc::new(RedisPresenceStore::connect(&redis.url()).await.unwrap());
    for store in [&sqlite, &redis1] {
        let sub = StoredSubscription {
            owner: store.node().into(),
            ..sub.clone()
        };
        store.put_publication(&pubn("e1", "one")).await.unwrap();
        // Dropped: still written, and before the next one.
        drop(store.put_publication(&pubn("e2", "two")));
        store.put_publication(&pubn("e3", "three")).await.unwrap();
        store.put_subscription(&sub).await.unwrap();
        let (pubs, subs) = store.load().await.unwrap();
        assert_eq!(
            pubs,
            vec![pubn("e3", "three")],
            "one record per id, the last write"
        );
        assert_eq!(subs, vec![sub.clone()]);
        store.remove_publication("p1").await.unwrap();
        store.remove_subscription("c1;t1").await.unwrap();
        let (pubs, subs) = store.load().await.unwrap();
        assert!(pubs.is_empty() && subs.is_empty());
    }
    // Two nodes on one Redis: the second hears the first's writes, not its own.
    let redis2 = RedisPresenceStore::connect(&redis.url()).await.unwrap();
    let mut events = redis2.watch().await.expect("a shared store can be watched");
    redis2.put_publication(&pubn("own", "mine")).await.unwrap();
    redis1.put_publication(&pubn("e4", "four")).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("a change from the other node")
        .unwrap();
    assert!(
        matches!(&ev, PresenceEvent::Publication(id) if id == "p1"),
        "{ev:?}"
    );
    assert_eq!(
        redis2.load_publication("p1").await.unwrap(),
        Some(pubn("e4", "four"))
    );
    assert!(redis2.shared() && !sqlite.shared());

    // A take-over outlasts what the old owner writes after it: a NOTIFY's CSeq that waited
    // in the old owner's queue, or its removal, must not undo it (else the new owner hears
    // the record is the old owner's again and lets go too: nobody notifies).
    let owned = |store: &dyn PresenceStore, seq: u32| StoredSubscription {
        owner: store.node().into(),
        local_seq: seq,
        ..sub.clone()
    };
    redis1.put_subscription(&owned(&*redis1, 4)).await.unwrap();
    redis2
        .take_subscription(&owned(&redis2, 104))
        .await
        .unwrap();
    redis1.put_subscription(&owned(&*redis1, 5)).await.unwrap();
    redis1.remove_subscription("c1;t1").await.unwrap();
    assert_eq!(
        redis2.load_subscription("c1;t1").await.unwrap(),
        Some(owned(&redis2, 104)),
        "the old owner's later write and removal are dropped"
    );
    // The new owner's own writes go on.
    redis2.put_subscription(&owned(&redis2, 105)).await.unwrap();
    assert_eq!(
        redis1.load_subscription("c1;t1").await.unwrap(),
        Some(owned(&redis2, 105))
    );
    // Anyone removes an expired record: its owner may be gone for good.
    redis2
        .put_subscription(&StoredSubscription {
            expires_at: 1,
            ..owned(&redis2, 106)
        })
        .await
        .unwrap();
    redis1.remove_subscription("c1;t1").await.unwrap();
    assert_eq!(redis2.load_subscription("c1;t1").await.unwrap(), None);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_authenticate_challenges_and_limits_publish_to_ones_own_state() {
    let dir = sipp::workdir("pres-auth");
    let users = dir.join("users.toml");
    std::fs::write(&users, "[users.alice]\npassword = \"secret\"\n").unwrap();
    let s = server(&dir, PLAN, |c| {
        c.registrar.users_file = users.display().to_string();
        c.presence.authenticate = true;
    })
    .await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let publish_as = |user: &str, auth: Option<String>| {
        let mut msg = publish_msg(&peer, user, None, "hi");
        if let Some(a) = auth {
            msg = msg.replacen("Event:", &format!("Authorization: {a}\r\nEvent:"), 1);
        }
        msg
    };
    // No credentials: 401 with a challenge (we are the PUBLISH's UAS).
    let r = ask(&s, &peer, &publish_as("alice", None)).await;
    assert_eq!(status(&r), 401, "{r}");
    let challenge = header(&r, "WWW-Authenticate").unwrap().to_owned();
    let answer_for = |user: &str, nc: u32| {
        strowger::auth::answer_challenge(
            &challenge,
            "PUBLISH",
            &format!("sip:{user}@strowger.test"),
            "alice",
            "secret",
            "c0ffee",
            nc,
        )
        .unwrap()
    };
    let r = ask(
        &s,
        &peer,
        &publish_as("alice", Some(answer_for("alice", 1))),
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    // Alice's credentials, Bob's presence: 403.
    let r = ask(&s, &peer, &publish_as("bob", Some(answer_for("bob", 2)))).await;
    assert_eq!(
        (status(&r), reason(&r)),
        (403, "You may only publish your own state"),
        "{r}"
    );
    // MESSAGE goes on to others: 407, like a call.
    let r = message(&s, &peer, "alice", "hello").await;
    assert_eq!(status(&r), 407, "{r}");
    assert!(header(&r, "Proxy-Authenticate").is_some(), "{r}");
    let st = s.handle.presence().stats();
    assert_eq!(load(&st.publish[0]), 1);
    assert_eq!(load(&st.publish[5]), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lamp_subscribed_during_a_call_shows_it_at_once() {
    // Calls are only watched while somebody subscribes to the dialog package: a
    // subscription that arrives while a call is up reads the calls in progress.
    let dir = sipp::workdir("blf-late");
    let s = server(&dir, PLAN, |c| c.presence.min_notify_interval_ms = 0).await;
    let port = sipp::free_udp_port();
    let callee = sipp::start(
        &dir,
        "ext1001",
        Path::new("blf_callee.xml"),
        port,
        None,
        &[],
    );
    register_phone(&s, "1001", port).await;
    let caller = sipp::start(
        &dir,
        "caller",
        Path::new("uac_call.xml"),
        sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "1001", "-d", "3000"],
    );
    let mut up = false;
    for _ in 0..100 {
        if s.handle
            .b2bua()
            .calls()
            .iter()
            .any(|c| c.state == "answered")
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the call is up");
    let watcher = UdpPeer::bind("127.0.0.1").await;
    let sub = request(
        "SUBSCRIBE",
        "sip:1001@strowger.test",
        watcher.addr,
        "UDP",
        &unique("late"),
        &format!(
            "Event: dialog\r\nAccept: application/dialog-info+xml\r\nExpires: 600\r\n\
             Contact: <sip:w@{}>\r\n",
            watcher.addr
        ),
        "",
    );
    watcher.send(s.udp, sub.as_bytes()).await;
    let mut first = None;
    for _ in 0..10 {
        let Some(m) = watcher.recv(Duration::from_secs(3)).await else {
            break;
        };
        if m.starts_with("NOTIFY") {
            first = Some(m);
            break;
        }
    }
    let first = first.expect("the initial NOTIFY");
    assert!(first.contains("<state>confirmed</state>"), "{first}");
    caller.expect_success(LIMIT).await;
    callee.expect_success(LIMIT).await;
}
