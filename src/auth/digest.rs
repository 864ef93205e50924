//! `DigestAuth`: challenges and verification (RFC 3261 22.2-22.4 with RFC 7616 qop=auth
//! and RFC 8760 SHA-256).
//!
//! ## Nonces
//! A nonce is 64 hex digits: an 8-octet timestamp (ms of the clock), 8 random octets and
//! the first 16 octets of HMAC-SHA256(secret, timestamp || random). It proves itself, so
//! issuing one stores nothing; only a nonce that has carried valid credentials gets an
//! entry (its highest nonce count) in a sharded table, dropped once the nonce expires.

use super::hash::{self, Algorithm};
use super::params::{push_quoted, Credentials};
use super::state::{Clock, FailureTable, NcCheck, NcTable, SystemClock};
use super::users::UserSecrets;
use crate::sip::{Request, Response, Uri};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Which challenge: a registrar or UAS answers 401 with WWW-Authenticate and reads
/// Authorization; a proxy answers 407 with Proxy-Authenticate and reads Proxy-Authorization
/// (RFC 3261 22.2, 22.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Www,
    Proxy,
}

impl ChallengeKind {
    pub fn status(self) -> u16 {
        match self {
            ChallengeKind::Www => 401,
            ChallengeKind::Proxy => 407,
        }
    }
    /// The header carrying the challenge.
    pub fn challenge_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "WWW-Authenticate",
            ChallengeKind::Proxy => "Proxy-Authenticate",
        }
    }
    /// The header carrying the client's credentials.
    pub fn credentials_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "Authorization",
            ChallengeKind::Proxy => "Proxy-Authorization",
        }
    }
}

/// Per-source brute-force throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Count failures per source IP; at `max_failures` within `failure_window` the source
    /// gets 403 until a further `failure_window` has passed. `max_sources` bounds memory:
    /// past it new sources go untracked.
    PerSource { max_sources: usize },
    /// No throttle (for example when every request arrives through one SBC, whose address
    /// would be locked for everyone by one misconfigured phone).
    Off,
}

/// Digest settings. Config keys (documented in the module header, wired by the server):
/// `sip.domain` (realm), `auth.nonce_ttl_s`, `auth.max_failures`, `auth.failure_window_s`.
#[derive(Debug, Clone)]
pub struct DigestConfig {
    /// The realm (RFC 3261 22.1: the domain, `sip.domain`).
    pub realm: String,
    /// How long a nonce is accepted; after that a correct answer gets stale=true.
    pub nonce_ttl: Duration,
    /// Failed attempts within `failure_window` after which a source gets 403 (0: never).
    pub max_failures: u32,
    pub failure_window: Duration,
    pub throttle: Throttle,
    /// Most nonces tracked for replay protection at once; a nonce that cannot be tracked
    /// is refused (fresh challenge). 2M covers 5,000 new nonces/s for the default TTL.
    pub max_tracked_nonces: usize,
    /// What the challenge offers, in order of preference (RFC 8760 2.4: a client takes
    /// the first it supports; some, SIPp 3.6 and baresip 1.0 among them, take the first
    /// whatever it is, and most deployed phones speak MD5 only: so MD5 first by default,
    /// SHA-256 still offered). An answer with an algorithm not offered gets a fresh
    /// challenge.
    pub algorithms: Vec<Algorithm>,
}

impl DigestConfig {
    /// The defaults for `realm`: nonce TTL 300 s, 5 failures per 60 s per source.
    pub fn new(realm: impl Into<String>) -> DigestConfig {
        DigestConfig {
            realm: realm.into(),
            nonce_ttl: Duration::from_secs(300),
            max_failures: 5,
            failure_window: Duration::from_secs(60),
            throttle: Throttle::PerSource {
                max_sources: 262_144,
            },
            max_tracked_nonces: 2_000_000,
            algorithms: vec![Algorithm::Md5, Algorithm::Sha256],
        }
    }
}

