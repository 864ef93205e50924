//! The SIP engine end to end over real sockets: the server on port 0, raw SIP over UDP and
//! TCP, IPv4 and IPv6.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

const METHODS: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "INFO",
    "UPDATE",
    "REFER",
    "PUBLISH",
    "MESSAGE",
];

fn assert_options_ok(resp: &str) {
    assert_eq!(status(resp), 200, "{resp}");
    let allow = header(resp, "Allow").expect("Allow");
    for m in METHODS {
        assert!(
            allow.split(',').any(|a| a.trim() == m),
            "Allow lacks {m}: {allow}"
        );
    }
    for h in ["Accept", "Accept-Encoding", "Accept-Language", "Supported"] {
        assert!(header(resp, h).is_some(), "missing {h}: {resp}");
    }
    // What the server implements, RFC 4028 session timers included.
    let supported: Vec<&str> = header(resp, "Supported")
        .unwrap()
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(supported, ["100rel", "replaces", "timer"], "{resp}");
    let contact = header(resp, "Contact").expect("Contact");
    assert!(contact.contains(";audio"), "feature tags: {contact}");
    assert_eq!(
        header(resp, "Content-Length"),
        Some("0"),
        "OPTIONS 200 has no body"
    );
    assert!(header(resp, "To").unwrap().contains("tag="), "To tag");
}

#[tokio::test]
async fn options_over_udp() {
    let s = start_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let req = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("opt"),
        "",
        "",
    );
    peer.send(s.udp, req.as_bytes()).await;
    let resp = peer.recv(WAIT).await.expect("answer");
    assert_options_ok(&resp);
    assert!(
        header(&resp, "Via").unwrap().contains("rport="),
        "rport filled: {resp}"
    );
}

#[tokio::test]
async fn options_over_tcp() {
    let s = start_server().await;
    let mut peer = TcpPeer::connect(s.tcp).await;
    let req = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.local(),
        "TCP",
        &unique("opt"),
        "",
        "",
    );
    peer.write(req.as_bytes()).await;
    assert_options_ok(&peer.recv(WAIT).await.expect("answer"));
}

#[tokio::test]
async fn options_over_udp_ipv6() {
    let mut config = test_config();
    config.sip.listen = vec!["udp:[::1]:0".into(), "tcp:[::1]:0".into()];
    let Ok(handle) = strowger::server::start(&config).await else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let addr = handle
        .addr(strowger::transport::TransportKind::Udp)
        .unwrap();
    let peer = UdpPeer::bind("[::1]").await;
    let req = request(
        "OPTIONS",
        "sip:[::1]",
        peer.addr,
        "UDP",
        &unique("opt6"),
        "",
        "",
    );
    peer.send(addr, req.as_bytes()).await;
    let resp = peer.recv(WAIT).await.expect("answer over IPv6");
    assert_options_ok(&resp);
    assert!(
        header(&resp, "Contact").unwrap().contains("[::1]"),
        "{resp}"
    );
}

#[tokio::test]
async fn retransmitted_request_is_absorbed_and_answered_the_same() {
    let s = start_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let req = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("rtx"),
        "",
        "",
    );
    peer.send(s.udp, req.as_bytes()).await;
    let first = peer.recv(WAIT).await.expect("first answer");
    peer.send(s.udp, req.as_bytes()).await;
    let second = peer.recv(WAIT).await.expect("answer to the retransmission");
    // The same response, To tag included: the transaction re-sent it, the core did not
    // see the request twice.
    assert_eq!(first, second);
}

async fn answer_to(raw: &str) -> Option<String> {
    let s = start_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let raw = raw.replace("PEER", &peer.addr.to_string());
    peer.send(s.udp, raw.as_bytes()).await;
    peer.recv_final(WAIT).await
}

fn req_text(method: &str, extra: &str, cseq_method: &str) -> String {
    format!(
        "{method} sip:bob@strowger.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP PEER;branch=z9hG4bK{}\r\n\
         From: <sip:alice@example.com>;tag=1\r\n\
         To: <sip:bob@strowger.test>\r\n\
         Call-ID: {}\r\n\
         CSeq: 1 {cseq_method}\r\n\
         {extra}\
         Content-Length: 0\r\n\r\n",
        unique("b"),
        unique("bad")
    )
}

#[tokio::test]
async fn unknown_method_gets_501_with_allow() {
    let r = answer_to(&req_text("FROB", "Max-Forwards: 70\r\n", "FROB"))
        .await
        .unwrap();
    assert_eq!(status(&r), 501, "{r}");
    assert!(header(&r, "Allow").unwrap().contains("MESSAGE"));
}

