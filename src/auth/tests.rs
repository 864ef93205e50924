//! End-to-end tests of `DigestAuth`: challenge, a client answering it like a phone, and
//! every verdict of `verify`.

use super::*;
use crate::sip::{parse, Request, SipMessage};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

const REALM: &str = "example.com";
const URI: &str = "sip:example.com";

fn register(extra: &[String]) -> Request {
    let mut text = String::from(
        "REGISTER sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKabc\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@example.com>;tag=1\r\n\
         To: <sip:alice@example.com>\r\n\
         Call-ID: c1@192.0.2.10\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <sip:alice@192.0.2.10>\r\n",
    );
    for h in extra {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text.push_str("Content-Length: 0\r\n\r\n");
    match parse(text.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        other => panic!("test request did not parse: {other:?}"),
    }
}

struct Fixture {
    auth: DigestAuth,
    clock: Arc<ManualClock>,
    users: Users,
}

fn fixture(config: DigestConfig) -> Fixture {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    Fixture {
        auth: DigestAuth::with_parts(config, b"test secret", clock.clone()),
        clock,
        users: Users::from_passwords(REALM, [("alice", "secret"), ("bob", "hunter2")]),
    }
}

fn default_fixture() -> Fixture {
    fixture(DigestConfig::new(REALM))
}

const A: &str = "192.0.2.10";
const B: &str = "198.51.100.7";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Fixture {
    /// The first (preferred) challenge header of a fresh 401.
    fn challenge_value(&self, alg_index: usize) -> String {
        let r = self
            .auth
            .challenge(&register(&[]), ChallengeKind::Www, false);
        let v = r.headers.get_all("WWW-Authenticate").nth(alg_index);
        v.unwrap().to_owned()
    }
    fn verify(&self, req: &Request, from: &str) -> AuthOutcome {
        self.auth.verify(req, ChallengeKind::Www, ip(from), |u| {
            self.users.get(u).cloned()
        })
    }
    fn answer(&self, ch: &str, user: &str, pass: &str, nc: u32) -> Request {
        let a = answer_challenge(ch, "REGISTER", URI, user, pass, "0a4f113b", nc).unwrap();
        register(&[format!("Authorization: {a}")])
    }
}

fn ok(user: &str) -> AuthOutcome {
    AuthOutcome::Ok {
        user: user.to_owned(),
    }
}
const CHALLENGE: AuthOutcome = AuthOutcome::Challenge { stale: false };
const STALE: AuthOutcome = AuthOutcome::Challenge { stale: true };

#[test]
fn challenge_has_md5_then_sha256_with_qop_and_to_tag() {
    let f = default_fixture();
    let req = register(&[]);
    let r = f.auth.challenge(&req, ChallengeKind::Www, false);
    assert_eq!(r.status, 401);
    assert!(r.base.to.tag().is_some());
    let values: Vec<_> = r.headers.get_all("WWW-Authenticate").collect();
    assert_eq!(values.len(), 2);
    // MD5 first by default: SIPp 3.6 and baresip 1.0 answer only the first challenge,
    // whatever its algorithm (SHA-256 is still offered, second).
    let md5 = Challenge::parse(values[0]).unwrap();
    let sha = Challenge::parse(values[1]).unwrap();
    assert_eq!(sha.algorithm, Algorithm::Sha256);
    assert_eq!(md5.algorithm, Algorithm::Md5);
    for c in [&sha, &md5] {
        assert_eq!(c.realm, REALM);
        assert_eq!(c.qop, vec!["auth"]);
        assert!(!c.stale);
        assert!(c.opaque.is_some());
    }
    assert!(values[0].contains("qop=\"auth\"") && values[0].contains("algorithm=MD5"));
    assert!(values[1].contains("algorithm=SHA-256"));
    assert!(!values[0].contains("stale"));

    let p = f.auth.challenge(&req, ChallengeKind::Proxy, true);
    assert_eq!(p.status, 407);
    assert!(p.headers.get("WWW-Authenticate").is_none());
    let values: Vec<_> = p.headers.get_all("Proxy-Authenticate").collect();
    assert_eq!(values.len(), 2);
    assert!(values.iter().all(|v| v.ends_with(", stale=true")));
    assert!(Challenge::parse(values[1]).unwrap().stale);
    assert_eq!(
        f.auth
            .stats()
            .challenges
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn round_trip_sha256_and_md5() {
    let f = default_fixture();
    for alg in [0, 1] {
        let ch = f.challenge_value(alg);
        assert_eq!(
            f.verify(&f.answer(&ch, "alice", "secret", 1), A),
            ok("alice")
        );
    }
    // No credentials at all: the usual first request.
    assert_eq!(f.verify(&register(&[]), A), CHALLENGE);
}

#[test]
fn proxy_kind_reads_proxy_authorization() {
    let f = default_fixture();
    let ch = f.challenge_value(0);
    let a = answer_challenge(&ch, "REGISTER", URI, "alice", "secret", "c", 1).unwrap();
    let req = register(&[format!("Proxy-Authorization: {a}")]);
    let users = &f.users;
    let v = |kind| f.auth.verify(&req, kind, ip(A), |u| users.get(u).cloned());
    assert_eq!(v(ChallengeKind::Www), CHALLENGE);
    assert_eq!(v(ChallengeKind::Proxy), ok("alice"));
}

#[test]
fn picks_our_realm_among_several_and_prefers_sha256() {
    let f = default_fixture();
    let md5 = f.challenge_value(0);
    let sha = f.challenge_value(1);
    let other = answer_challenge(
        r#"Digest realm="upstream.example", nonce="x", qop="auth""#,
        "REGISTER",
        URI,
        "alice",
        "secret",
        "c",
        1,
    )
    .unwrap();
    // A wrong MD5 answer for our realm, then a right SHA-256 one: SHA-256 is chosen.
    let bad_md5 = answer_challenge(&md5, "REGISTER", URI, "alice", "wrong", "c", 1).unwrap();
    let good_sha = answer_challenge(&sha, "REGISTER", URI, "alice", "secret", "c", 1).unwrap();
    let req = register(&[
        format!("Authorization: {other}"),
        format!("Authorization: {bad_md5}"),
        format!("Authorization: {good_sha}"),
    ]);
    assert_eq!(f.verify(&req, A), ok("alice"));
    // Only another realm's credentials: a plain challenge.
    let req = register(&[format!("Authorization: {other}")]);
    assert_eq!(f.verify(&req, A), CHALLENGE);
}

#[test]
fn wrong_password_challenges_then_forbids_that_source_only() {
    let f = default_fixture();
    let ch = f.challenge_value(0);
    for i in 1..5 {
        assert_eq!(
            f.verify(&f.answer(&ch, "alice", "guess", i), A),
            CHALLENGE,
            "try {i}"
        );
    }
    let forbidden = AuthOutcome::Forbidden {
        reason: "Too many failed attempts",
    };
    assert_eq!(f.verify(&f.answer(&ch, "alice", "guess", 5), A), forbidden);
    // Even the right password is refused from that source now...
    assert_eq!(f.verify(&f.answer(&ch, "alice", "secret", 6), A), forbidden);
    // ...while another source still gets a challenge for a wrong one and in for a right one.
    assert_eq!(f.verify(&f.answer(&ch, "alice", "guess", 7), B), CHALLENGE);
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 8), B),
        ok("alice")
    );
    // After the window the source may try again.
    f.clock.advance(Duration::from_secs(61));
    let ch = f.challenge_value(0);
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 1), A),
        ok("alice")
    );
    let s = f.auth.stats();
    assert_eq!(s.failures.load(std::sync::atomic::Ordering::Relaxed), 6);
    assert_eq!(s.throttled.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn unknown_user_is_a_wrong_password() {
    let f = default_fixture();
    let ch = f.challenge_value(1);
    assert_eq!(
        f.verify(&f.answer(&ch, "mallory", "secret", 1), A),
        CHALLENGE
    );
    // A user without a SHA-256 HA1 cannot answer the SHA-256 challenge.
    let mut map = std::collections::HashMap::new();
    map.insert(
        "carol".to_owned(),
        UserSecrets {
            ha1_md5: Some(ha1("carol", REALM, "pw", Algorithm::Md5)),
            ha1_sha256: None,
        },
    );
    let users = Users::from_map(map);
    let verify = |req: &Request| {
        f.auth
            .verify(req, ChallengeKind::Www, ip(B), |u| users.get(u).cloned())
    };
    assert_eq!(verify(&f.answer(&ch, "carol", "pw", 1)), CHALLENGE);
    let md5 = f.challenge_value(0);
    assert_eq!(verify(&f.answer(&md5, "carol", "pw", 1)), ok("carol"));
}

#[test]
fn expired_nonce_is_stale_only_when_the_answer_is_right() {
    let f = default_fixture();
    let ch = f.challenge_value(0);
    f.clock.advance(Duration::from_secs(299));
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 1), A),
        ok("alice")
    );
    f.clock.advance(Duration::from_secs(2));
    assert_eq!(f.verify(&f.answer(&ch, "alice", "secret", 2), A), STALE);
    // A wrong answer with an old nonce is just wrong, not stale.
    assert_eq!(f.verify(&f.answer(&ch, "alice", "nope", 3), A), CHALLENGE);
}

