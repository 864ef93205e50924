//! Parse speed of a typical 10-header INVITE with SDP: our parser against rsip 0.4
//! (the comparator the issue names), measured in the same run; and a new call refused
//! under overload from the parsed INVITE and from a look at its bytes.
//! Run: `cargo bench --bench parse`; `bash benches/parse_callgrind.sh` for the instructions
//! to parse the six messages of a call (`PARSE_CALLS`).

mod counting;

use criterion::{criterion_group, Criterion};
use std::hint::black_box;

// The server's allocator, so that allocations cost what they cost in the server.
#[global_allocator]
static GLOBAL: strowger::allocator::Allocator = strowger::allocator::Allocator;

const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com>\r\n\
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 142\r\n\r\n\
v=0\r\no=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\n\
s=-\r\nc=IN IP4 192.0.2.101\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

// The six messages a call brings to the server in `benches/calls.sh`, as SIPp's built-in
// uac and uas sent them through Strowger (captured with SIPp's `-trace_msg`): the caller's
// INVITE, ACK and BYE, the callee's 180, 200 and the BYE's 200.
const INVITE_IN: &str = "INVITE sip:service@127.0.0.1:37293 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:47460;branch=z9hG4bK-17601-1-0\r\n\
From: sipp <sip:sipp@127.0.0.1:47460>;tag=17601SIPpTag001\r\n\
To: service <sip:service@127.0.0.1:37293>\r\n\
Call-ID: 1-17601@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: sip:sipp@127.0.0.1:47460\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Type: application/sdp\r\n\
Content-Length:   129\r\n\
\r\n\
v=0\r\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 6008 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n\
";
const RINGING_IN: &str = "SIP/2.0 180 Ringing\r\n\
Via: SIP/2.0/UDP 127.0.0.1:37293;branch=z9hG4bK4a325ca499638eae2979;rport\r\n\
From: sipp <sip:sipp@127.0.0.1:47460>;tag=5a7e54dd72de7c66\r\n\
To: <sip:service@127.0.0.1:56843>;tag=17463SIPpTag011\r\n\
Call-ID: 06cd0cfc7043740cf420c86c@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.1:56843;transport=UDP>\r\n\
Content-Length: 0\r\n\
\r\n\
";
const OK_IN: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.1:37293;branch=z9hG4bK4a325ca499638eae2979;rport\r\n\
From: sipp <sip:sipp@127.0.0.1:47460>;tag=5a7e54dd72de7c66\r\n\
To: <sip:service@127.0.0.1:56843>;tag=17463SIPpTag011\r\n\
Call-ID: 06cd0cfc7043740cf420c86c@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.1:56843;transport=UDP>\r\n\
Content-Type: application/sdp\r\n\
Content-Length:   129\r\n\
\r\n\
v=0\r\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 6004 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n\
";
const ACK_IN: &str = "ACK sip:service@127.0.0.1:37293 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:47460;branch=z9hG4bK-17601-1-5\r\n\
From: sipp <sip:sipp@127.0.0.1:47460>;tag=17601SIPpTag001\r\n\
To: service <sip:service@127.0.0.1:37293>;tag=65f0e0ac26a25584\r\n\
Call-ID: 1-17601@127.0.0.1\r\n\
CSeq: 1 ACK\r\n\
Contact: sip:sipp@127.0.0.1:47460\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Length: 0\r\n\
\r\n\
";
const BYE_IN: &str = "BYE sip:service@127.0.0.1:37293 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:47460;branch=z9hG4bK-17601-1-7\r\n\
From: sipp <sip:sipp@127.0.0.1:47460>;tag=17601SIPpTag001\r\n\
To: service <sip:service@127.0.0.1:37293>;tag=65f0e0ac26a25584\r\n\
Call-ID: 1-17601@127.0.0.1\r\n\
CSeq: 2 BYE\r\n\
Contact: sip:sipp@127.0.0.1:47460\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Length: 0\r\n\
\r\n\
";
const BYE_OK_IN: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.1:37293;branch=z9hG4bK1123ebf58c06b3e291e7;rport\r\n\
From: sipp <sip:sipp@127.0.0.1:47460>;tag=5a7e54dd72de7c66\r\n\
To: <sip:service@127.0.0.1:56843>;tag=17463SIPpTag011\r\n\
Call-ID: 06cd0cfc7043740cf420c86c@127.0.0.1\r\n\
CSeq: 2 BYE\r\n\
Contact: <sip:127.0.0.1:56843;transport=UDP>\r\n\
Content-Length: 0\r\n\
\r\n\
";
const CALL_MESSAGES: [&str; 6] = [INVITE_IN, RINGING_IN, OK_IN, ACK_IN, BYE_IN, BYE_OK_IN];

