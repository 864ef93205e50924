//! The caller's leg on tokio's paused clock: RFC 3261 13.3.1.4 (2xx until ACK), RFC 3262
//! (reliable provisionals, PRACK), 9.2 (CANCEL only while the INVITE is pending).

use super::super::test_util::caller_invite as invite;
use super::*;

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

fn resp(status: u16) -> Response {
    let mut r = invite().response(status);
    r.set_to_tag("ours");
    r
}

/// `status` as the call writes it for the caller.
fn written(status: u16) -> Written {
    let invite = invite();
    let mut r = invite.reply(status);
    r.to_tag = Some("ours");
    Written {
        status,
        bytes: r.to_bytes(),
    }
}

/// A provisional let through and, when it goes reliably, handed back as sent.
fn provisional(leg: &mut CallerLeg, status: u16, reliable: bool) -> Option<Provisional> {
    let p = leg.provisional(status, reliable)?;
    if let Some(rseq) = p.rseq {
        leg.sent_reliable(rseq, written(status), None, T1);
    }
    Some(p)
}

fn sent(actions: &Actions) -> Vec<u16> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Resend(r) => Some(r.status),
            _ => None,
        })
        .collect()
}

/// Advances to the leg's next deadline and runs its timers.
async fn next(leg: &mut CallerLeg) -> Actions {
    let at = leg.deadline().expect("a timer is running");
    tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
    leg.on_timer(Instant::now(), T2)
}

#[tokio::test(start_paused = true)]
async fn the_2xx_goes_again_at_t1_doubling_to_t2_until_the_ack() {
    let mut leg = CallerLeg::new(false);
    let start = Instant::now();
    leg.accept(written(200), T1);
    assert!(leg.answered() && leg.awaiting_ack());
    let mut at = Vec::new();
    for _ in 0..5 {
        let a = next(&mut leg).await;
        assert_eq!(sent(&a), [200]);
        at.push(Instant::now() - start);
    }
    let ms = |n| Duration::from_millis(n);
    // T1, +2T1, +4T1, then capped at T2 = 4 s.
    assert_eq!(at, [ms(500), ms(1500), ms(3500), ms(7500), ms(11500)]);
    assert!(leg.on_ack(), "the ACK for the 2xx");
    assert!(!leg.awaiting_ack());
    assert_eq!(leg.deadline(), None, "no more retransmissions");
    assert!(!leg.on_ack(), "a retransmitted ACK changes nothing");
}

