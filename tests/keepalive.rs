//! Registrar keep-alive end to end: a raw UDP phone registers, answers the OPTIONS pings
//! (stays in lookups), goes silent (drops out of lookups once a ping times out, while its
//! binding stays), answers again (comes back on the next ping), and a REGISTER refresh
//! brings a silent phone back at once.
//!
//! The server runs with T1 = 20 ms, so a ping times out after timer F = 64*T1 = 1.28 s
//! (RFC 3261 17.1.2.2), and with a 1 s interval, below the 5 s the configuration file
//! accepts: `server::start` takes the `Config` as given, validation belongs to loading.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const AOR: &str = "sip:kp@strowger.test";

fn register(peer: SocketAddr, cseq: u32) -> String {
    format!(
        "REGISTER sip:strowger.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {peer};branch=z9hG4bK{b};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:kp@strowger.test>;tag=r{b}\r\n\
         To: <sip:kp@strowger.test>\r\n\
         Call-ID: keepalive-reg-{port}\r\n\
         CSeq: {cseq} REGISTER\r\n\
         Contact: <sip:kp@{peer}>\r\n\
         Expires: 600\r\n\
         Content-Length: 0\r\n\r\n",
        b = unique("reg"),
        port = peer.port(),
    )
}

/// A 200 to a request: its Via, From, To, Call-ID and CSeq copied (RFC 3261 8.2.6.2), a
/// To tag added.
fn ok_to(req: &str) -> String {
    let head = req.split("\r\n\r\n").next().unwrap_or("");
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for line in head.lines().skip(1) {
        let name = line
            .split_once(':')
            .map(|(n, _)| n.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match name.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            "to" | "t" => {
                out.push_str(line);
                out.push_str(";tag=phone\r\n");
            }
            _ => {}
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

/// The phone: answers OPTIONS with 200 while `answering` is set (counting every OPTIONS
/// seen), and passes every other message on to the test.
struct Phone {
    peer: Arc<UdpPeer>,
    answering: Arc<AtomicBool>,
    pings: Arc<AtomicU64>,
    others: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Phone {
    fn start(peer: UdpPeer, server: SocketAddr) -> Phone {
        let peer = Arc::new(peer);
        let answering = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicU64::new(0));
        let (tx, others) = mpsc::unbounded_channel();
        let task = tokio::spawn({
            let (peer, answering, pings) = (peer.clone(), answering.clone(), pings.clone());
            async move {
                loop {
                    let Some(msg) = peer.recv(Duration::from_secs(60)).await else {
                        continue;
                    };
                    if msg.starts_with("OPTIONS ") {
                        pings.fetch_add(1, Ordering::SeqCst);
                        if answering.load(Ordering::SeqCst) {
                            peer.send(server, ok_to(&msg).as_bytes()).await;
                        }
                    } else if tx.send(msg).is_err() {
                        return;
                    }
                }
            }
        });
        Phone {
            peer,
            answering,
            pings,
            others,
            task,
        }
    }

    fn answer(&self, yes: bool) {
        self.answering.store(yes, Ordering::SeqCst);
    }

    /// The next final response passed on, within `wait`.
    async fn final_response(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.others.recv())
                .await
                .ok()??;
            if status(&msg) >= 200 {
                return Some(msg);
            }
        }
    }
}

impl Drop for Phone {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `cond` every 20 ms for at most `limit`; true when it held.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_contact_leaves_lookup_and_comes_back() {
    let mut c = test_config();
    c.sip.timers.t1_ms = 20;
    c.registrar.keepalive_interval_s = 1;
    let s = start_with(c).await;
    let registrar = s.handle.registrar().clone();
    let keepalive = s.handle.keepalive().expect("keep-alive on");

    // The contact is the phone's own address, so the REGISTER's source is the contact.
    let peer = UdpPeer::bind("127.0.0.1").await;
    let contact = format!("sip:kp@{}", peer.addr);
    let mut phone = Phone::start(peer, s.udp);
    phone
        .peer
        .send(s.udp, register(phone.peer.addr, 1).as_bytes())
        .await;
    let resp = phone.final_response(WAIT).await.expect("REGISTER answered");
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(registrar.lookup(AOR).len(), 1);

    // Answering: pinged, and still found.
    assert!(
        eventually(Duration::from_secs(5), || phone
            .pings
            .load(Ordering::SeqCst)
            >= 2)
        .await,
        "no pings within 5 s"
    );
    assert!(keepalive.stats().answered.load(Ordering::SeqCst) >= 1);
    assert_eq!(registrar.lookup(AOR).len(), 1);
    assert!(registrar.is_reachable(&contact));

    // Silent: a ping times out (1 s interval + 1.28 s timer F), and lookups skip it.
    phone.answer(false);
    assert!(
        eventually(Duration::from_secs(6), || registrar.lookup(AOR).is_empty()).await,
        "still in lookup after 6 s of silence"
    );
    assert!(!registrar.is_reachable(&contact));
    assert!(registrar.binding_for_contact(&contact).is_none());
    let bound = registrar.bindings();
    assert!(
        bound.iter().any(|b| b.contact == contact),
        "the binding itself must stay: {bound:?}"
    );
    assert_eq!(registrar.count(), 1);
    assert!(keepalive.stats().went_unreachable.load(Ordering::SeqCst) >= 1);

    // Answering again: back with the next answered ping.
    phone.answer(true);
    assert!(
        eventually(Duration::from_secs(5), || registrar.lookup(AOR).len() == 1).await,
        "not back in lookup 5 s after answering again"
    );
    assert!(registrar.is_reachable(&contact));
    assert!(registrar.binding_for_contact(&contact).is_some());
    assert!(keepalive.stats().came_back.load(Ordering::SeqCst) >= 1);

    // Silent again, then a REGISTER refresh: the phone is alive, found at once.
    phone.answer(false);
    assert!(
        eventually(Duration::from_secs(6), || registrar.lookup(AOR).is_empty()).await,
        "still in lookup after 6 s of silence (second time)"
    );
    phone
        .peer
        .send(s.udp, register(phone.peer.addr, 2).as_bytes())
        .await;
    let resp = phone.final_response(WAIT).await.expect("refresh answered");
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(registrar.lookup(AOR).len(), 1);
    assert!(registrar.is_reachable(&contact));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_off_by_default() {
    let s = start_server().await;
    assert!(s.handle.keepalive().is_none());
}