/// The verdict on a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Authenticated as `user`.
    Ok { user: String },
    /// Answer with `DigestAuth::challenge(.., stale)`: no credentials for our realm, wrong
    /// ones, an unknown or expired nonce, an unsupported algorithm, or a replayed nonce
    /// count (stale=false: a client that reuses a count gets a fresh nonce and starts at 1).
    Challenge { stale: bool },
    /// Answer 403: the source is throttled.
    Forbidden { reason: &'static str },
    /// Answer 400: credentials for our realm that cannot be read, or whose `uri` is not the
    /// Request-URI (RFC 2617 3.2.2.5 / RFC 7616 3.4.6: "SHOULD return 400").
    BadRequest { reason: &'static str },
}

/// Counters, readable at any time (metrics).
#[derive(Debug, Default)]
pub struct DigestStats {
    /// Challenges built.
    pub challenges: AtomicU64,
    /// Requests authenticated.
    pub ok: AtomicU64,
    /// Wrong answers (wrong password, unknown user, no HA1 for the algorithm).
    pub failures: AtomicU64,
    /// Correct answers with an expired nonce.
    pub stale: AtomicU64,
    /// Correct answers with a nonce count already used.
    pub replays: AtomicU64,
    /// Requests refused because the source is throttled.
    pub throttled: AtomicU64,
    /// Credentials that could not be read, or a uri that is not the Request-URI.
    pub malformed: AtomicU64,
    /// Nonces we did not issue (forged, or from before a restart with a new secret).
    pub bad_nonce: AtomicU64,
    /// Right answers challenged again because the nonce-count table was full
    /// (`auth.max_tracked_nonces`).
    pub nonces_untracked: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    config: DigestConfig,
    /// The keyed HMAC state, cloned for each nonce (keying once saves two compressions).
    mac: Hmac<Sha256>,
    opaque: String,
    clock: Arc<dyn Clock>,
    ncs: NcTable,
    failures: FailureTable,
    stats: DigestStats,
}

/// Digest authentication for one realm. Cheap to clone (shared inner).
#[derive(Clone)]
pub struct DigestAuth {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DigestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestAuth")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

const NONCE_HEX: usize = 64;
const MAC_LEN: usize = 16;

impl DigestAuth {
    /// With a random secret (nonces die with the process) and the wall clock.
    pub fn new(config: DigestConfig) -> DigestAuth {
        let secret: [u8; 32] = rand::random();
        DigestAuth::with_parts(config, &secret, Arc::new(SystemClock))
    }

    /// With a given secret (several nodes, or nonces that survive a restart) and clock.
    pub fn with_parts(config: DigestConfig, secret: &[u8], clock: Arc<dyn Clock>) -> DigestAuth {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
        let mut m = mac.clone();
        m.update(b"opaque");
        let opaque = hex::encode(&m.finalize().into_bytes()[..8]);
        let max_sources = match config.throttle {
            Throttle::PerSource { max_sources } => max_sources,
            Throttle::Off => 1,
        };
        DigestAuth {
            inner: Arc::new(Inner {
                ncs: NcTable::new(config.max_tracked_nonces),
                failures: FailureTable::new(max_sources),
                config,
                mac,
                opaque,
                clock,
                stats: DigestStats::default(),
            }),
        }
    }

    pub fn config(&self) -> &DigestConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> &DigestStats {
        &self.inner.stats
    }

    /// Events a table bound cost: right answers challenged again because the nonce-count
    /// table was full, and failures not counted because the per-source table was.
    pub fn table_full_events(&self) -> u64 {
        self.inner.stats.nonces_untracked.load(Ordering::Relaxed)
            + self.inner.failures.untracked.load(Ordering::Relaxed)
    }

    fn mac16(&self, ts: &[u8; 8], rnd: &[u8; 8]) -> [u8; MAC_LEN] {
        let mut m = self.inner.mac.clone();
        m.update(ts);
        m.update(rnd);
        let full = m.finalize().into_bytes();
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    fn new_nonce(&self) -> String {
        let ts = self.inner.clock.now_ms().to_be_bytes();
        let rnd: [u8; 8] = rand::random();
        let mac = self.mac16(&ts, &rnd);
        let mut raw = [0u8; 32];
        raw[..8].copy_from_slice(&ts);
        raw[8..16].copy_from_slice(&rnd);
        raw[16..].copy_from_slice(&mac);
        hex::encode(raw)
    }

    /// Checks a nonce we may have issued: its timestamp (ms) and table key, or `None`
    /// when the HMAC does not match.
    fn open_nonce(&self, nonce: &str) -> Option<(u64, u64)> {
        if nonce.len() != NONCE_HEX {
            return None;
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(nonce, &mut raw).ok()?;
        let ts: [u8; 8] = raw[..8].try_into().ok()?;
        let rnd: [u8; 8] = raw[8..16].try_into().ok()?;
        let mac = self.mac16(&ts, &rnd);
        if bool::from(mac.ct_eq(&raw[16..])) {
            Some((u64::from_be_bytes(ts), u64::from_be_bytes(rnd)))
        } else {
            None
        }
    }

    /// One challenge header value.
    fn challenge_value(&self, nonce: &str, alg: Algorithm, stale: bool) -> String {
        let mut v = String::with_capacity(160);
        v.push_str("Digest realm=");
        push_quoted(&mut v, &self.inner.config.realm);
        v.push_str(", nonce=\"");
        v.push_str(nonce);
        v.push_str("\", opaque=\"");
        v.push_str(&self.inner.opaque);
        v.push_str("\", algorithm=");
        v.push_str(alg.name());
        v.push_str(", qop=\"auth\"");
        if stale {
            v.push_str(", stale=true");
        }
        v
    }

    /// A 401 (WWW-Authenticate) or 407 (Proxy-Authenticate) to `req` with two challenges,
    /// SHA-256 first then MD5: RFC 8760 2.4 has the server list them in order of
    /// preference, and a client uses the first it supports. One nonce serves both (it is
    /// not tied to an algorithm). `stale` tells the client its credentials were right but
    /// the nonce old, so it retries without asking the user (RFC 7616 3.3).
    pub fn challenge(&self, req: &Request, kind: ChallengeKind, stale: bool) -> Response {
        bump(&self.inner.stats.challenges);
        let nonce = self.new_nonce();
        let mut resp = req.response(kind.status());
        for &alg in &self.inner.config.algorithms {
            resp.headers.push(
                kind.challenge_header(),
                self.challenge_value(&nonce, alg, stale),
            );
        }
        resp.set_to_tag(&crate::sip::new_tag());
        resp
    }

    /// The response an outcome calls for, or `None` for `Ok`: the challenge, a 403 with
    /// the reason as phrase, or a 400.
    pub fn respond(
        &self,
        req: &Request,
        kind: ChallengeKind,
        outcome: &AuthOutcome,
    ) -> Option<Response> {
        let mut resp = match outcome {
            AuthOutcome::Ok { .. } => return None,
            AuthOutcome::Challenge { stale } => return Some(self.challenge(req, kind, *stale)),
            AuthOutcome::Forbidden { reason } => req.response(403).with_reason(*reason),
            AuthOutcome::BadRequest { reason } => req.response(400).with_reason(*reason),
        };
        resp.set_to_tag(&crate::sip::new_tag());
        Some(resp)
    }

    fn throttled(&self) -> AuthOutcome {
        bump(&self.inner.stats.throttled);
        AuthOutcome::Forbidden {
            reason: "Too many failed attempts",
        }
    }

    fn malformed(&self, reason: &'static str) -> AuthOutcome {
        bump(&self.inner.stats.malformed);
        AuthOutcome::BadRequest { reason }
    }

    /// Checks the credentials of `req` (RFC 3261 22.4, RFC 7616 3.4). `source` is the
    /// address the request came from (throttle key); `secrets` looks a user up (the users
    /// file, a database...). See `AuthOutcome` for what each verdict means.
    pub fn verify(
        &self,
        req: &Request,
        kind: ChallengeKind,
        source: IpAddr,
        secrets: impl Fn(&str) -> Option<UserSecrets>,
    ) -> AuthOutcome {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let stats = &inner.stats;
        let now_ms = inner.clock.now_ms();
        let throttle_on =
            cfg.max_failures > 0 && matches!(cfg.throttle, Throttle::PerSource { .. });
        // A blocked source learns nothing, not even whether its next guess was right.
        if throttle_on && inner.failures.is_blocked(source, now_ms) {
            return self.throttled();
        }

        // RFC 3261 22.3: a request may carry credentials for several realms (one per proxy
        // on the path); use ours, preferring SHA-256 if the client sent both.
        let mut chosen: Option<Credentials> = None;
        let mut unreadable = false;
        for value in req.headers.get_all(kind.credentials_header()) {
            match Credentials::parse(value) {
                None => {} // another scheme (Basic...): not ours to judge
                Some(Err(_)) => unreadable = true,
                Some(Ok(c)) if c.realm.as_deref() == Some(cfg.realm.as_str()) => {
                    let better = chosen.as_ref().is_none_or(|old| {
                        old.algorithm() != Some(Algorithm::Sha256)
                            && c.algorithm() == Some(Algorithm::Sha256)
                    });
                    if better {
                        chosen = Some(c);
                    }
                }
                Some(Ok(_)) => {}
            }
        }
        let Some(c) = chosen else {
            if unreadable {
                return self.malformed("Malformed credentials");
            }
            return AuthOutcome::Challenge { stale: false };
        };

        let (Some(user), Some(nonce), Some(uri), Some(response)) =
            (&c.username, &c.nonce, &c.uri, &c.response)
        else {
            return self.malformed("Incomplete credentials");
        };
        // We offer neither -sess nor other algorithms, nor userhash (RFC 7616 3.4.4) nor
        // a qop other than auth; a client answering with them gets our offer again.
        let Some(alg) = c
            .algorithm()
            .filter(|a| self.inner.config.algorithms.contains(a))
        else {
            bump(&stats.malformed);
            return AuthOutcome::Challenge { stale: false };
        };
        if c.userhash
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case("true"))
            || !c
                .qop
                .as_deref()
                .is_some_and(|q| q.eq_ignore_ascii_case("auth"))
        {
            bump(&stats.malformed);
            return AuthOutcome::Challenge { stale: false };
        }
        let (Some(cnonce), Some(nc_text)) = (&c.cnonce, &c.nc) else {
            return self.malformed("Incomplete credentials");
        };
        // nc is exactly 8 hex digits (RFC 7616 3.4 `nc-value = 8LHEX`).
        let nc = match (nc_text.len(), u32::from_str_radix(nc_text, 16)) {
            (8, Ok(n)) if nc_text.bytes().all(|b| b.is_ascii_hexdigit()) => n,
            _ => return self.malformed("Bad nc"),
        };
        if cnonce.is_empty() {
            return self.malformed("Bad cnonce");
        }
        let mut got = [0u8; 32];
        if response.len() != alg.hex_len()
            || hex::decode_to_slice(response.as_bytes(), &mut got[..alg.digest_len()]).is_err()
        {
            return self.malformed("Bad response");
        }
        if !uri_matches(&req.uri, uri) {
            return self.malformed("Authorization uri does not match Request-URI");
        }
        // The opaque must come back unchanged (RFC 7616 3.4); some old clients drop it.
        if c.opaque.as_deref().is_some_and(|o| o != inner.opaque) {
            bump(&stats.bad_nonce);
            return AuthOutcome::Challenge { stale: false };
        }
        // A nonce we did not issue: challenge without checking the answer, so a made-up
        // nonce gives no way to test passwords.
        let Some((issued_ms, key)) = self.open_nonce(nonce) else {
            bump(&stats.bad_nonce);
            return AuthOutcome::Challenge { stale: false };
        };

        // Unknown users are hashed like known ones against a dummy HA1 and fail the same
        // way, so neither the verdict nor the time tells whether a user exists.
        let secrets = secrets(user);
        let ha1 = secrets.as_ref().and_then(|s| s.ha1(alg));
        let known = ha1.is_some_and(|h| h.len() == alg.hex_len());
        const DUMMY: &str = "0000000000000000000000000000000000000000000000000000000000000000";
        let ha1 = match ha1 {
            Some(h) if known => h,
            _ => &DUMMY[..alg.hex_len()],
        };
        let want = hash::response(
            alg,
            ha1.as_bytes(),
            nonce.as_bytes(),
            nc_text.as_bytes(),
            cnonce.as_bytes(),
            c.qop.as_deref().unwrap_or("auth").as_bytes(),
            req.method.as_str().as_bytes(),
            uri.as_bytes(),
        );
        let right = bool::from(want.as_bytes().ct_eq(&got[..alg.digest_len()])) && known;
        if !right {
            bump(&stats.failures);
            let blocked = throttle_on
                && inner.failures.record(
                    source,
                    now_ms,
                    cfg.max_failures,
                    cfg.failure_window.as_millis() as u64,
                );
            if blocked {
                return self.throttled();
            }
            return AuthOutcome::Challenge { stale: false };
        }

        // Right answer: the nonce must still be fresh (RFC 7616 3.3 stale semantics).
        let ttl_ms = cfg.nonce_ttl.as_millis() as u64;
        let age = now_ms.saturating_sub(issued_ms);
        if age >= ttl_ms || issued_ms > now_ms.saturating_add(ttl_ms) {
            bump(&stats.stale);
            return AuthOutcome::Challenge { stale: true };
        }
        let expires_s = ((issued_ms + ttl_ms) / 1000 + 1).min(u32::MAX as u64) as u32;
        let now_s = (now_ms / 1000).min(u32::MAX as u64) as u32;
        let sweep_s = (cfg.nonce_ttl.as_secs() / 4).clamp(1, u32::MAX as u64) as u32;
        match inner.ncs.check(key, nc, expires_s, now_s, sweep_s) {
            NcCheck::Fresh => {
                bump(&stats.ok);
                AuthOutcome::Ok {
                    user: user.clone().into_owned(),
                }
            }
            NcCheck::Replay => {
                bump(&stats.replays);
                AuthOutcome::Challenge { stale: false }
            }
            NcCheck::Full => {
                bump(&stats.nonces_untracked);
                AuthOutcome::Challenge { stale: false }
            }
        }
    }
}

/// Does the `uri` of the credentials designate the Request-URI? RFC 3261 22.4 has the
/// server check that they match. The same octets always do: clients (baresip) hash the
/// Request-URI as they wrote it, repeated parameters included, which the parameter rules
/// below cannot pair up. Otherwise the text the client hashed is its own spelling, so we
/// compare as RFC 3261 19.1.4 compares URIs: scheme and host ignore case, user and
/// password do not, ports must be equal, the parameters user, ttl, method, maddr and
/// transport must agree when either side has them, other parameters when both do, and the
/// headers must be equal. (%-escapes are compared as written.)
pub(crate) fn uri_matches(req: &Uri, text: &str) -> bool {
    if same_text(req, text) {
        return true;
    }
    let Ok(u) = Uri::parse(text) else {
        return false;
    };
    if !u.scheme.as_str().eq_ignore_ascii_case(req.scheme.as_str()) {
        return false;
    }
    if let (Some(a), Some(b)) = (&u.opaque, &req.opaque) {
        return a.eq_ignore_ascii_case(b);
    }
    if u.opaque.is_some() || req.opaque.is_some() {
        return false;
    }
    if u.user != req.user
        || u.password != req.password
        || !u.host.matches(&req.host)
        || u.port != req.port
    {
        return false;
    }
    let strict = ["user", "ttl", "method", "maddr", "transport"];
    for (name, value) in u.params.iter() {
        match req.params.get(name) {
            Some(other) => {
                let same = match (value, other) {
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    return false;
                }
            }
            None if strict.iter().any(|s| s.eq_ignore_ascii_case(name)) => return false,
            None => {}
        }
    }
    for (name, _) in req.params.iter() {
        if strict.iter().any(|s| s.eq_ignore_ascii_case(name)) && u.params.get(name).is_none() {
            return false;
        }
    }
    match (&u.headers, &req.headers) {
        (None, None) => true,
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// Whether `uri` is written exactly as `text`, compared while it is written (no copy on the
/// authentication path). The parsed Request-URI writes back the octets it was read from.
fn same_text(uri: &Uri, text: &str) -> bool {
    struct Compare<'a> {
        rest: &'a str,
        same: bool,
    }
    impl std::fmt::Write for Compare<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            match self.rest.strip_prefix(s) {
                Some(rest) if self.same => self.rest = rest,
                _ => self.same = false,
            }
            Ok(())
        }
    }
    let mut c = Compare {
        rest: text,
        same: true,
    };
    let _ = std::fmt::Write::write_fmt(&mut c, format_args!("{uri}"));
    c.same && c.rest.is_empty()
}
