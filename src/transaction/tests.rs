//! Transaction layer tests on tokio's paused clock: every timer and transition of RFC 3261
//! figures 5 to 8 and RFC 6026's Accepted state, driven through the public API with a
//! recording fake Sender and a recording fake TransactionUser.
//!
//! Owns: layer-level tests. Must not touch: production code.

use super::test_util::{invite, options, response_to};
use super::*;
use crate::sip::{parse, Via};
use crate::transport::{ConnectionId, TransportKind};
use std::time::Duration;
use tokio::time::Instant;

/// Sleeps on the paused clock, then lets the timer tasks due at that instant run.
async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

struct FakeSender {
    sent: Mutex<Vec<(Instant, Target, Bytes)>>,
    fail: AtomicBool,
}

impl Sender for FakeSender {
    fn send(&self, target: &Target, data: Bytes) -> Result<(), TransportError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(TransportError::ConnectionClosed(target.addr));
        }
        self.sent.lock().push((Instant::now(), *target, data));
        Ok(())
    }
}

impl FakeSender {
    /// Everything sent so far, parsed, with the time since `t0`; clears the record.
    fn take(&self, t0: Instant) -> Vec<(Duration, SipMessage)> {
        self.sent
            .lock()
            .drain(..)
            .map(|(at, _, b)| (at - t0, parse(&b).expect("sent message parses").0))
            .collect()
    }
}

#[derive(Default)]
struct FakeTu {
    requests: Mutex<Vec<(ServerTransaction, Request)>>,
    acks: Mutex<Vec<Request>>,
    cancels: Mutex<Vec<(ServerTransaction, Request)>>,
    strays: Mutex<Vec<Response>>,
    /// Answer every request at once with this status.
    auto: Option<u16>,
}

impl TransactionUser for FakeTu {
    fn on_request(&self, tx: ServerTransaction, req: Request) {
        if let Some(status) = self.auto {
            let mut r = req.response(status);
            r.set_to_tag("uas");
            tx.respond(r).expect("auto answer");
            return;
        }
        self.requests.lock().push((tx, req));
    }
    fn on_ack(&self, ack: Request, _source: Target) {
        self.acks.lock().push(ack);
    }
    fn on_cancel(&self, invite: ServerTransaction, cancel: Request) {
        self.cancels.lock().push((invite, cancel));
    }
    fn on_stray_response(&self, resp: Response, _source: Target) {
        self.strays.lock().push(resp);
    }
}

fn udp() -> Target {
    Target {
        transport: TransportKind::Udp,
        addr: "192.0.2.1:5060".parse().unwrap(),
        connection: None,
    }
}

fn tcp() -> Target {
    Target {
        transport: TransportKind::Tcp,
        addr: "192.0.2.1:5060".parse().unwrap(),
        connection: ConnectionId::new(1),
    }
}

struct Env {
    layer: TransactionLayer,
    sender: Arc<FakeSender>,
    tu: Arc<FakeTu>,
    t0: Instant,
}

fn env_with(tu: FakeTu) -> Env {
    let sender = Arc::new(FakeSender {
        sent: Mutex::new(Vec::new()),
        fail: AtomicBool::new(false),
    });
    let tu = Arc::new(tu);
    let layer = TransactionLayer::new(sender.clone(), TimerConfig::default(), tu.clone());
    Env {
        layer,
        sender,
        tu,
        t0: Instant::now(),
    }
}

fn env() -> Env {
    env_with(FakeTu::default())
}

impl Env {
    fn sent(&self) -> Vec<(Duration, SipMessage)> {
        self.sender.take(self.t0)
    }
    /// The offsets (ms) of sent requests of `m` / responses of `status`.
    fn times(sent: &[(Duration, SipMessage)], pick: impl Fn(&SipMessage) -> bool) -> Vec<u128> {
        sent.iter()
            .filter(|(_, m)| pick(m))
            .map(|(d, _)| d.as_millis())
            .collect()
    }
    fn server_tx(&self) -> ServerTransaction {
        self.tu
            .requests
            .lock()
            .last()
            .expect("a request reached the TU")
            .0
            .clone()
    }
}

fn is_method(m: Method) -> impl Fn(&SipMessage) -> bool {
    move |msg| matches!(msg, SipMessage::Request(r) if r.method == m)
}

fn is_status(s: u16) -> impl Fn(&SipMessage) -> bool {
    move |msg| matches!(msg, SipMessage::Response(r) if r.status == s)
}

fn req_msg(r: &Request) -> SipMessage {
    SipMessage::Request(r.clone())
}

fn resp_msg(r: &Response) -> SipMessage {
    SipMessage::Response(r.clone())
}

fn with_branch(mut r: Request, branch: &str) -> Request {
    r.base.via[0].params.set("branch", Some(branch));
    r
}

fn ack_for(inv: &Request, to_tag: &str) -> Request {
    let mut ack = inv.clone();
    ack.method = Method::Ack;
    ack.base.cseq.method = Method::Ack;
    ack.base.to.set_tag(to_tag);
    ack
}

// ---- INVITE client (RFC 3261 figure 5, RFC 6026) ---------------------------------------

