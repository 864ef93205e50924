//! Two devices talking directly over a memory network, on a paused clock.

use super::*;
use crate::sip::SipMessage;
use crate::transport::MemoryNetwork;
use bytes::Bytes;

const ALICE: &str = "10.0.0.1:5060";
const BOB: &str = "10.0.0.2:5060";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Alice sends to Bob directly; Bob behaves as told.
async fn pair(bob: Behaviour) -> (Device, Device) {
    let net = MemoryNetwork::new();
    let b = Device::start(
        &net,
        DeviceSpec::default()
            .named("bob")
            .at(addr(BOB))
            .server(addr(ALICE))
            .on_invite(bob),
    )
    .await
    .unwrap();
    let mut spec = DeviceSpec::default().named("alice").at(addr(ALICE));
    spec.user = "alice".into();
    spec.server = addr(BOB);
    let a = Device::start(&net, spec).await.unwrap();
    (a, b)
}

fn labels(d: &Device, dir: Direction) -> Vec<String> {
    d.log()
        .iter()
        .filter(|e| e.direction == dir)
        .map(LogEntry::label)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn answered_after_two_seconds_then_the_caller_hangs_up() {
    let (a, b) = pair(Behaviour::Answer {
        after: Duration::from_secs(2),
    })
    .await;
    let out = a
        .call("bob", &[("X-Test".into(), "yes".into())])
        .await
        .unwrap();
    assert_eq!((out.status, out.provisional.clone()), (200, vec![180]));
    assert!(out.answered());
    assert_eq!(out.elapsed, Duration::from_secs(2), "on the tokio clock");
    assert!(out.call.is_up());
    let inc = b.wait_incoming(1, Duration::from_secs(1)).await.unwrap();
    assert_eq!(inc.ruri, "sip:bob@strowger.test");
    assert_eq!(inc.number.as_deref(), Some("bob"));
    assert_eq!(inc.header("x-test"), Some("yes"));
    assert_eq!(inc.header("Content-Type"), Some("application/sdp"));
    assert_eq!(inc.final_status, Some(200));
    assert_eq!(inc.answered_at, Some(Duration::from_secs(2)));

    assert_eq!(out.call.hangup().await.unwrap(), 200);
    assert_eq!(out.call.ended_by(), Some(Side::Local));
    let inc = &b.incoming()[0];
    assert_eq!(inc.ended_by, Some(Side::Remote));
    assert_eq!(labels(&b, Direction::Received), ["INVITE", "ACK", "BYE"]);
    assert_eq!(labels(&b, Direction::Sent), ["180", "200", "200"]);
    assert_eq!(labels(&a, Direction::Sent), ["INVITE", "ACK", "BYE"]);
    // The 200 carries SDP and a Contact; the ACK went to that Contact.
    let ok = &b.log()[2];
    assert!(
        ok.summary().starts_with("200 OK (INVITE)"),
        "{}",
        ok.summary()
    );
    assert_eq!(
        ok.header("Content-Type").as_deref(),
        Some("application/sdp")
    );
    let ladder = ladder(&[&a, &b]);
    assert!(
        ladder.contains("alice -> 10.0.0.2:5060  INVITE sip:bob@strowger.test"),
        "{ladder}"
    );
    assert!(
        ladder.contains("2.000s  bob -> 10.0.0.1:5060  200 OK (INVITE)"),
        "{ladder}"
    );
}

#[tokio::test(start_paused = true)]
async fn busy_is_486_and_acknowledged() {
    let (a, b) = pair(Behaviour::Busy).await;
    let out = a.call("bob", &[]).await.unwrap();
    assert_eq!((out.status, out.reason.as_str()), (486, "Busy Here"));
    assert!(!out.call.is_up());
    assert_eq!(out.call.ended_by(), Some(Side::Remote));
    // 17.1.1.3: the caller ACKs a non-2xx answer, in the INVITE's transaction.
    tokio::task::yield_now().await;
    assert_eq!(labels(&b, Direction::Received), ["INVITE", "ACK"]);
    let log = a.log();
    assert_eq!(
        log[0].message.base().branch(),
        log[2].message.base().branch()
    );
    assert!(matches!(out.call.hangup().await, Err(SimError::NotUp(_))));
}

#[tokio::test(start_paused = true)]
async fn rejected_with_603() {
    let (a, b) = pair(Behaviour::Reject(603)).await;
    let out = a.call("bob", &[]).await.unwrap();
    assert_eq!((out.status, out.reason.as_str()), (603, "Decline"));
    assert_eq!(b.incoming()[0].final_status, Some(603));
}

#[tokio::test(start_paused = true)]
async fn ringing_then_cancelled() {
    let (a, b) = pair(Behaviour::Ring).await;
    let call = a.dial("bob", &[]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(call.cancel().await.unwrap(), Some(200));
    let out = call.outcome().await.unwrap();
    assert_eq!((out.status, out.provisional.clone()), (487, vec![180]));
    assert_eq!(out.elapsed, Duration::from_secs(5));
    assert_eq!(call.ended_by(), Some(Side::Local));
    let inc = &b.incoming()[0];
    assert_eq!(inc.final_status, Some(487));
    assert_eq!(inc.ended_by, Some(Side::Remote));
    tokio::task::yield_now().await;
    assert_eq!(labels(&b, Direction::Received), ["INVITE", "CANCEL", "ACK"]);
    assert_eq!(labels(&b, Direction::Sent), ["180", "200", "487"]);
    // Nothing left to cancel once the final answer is in.
    assert_eq!(call.cancel().await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn answered_then_the_callee_hangs_up() {
    let (a, b) = pair(Behaviour::AnswerThenHangUp {
        after: Duration::from_secs(1),
        hold: Duration::from_secs(5),
    })
    .await;
    let start = tokio::time::Instant::now();
    let out = a.call("bob", &[]).await.unwrap();
    assert_eq!(out.status, 200);
    assert_eq!(
        out.call.wait_ended(Duration::from_secs(60)).await.unwrap(),
        Side::Remote
    );
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    assert_eq!(b.incoming()[0].ended_by, Some(Side::Local));
    assert_eq!(b.incoming()[0].ended_at, Some(Duration::from_secs(6)));
    assert_eq!(labels(&a, Direction::Received), ["180", "200", "BYE"]);
    assert_eq!(labels(&a, Direction::Sent), ["INVITE", "ACK", "200"]);
    assert!(matches!(out.call.hangup().await, Err(SimError::NotUp(_))));
}

#[tokio::test(start_paused = true)]
async fn answered_then_referred() {
    let (a, b) = pair(Behaviour::AnswerThenRefer {
        after: Duration::ZERO,
        target: "carol".into(),
    })
    .await;
    let out = a.call("bob", &[]).await.unwrap();
    assert_eq!(out.status, 200);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let refer = a
        .log()
        .into_iter()
        .find(|e| e.label() == "REFER")
        .expect("bob sent a REFER");
    assert_eq!(
        refer.header("Refer-To").as_deref(),
        Some("<sip:carol@strowger.test>")
    );
    assert_eq!(
        refer.header("Referred-By").as_deref(),
        Some("<sip:phone@strowger.test>")
    );
    // In the dialog: the caller's tags, the next CSeq of the callee.
    let SipMessage::Request(r) = &refer.message else {
        unreachable!()
    };
    assert_eq!(r.base.call_id, out.call.call_id());
    assert_eq!(r.base.cseq.seq, 1);
    // Alice takes no REFER (a simulated phone does not transfer itself): 405.
    assert_eq!(labels(&b, Direction::Received), ["INVITE", "ACK", "405"]);
}

#[tokio::test(start_paused = true)]
async fn a_trunk_answers_any_number() {
    let net = MemoryNetwork::new();
    let t = Device::start(
        &net,
        DeviceSpec::trunk("carrier", addr(ALICE)).at(addr(BOB)),
    )
    .await
    .unwrap();
    assert!(t.spec().trunk && !t.spec().register);
    let mut spec = DeviceSpec::default().at(addr(ALICE));
    spec.server = addr(BOB);
    let a = Device::start(&net, spec).await.unwrap();
    let out = a.call("sip:+15551234@10.0.0.2:5060", &[]).await.unwrap();
    assert_eq!(out.status, 200);
    assert_eq!(t.incoming()[0].number.as_deref(), Some("+15551234"));
    assert_eq!(t.incoming()[0].ruri, "sip:+15551234@10.0.0.2:5060");
}

/// A retransmitted request gets the same answer again (RFC 3261 17.2.1, 17.2.2); requests
/// in no dialog get 481.
#[tokio::test(start_paused = true)]
async fn retransmissions_are_answered_again() {
    let net = MemoryNetwork::new();
    let b = Device::start(
        &net,
        DeviceSpec::default()
            .at(addr(BOB))
            .on_invite(Behaviour::Ring),
    )
    .await
    .unwrap();
    let mut raw = net.endpoint(addr(ALICE));
    let invite = format!(
        "INVITE sip:bob@strowger.test SIP/2.0\r\nVia: SIP/2.0/UDP {ALICE};branch=z9hG4bKr1\r\n\
         From: <sip:a@x>;tag=a\r\nTo: <sip:bob@strowger.test>\r\nCall-ID: r1\r\n\
         CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContact: <sip:a@{ALICE}>\r\nContent-Length: 0\r\n\r\n"
    );
    let mut answers = Vec::new();
    for _ in 0..2 {
        raw.send(addr(BOB), Bytes::from(invite.clone()));
        let (_, got) = raw.recv().await.unwrap();
        answers.push(got);
    }
    assert_eq!(answers[0], answers[1], "the same 180, To tag included");
    assert!(answers[0].starts_with(b"SIP/2.0 180 "));
    assert_eq!(b.incoming().len(), 1, "one call, not two");

    let bye = "BYE sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKb1\r\n\
               From: <sip:a@x>;tag=a\r\nTo: <sip:bob@x>;tag=zz\r\nCall-ID: nope\r\n\
               CSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    raw.send(addr(BOB), Bytes::from_static(bye.as_bytes()));
    let (_, got) = raw.recv().await.unwrap();
    assert!(got.starts_with(b"SIP/2.0 481 "), "{got:?}");
    let options =
        "OPTIONS sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKo1\r\n\
               From: <sip:a@x>;tag=a\r\nTo: <sip:bob@x>\r\nCall-ID: o1\r\n\
               CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    raw.send(addr(BOB), Bytes::from_static(options.as_bytes()));
    let (_, first) = raw.recv().await.unwrap();
    raw.send(addr(BOB), Bytes::from_static(options.as_bytes()));
    let (_, second) = raw.recv().await.unwrap();
    assert!(first.starts_with(b"SIP/2.0 200 "));
    assert_eq!(first, second);
}

#[tokio::test(start_paused = true)]
async fn stopping_frees_the_address_and_unanswered_calls_time_out() {
    let net = MemoryNetwork::new();
    let b = Device::start(&net, DeviceSpec::default().at(addr(BOB)))
        .await
        .unwrap();
    assert!(matches!(
        Device::start(&net, DeviceSpec::default().at(addr(BOB))).await,
        Err(SimError::AddrInUse(_))
    ));
    b.stop();
    tokio::task::yield_now().await;
    assert!(net.try_endpoint(addr(BOB)).is_ok());
    let mut spec = DeviceSpec::default()
        .at(addr(ALICE))
        .patience(Duration::from_secs(40));
    spec.server = addr(BOB);
    let a = Device::start(&net, spec).await.unwrap();
    let start = tokio::time::Instant::now();
    assert!(matches!(
        a.call("bob", &[]).await,
        Err(SimError::Timeout { .. })
    ));
    assert_eq!(start.elapsed(), Duration::from_secs(40));
}
