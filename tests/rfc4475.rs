//! Sends all 49 RFC 4475 torture messages, byte for byte from
//! ../shared/conformance/rfc4475 (read in place), to a running server over UDP and checks
//! each outcome against INDEX.tsv.
//!
//! The corpus routes responses by its Via headers: to the sender's address (`received`)
//! and the sent-by port, 5060 when none is given. So this test sends from, and listens on,
//! 127.0.0.1:5060; the server itself listens on a port chosen at run time.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

#[tokio::test]
async fn torture_messages_get_the_expected_outcomes() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/rfc4475");
    let index = std::fs::read_to_string(dir.join("INDEX.tsv")).expect("RFC 4475 corpus");
    // The corpus reuses Via branches across messages, and a server transaction lives on
    // for 64*T1 after its final response (RFC 3261 17.2.2, Timer J): with the default
    // T1 a later message with the same branch would be taken, rightly, for a retransmission
    // of an earlier one. A short T1 lets each message's transactions end before the next.
    let mut config = test_config();
    config.sip.timers.t1_ms = 5;
    config.sip.timers.t2_ms = 40;
    config.sip.timers.t4_ms = 50;
    let s = start_with(config).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:5060")
        .await
        .expect("127.0.0.1:5060 must be free: the RFC 4475 messages route their responses there");
    let peer = UdpPeer {
        addr: sock.local_addr().unwrap(),
        sock,
    };
    let mut failures = Vec::new();
    let mut earlier = std::collections::HashSet::new();
    let mut count = 0;
    for line in index.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        let (name, expect) = (f[0], f[2]);
        let bytes = std::fs::read(dir.join(format!("{name}.dat"))).unwrap();
        peer.send(s.udp, &bytes).await;
        // A probe after each message: everything that arrives before the probe's answer
        // (plus a short grace) belongs to the torture message.
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
        let mut mine = Vec::new();
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
            } else {
                let call_id = header(&r, "Call-ID").unwrap_or("").to_string();
                // Timer G retransmits a final response to an INVITE until its ACK (RFC
                // 3261 17.2.1), and this test sends none: those repeats belong to an
                // earlier message.
                if earlier.contains(&call_id) {
                    continue;
                }
                mine.push(call_id);
                got.push(status(&r));
            }
        }
        assert!(probe_seen, "server stopped answering after {name}");
        count += 1;
        let mut finals: Vec<u16> = got.iter().copied().filter(|&c| c >= 200).collect();
        // Timer G repeats (no ACK is sent here) are the same answer.
        finals.dedup();
        let ok = match expect {
            "answer-not-400" => !finals.is_empty() && !got.contains(&400),
            "4xx-or-drop" => finals.iter().all(|c| (400..500).contains(c)),
            "505-or-drop" => finals.iter().all(|&c| c == 505),
            "answer-415" => finals == [415],
            "answer-416" => finals == [416],
            "answer-420" => finals == [420],
            "no-crash" => true,
            other => panic!("unknown expectation {other}"),
        };
        earlier.extend(mine);
        for _ in 0..200 {
            if s.handle.transactions() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !ok {
            failures.push(format!("{name}: expected {expect}, got {got:?}"));
        }
    }
    assert_eq!(count, 49);
    assert!(
        failures.is_empty(),
        "wrong outcomes:\n{}",
        failures.join("\n")
    );
}