#[tokio::test(start_paused = true)]
async fn invite_client_timer_a_schedule_and_timer_b_over_udp() {
    let e = env();
    let mut tx = e.layer.send_request(invite(), udp()).unwrap();
    assert_eq!(tx.branch(), "z9hG4bKinv1");
    assert_eq!(e.layer.len(), 1);
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Timeout)));
    assert_eq!(
        Instant::now() - e.t0,
        Duration::from_secs(32),
        "Timer B = 64*T1"
    );
    assert!(tx.next_event().await.is_none());
    let sent = e.sent();
    assert_eq!(
        Env::times(&sent, is_method(Method::Invite)),
        vec![0, 500, 1500, 3500, 7500, 15500, 31500],
        "Timer A: T1, doubling"
    );
    assert_eq!(e.layer.len(), 0);
    assert_eq!(e.layer.stats().client_timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn invite_client_no_retransmission_over_tcp() {
    let e = env();
    let mut tx = e.layer.send_request(invite(), tcp()).unwrap();
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Timeout)));
    assert_eq!(Env::times(&e.sent(), is_method(Method::Invite)), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn invite_client_4xx_ack_and_timer_d() {
    let e = env();
    let inv = invite();
    let mut tx = e.layer.send_request(inv.clone(), udp()).unwrap();
    sleep(Duration::from_millis(700)).await;
    e.layer.on_message(resp_msg(&response_to(&inv, 180)), udp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Provisional(r)) if r.status == 180));
    e.layer.on_message(resp_msg(&response_to(&inv, 486)), udp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Final(r)) if r.status == 486));
    // A retransmitted 486 gets the ACK again and is not reported.
    sleep(Duration::from_millis(300)).await;
    e.layer.on_message(resp_msg(&response_to(&inv, 486)), udp());
    let sent = e.sent();
    assert_eq!(Env::times(&sent, is_method(Method::Invite)), vec![0, 500]);
    assert_eq!(Env::times(&sent, is_method(Method::Ack)), vec![700, 1000]);
    let Some(SipMessage::Request(ack)) = sent
        .iter()
        .map(|(_, m)| m)
        .find(|m| is_method(Method::Ack)(m))
    else {
        panic!("no ACK")
    };
    // RFC 3261 17.1.1.3.
    assert_eq!(ack.uri, inv.uri);
    assert_eq!(ack.base.via, inv.base.via[..1].to_vec());
    assert_eq!(ack.base.to.tag(), Some("totag"));
    assert_eq!(ack.base.from, inv.base.from);
    assert_eq!(ack.base.call_id, inv.base.call_id);
    assert_eq!(
        (ack.base.cseq.seq, &ack.base.cseq.method),
        (1, &Method::Ack)
    );
    assert_eq!(
        ack.headers.list("Route"),
        vec!["<sip:proxy.example;lr>".to_owned()]
    );
    // Timer D: 32 s after the final.
    assert!(tx.next_event().await.is_none());
    assert_eq!(Instant::now() - e.t0, Duration::from_millis(32_700));
    assert_eq!(e.layer.len(), 0);
    assert!(
        e.sent().is_empty(),
        "no INVITE retransmission after the final"
    );
}

#[tokio::test(start_paused = true)]
async fn invite_client_tcp_final_terminates_at_once() {
    let e = env();
    let inv = invite();
    let mut tx = e.layer.send_request(inv.clone(), tcp()).unwrap();
    e.layer.on_message(resp_msg(&response_to(&inv, 503)), tcp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Final(_))));
    assert!(tx.next_event().await.is_none());
    assert_eq!(e.layer.len(), 0, "Timer D is 0 over TCP");
}

#[tokio::test(start_paused = true)]
async fn invite_client_2xx_accepted_and_timer_m() {
    let e = env();
    let inv = invite();
    let mut tx = e.layer.send_request(inv.clone(), udp()).unwrap();
    e.layer.on_message(resp_msg(&response_to(&inv, 200)), udp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Final(r)) if r.status == 200));
    sleep(Duration::from_secs(2)).await;
    // RFC 6026: a retransmitted (or forked) 2xx is reported again.
    e.layer.on_message(resp_msg(&response_to(&inv, 200)), udp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Final(_))));
    assert!(tx.next_event().await.is_none());
    assert_eq!(
        Instant::now() - e.t0,
        Duration::from_secs(32),
        "Timer M = 64*T1"
    );
    let sent = e.sent();
    assert_eq!(Env::times(&sent, is_method(Method::Invite)), vec![0]);
    assert!(
        Env::times(&sent, is_method(Method::Ack)).is_empty(),
        "the TU ACKs 2xx"
    );
    // After Timer M, 2xx go to the TU as strays.
    e.layer.on_message(resp_msg(&response_to(&inv, 200)), udp());
    assert_eq!(e.tu.strays.lock().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn client_transport_error_is_reported_and_ends() {
    let e = env();
    e.sender.fail.store(true, Ordering::SeqCst);
    let mut tx = e.layer.send_request(invite(), udp()).unwrap();
    assert!(matches!(
        tx.next_event().await,
        Some(ClientEvent::TransportError(_))
    ));
    assert!(tx.next_event().await.is_none());
    assert_eq!(e.layer.len(), 0);
    // A failure on a retransmission (Timer E) ends the transaction as well.
    e.sender.fail.store(false, Ordering::SeqCst);
    let mut tx = e.layer.send_request(options(), udp()).unwrap();
    sleep(Duration::from_millis(100)).await;
    e.sender.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        tx.next_event().await,
        Some(ClientEvent::TransportError(_))
    ));
    assert_eq!(
        Instant::now() - e.t0,
        Duration::from_millis(500),
        "Timer E fired"
    );
    assert!(tx.next_event().await.is_none());
    assert_eq!(e.layer.len(), 0);
    assert_eq!(e.layer.stats().transport_errors, 2);
}

