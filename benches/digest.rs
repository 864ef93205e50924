//! Cost of digest verification: `DigestAuth::verify` of a valid Authorization (SHA-256 and
//! MD5), and of building a 401. The target is 5,000 authenticated REGISTERs/s on 2 cores,
//! so verification should cost a few µs. Each iteration gets the next nonce count (a
//! repeated one would be refused as a replay); building that request is setup, not timed.
//! Run: `cargo bench --bench digest`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use std::net::IpAddr;
use strowger::auth::{answer_challenge, ChallengeKind, DigestAuth, DigestConfig, Users};
use strowger::sip::{parse, Request, SipMessage};

const REGISTER: &str = "REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: <sip:alice@example.com>\r\n\
From: <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@192.0.2.10\r\n\
CSeq: 2 REGISTER\r\n\
Contact: <sip:alice@192.0.2.10:5060>\r\n\
Expires: 3600\r\n\
Content-Length: 0\r\n\r\n";

fn request() -> Request {
    match parse(REGISTER.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        _ => panic!("bench request does not parse"),
    }
}

fn digest(c: &mut Criterion) {
    let auth = DigestAuth::new(DigestConfig::new("example.com"));
    let users = Users::from_passwords("example.com", [("alice", "secret")]);
    let source: IpAddr = "192.0.2.10".parse().unwrap();
    let base = request();
    let challenge = auth.challenge(&base, ChallengeKind::Www, false);
    let offers: Vec<String> = challenge
        .headers
        .get_all("WWW-Authenticate")
        .map(str::to_owned)
        .collect();

    let mut g = c.benchmark_group("digest_verify_ok");
    for (name, offer) in [("sha256", &offers[0]), ("md5", &offers[1])] {
        let mut nc = 0u32;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    nc += 1;
                    let a = answer_challenge(
                        offer,
                        "REGISTER",
                        "sip:example.com",
                        "alice",
                        "secret",
                        "0a4f113b",
                        nc,
                    )
                    .unwrap();
                    let mut req = base.clone();
                    req.headers.push("Authorization", a);
                    req
                },
                |req| {
                    let out = auth.verify(black_box(&req), ChallengeKind::Www, source, |u| {
                        users.get(u).cloned()
                    });
                    debug_assert!(matches!(out, strowger::auth::AuthOutcome::Ok { .. }));
                    out
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    c.bench_function("digest_challenge_401", |b| {
        b.iter(|| auth.challenge(black_box(&base), ChallengeKind::Www, false))
    });
}

criterion_group!(benches, digest);
criterion_main!(benches);