#[tokio::test]
async fn max_forwards_zero_gets_483() {
    let r = answer_to(&req_text("INVITE", "Max-Forwards: 0\r\n", "INVITE"))
        .await
        .unwrap();
    assert_eq!(status(&r), 483, "{r}");
}

#[tokio::test]
async fn other_sip_version_gets_505() {
    let raw = req_text("OPTIONS", "Max-Forwards: 70\r\n", "OPTIONS")
        .replace("SIP/2.0\r\n", "SIP/3.0\r\n");
    let r = answer_to(&raw).await.unwrap();
    assert_eq!(status(&r), 505, "{r}");
}

#[tokio::test]
async fn unknown_require_gets_420_with_unsupported() {
    let r = answer_to(&req_text("OPTIONS", "Require: frobnication\r\n", "OPTIONS"))
        .await
        .unwrap();
    assert_eq!(status(&r), 420, "{r}");
    assert_eq!(header(&r, "Unsupported"), Some("frobnication"));
}

#[tokio::test]
async fn content_length_beyond_datagram_gets_400_naming_it() {
    let raw =
        req_text("OPTIONS", "", "OPTIONS").replace("Content-Length: 0", "Content-Length: 900");
    let r = answer_to(&raw).await.unwrap();
    assert_eq!(status(&r), 400, "{r}");
    assert!(reason(&r).contains("Content-Length"), "{r}");
}

#[tokio::test]
async fn missing_call_id_gets_400_naming_it() {
    let raw = req_text("OPTIONS", "", "OPTIONS");
    let raw: String = raw
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("Call-ID"))
        .collect();
    let r = answer_to(&raw).await.unwrap();
    assert_eq!(status(&r), 400);
    assert_eq!(reason(&r), "Missing Call-ID header");
}

#[tokio::test]
async fn cseq_method_mismatch_gets_400() {
    let r = answer_to(&req_text("OPTIONS", "", "INVITE")).await.unwrap();
    assert_eq!(status(&r), 400, "{r}");
}

#[tokio::test]
async fn garbage_is_dropped_and_counted_and_the_server_still_answers() {
    let s = start_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    for junk in [
        &b"\x00\x01\x02garbage"[..],
        b"HELLO\r\n\r\n",
        b"SIP/2.0 999999 Nope\r\n\r\n",
        &[0xff; 300],
    ] {
        peer.send(s.udp, junk).await;
    }
    let req = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("after"),
        "",
        "",
    );
    peer.send(s.udp, req.as_bytes()).await;
    let r = peer.recv(WAIT).await.expect("still answering");
    assert_eq!(
        status(&r),
        200,
        "the first thing back is the OPTIONS answer: {r}"
    );
    assert!(s.handle.stats().malformed_dropped.load(Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn in_dialog_request_for_unknown_dialog_gets_481() {
    let s = start_server().await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let req = request(
        "BYE",
        "sip:bob@strowger.test",
        peer.addr,
        "UDP",
        &unique("bye"),
        "",
        "",
    )
    .replace(
        "To: <sip:bob@strowger.test>",
        "To: <sip:bob@strowger.test>;tag=nosuch",
    );
    peer.send(s.udp, req.as_bytes()).await;
    assert_eq!(status(&peer.recv_final(WAIT).await.unwrap()), 481);
}

#[tokio::test]
async fn tcp_message_split_across_segments() {
    let s = start_server().await;
    let mut peer = TcpPeer::connect(s.tcp).await;
    peer.stream.set_nodelay(true).unwrap();
    let req = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.local(),
        "TCP",
        &unique("split"),
        "",
        "",
    );
    let bytes = req.as_bytes();
    for chunk in bytes.chunks(bytes.len() / 4 + 1) {
        peer.write(chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&peer.recv(WAIT).await.expect("answer")), 200);
}

#[tokio::test]
async fn tcp_several_messages_in_one_segment() {
    let s = start_server().await;
    let mut peer = TcpPeer::connect(s.tcp).await;
    let ids: Vec<String> = (0..3).map(|_| unique("multi")).collect();
    let mut all = String::from("\r\n\r\n");
    for id in &ids {
        all.push_str(&request(
            "OPTIONS",
            "sip:strowger.test",
            peer.local(),
            "TCP",
            id,
            "",
            "",
        ));
    }
    peer.write(all.as_bytes()).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = peer.recv(WAIT).await.expect("answer");
        assert_eq!(status(&r), 200);
        seen.push(header(&r, "Call-ID").unwrap().to_owned());
    }
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn tcp_message_with_body_and_message_after_it() {
    let s = start_server().await;
    let mut peer = TcpPeer::connect(s.tcp).await;
    let a = request(
        "MESSAGE",
        "sip:bob@strowger.test",
        peer.local(),
        "TCP",
        &unique("m"),
        "Content-Type: text/plain\r\n",
        "hello\r\n\r\nworld",
    );
    let b = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.local(),
        "TCP",
        &unique("o"),
        "",
        "",
    );
    peer.write(format!("{a}{b}").as_bytes()).await;
    let r1 = peer.recv(WAIT).await.unwrap();
    let r2 = peer.recv(WAIT).await.unwrap();
    // The body with a blank line inside is framed by Content-Length, not by CRLFCRLF.
    // (MESSAGE is routed off the transport's task: its answer may come second.)
    let (m, o) = if header(&r1, "CSeq") == Some("1 MESSAGE") {
        (r1, r2)
    } else {
        (r2, r1)
    };
    assert_eq!(header(&m, "CSeq"), Some("1 MESSAGE"), "{m}");
    assert_eq!(header(&o, "CSeq"), Some("1 OPTIONS"), "{o}");
    assert_eq!(status(&o), 200, "{o}");
}