#[tokio::test(start_paused = true)]
async fn send_request_checks_branch_and_duplicates() {
    let e = env();
    let mut no_branch = options();
    no_branch.base.via[0].params.remove("branch");
    assert!(matches!(
        e.layer.send_request(no_branch, udp()),
        Err(TransactionError::NoBranch)
    ));
    let _tx = e.layer.send_request(options(), udp()).unwrap();
    assert!(matches!(
        e.layer.send_request(options(), udp()),
        Err(TransactionError::Duplicate)
    ));
}

// ---- non-INVITE client (RFC 3261 figure 6) ---------------------------------------------

#[tokio::test(start_paused = true)]
async fn non_invite_client_timer_e_and_f() {
    let e = env();
    let mut tx = e.layer.send_request(options(), udp()).unwrap();
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Timeout)));
    assert_eq!(
        Instant::now() - e.t0,
        Duration::from_secs(32),
        "Timer F = 64*T1"
    );
    assert!(tx.next_event().await.is_none());
    assert_eq!(
        Env::times(&e.sent(), is_method(Method::Options)),
        vec![0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500],
        "Timer E doubles up to T2"
    );
    assert_eq!(e.layer.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn non_invite_client_proceeding_uses_t2() {
    let e = env();
    let req = options();
    let mut tx = e.layer.send_request(req.clone(), udp()).unwrap();
    sleep(Duration::from_millis(200)).await;
    e.layer.on_message(resp_msg(&response_to(&req, 100)), udp());
    assert!(matches!(
        tx.next_event().await,
        Some(ClientEvent::Provisional(_))
    ));
    sleep(Duration::from_millis(9_000)).await;
    e.layer.on_message(resp_msg(&response_to(&req, 200)), udp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Final(_))));
    assert_eq!(
        Env::times(&e.sent(), is_method(Method::Options)),
        vec![0, 500, 4500, 8500],
        "the Timer E running at the 1xx fires, then T2"
    );
    // Completed absorbs retransmitted finals; Timer K = T4 ends it.
    e.layer.on_message(resp_msg(&response_to(&req, 200)), udp());
    assert!(tx.next_event().await.is_none());
    assert_eq!(Instant::now() - e.t0, Duration::from_millis(9_200 + 5_000));
    assert!(e.sent().is_empty());
    assert_eq!(e.layer.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn non_invite_client_timer_k_zero_over_tcp() {
    let e = env();
    let req = options();
    let mut tx = e.layer.send_request(req.clone(), tcp()).unwrap();
    e.layer.on_message(resp_msg(&response_to(&req, 404)), tcp());
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Final(_))));
    assert!(tx.next_event().await.is_none());
    assert_eq!(e.layer.len(), 0);
    assert_eq!(Env::times(&e.sent(), is_method(Method::Options)), vec![0]);
}

// ---- INVITE server (RFC 3261 figure 7, RFC 6026) ---------------------------------------

#[tokio::test(start_paused = true)]
async fn invite_server_trying_retransmission_g_ack_confirmed_i() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    let sent = e.sent();
    assert_eq!(
        Env::times(&sent, is_status(100)),
        vec![0],
        "100 Trying at once"
    );
    let SipMessage::Response(trying) = &sent[0].1 else {
        panic!()
    };
    assert_eq!(trying.base.to.tag(), None);
    assert_eq!(e.tu.requests.lock().len(), 1);
    let tx = e.server_tx();
    assert_eq!(tx.method(), &Method::Invite);
    assert_eq!(tx.source(), udp());
    assert!(!tx.is_finished());
    // The transaction keeps no copy of the request's headers: a response it makes itself
    // (a CANCEL's 487) reads them back from its 100 Trying, then from a 18x with its tag.
    let own = tx.response(486).expect("answerable before the final");
    assert_eq!((own.status, own.base.clone()), (486, inv.base.clone()));
    assert!(own.headers.is_empty() && own.body.is_empty());
    // A retransmitted INVITE gets the last response again and does not reach the TU.
    e.layer.on_message(req_msg(&inv), udp());
    assert_eq!(Env::times(&e.sent(), is_status(100)), vec![0]);
    assert_eq!(e.tu.requests.lock().len(), 1);
    sleep(Duration::from_secs(1)).await;
    tx.respond(response_to(&inv, 486)).unwrap();
    assert!(tx.is_finished());
    // The request's headers go with the final (issue 14: the transaction lingers for
    // Timer G/H/I, and nothing is built from them any more).
    assert!(tx.response(200).is_none());
    assert!(matches!(
        tx.respond(response_to(&inv, 200)),
        Err(TransactionError::AlreadyFinal)
    ));
    sleep(Duration::from_millis(12_000)).await;
    // Timer G: T1 doubling to T2.
    assert_eq!(
        Env::times(&e.sent(), is_status(486)),
        vec![1000, 1500, 2500, 4500, 8500, 12500]
    );
    e.layer.on_message(req_msg(&inv), udp());
    assert_eq!(e.sent().len(), 1, "retransmitted INVITE gets the 486 again");
    e.layer.on_message(req_msg(&ack_for(&inv, "totag")), udp());
    assert!(e.tu.acks.lock().is_empty(), "the non-2xx ACK is absorbed");
    sleep(Duration::from_millis(4_900)).await;
    assert!(e.sent().is_empty(), "Timer G stops in Confirmed");
    assert_eq!(e.layer.len(), 1);
    e.layer.on_message(req_msg(&ack_for(&inv, "totag")), udp());
    assert!(
        e.tu.acks.lock().is_empty(),
        "ACK retransmission absorbed in Confirmed"
    );
    sleep(Duration::from_millis(100)).await;
    assert_eq!(e.layer.len(), 0, "Timer I = T4");
}