#[test]
fn nonce_count_must_increase() {
    let f = default_fixture();
    let ch = f.challenge_value(0);
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 1), A),
        ok("alice")
    );
    assert_eq!(f.verify(&f.answer(&ch, "alice", "secret", 1), A), CHALLENGE);
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 2), A),
        ok("alice")
    );
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 5), A),
        ok("alice")
    );
    assert_eq!(f.verify(&f.answer(&ch, "alice", "secret", 3), A), CHALLENGE);
    let s = f.auth.stats();
    assert_eq!(s.replays.load(std::sync::atomic::Ordering::Relaxed), 2);
    // Replays are not password failures: the source is not throttled by them.
    for _ in 0..10 {
        f.verify(&f.answer(&ch, "alice", "secret", 1), A);
    }
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 6), A),
        ok("alice")
    );
}

#[test]
fn forged_or_foreign_nonce_is_challenged() {
    let f = default_fixture();
    let ch = f.challenge_value(0);
    // Same server code, different secret: as after a restart.
    let other = DigestAuth::with_parts(DigestConfig::new(REALM), b"other", f.clock.clone());
    let foreign = other
        .challenge(&register(&[]), ChallengeKind::Www, false)
        .headers
        .get("WWW-Authenticate")
        .unwrap()
        .to_owned();
    // opaque differs too; drop it to reach the nonce check.
    let a = answer_challenge(&foreign, "REGISTER", URI, "alice", "secret", "c", 1).unwrap();
    let a =
        a.split(", opaque=").next().unwrap().to_owned() + ", qop=auth, nc=00000001, cnonce=\"c\"";
    assert_eq!(
        f.verify(&register(&[format!("Authorization: {a}")]), A),
        CHALLENGE
    );
    // A nonce with one digit changed.
    let nonce = Challenge::parse(&ch).unwrap().nonce;
    let mut bad = nonce.clone().into_bytes();
    bad[3] = if bad[3] == b'0' { b'1' } else { b'0' };
    let tampered = ch.replace(&nonce, std::str::from_utf8(&bad).unwrap());
    assert_eq!(
        f.verify(&f.answer(&tampered, "alice", "secret", 1), A),
        CHALLENGE
    );
    let s = f.auth.stats();
    assert_eq!(s.bad_nonce.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(s.failures.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn wrong_realm_uri_mismatch_and_malformed_are_not_ok() {
    let f = default_fixture();
    let ch = f.challenge_value(0);
    // Wrong realm: the client answered someone else's challenge.
    let wrong_realm = ch.replace("realm=\"example.com\"", "realm=\"evil.example\"");
    assert_eq!(
        f.verify(&f.answer(&wrong_realm, "alice", "secret", 1), A),
        CHALLENGE
    );
    // uri that is not the Request-URI.
    let a = answer_challenge(
        &ch,
        "REGISTER",
        "sip:other.example",
        "alice",
        "secret",
        "c",
        1,
    )
    .unwrap();
    assert!(matches!(
        f.verify(&register(&[format!("Authorization: {a}")]), A),
        AuthOutcome::BadRequest { .. }
    ));
    // Malformed headers for our realm.
    let good = answer_challenge(&ch, "REGISTER", URI, "alice", "secret", "c", 1).unwrap();
    for bad in [
        good.replace("nc=00000001", "nc=1"),
        good.replace("nc=00000001", "nc=0000000g"),
        good.replace(", cnonce=\"c\"", ""),
        good.replace("username=\"alice\", ", ""),
        good.replace("response=\"", "response=\"zz"),
        r#"Digest realm="example.com", username="alice"#.to_owned(),
    ] {
        let out = f.verify(&register(&[format!("Authorization: {bad}")]), A);
        assert!(
            matches!(out, AuthOutcome::BadRequest { .. }),
            "{bad}: {out:?}"
        );
    }
    // Things we did not offer get our offer again.
    for other in [
        good.replace("algorithm=MD5", "algorithm=SHA-512-256"),
        good.replace("qop=auth", "qop=auth-int"),
        good.replace(", qop=auth", ""),
        good.clone() + ", userhash=true",
    ] {
        assert_eq!(
            f.verify(&register(&[format!("Authorization: {other}")]), A),
            CHALLENGE
        );
    }
    // None of those counted as password failures.
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 1), A),
        ok("alice")
    );
}

