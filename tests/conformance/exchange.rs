//! Sending corpus messages to a running server over UDP and collecting its answers, for
//! tests/rfc4475.rs and tests/rfc5118.rs (which include this file next to `common`).

use crate::common::*;
use crate::conformance::with_sent_by_port;
use std::time::Duration;

/// A server for corpus runs. The corpora reuse Via branches across messages, and a server
/// transaction lives on for 64*T1 after its final response (RFC 3261 17.2.2, Timer J): with
/// the default T1 a later message with the same branch would be taken, rightly, for a
/// retransmission of an earlier one. A short T1 lets each message's transactions end
/// before the next is sent.
pub async fn corpus_server() -> TestServer {
    let mut config = test_config();
    config.sip.timers.t1_ms = 5;
    config.sip.timers.t2_ms = 40;
    config.sip.timers.t4_ms = 50;
    start_with(config).await
}

/// Sends one corpus message from `peer` (its top Via's sent-by port set to the peer's, so
/// the answers come here) and returns every answer to it as (status, reason), in order of
/// arrival, or None when the server stopped answering.
pub async fn exchange(s: &TestServer, peer: &UdpPeer, msg: &[u8]) -> Option<Vec<(u16, String)>> {
    peer.send(s.udp, &with_sent_by_port(msg, peer.addr.port()))
        .await;
    // A probe after each message: everything that arrives before the probe's answer (plus
    // a short grace) belongs to the corpus message.
    let probe_id = unique("probe");
    let probe = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &probe_id,
        "",
        "",
    );
    peer.send(s.udp, probe.as_bytes()).await;
    let mut got = Vec::new();
    let mut probe_seen = false;
    while let Some(r) = peer
        .recv(if probe_seen {
            Duration::from_millis(50)
        } else {
            WAIT
        })
        .await
    {
        if header(&r, "Call-ID") == Some(probe_id.as_str()) {
            probe_seen = true;
        } else if r.starts_with("SIP/2.0 ") {
            got.push((status(&r), reason(&r).to_owned()));
        }
    }
    // Let this message's transactions end: Timer G repeats a final answer to an INVITE
    // until its ACK (RFC 3261 17.2.1), and none is sent here, until Timer H. Repeats
    // still queued then are dropped, so that the next message's answers are its own.
    for _ in 0..300 {
        if s.handle.transactions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while peer.recv(Duration::from_millis(30)).await.is_some() {}
    probe_seen.then_some(got)
}

/// The distinct final statuses among `answers` (Timer G repeats are the same answer).
pub fn finals(answers: &[(u16, String)]) -> Vec<u16> {
    let mut f: Vec<u16> = answers
        .iter()
        .map(|(c, _)| *c)
        .filter(|&c| c >= 200)
        .collect();
    f.dedup();
    f
}