#[tokio::test(start_paused = true)]
async fn invite_server_timer_h_without_ack() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    e.server_tx().respond(response_to(&inv, 480)).unwrap();
    sleep(Duration::from_millis(31_999)).await;
    assert_eq!(e.layer.len(), 1);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(e.layer.len(), 0, "Timer H = 64*T1");
    assert_eq!(e.layer.stats().ack_timeouts, 1);
    // G fired at 0.5, 1.5, 3.5, 7.5 then every 4 s up to 31.5 (H wins at 32).
    assert_eq!(
        Env::times(&e.sent(), is_status(480)),
        vec![0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
    );
}

#[tokio::test(start_paused = true)]
async fn invite_server_over_tcp_no_g_and_zero_i() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), tcp());
    e.server_tx().respond(response_to(&inv, 486)).unwrap();
    sleep(Duration::from_secs(10)).await;
    assert_eq!(Env::times(&e.sent(), is_status(486)), vec![0]);
    e.layer.on_message(req_msg(&ack_for(&inv, "totag")), tcp());
    assert_eq!(e.layer.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn invite_server_accepted_absorbs_invites_and_passes_acks() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    let tx = e.server_tx();
    tx.respond(response_to(&inv, 200)).unwrap();
    e.sent();
    // RFC 6026 8.6: retransmitted INVITEs are absorbed: not answered, not passed up.
    e.layer.on_message(req_msg(&inv), udp());
    assert!(e.sent().is_empty());
    assert_eq!(e.tu.requests.lock().len(), 1);
    // The TU retransmits its 2xx through the transaction.
    tx.respond(response_to(&inv, 200)).unwrap();
    assert_eq!(e.sent().len(), 1);
    // ACKs (same branch, or the usual new branch) reach the TU.
    e.layer.on_message(req_msg(&ack_for(&inv, "totag")), udp());
    let other = with_branch(ack_for(&inv, "totag"), "z9hG4bKack2");
    e.layer.on_message(req_msg(&other), udp());
    assert_eq!(e.tu.acks.lock().len(), 2);
    sleep(Duration::from_millis(31_999)).await;
    assert_eq!(e.layer.len(), 1);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(e.layer.len(), 0, "Timer L = 64*T1");
}

/// Cleanup timers (here J) fire on the layer's 50 ms grid: a transaction finished 7 ms after
/// the layer started ends at 32.050 s, not 32.007 s, together with its neighbours.
#[tokio::test(start_paused = true)]
async fn cleanup_timers_end_transactions_on_a_shared_grid() {
    let e = env();
    let req = options();
    sleep(Duration::from_millis(7)).await;
    e.layer.on_message(req_msg(&req), udp());
    e.server_tx().respond(response_to(&req, 200)).unwrap();
    sleep(Duration::from_millis(32_042)).await;
    assert_eq!(e.layer.len(), 1, "not yet at 32.049 s");
    sleep(Duration::from_millis(1)).await;
    assert_eq!(e.layer.len(), 0, "Timer J ends it at 32.050 s");
}

// ---- non-INVITE server (RFC 3261 figure 8) ---------------------------------------------

#[tokio::test(start_paused = true)]
async fn non_invite_server_retransmissions_and_timer_j() {
    let e = env();
    let req = options();
    e.layer.on_message(req_msg(&req), udp());
    assert!(e.sent().is_empty(), "no 100 for non-INVITE");
    e.layer.on_message(req_msg(&req), udp());
    assert!(e.sent().is_empty(), "Trying absorbs retransmissions");
    assert_eq!(e.tu.requests.lock().len(), 1);
    let tx = e.server_tx();
    tx.respond(response_to(&req, 183)).unwrap();
    e.layer.on_message(req_msg(&req), udp());
    assert_eq!(Env::times(&e.sent(), is_status(183)), vec![0, 0]);
    tx.respond(response_to(&req, 200)).unwrap();
    e.layer.on_message(req_msg(&req), udp());
    assert_eq!(Env::times(&e.sent(), is_status(200)), vec![0, 0]);
    assert!(tx.respond(response_to(&req, 500)).is_err());
    sleep(Duration::from_millis(31_999)).await;
    assert_eq!(e.layer.len(), 1);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(e.layer.len(), 0, "Timer J = 64*T1");
    assert!(matches!(
        tx.respond(response_to(&req, 200)),
        Err(TransactionError::Gone)
    ));
    assert_eq!(e.layer.stats().retransmissions_absorbed, 3);
}