#[test]
fn uri_comparison_follows_rfc3261_19_1_4() {
    use super::digest::uri_matches;
    let req = crate::sip::Uri::parse("sip:alice@Example.COM;transport=udp").unwrap();
    assert!(uri_matches(&req, "sip:alice@example.com;transport=UDP"));
    assert!(uri_matches(
        &req,
        "SIP:alice@example.com;transport=udp;foo=bar"
    ));
    assert!(!uri_matches(&req, "sip:alice@example.com"));
    assert!(!uri_matches(&req, "sip:Alice@example.com;transport=udp"));
    assert!(!uri_matches(
        &req,
        "sip:alice@example.com:5060;transport=udp"
    ));
    assert!(!uri_matches(&req, "sips:alice@example.com;transport=udp"));
    assert!(!uri_matches(&req, "not a uri"));
    let tel = crate::sip::Uri::parse("tel:+15551234").unwrap();
    assert!(uri_matches(&tel, "tel:+15551234"));
    assert!(!uri_matches(&tel, "sip:+15551234@example.com"));
}

#[test]
fn throttle_can_be_turned_off() {
    let mut cfg = DigestConfig::new(REALM);
    cfg.throttle = Throttle::Off;
    let f = fixture(cfg);
    let ch = f.challenge_value(0);
    for i in 1..20 {
        assert_eq!(f.verify(&f.answer(&ch, "alice", "guess", i), A), CHALLENGE);
    }
    assert_eq!(
        f.verify(&f.answer(&ch, "alice", "secret", 20), A),
        ok("alice")
    );
}