/// `PARSE_CALLS` measures (callgrind counts only inside this function): the six messages
/// of `calls` calls parsed, and dropped as the server drops them.
#[inline(never)]
fn measured_parses(calls: u64) {
    for _ in 0..calls {
        for m in CALL_MESSAGES {
            black_box(strowger::sip::parse(black_box(m.as_bytes())).unwrap());
        }
    }
}

/// `PARSE_CALLS=n`: no criterion; the six messages of n calls parsed (after 2,000 calls'
/// to warm up) in `measured_parses`, then the time per call. `bash
/// benches/parse_callgrind.sh` runs it under callgrind.
fn calls_only(calls: u64) {
    for m in CALL_MESSAGES {
        assert!(strowger::sip::parse(m.as_bytes()).is_ok(), "{m}");
    }
    measured_parses(2_000);
    let start = std::time::Instant::now();
    measured_parses(calls);
    println!(
        "{calls} calls' messages after 2000 to warm up: {:.2} us per call's six messages",
        start.elapsed().as_secs_f64() * 1e6 / calls.max(1) as f64
    );
}

fn parse(c: &mut Criterion) {
    let bytes = INVITE.as_bytes();
    assert!(strowger::sip::parse(bytes).is_ok());
    assert!(rsip::SipMessage::try_from(bytes).is_ok());
    let mut g = c.benchmark_group("parse_invite_10_headers");
    g.bench_function("strowger", |b| {
        b.iter(|| strowger::sip::parse(black_box(bytes)).unwrap())
    });
    g.bench_function("rsip_0_4", |b| {
        b.iter(|| rsip::SipMessage::try_from(black_box(bytes)).unwrap())
    });
    g.finish();
    let (msg, _) = strowger::sip::parse(bytes).unwrap();
    c.bench_function("serialize_invite", |b| {
        b.iter(|| black_box(&msg).to_bytes())
    });
    // A new call refused under overload (stateless 503 with Retry-After): from the parsed
    // request, as before the look at the bytes, and from that look (`sip::peek_request`).
    let source: std::net::SocketAddr = "192.0.2.101:5060".parse().unwrap();
    let mut g = c.benchmark_group("refuse_invite_503");
    g.bench_function("parse_then_respond", |b| {
        b.iter(|| {
            let Ok((strowger::sip::SipMessage::Request(req), _)) =
                strowger::sip::parse(black_box(bytes))
            else {
                unreachable!()
            };
            let mut resp = req.response(503);
            resp.set_to_tag("ovl-0123456789abcdef");
            resp.headers.push("Retry-After", "2");
            resp.to_bytes()
        })
    });
    g.bench_function("peek_then_respond", |b| {
        b.iter(|| {
            let peek = strowger::sip::peek_request(black_box(bytes)).unwrap();
            peek.response(
                503,
                "Overloaded",
                "ovl-0123456789abcdef",
                source,
                "Retry-After: 2\r\n",
            )
        })
    });
    g.finish();
}

criterion_group!(benches, parse);

fn main() {
    counting::main_with("PARSE_CALLS", calls_only, benches);
}