#[tokio::test(start_paused = true)]
async fn non_invite_server_timer_j_zero_over_tcp() {
    let e = env();
    let req = options();
    e.layer.on_message(req_msg(&req), tcp());
    e.server_tx().respond(response_to(&req, 200)).unwrap();
    assert_eq!(e.layer.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn server_transport_error_ends_transaction() {
    let e = env();
    let req = options();
    e.layer.on_message(req_msg(&req), udp());
    e.sender.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        e.server_tx().respond(response_to(&req, 200)),
        Err(TransactionError::Transport(_))
    ));
    assert_eq!(e.layer.len(), 0);
}

// ---- CANCEL, merged requests, RFC 2543, shutdown, strays -------------------------------

#[tokio::test(start_paused = true)]
async fn cancel_matches_invite() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    e.server_tx().respond(response_to(&inv, 180)).unwrap();
    e.sent();
    let mut cancel = inv.clone();
    cancel.method = Method::Cancel;
    cancel.base.cseq.method = Method::Cancel;
    e.layer.on_message(req_msg(&cancel), udp());
    let sent = e.sent();
    assert_eq!(sent.len(), 1);
    let SipMessage::Response(ok) = &sent[0].1 else {
        panic!()
    };
    assert_eq!((ok.status, &ok.base.cseq.method), (200, &Method::Cancel));
    assert_eq!(
        ok.base.to.tag(),
        Some("totag"),
        "same To tag as the INVITE's responses"
    );
    let (invite_tx, _) = e.tu.cancels.lock().pop().expect("on_cancel");
    assert_eq!(e.tu.requests.lock().len(), 1, "CANCEL is not an on_request");
    invite_tx.respond(response_to(&inv, 487)).unwrap();
    assert_eq!(Env::times(&e.sent(), is_status(487)), vec![0]);
    // A retransmitted CANCEL gets its 200 again, and the TU hears nothing more.
    e.layer.on_message(req_msg(&cancel), udp());
    assert_eq!(Env::times(&e.sent(), is_status(200)), vec![0]);
    assert!(e.tu.cancels.lock().is_empty());
    sleep(Duration::from_secs(40)).await;
    assert_eq!(e.layer.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn cancel_for_unknown_transaction_gets_481() {
    let e = env();
    let mut cancel = with_branch(invite(), "z9hG4bKnone");
    cancel.method = Method::Cancel;
    cancel.base.cseq.method = Method::Cancel;
    e.layer.on_message(req_msg(&cancel), udp());
    let sent = e.sent();
    let SipMessage::Response(r) = &sent[0].1 else {
        panic!()
    };
    assert_eq!(
        (r.status, r.reason.as_str()),
        (481, "Call/Transaction Does Not Exist")
    );
    assert!(e.tu.cancels.lock().is_empty());
    assert!(e.tu.requests.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancel_after_final_gets_200_without_on_cancel() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    e.server_tx().respond(response_to(&inv, 486)).unwrap();
    let mut cancel = inv.clone();
    cancel.method = Method::Cancel;
    cancel.base.cseq.method = Method::Cancel;
    e.layer.on_message(req_msg(&cancel), udp());
    assert!(Env::times(&e.sent(), is_status(200)).len() == 1);
    assert!(e.tu.cancels.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn merged_request_gets_482() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    e.sent();
    let forked = with_branch(inv.clone(), "z9hG4bKother");
    e.layer.on_message(req_msg(&forked), udp());
    let sent = e.sent();
    let SipMessage::Response(r) = &sent[0].1 else {
        panic!()
    };
    assert_eq!((r.status, r.reason.as_str()), (482, "Loop Detected"));
    assert!(r.base.to.tag().is_some());
    assert_eq!(e.tu.requests.lock().len(), 1);
    assert_eq!(e.layer.len(), 1);
    assert_eq!(e.layer.stats().merged_rejected, 1);
}

/// An INVITE of an RFC 2543 peer: its Via has no branch with the magic cookie.
fn rfc2543_invite() -> Request {
    let mut inv = invite();
    inv.base.via[0] = Via::parse("SIP/2.0/UDP 192.0.2.1:5060").unwrap();
    inv
}

#[tokio::test(start_paused = true)]
async fn rfc2543_fallback_matching() {
    let e = env();
    let inv = rfc2543_invite();
    e.layer.on_message(req_msg(&inv), udp());
    // The retransmission matches without any branch (and with received added).
    let mut again = inv.clone();
    again.base.via[0].params.set("received", Some("192.0.2.1"));
    e.layer.on_message(req_msg(&again), udp());
    assert_eq!(Env::times(&e.sent(), is_status(100)), vec![0, 0]);
    assert_eq!(e.tu.requests.lock().len(), 1);
    e.server_tx().respond(response_to(&inv, 404)).unwrap();
    // The ACK carries the response's To tag (17.2.3).
    e.layer.on_message(req_msg(&ack_for(&inv, "totag")), udp());
    assert!(
        e.tu.acks.lock().is_empty(),
        "matched the INVITE transaction"
    );
    e.sent();
    sleep(Duration::from_secs(2)).await;
    assert!(e.sent().is_empty(), "Confirmed: no Timer G");
    // An ACK with another To tag is not for this transaction.
    e.layer
        .on_message(req_msg(&ack_for(&inv, "elsewhere")), udp());
    assert_eq!(e.tu.acks.lock().len(), 1);
}

/// Issue 15: a response no datagram carries becomes a short 500 with the same To tag,
/// whether the user wrote it from the request (`reply`) or handed bytes (`respond_written`,
/// answered from the 100 Trying's headers).
#[tokio::test(start_paused = true)]
async fn a_response_too_large_for_udp_goes_as_a_500() {
    let e = env();
    let inv = invite();
    e.layer.on_message(req_msg(&inv), udp());
    e.sent();
    let tx = e.server_tx();
    let huge = Bytes::from(vec![b'x'; 70_000]);
    tx.respond_written(200, Some("ours"), huge).unwrap();
    let sent = e.sent();
    let SipMessage::Response(r) = &sent[0].1 else {
        panic!("a response")
    };
    assert_eq!((r.status, r.reason.as_str()), (500, "Response Too Large"));
    assert_eq!(r.base.to.tag(), Some("ours"));
    assert_eq!(r.base.call_id, inv.base.call_id);

    let e = env();
    let opts = options();
    e.layer.on_message(req_msg(&opts), udp());
    let body = Bytes::from(vec![b'x'; 70_000]);
    let mut big = opts.reply(200);
    big.to_tag = Some("mine");
    big.body = &body;
    e.server_tx().reply(&big).unwrap();
    let sent = e.sent();
    let SipMessage::Response(r) = &sent[0].1 else {
        panic!("a response")
    };
    assert_eq!((r.status, r.reason.as_str()), (500, "Response Too Large"));
    assert_eq!(r.base.to.tag(), Some("mine"));
    assert!(r.body.is_empty());
}

/// RFC 3261 17.2.3 fallback: until the final, an RFC 2543 request matches its transaction
/// only with the To tag of the request that made it; after it, without.
#[tokio::test(start_paused = true)]
async fn rfc2543_matching_compares_the_to_tag_until_the_final() {
    let e = env();
    let inv = rfc2543_invite();
    e.layer.on_message(req_msg(&inv), udp());
    let mut tagged = inv.clone();
    tagged.base.to.set_tag("other");
    e.layer.on_message(req_msg(&tagged), udp());
    assert_eq!(
        Env::times(&e.sent(), is_status(100)),
        vec![0],
        "another To tag: not a retransmission (dropped)"
    );
    e.server_tx().respond(response_to(&inv, 404)).unwrap();
    e.sent();
    e.layer.on_message(req_msg(&tagged), udp());
    assert_eq!(
        Env::times(&e.sent(), is_status(404)),
        vec![0],
        "after the final the 404 goes again"
    );
    assert_eq!(e.tu.requests.lock().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn stop_accepting_answers_503_to_new_requests_only() {
    let e = env();
    e.layer.stop_accepting();
    e.layer.on_message(req_msg(&invite()), udp());
    let sent = e.sent();
    let SipMessage::Response(r) = &sent[0].1 else {
        panic!()
    };
    assert_eq!(r.status, 503);
    assert!(r.headers.has("Retry-After"));
    assert!(e.tu.requests.lock().is_empty());
    assert_eq!(e.layer.len(), 0);
    // In-dialog requests go on.
    let mut bye = with_branch(options(), "z9hG4bKbye");
    bye.method = Method::Bye;
    bye.base.cseq.method = Method::Bye;
    bye.base.to.set_tag("dialog");
    e.layer.on_message(req_msg(&bye), udp());
    assert_eq!(e.tu.requests.lock().len(), 1);
    assert_eq!(e.layer.stats().rejected_not_accepting, 1);
}

/// Issue 15: a flood of requests outside dialogs (bad credentials, each answered and then
/// remembered for Timer J) cannot grow the table past `max_transactions`; requests of
/// dialogs already up still get their transactions, and the bound lifts as Timer J ends
/// transactions.
#[tokio::test(start_paused = true)]
async fn a_full_table_refuses_new_requests_outside_dialogs_only() {
    let e = env();
    e.layer.set_max_transactions(3);
    for i in 0..5 {
        let mut req = with_branch(options(), &format!("z9hG4bKflood{i}"));
        req.base.call_id = format!("flood{i}");
        e.layer.on_message(req_msg(&req), udp());
    }
    assert_eq!(e.layer.len(), 3);
    assert_eq!(e.tu.requests.lock().len(), 3);
    let refused: Vec<_> = e
        .sent()
        .into_iter()
        .filter_map(|(_, m)| match m {
            SipMessage::Response(r) if r.status == 503 => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0].reason, "Too Many Transactions");
    assert!(refused[0].headers.has("Retry-After"));
    assert_eq!(e.layer.stats().refused_table_full, 2);
    // A BYE of a dialog already up passes.
    let mut bye = with_branch(options(), "z9hG4bKbye");
    bye.method = Method::Bye;
    bye.base.cseq.method = Method::Bye;
    bye.base.to.set_tag("dialog");
    e.layer.on_message(req_msg(&bye), udp());
    assert_eq!(e.tu.requests.lock().len(), 4);
    assert_eq!(e.layer.stats().refused_table_full, 2);
}

#[tokio::test(start_paused = true)]
async fn strays_go_to_the_tu() {
    let e = env();
    e.layer
        .on_message(resp_msg(&response_to(&invite(), 200)), udp());
    assert_eq!(e.tu.strays.lock().len(), 1);
    e.layer.on_message(req_msg(&ack_for(&invite(), "x")), udp());
    assert_eq!(e.tu.acks.lock().len(), 1);
    let ack = SipMessage::Request(ack_for(&invite(), "x"));
    e.layer.send_stateless(&ack, &udp()).unwrap();
    assert_eq!(Env::times(&e.sent(), is_method(Method::Ack)), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn stress_20000_server_transactions_drain() {
    let e = env_with(FakeTu {
        auto: Some(200),
        ..FakeTu::default()
    });
    let mut target = udp();
    for i in 0..20_000u32 {
        let base = if i % 2 == 0 { invite() } else { options() };
        let mut req = with_branch(base, &format!("z9hG4bKs{i}"));
        req.base.call_id = format!("stress{i}");
        // Spread the peers over ports, as many phones would.
        target.addr.set_port(1024 + (i % 50_000) as u16);
        e.layer.on_message(req_msg(&req), target);
    }
    assert_eq!(e.layer.len(), 20_000);
    assert_eq!(e.layer.stats().server_created, 20_000);
    sleep(Duration::from_secs(33)).await;
    assert_eq!(e.layer.len(), 0);
    assert!(e.layer.is_empty());
}

#[tokio::test(start_paused = true)]
async fn explicit_advance_drives_timers_too() {
    let e = env();
    let mut tx = e.layer.send_request(options(), udp()).unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        Env::times(&e.sent(), is_method(Method::Options)),
        vec![0, 500]
    );
    tokio::time::advance(Duration::from_secs(32)).await;
    assert!(matches!(tx.next_event().await, Some(ClientEvent::Timeout)));
}

/// Two cores feeding the same 2000 requests over UDP: each creates exactly one transaction
/// (the other copy is a retransmission, answered with the transaction's 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_feeding_creates_each_transaction_once() {
    let e = env_with(FakeTu {
        auto: Some(200),
        ..FakeTu::default()
    });
    let reqs: Arc<Vec<Request>> = Arc::new(
        (0..2000)
            .map(|i| {
                let mut r = with_branch(options(), &format!("z9hG4bKc{i}"));
                r.base.call_id = format!("conc{i}");
                r
            })
            .collect(),
    );
    let feeders: Vec<_> = (0..2)
        .map(|_| {
            let layer = e.layer.clone();
            let reqs = reqs.clone();
            tokio::task::spawn_blocking(move || {
                for r in reqs.iter() {
                    layer.on_message(req_msg(r), udp());
                }
            })
        })
        .collect();
    for f in feeders {
        f.await.unwrap();
    }
    let stats = e.layer.stats();
    assert_eq!(stats.server_created, 2000);
    assert_eq!(stats.retransmissions_absorbed, 2000);
    assert_eq!(e.layer.len(), 2000, "Timer J keeps them for 32 s");
    // Each transaction answered its request, and its retransmission once the 200 was sent
    // (a copy that arrives while the TU is still answering is absorbed in Trying).
    let sent = e.sender.sent.lock().len();
    assert!((2000..=4000).contains(&sent), "{sent}");
}

/// RFC 3261 8.2.7 (issue 15): a challenge answered statelessly leaves no transaction, and
/// a retransmission of the request is a new request.
#[tokio::test(start_paused = true)]
async fn respond_and_end_leaves_no_transaction() {
    let e = env();
    let req = with_branch(options(), "z9hG4bKstateless");
    e.layer.on_message(req_msg(&req), udp());
    let tx = e.server_tx();
    assert_eq!(e.layer.len(), 1);
    tx.respond_and_end(response_to(&req, 401)).unwrap();
    assert_eq!(e.layer.len(), 0);
    assert!(e
        .sent()
        .iter()
        .any(|(_, m)| matches!(m, SipMessage::Response(r) if r.status == 401)));
    assert!(matches!(
        tx.respond(response_to(&req, 200)),
        Err(TransactionError::Gone)
    ));
    e.layer.on_message(req_msg(&req), udp());
    assert_eq!(
        e.tu.requests.lock().len(),
        2,
        "the retransmission is a new request"
    );
}

// ---- Stateless refusal from a look at the bytes (overload) -----------------------------

/// A layer with an overload detector (target 50 ms, windows of 100 ms, Retry-After 4).
fn env_with_overload() -> (Env, Arc<crate::overload::Overload>) {
    let e = env();
    let overload = Arc::new(crate::overload::Overload::new(
        Duration::from_millis(50),
        Duration::from_millis(100),
        Instant::now(),
    ));
    e.layer.set_overload(overload.clone(), 4);
    (e, overload)
}

#[tokio::test(start_paused = true)]
async fn under_overload_a_new_invite_is_refused_from_its_bytes_and_its_ack_dropped() {
    let (e, overload) = env_with_overload();
    let bytes = invite().to_bytes();
    // Nothing refused: the look passes everything on.
    assert!(e.layer.screen(&bytes, &udp(), None));
    // A transaction for it exists: its retransmission goes on to be absorbed.
    e.layer.on_message(req_msg(&invite()), udp());
    overload.note_script_memory(0.9);
    assert!(e.layer.screen(&bytes, &udp(), None));
    let _ = e.sent();
    // A new INVITE: a 503 from the look alone, the same tag for a retransmission.
    let fresh = with_branch(invite(), "z9hG4bKfresh");
    let mut fresh_bytes = fresh.to_bytes().to_vec();
    // From another port than the Via's sent-by (a NAT): the 503 goes to the sent-by
    // port at the source address (RFC 3261 18.2.2; no rport asked for).
    let natted = Target {
        addr: "192.0.2.1:4000".parse().unwrap(),
        ..udp()
    };
    assert!(!e.layer.screen(&fresh_bytes, &natted, None));
    assert!(!e.layer.screen(&fresh_bytes, &udp(), None));
    let to: Vec<Target> = e.sender.sent.lock().iter().map(|(_, t, _)| *t).collect();
    assert_eq!(to, vec![udp(), udp()]);
    let sent = e.sent();
    assert_eq!(sent.len(), 2);
    let tags: Vec<String> = sent
        .iter()
        .map(|(_, m)| {
            let SipMessage::Response(r) = m else {
                panic!("{m:?}")
            };
            assert_eq!((r.status, r.reason.as_str()), (503, "Overloaded"));
            assert_eq!(r.headers.get("Retry-After"), Some("4"));
            assert_eq!(r.base.via, fresh.base.via);
            assert_eq!(r.base.call_id, fresh.base.call_id);
            r.base.to.tag().unwrap().to_owned()
        })
        .collect();
    assert!(tags[0].starts_with(OVERLOAD_TAG_PREFIX), "{tags:?}");
    assert_eq!(tags[0], tags[1]);
    assert_eq!(overload.refused_total(), 2);
    // Its ACK is dropped from the look; an ACK with another tag and an in-dialog INVITE
    // go on to the parser, as does a request of another method.
    assert!(!e
        .layer
        .screen(&ack_for(&fresh, &tags[0]).to_bytes(), &udp(), None));
    assert!(e
        .layer
        .screen(&ack_for(&fresh, "abc123").to_bytes(), &udp(), None));
    let mut reinvite = with_branch(invite(), "z9hG4bKre");
    reinvite.base.to.set_tag("abc123");
    assert!(e.layer.screen(&reinvite.to_bytes(), &udp(), None));
    assert!(e.layer.screen(&options().to_bytes(), &udp(), None));
    // Unusual shapes are the parser's: a folded header line.
    let text = String::from_utf8(fresh_bytes.clone()).unwrap();
    fresh_bytes = text
        .replace("CSeq: 1 INVITE", "CSeq: 1\r\n INVITE")
        .into_bytes();
    assert!(e.layer.screen(&fresh_bytes, &udp(), None));
    assert!(e.sent().is_empty());
    // The parsed path refuses with the same kind of tag, so its ACK is dropped the same way.
    let other = with_branch(invite(), "z9hG4bKparsed");
    e.layer.on_message(req_msg(&other), udp());
    let sent = e.sent();
    let SipMessage::Response(r) = &sent[0].1 else {
        panic!()
    };
    assert_eq!(r.status, 503);
    assert!(r.base.to.tag().unwrap().starts_with(OVERLOAD_TAG_PREFIX));
}

#[tokio::test(start_paused = true)]
async fn a_new_invite_that_waited_past_the_target_in_the_socket_is_refused() {
    let (e, overload) = env_with_overload();
    let fresh = with_branch(invite(), "z9hG4bKstale");
    let bytes = fresh.to_bytes();
    // No overload seen yet: a datagram that waited (a stall of the server) is taken.
    assert!(e
        .layer
        .screen(&bytes, &udp(), Some(Duration::from_millis(200))));
    // A window over the detector's target, then one under it: the refused fraction is
    // back at 0, but the overload is recent.
    for (i, ms) in [80, 1, 1].into_iter().enumerate() {
        if i > 0 {
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let delay = Duration::from_millis(ms);
        overload.observe(crate::overload::Queue::Socket, delay, Instant::now());
    }
    assert!(!overload.is_refusing());
    // Read soon enough, or with no wait known (TCP): taken, whatever else is true.
    assert!(e
        .layer
        .screen(&bytes, &udp(), Some(Duration::from_millis(50))));
    assert!(e.layer.screen(&bytes, &udp(), None));
    // Stood in the queue past the target: a 503 from the look, though the detector's
    // fraction is still 0.
    assert!(!e
        .layer
        .screen(&bytes, &udp(), Some(Duration::from_millis(51))));
    let sent = e.sent();
    let [(_, SipMessage::Response(r))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!((r.status, r.headers.get("Retry-After")), (503, Some("4")));
    assert_eq!(overload.refused_total(), 1);
    // Anything but a new INVITE goes on to be parsed, however long it waited: the calls
    // already up are never the ones shed.
    let late = Some(Duration::from_secs(1));
    let mut reinvite = with_branch(invite(), "z9hG4bKre");
    reinvite.base.to.set_tag("abc123");
    assert!(e.layer.screen(&reinvite.to_bytes(), &udp(), late));
    assert!(e.layer.screen(&options().to_bytes(), &udp(), late));
    assert!(e
        .layer
        .screen(&ack_for(&fresh, "abc123").to_bytes(), &udp(), late));
    // A retransmission of an INVITE whose transaction exists is absorbed by it.
    e.layer.on_message(req_msg(&invite()), udp());
    let _ = e.sent();
    assert!(e.layer.screen(&invite().to_bytes(), &udp(), late));
    assert_eq!(overload.refused_total(), 1);
}