#[tokio::test]
async fn graceful_shutdown_refuses_new_requests_then_stops() {
    let s = start_server().await;
    let udp = s.udp;
    s.handle.shutdown(Duration::from_millis(200)).await;
    let peer = UdpPeer::bind("127.0.0.1").await;
    let req = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("late"),
        "",
        "",
    );
    peer.send(udp, req.as_bytes()).await;
    assert!(
        peer.recv(Duration::from_millis(300)).await.is_none(),
        "closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_new_requests_503_and_lets_a_ringing_call_finish() {
    let callee = UdpPeer::bind("127.0.0.1").await;
    let dir = std::env::temp_dir().join(unique("strowger-drain"));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            "function on_invite(call) local r = call:dial(\"sip:b@{}\") if not r.answered then call:reject(r.status, r.reason) end end\n",
            callee.addr
        ),
    )
    .unwrap();
    let mut c = test_config();
    c.script.path = plan.display().to_string();
    let s = start_with(c).await;
    let udp = s.udp;
    let caller = UdpPeer::bind("127.0.0.1").await;
    let invite = request(
        "INVITE",
        "sip:b@strowger.test",
        caller.addr,
        "UDP",
        &unique("drain"),
        "Contact: <sip:a@127.0.0.1>\r\n",
        "",
    );
    caller.send(udp, invite.as_bytes()).await;
    // The B leg's INVITE reaches the callee, which does not answer yet.
    let b_invite = loop {
        let m = callee.recv(WAIT).await.expect("INVITE on the B leg");
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    let started = std::time::Instant::now();
    let handle = s.handle;
    let drain = tokio::spawn(async move { handle.shutdown(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A new request during the drain: 503.
    let late = UdpPeer::bind("127.0.0.1").await;
    let opt = request(
        "OPTIONS",
        "sip:strowger.test",
        late.addr,
        "UDP",
        &unique("late"),
        "",
        "",
    );
    late.send(udp, opt.as_bytes()).await;
    let r = late
        .recv_final(WAIT)
        .await
        .expect("an answer during the drain");
    assert_eq!(status(&r), 503, "{r}");
    // The ringing call still completes: the callee's 486 reaches the caller.
    // The callee's 486: Via, From, Call-ID, CSeq copied, To with a tag (RFC 3261 8.2.6).
    let mut busy = String::from("SIP/2.0 486 Busy Here\r\n");
    for line in b_invite.lines() {
        let l = line.to_ascii_lowercase();
        if l.starts_with("to:") {
            busy.push_str(&format!("{line};tag=callee1\r\n"));
        } else if ["via:", "from:", "call-id:", "cseq:"]
            .iter()
            .any(|h| l.starts_with(h))
        {
            busy.push_str(&format!("{line}\r\n"));
        }
    }
    busy.push_str("Content-Length: 0\r\n\r\n");
    callee.send(udp, busy.as_bytes()).await;
    let r = caller
        .recv_final(WAIT)
        .await
        .expect("the caller gets the final answer");
    assert_eq!(status(&r), 486, "{r}");
    drain.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the drain ended once the call was answered, not at the drain limit"
    );
}

/// RFC 4028 session timers: the INVITE the B2BUA sends on offers them (`Supported: timer`,
/// its own Session-Expires asking the callee to refresh, Min-SE); the caller's
/// Session-Expires is never relayed as such (each leg negotiates its own). With
/// `call.session_expires_s = 0` nothing is offered.
#[tokio::test]
async fn outgoing_invite_offers_session_timers_unless_off() {
    let out = outgoing_invite(1800).await;
    let supported = header(&out, "Supported").unwrap_or("");
    assert!(
        supported
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("timer")),
        "{out}"
    );
    assert_eq!(
        header(&out, "Session-Expires"),
        Some("1800;refresher=uas"),
        "{out}"
    );
    assert_eq!(header(&out, "Min-SE"), Some("90"), "{out}");
    let off = outgoing_invite(0).await;
    assert!(header(&off, "Session-Expires").is_none(), "{off}");
    assert!(header(&off, "x").is_none(), "{off}");
}

/// The INVITE the B2BUA sends for a caller that asks for a 1800 s timer; the callee is
/// busy.
async fn outgoing_invite(session_expires: u32) -> String {
    let callee = UdpPeer::bind("127.0.0.1").await;
    let dir = std::env::temp_dir().join(unique("strowger-no-timer"));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            "function on_invite(call)\n  call:dial(\"sip:callee@{}\")\nend\n",
            callee.addr
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.script.path = plan.display().to_string();
    config.call.session_expires_s = session_expires;
    let s = start_with(config).await;
    let caller = UdpPeer::bind("127.0.0.1").await;
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
               m=audio 4000 RTP/AVP 0\r\n";
    let invite = request(
        "INVITE",
        "sip:bob@strowger.test",
        caller.addr,
        "UDP",
        &unique("no-timer"),
        "Contact: <sip:alice@127.0.0.1>\r\nSupported: 100rel, timer\r\n\
         Session-Expires: 1800;refresher=uac\r\nMin-SE: 90\r\n\
         Content-Type: application/sdp\r\n",
        sdp,
    );
    caller.send(s.udp, invite.as_bytes()).await;
    let out = loop {
        let m = callee.recv(WAIT).await.expect("the B2BUA's INVITE");
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    // End the call attempt: the callee is busy.
    let busy = format!(
        "SIP/2.0 486 Busy Here\r\nVia: {}\r\nFrom: {}\r\nTo: {};tag=b1\r\nCall-ID: {}\r\n\
         CSeq: {}\r\nContent-Length: 0\r\n\r\n",
        header(&out, "Via").unwrap(),
        header(&out, "From").unwrap(),
        header(&out, "To").unwrap(),
        header(&out, "Call-ID").unwrap(),
        header(&out, "CSeq").unwrap(),
    );
    callee.send(s.udp, busy.as_bytes()).await;
    let r = caller.recv_final(WAIT).await.expect("the caller's answer");
    assert_eq!(status(&r), 486, "{r}");
    out
}

/// Issue 15 item 2: a source sending more than `sip.pike_requests` requests outside
/// dialogs in a second is blocked (its requests dropped unanswered, counted). That other
/// sources are not affected is checked by the unit tests of `pike` (every test peer here
/// shares 127.0.0.1).
#[tokio::test]
async fn a_flooding_source_is_blocked() {
    let mut config = test_config();
    config.sip.pike_requests = 5;
    config.sip.pike_block_s = 60;
    let server = start_with(config).await;
    let options = |peer: std::net::SocketAddr| {
        request(
            "OPTIONS",
            "sip:strowger.test",
            peer,
            "UDP",
            &unique("pike"),
            "",
            "",
        )
    };
    let flooder = UdpPeer::bind("127.0.0.1").await;
    for _ in 0..10 {
        flooder
            .send(server.udp, options(flooder.addr).as_bytes())
            .await;
    }
    let mut answered = 0;
    while flooder.recv(Duration::from_millis(500)).await.is_some() {
        answered += 1;
    }
    assert_eq!(answered, 5, "five answered, the rest dropped");
    // Still blocked a moment later (the address is what counts, not the port).
    flooder
        .send(server.udp, options(flooder.addr).as_bytes())
        .await;
    assert!(flooder.recv(Duration::from_millis(300)).await.is_none());
    let metrics = strowger::admin::get(server.handle.admin_addr(), "/metrics")
        .await
        .unwrap();
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(value("strowger_pike_dropped_total").as_deref(), Some("6"));
    assert_eq!(value("strowger_pike_blocks_total").as_deref(), Some("1"));
}