#[test]
fn respond_builds_the_answer() {
    let f = default_fixture();
    let req = register(&[]);
    assert!(f.auth.respond(&req, ChallengeKind::Www, &ok("a")).is_none());
    let r = f
        .auth
        .respond(
            &req,
            ChallengeKind::Proxy,
            &AuthOutcome::Challenge { stale: true },
        )
        .unwrap();
    assert_eq!(r.status, 407);
    let r = f
        .auth
        .respond(
            &req,
            ChallengeKind::Www,
            &AuthOutcome::Forbidden {
                reason: "Too many failed attempts",
            },
        )
        .unwrap();
    assert_eq!(
        (r.status, r.reason.as_str()),
        (403, "Too many failed attempts")
    );
    assert!(r.base.to.tag().is_some());
}

/// A client hashes the Request-URI as it wrote it, a repeated parameter included
/// (baresip: `;transport=tcp;transport=tcp`): the same octets designate the Request-URI
/// even where the RFC 3261 19.1.4 parameter rules cannot pair the repeats up (a repeat
/// with another value was refused: "Authorization uri does not match Request-URI").
#[test]
fn uri_equal_to_the_request_uri_octet_for_octet_matches() {
    for ruri in [
        "sip:example.com;transport=tcp;transport=tcp",
        "sip:alice@example.com:5070;transport=tcp;transport=udp;lr;lr=on",
    ] {
        let f = default_fixture();
        let ch = f.challenge_value(0);
        let a = answer_challenge(&ch, "REGISTER", ruri, "alice", "secret", "0a4f113b", 1).unwrap();
        let mut req = register(&[format!("Authorization: {a}")]);
        req.uri = crate::sip::Uri::parse(ruri).unwrap();
        assert_eq!(f.verify(&req, A), ok("alice"), "{ruri}");
    }
    use super::digest::uri_matches;
    let req = crate::sip::Uri::parse("sip:a@example.com;transport=tcp;transport=udp").unwrap();
    assert!(uri_matches(
        &req,
        "sip:a@example.com;transport=tcp;transport=udp"
    ));
    assert!(!uri_matches(
        &req,
        "sip:a@example.com;transport=tcp;transport=ud"
    ));
    assert!(!uri_matches(
        &req,
        "sip:a@example.com;transport=tcp;transport=udpx"
    ));
    assert!(!uri_matches(&req, "sip:a@example.com;transport=udp"));
}

