//! The fork on tokio's paused clock: RFC 3261 9.1 CANCEL rules, 13.2.2.4 late 2xx,
//! 16.7 choice of the best response, the ring timeout and where an outcome came from.

use super::*;
use crate::sip::{parse, SipMessage};
use crate::transport::TransportKind;

const T1: Duration = Duration::from_millis(500);

fn invite(n: u64) -> Request {
    let text = format!(
        "INVITE sip:callee{n}@192.0.2.{n} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.100:5060;branch=z9hG4bKfork{n}\r\n\
         From: <sip:caller@a.example>;tag=from{n}\r\n\
         To: <sip:callee{n}@192.0.2.{n}>\r\n\
         Call-ID: fork{n}@b2bua\r\n\
         CSeq: 1 INVITE\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    );
    match parse(text.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        other => panic!("fixture does not parse: {other:?}"),
    }
}

fn target(n: u64) -> Target {
    Target {
        transport: TransportKind::Udp,
        addr: format!("192.0.2.{n}:5060").parse().unwrap(),
        connection: None,
    }
}

fn response(n: u64, status: u16) -> Response {
    let mut r = invite(n).response(status);
    if status > 100 {
        r.set_to_tag(&format!("callee{n}"));
    }
    r
}

/// A fork with a dial of `n` branches (ids 1..=n, target indexes 0..n) ringing for 20 s.
fn dial(n: u64) -> Fork {
    let mut f = Fork::new(T1);
    let owner = f.start_dial(None).expect("no dial yet");
    for id in 1..=n {
        f.add(id, owner, (id - 1) as usize, invite(id), target(id));
    }
    f.set_ring_deadline(Instant::now() + Duration::from_secs(20));
    assert!(f.settle().is_empty(), "branches are pending");
    f
}

fn outcome(actions: &Actions) -> Option<&DialOutcome> {
    actions.iter().find_map(|a| match a {
        Action::DialDone(o) => Some(o),
        _ => None,
    })
}

#[tokio::test(start_paused = true)]
async fn provisional_is_relayed_and_2xx_wins() {
    let mut f = dial(1);
    assert_eq!(&f.on_provisional(1, &response(1, 100))[..], []);
    assert_eq!(
        &f.on_provisional(1, &response(1, 180))[..],
        [Action::Relay(1)]
    );
    assert!(f.get(1).unwrap().early.is_some(), "early dialog kept");
    let a = f.on_success(1, &response(1, 200));
    assert_eq!(a[0], Action::Answered(1));
    let o = outcome(&a).expect("dial done");
    assert!(o.answered);
    assert_eq!(
        (o.status, o.source, o.target),
        (200, DialSource::Callee, Some(0))
    );
    assert!(f.is_settled());
    // The 2xx again (our ACK was lost): ACK again, nothing else.
    assert_eq!(&f.on_success(1, &response(1, 200))[..], [Action::ReAck(1)]);
}

/// RFC 3261 9.1: no CANCEL before a provisional; it goes when the first one arrives.
#[tokio::test(start_paused = true)]
async fn cancel_before_any_provisional_waits_for_the_first_one() {
    let mut f = dial(1);
    let a = f.end_dial(487, "Request Terminated", DialSource::Caller);
    assert!(!a.iter().any(|a| matches!(a, Action::Cancel(_))), "{a:?}");
    let o = outcome(&a).expect("the script hears at once");
    assert_eq!((o.status, o.source), (487, DialSource::Caller));
    assert!(!f.is_settled(), "the branch still owes its CANCEL");
    // Its 100 Trying is a provisional too (9.1 allows CANCEL after any 1xx).
    assert_eq!(
        &f.on_provisional(1, &response(1, 100))[..],
        [Action::Cancel(1)]
    );
    // Not relayed, not cancelled twice.
    assert_eq!(&f.on_provisional(1, &response(1, 180))[..], []);
    let (cancel, to) = f.cancel_request(1).unwrap();
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(cancel.base.cseq.seq, 1);
    assert_eq!(cancel.base.via[0].branch(), invite(1).base.via[0].branch());
    assert_eq!(to, target(1));
    assert!(outcome(&f.on_failure(1, 487, "Request Terminated")).is_none());
    assert!(f.is_settled());
}

/// A 2xx from a branch cancelled before it rang: ACK and BYE (13.2.2.4), never the call.
#[tokio::test(start_paused = true)]
async fn late_2xx_of_a_cancelled_branch_is_acked_and_byed() {
    let mut f = dial(1);
    f.end_dial(487, "Request Terminated", DialSource::Caller);
    assert_eq!(&f.on_success(1, &response(1, 200))[..], [Action::AckBye(1)]);
    assert!(f.is_settled());
    // Its retransmission is ACKed again, not BYEd again.
    assert_eq!(&f.on_success(1, &response(1, 200))[..], [Action::ReAck(1)]);
}

/// The ring timeout before anything rang: 408 from "timeout"; the branch is CANCELled
/// when its 1xx comes, and a 2xx crossing that CANCEL is ACKed and BYEd.
#[tokio::test(start_paused = true)]
async fn ring_timeout_before_a_provisional() {
    let mut f = dial(1);
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(f.on_timer(Instant::now()).is_empty());
    tokio::time::advance(Duration::from_secs(1)).await;
    let a = f.on_timer(Instant::now());
    let o = outcome(&a).expect("timed out");
    assert_eq!(
        (o.status, o.source, o.target),
        (408, DialSource::Timeout, None)
    );
    assert_eq!(
        &f.on_provisional(1, &response(1, 180))[..],
        [Action::Cancel(1)]
    );
    assert_eq!(&f.on_success(1, &response(1, 200))[..], [Action::AckBye(1)]);
    assert!(f.is_settled());
}

#[tokio::test(start_paused = true)]
async fn ring_timeout_after_ringing_is_480_and_cancels() {
    let mut f = dial(2);
    f.on_provisional(1, &response(1, 180));
    tokio::time::advance(Duration::from_secs(20)).await;
    let a = f.on_timer(Instant::now());
    assert!(a.contains(&Action::Cancel(1)), "{a:?}");
    assert!(
        !a.contains(&Action::Cancel(2)),
        "branch 2 has not rung: {a:?}"
    );
    let o = outcome(&a).unwrap();
    assert_eq!((o.status, o.source), (480, DialSource::Timeout));
    assert_eq!(f.deadline(), Some(Instant::now() + T1 * 64), "9.1 give-up");
}

/// RFC 3261 9.1: a CANCELled INVITE without a final response is given up after 64*T1.
#[tokio::test(start_paused = true)]
async fn cancelled_branch_without_final_is_given_up_after_64_t1() {
    let mut f = dial(1);
    f.on_provisional(1, &response(1, 180));
    f.end_dial(487, "Request Terminated", DialSource::Caller);
    assert!(!f.is_settled());
    tokio::time::advance(T1 * 64 - Duration::from_millis(1)).await;
    f.on_timer(Instant::now());
    assert!(!f.is_settled());
    tokio::time::advance(Duration::from_millis(1)).await;
    f.on_timer(Instant::now());
    assert!(f.is_settled());
    assert_eq!(f.deadline(), None);
}

/// The first 2xx wins; the others are CANCELled, and their crossing 2xx is released.
#[tokio::test(start_paused = true)]
async fn fork_first_2xx_wins_and_losers_are_cancelled() {
    let mut f = dial(3);
    f.on_provisional(1, &response(1, 180));
    f.on_provisional(2, &response(2, 183));
    let a = f.on_success(2, &response(2, 200));
    assert_eq!(a[0], Action::Answered(2));
    assert!(a.contains(&Action::Cancel(1)), "{a:?}");
    assert!(!a.contains(&Action::Cancel(3)), "3 has not rung: {a:?}");
    assert_eq!(outcome(&a).unwrap().target, Some(1));
    assert_eq!(&f.on_success(1, &response(1, 200))[..], [Action::AckBye(1)]);
    assert_eq!(
        &f.on_provisional(3, &response(3, 180))[..],
        [Action::Cancel(3)]
    );
    f.on_failure(3, 487, "Request Terminated");
    assert!(f.is_settled());
    f.compact(Some(2));
    assert!(f.get(2).is_some() && f.get(1).is_none() && f.get(3).is_none());
}

/// RFC 3261 16.7 step 6: the best failure; the script learns which target gave it.
#[tokio::test(start_paused = true)]
async fn all_fail_best_response_names_its_target() {
    let mut f = dial(3);
    assert!(outcome(&f.on_failure(1, 503, "Unavailable")).is_none());
    assert!(outcome(&f.on_failure(3, 486, "Busy Here")).is_none());
    let a = f.on_failure(2, 404, "Not Found");
    let o = outcome(&a).unwrap();
    assert_eq!(
        (o.status, o.source, o.target),
        (486, DialSource::Callee, Some(2))
    );
    // A 401/407/415/420/484 is preferred within the class.
    let mut f = dial(2);
    f.on_failure(1, 486, "Busy Here");
    let o = f.on_failure(2, 484, "Address Incomplete");
    assert_eq!(outcome(&o).unwrap().status, 484);
    // Only 5xx: 503 becomes 500.
    let mut f = dial(1);
    let o = f.on_failure(1, 503, "Unavailable");
    assert_eq!(outcome(&o).unwrap().status, 500);
}

/// RFC 3261 16.7 step 5: a 6xx ends the fork at once.
#[tokio::test(start_paused = true)]
async fn a_6xx_ends_the_fork() {
    let mut f = dial(2);
    f.on_provisional(2, &response(2, 180));
    let a = f.on_failure(1, 603, "Decline");
    assert!(a.contains(&Action::Cancel(2)), "{a:?}");
    let o = outcome(&a).unwrap();
    assert_eq!(
        (o.status, o.source, o.target),
        (603, DialSource::Callee, Some(0))
    );
}

/// Targets refused here (bad URI, no route) are "local"; with no branch left the dial ends.
#[tokio::test(start_paused = true)]
async fn refused_targets_are_local() {
    let mut f = Fork::new(T1);
    f.start_dial(None).unwrap();
    f.refused(0, 400, "Bad dial target".into());
    let o = f.settle();
    let o = outcome(&o).unwrap();
    assert_eq!(
        (o.status, o.source, o.target),
        (400, DialSource::Local, Some(0))
    );
    // Within a class a callee's answer beats a local refusal.
    let mut f = Fork::new(T1);
    let owner = f.start_dial(None).unwrap();
    f.refused(0, 400, "Bad dial target".into());
    f.add(2, owner, 1, invite(2), target(2));
    let o = f.on_failure(2, 486, "Busy Here");
    let o = outcome(&o).unwrap();
    assert_eq!(
        (o.status, o.source, o.target),
        (486, DialSource::Callee, Some(1))
    );
    // A second dial while one is in progress is refused.
    let mut f = dial(1);
    assert!(f.start_dial(None).is_none());
    // Abandoned (the call ended, nobody waits): no outcome; its branch owes a CANCEL.
    f.on_provisional(1, &response(1, 180));
    assert_eq!(&f.abandon_dial()[..], [Action::Cancel(1)]);
    assert!(f.start_dial(None).is_some());
}

/// A branch of an earlier dial never answers a later one.
#[tokio::test(start_paused = true)]
async fn a_2xx_from_an_earlier_dial_is_released() {
    let mut f = dial(1);
    tokio::time::advance(Duration::from_secs(20)).await;
    f.on_timer(Instant::now());
    let owner = f.start_dial(None).expect("second dial");
    f.add(2, owner, 0, invite(2), target(2));
    assert_eq!(&f.on_success(1, &response(1, 200))[..], [Action::AckBye(1)]);
    let a = f.on_success(2, &response(2, 200));
    assert_eq!(a[0], Action::Answered(2));
}

/// Once the call is confirmed the winner keeps only what its leg is known by (issue 14),
/// and the losers that ended are gone.
#[tokio::test(start_paused = true)]
async fn compact_keeps_the_winners_identity_only() {
    let mut f = dial(2);
    let _ = f.on_success(2, &response(2, 200));
    let _ = f.on_failure(1, 487, "Request Terminated");
    f.compact(Some(2));
    assert!(f.get(1).is_none(), "the ended loser is dropped");
    let b = f.get(2).expect("the winner stays");
    assert!(b.invite().is_none(), "the INVITE itself is dropped");
    assert_eq!(b.seq(), 1);
    assert_eq!(b.call_id_and_tag(), ("fork2@b2bua", "from2"));
    assert_eq!(b.request_uri(), "sip:callee2@192.0.2.2");
    assert!(
        f.cancel_request(2).is_none(),
        "an answered branch is never CANCELled"
    );
}