#[tokio::test(start_paused = true)]
async fn no_ack_within_64_t1_ends_the_call() {
    let mut leg = CallerLeg::new(false);
    let start = Instant::now();
    leg.accept(written(200), T1);
    let mut gave_up = false;
    for _ in 0..40 {
        let a = next(&mut leg).await;
        if a.iter().any(|a| matches!(a, Action::NoAck)) {
            gave_up = true;
            break;
        }
    }
    assert!(gave_up);
    assert_eq!(Instant::now() - start, T1 * 64);
    assert_eq!(leg.deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn reliable_provisionals_have_their_own_rseq_and_wait_for_prack() {
    let mut leg = CallerLeg::new(true);
    let p = leg.provisional(183, true).unwrap();
    assert!(p.first, "the first 18x");
    assert_eq!(p.rseq, Some(1));
    leg.sent_reliable(1, written(183), Some((7, 41, 1)), T1);
    let p = provisional(&mut leg, 180, true).unwrap();
    assert!(!p.first);
    assert_eq!(p.rseq, Some(2));
    // Both go again at T1 until PRACKed.
    let a = next(&mut leg).await;
    assert_eq!(sent(&a), [183, 180]);
    assert_eq!(leg.on_prack(Some(9)), Prack::NoMatch);
    assert_eq!(leg.on_prack(None), Prack::NoMatch);
    assert_eq!(leg.on_prack(Some(1)), Prack::FromB(7, 41, 1));
    assert_eq!(
        leg.on_prack(Some(1)),
        Prack::NoMatch,
        "acknowledged already"
    );
    assert_eq!(leg.on_prack(Some(2)), Prack::Ours);
    assert_eq!(leg.deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn a_caller_without_100rel_gets_plain_provisionals() {
    let mut leg = CallerLeg::new(false);
    let p = provisional(&mut leg, 100, false).unwrap();
    assert!(!p.first, "100 is not ringing");
    assert_eq!(p.rseq, None);
    let p = provisional(&mut leg, 180, true).unwrap();
    assert!(p.first);
    assert_eq!(p.rseq, None, "the caller cannot PRACK");
    assert_eq!(leg.deadline(), None, "nothing to retransmit");
}

/// RFC 3262 3: no PRACK within 64*T1 fails the INVITE (while it is still pending).
#[tokio::test(start_paused = true)]
async fn no_prack_within_64_t1_fails_the_invite() {
    let mut leg = CallerLeg::new(true);
    let start = Instant::now();
    provisional(&mut leg, 183, true).unwrap();
    let mut failed = false;
    for _ in 0..40 {
        let a = next(&mut leg).await;
        if a.iter().any(|a| matches!(a, Action::NoPrack)) {
            failed = true;
            break;
        }
    }
    assert!(failed);
    assert_eq!(Instant::now() - start, T1 * 64);
    assert_eq!(leg.deadline(), None);
}

/// RFC 3261 9.2: CANCEL ends a pending INVITE with 487, and nothing after a final answer.
#[tokio::test(start_paused = true)]
async fn cancel_only_while_pending_and_one_final_answer() {
    let mut leg = CallerLeg::new(true);
    provisional(&mut leg, 183, true).unwrap();
    leg.set_final_headers(vec![("Proxy-Authenticate".into(), "Digest x".into())]);
    let r = leg.cancel(resp(487)).expect("pending: 487");
    assert_eq!(r.status, 487);
    assert_eq!(r.headers.get("Proxy-Authenticate"), Some("Digest x"));
    assert!(leg.cancelled() && leg.answered());
    assert_eq!(
        leg.deadline(),
        None,
        "the reliable 183 is not retransmitted"
    );
    assert!(leg.reject(resp(500)).is_none());
    assert!(provisional(&mut leg, 180, false).is_none());
    // Answered: a CANCEL changes nothing.
    let mut leg = CallerLeg::new(false);
    leg.accept(written(200), T1);
    assert!(leg.cancel(resp(487)).is_none());
    assert!(!leg.cancelled());
    assert!(leg.reject(resp(500)).is_none());
}

/// Issue 14: what only the answer needs (reliable provisionals, the 2xx, a 407's
/// challenges) is one box made when first needed and gone at the ACK; a plain call never
/// makes it before its 2xx.
#[tokio::test(start_paused = true)]
async fn the_set_up_state_is_made_when_needed_and_gone_at_the_ack() {
    assert_eq!(std::mem::size_of::<CallerLeg>(), 16);
    let mut leg = CallerLeg::new(true);
    leg.set_final_headers(Vec::new());
    provisional(&mut leg, 180, false);
    assert!(leg.set_up.is_none(), "nothing kept for a plain 180");
    provisional(&mut leg, 183, true);
    assert!(leg.set_up.is_some(), "a reliable 183 is kept for its PRACK");
    assert_eq!(leg.on_prack(Some(1)), Prack::Ours);
    leg.accept(written(200), T1);
    assert!(leg.deadline().is_some(), "the 2xx is retransmitted");
    assert!(leg.on_ack());
    assert!(leg.set_up.is_none(), "the ACK frees the set-up state");
    leg.compact();
    assert!(leg.answered() && !leg.awaiting_ack());
}

/// A 407's challenges set before the dial fails still go with the final answer.
#[tokio::test(start_paused = true)]
async fn final_headers_survive_a_reliable_provisional_and_go_with_the_rejection() {
    let mut leg = CallerLeg::new(true);
    provisional(&mut leg, 183, true);
    leg.set_final_headers(vec![("Proxy-Authenticate".into(), "Digest x".into())]);
    let r = leg.reject(resp(407)).expect("not answered yet");
    assert_eq!(r.headers.get("Proxy-Authenticate"), Some("Digest x"));
    assert!(leg.set_up.is_none() && leg.deadline().is_none());
}