/// `auth.algorithms` orders the offer: an operator whose phones choose well can put
/// SHA-256 first again.
#[test]
fn offer_order_is_configurable() {
    let mut cfg = DigestConfig::new(REALM);
    cfg.algorithms = vec![Algorithm::Sha256, Algorithm::Md5];
    let f = fixture(cfg);
    assert!(f.challenge_value(0).contains("algorithm=SHA-256"));
    assert!(f.challenge_value(1).contains("algorithm=MD5"));
}

/// The client side (`DigestClient`, answering a trunk's challenges) passes this server
/// side's verification, with SHA-256 and MD5, and counts its nonce uses.
#[test]
fn our_client_answers_our_challenges() {
    let f = default_fixture();
    let c = DigestClient::new(ClientCredentials {
        username: "alice".into(),
        secret: ClientSecret::Password("secret".into()),
        realm: None,
    });
    let r = f.auth.challenge(&register(&[]), ChallengeKind::Www, false);
    let offers: Vec<&str> = r.headers.get_all("WWW-Authenticate").collect();
    for first in [0, 1] {
        let a = c.answer(401, &offers[first..], "REGISTER", URI).unwrap();
        let req = register(&[format!("{}: {}", a.header, a.value)]);
        assert_eq!(f.verify(&req, A), ok("alice"), "offer {first}: {}", a.value);
    }
    let wrong = DigestClient::new(ClientCredentials {
        username: "alice".into(),
        secret: ClientSecret::Password("guess".into()),
        realm: None,
    });
    let a = wrong.answer(401, &offers, "REGISTER", URI).unwrap();
    let req = register(&[format!("{}: {}", a.header, a.value)]);
    assert_ne!(f.verify(&req, A), ok("alice"));
}
