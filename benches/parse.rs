//! Parse speed of a typical 10-header INVITE with SDP: our parser against rsip 0.4
//! (the comparator the issue names), measured in the same run; and a new call refused
//! under overload from the parsed INVITE and from a look at its bytes.
//! Run: `cargo bench --bench parse`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

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
criterion_main!(benches);
