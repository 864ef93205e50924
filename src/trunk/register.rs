//! Outbound registration of a trunk (RFC 3261 10.2): REGISTER to the carrier, answer its
//! challenge, refresh before the granted interval runs out, back off after failures.
//!
//! Owns: the registration's state machine ([`Registration`], sans I/O: it takes the outcome
//! of each REGISTER and says what to send next or how long to wait) and the small task
//! that drives it through the transaction layer. Must not touch: sockets, retransmissions
//! and timeouts (the transaction layer's), how a challenge is answered (the trunk's
//! `auth::DigestClient`).
//!
//! The rules:
//! - One Call-ID and From tag for the life of the registration, the CSeq one higher with
//!   every REGISTER (RFC 3261 10.2.4); Expires asks for `expires`; the Contact is our
//!   address with user `username` and `line=<trunk name>`.
//! - 401/407: answered once with the trunk's credentials (a new CSeq, the same Call-ID). A
//!   second challenge in the same attempt is a failure (the credentials were refused:
//!   `auth_failures` counted, a warning logged once per streak) unless it says
//!   `stale=true`, which is answered one more time. Never a loop. The last challenge
//!   answered is answered again up front in later REGISTERs (RFC 3261 22.3, nonce count
//!   incremented); a challenge to those is answered once as above.
//! - 2xx: registered for the interval granted: the `expires` parameter of our Contact in
//!   the answer, else its Expires header, else what was asked. Refreshed after
//!   [`refresh_delay`]: the later of half the interval and 30 s before it ends (at least
//!   1 s), so a long grant is refreshed 30 s before expiry and a short one half-way.
//! - 423 (Interval Too Brief): asked again at once with the Min-Expires value (RFC 3261
//!   10.3 step 7), kept for later REGISTERs.
//! - Anything else (another status, timer F, a transport or DNS error): not registered,
//!   the next attempt after [`retry_delay`]: 5 s doubling to 5 min with up to 25% jitter,
//!   and never before a Retry-After (RFC 3261 20.33; capped at 1 h).
//! - On graceful shutdown a registered trunk sends Expires: 0 (RFC 3261 10.2.2).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;

use super::{RegistrationStatus, Trunk};
use crate::sip::{Method, NameAddr, Response};
use crate::transaction::{ClientEvent, TransactionLayer};
use crate::transport::LocalAddrs;

/// The first retry after a failure; doubled after each further failure.
const RETRY_BASE_S: u64 = 5;
/// The longest wait between attempts (before jitter).
const RETRY_MAX_S: u64 = 300;
/// The longest Retry-After honoured.
const RETRY_AFTER_MAX_S: u32 = 3600;
/// Challenges answered in one attempt at most: the first, and one that says `stale=true`.
const MAX_ANSWERS: u8 = 2;

/// What became of one REGISTER.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A final response.
    Response(Box<Response>),
    /// Timer F fired (or the transaction ended without an answer).
    Timeout,
    /// It could not be sent (name resolution, transport).
    TransportError(String),
}

/// A REGISTER to send: its CSeq, the Expires it asks for, and the credentials it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub cseq: u32,
    pub expires: u32,
    /// (`Authorization` or `Proxy-Authorization`, value).
    pub authorization: Option<(&'static str, String)>,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this REGISTER and report its outcome ([`Registration::on_outcome`]).
    Send(Outgoing),
    /// Wait this long, then call [`Registration::on_timer`].
    Wait(Duration),
    /// Nothing more to do (after unregistering).
    Done,
}

/// When to refresh a registration granted for `granted` seconds: the later of half of it
/// and 30 s before it ends, at least 1 s.
pub fn refresh_delay(granted: u32) -> Duration {
    let half = granted / 2;
    let early = granted.saturating_sub(30);
    Duration::from_secs(u64::from(half.max(early).max(1)))
}

/// The wait before the next attempt after `failures` failures in a row (1 for the first):
/// 5 s doubling to 5 min, times `jitter` (1.0 to 1.25), and never less than a Retry-After.
pub fn retry_delay(failures: u32, retry_after: Option<u32>, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = (RETRY_BASE_S << doublings).min(RETRY_MAX_S);
    let wait = Duration::from_secs(base).mul_f64(jitter.clamp(1.0, 1.25));
    match retry_after {
        Some(s) => wait.max(Duration::from_secs(u64::from(s.min(RETRY_AFTER_MAX_S)))),
        None => wait,
    }
}

/// The leading number of a header value (`Retry-After: 120 (busy);duration=60`).
fn leading_number(v: &str) -> Option<u32> {
    let digits: String = v.trim().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// One trunk's registration, without I/O.
#[derive(Debug)]
pub struct Registration {
    trunk: Arc<Trunk>,
    /// The Request-URI as text (the digest's `uri`).
    uri: String,
    /// The CSeq of the last REGISTER built.
    cseq: u32,
    /// The interval asked for (raised by a 423).
    expires: u32,
    /// The challenge last answered (status, its header values): answered again up front.
    challenge: Option<(u16, Vec<String>)>,
    /// Challenges answered in this attempt.
    answers: u8,
    /// Failed attempts in a row.
    failures: u32,
    /// A failure of this streak was logged as a warning already.
    warned: bool,
    /// Sending Expires: 0.
    unregistering: bool,
    jitter: bool,
}

impl Registration {
    /// The registration of `trunk`; `jitter` spreads retries (off in tests).
    pub fn new(trunk: Arc<Trunk>, jitter: bool) -> Registration {
        Registration {
            uri: trunk.uri().to_string(),
            expires: trunk.config().expires,
            trunk,
            cseq: 0,
            challenge: None,
            answers: 0,
            failures: 0,
            warned: false,
            unregistering: false,
            jitter,
        }
    }

    /// The first REGISTER.
    pub fn start(&mut self) -> Action {
        self.attempt()
    }

    /// A wait asked for by [`Action::Wait`] is over: refresh or retry.
    pub fn on_timer(&mut self) -> Action {
        self.attempt()
    }

    /// The interval asked for now.
    pub fn expires(&self) -> u32 {
        self.expires
    }

    /// Starts unregistering (graceful shutdown): the REGISTER with Expires: 0 to send, or
    /// None when the trunk is not registered.
    pub fn unregister(&mut self) -> Option<Action> {
        if !self.trunk.is_registered() {
            return None;
        }
        self.unregistering = true;
        self.answers = 0;
        let auth = self.cached_auth();
        Some(Action::Send(self.outgoing(auth)))
    }

    fn attempt(&mut self) -> Action {
        self.answers = 0;
        let auth = self.cached_auth();
        Action::Send(self.outgoing(auth))
    }

    fn outgoing(&mut self, authorization: Option<(&'static str, String)>) -> Outgoing {
        self.cseq = self.cseq.wrapping_add(1).max(1);
        Outgoing {
            cseq: self.cseq,
            expires: if self.unregistering { 0 } else { self.expires },
            authorization,
        }
    }

    /// Credentials for the last challenge answered, with the next nonce count.
    fn cached_auth(&self) -> Option<(&'static str, String)> {
        let (status, challenges) = self.challenge.as_ref()?;
        let values: Vec<&str> = challenges.iter().map(String::as_str).collect();
        let a = self
            .trunk
            .client()?
            .answer(*status, &values, "REGISTER", &self.uri)
            .ok()?;
        Some((a.header, a.value))
    }

    /// What the REGISTER's outcome means, and what comes next; `now` in Unix seconds.
    pub fn on_outcome(&mut self, outcome: Outcome, now: u64) -> Action {
        let r = match outcome {
            Outcome::Response(r) => *r,
            Outcome::Timeout => return self.fail(now, 408, None, "no answer (timeout)".into()),
            Outcome::TransportError(e) => return self.fail(now, 503, None, e),
        };
        match r.status {
            200..=299 => self.registered(&r, now),
            401 | 407 => self.challenged(&r, now),
            423 => {
                let min = r.headers.get("Min-Expires").and_then(leading_number);
                match min {
                    Some(min) if min > self.expires && min <= 86_400 && !self.unregistering => {
                        tracing::info!(trunk = %self.trunk.name(), asked = self.expires, min, "trunk wants a longer registration interval; asking again");
                        self.expires = min;
                        self.answers = 0;
                        let auth = self.cached_auth();
                        Action::Send(self.outgoing(auth))
                    }
                    _ => self.fail(now, 423, None, "423 without a usable Min-Expires".into()),
                }
            }
            status => {
                let retry_after = r.headers.get("Retry-After").and_then(leading_number);
                let why = format!("{status} {}", r.reason);
                self.fail(now, status, retry_after, why)
            }
        }
    }

    fn registered(&mut self, r: &Response, now: u64) -> Action {
        if self.unregistering {
            self.trunk.set_registered(false);
            self.trunk.set_registration(RegistrationStatus {
                last_status: Some(r.status),
                ..RegistrationStatus::default()
            });
            tracing::info!(trunk = %self.trunk.name(), "trunk unregistered");
            return Action::Done;
        }
        let granted = self.granted(r);
        if granted == 0 {
            return self.fail(now, r.status, None, "registrar kept no binding".into());
        }
        self.trunk
            .counters
            .registrations_ok
            .fetch_add(1, Ordering::Relaxed);
        if !self.trunk.is_registered() || self.failures > 0 {
            tracing::info!(trunk = %self.trunk.name(), granted, "trunk registered");
        }
        self.failures = 0;
        self.warned = false;
        self.trunk.set_registered(true);
        self.trunk.set_registration(RegistrationStatus {
            expires_at: Some(now + u64::from(granted)),
            next_retry: None,
            last_status: Some(r.status),
        });
        Action::Wait(refresh_delay(granted))
    }

    /// The interval the registrar granted: our Contact's `expires`, else the Expires
    /// header, else what was asked.
    fn granted(&self, r: &Response) -> u32 {
        let ours = r.headers.list("Contact").into_iter().find_map(|c| {
            let c = NameAddr::parse(&c).ok()?;
            (c.uri.params.value("line") == Some(self.trunk.name()))
                .then(|| c.params.value("expires").and_then(leading_number))
                .flatten()
        });
        ours.or_else(|| r.headers.get("Expires").and_then(leading_number))
            .unwrap_or(self.expires)
    }

    fn challenged(&mut self, r: &Response, now: u64) -> Action {
        let name = if r.status == 407 {
            "Proxy-Authenticate"
        } else {
            "WWW-Authenticate"
        };
        let challenges: Vec<String> = r.headers.get_all(name).map(str::to_owned).collect();
        let Some(client) = self.trunk.client() else {
            return self.auth_failed(now, r.status, "no credentials configured".into());
        };
        let values: Vec<&str> = challenges.iter().map(String::as_str).collect();
        match client.answer(r.status, &values, "REGISTER", &self.uri) {
            Ok(a) if self.answers == 0 || (a.stale && self.answers < MAX_ANSWERS) => {
                self.answers += 1;
                self.trunk
                    .counters
                    .challenges_answered
                    .fetch_add(1, Ordering::Relaxed);
                self.challenge = Some((r.status, challenges));
                Action::Send(self.outgoing(Some((a.header, a.value))))
            }
            Ok(_) => self.auth_failed(now, r.status, "credentials refused".into()),
            Err(e) => self.auth_failed(now, r.status, e.to_string()),
        }
    }

    fn auth_failed(&mut self, now: u64, status: u16, why: String) -> Action {
        self.trunk
            .counters
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        // Not offered again up front: it was refused.
        self.challenge = None;
        self.fail(now, status, None, format!("authentication failed: {why}"))
    }

    fn fail(&mut self, now: u64, status: u16, retry_after: Option<u32>, why: String) -> Action {
        if self.unregistering {
            self.trunk.set_registered(false);
            tracing::info!(trunk = %self.trunk.name(), status, why, "trunk not unregistered; its registration will lapse");
            return Action::Done;
        }
        self.trunk
            .counters
            .registrations_failed
            .fetch_add(1, Ordering::Relaxed);
        self.trunk.set_registered(false);
        self.failures = self.failures.saturating_add(1);
        let jitter = if self.jitter {
            rand::rng().random_range(1.0..1.25)
        } else {
            1.0
        };
        let wait = retry_delay(self.failures, retry_after, jitter);
        if self.warned {
            tracing::debug!(trunk = %self.trunk.name(), status, why, retry_in = ?wait, failures = self.failures, "trunk registration failed again");
        } else {
            self.warned = true;
            tracing::warn!(trunk = %self.trunk.name(), status, why, retry_in = ?wait, "trunk registration failed; retrying with backoff (further failures logged at debug)");
        }
        self.trunk.set_registration(RegistrationStatus {
            expires_at: None,
            next_retry: Some(now + wait.as_secs_f64().ceil() as u64),
            last_status: Some(status),
        });
        Action::Wait(wait)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Call-ID and From tag of a registration, made on its first REGISTER.
struct Ids {
    call_id: String,
    tag: String,
}

/// Sends one REGISTER to the trunk's next hop and waits for its outcome.
async fn send(
    trunk: &Trunk,
    layer: &TransactionLayer,
    local: &LocalAddrs,
    ids: &mut Option<Ids>,
    out: Outgoing,
) -> Outcome {
    let target = match crate::transport::resolve(trunk.next_hop(), local).await {
        Ok(t) => t,
        Err(e) => return Outcome::TransportError(e.to_string()),
    };
    let ids = ids.get_or_insert_with(|| Ids {
        call_id: Trunk::call_id(local, &target),
        tag: Trunk::tag(),
    });
    let aor = trunk.aor();
    let mut req = trunk.new_request(Method::Register, aor.clone(), aor, local, &target);
    req.base.from.set_tag(&ids.tag);
    req.base.call_id = ids.call_id.clone();
    req.base.cseq.seq = out.cseq;
    req.headers
        .push("Contact", format!("<{}>", trunk.contact(local, &target)));
    req.headers.push("Expires", out.expires.to_string());
    if let Some((name, value)) = out.authorization {
        req.headers.push(name, value);
    }
    let mut tx = match layer.send_request(req, target) {
        Ok(tx) => tx,
        Err(e) => return Outcome::TransportError(e.to_string()),
    };
    loop {
        match tx.next_event().await {
            Some(ClientEvent::Provisional(_)) => continue,
            Some(ClientEvent::Final(r)) => return Outcome::Response(Box::new(r)),
            Some(ClientEvent::Timeout) | None => return Outcome::Timeout,
            Some(ClientEvent::TransportError(e)) => return Outcome::TransportError(e),
        }
    }
}

/// Keeps `trunk` registered until `stop` turns true; then unregisters (bounded by the
/// caller) and ends.
pub(super) async fn run(
    trunk: Arc<Trunk>,
    layer: TransactionLayer,
    local: LocalAddrs,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut reg = Registration::new(trunk.clone(), true);
    let mut ids = None;
    let mut action = reg.start();
    loop {
        action = match action {
            Action::Send(out) => tokio::select! {
                o = send(&trunk, &layer, &local, &mut ids, out) => reg.on_outcome(o, unix_now()),
                _ = stop.changed() => break,
            },
            Action::Wait(d) => tokio::select! {
                _ = tokio::time::sleep(d) => reg.on_timer(),
                _ = stop.changed() => break,
            },
            Action::Done => return,
        };
    }
    if !*stop.borrow() {
        return; // the handle was dropped: no graceful stop
    }
    let Some(mut action) = reg.unregister() else {
        return;
    };
    while let Action::Send(out) = action {
        let outcome = send(&trunk, &layer, &local, &mut ids, out).await;
        action = reg.on_outcome(outcome, unix_now());
    }
}

#[cfg(test)]
mod tests {
    use super::super::{TrunkConfig, Trunks};
    use super::*;
    use std::collections::BTreeMap;

    fn trunk(f: impl FnOnce(&mut TrunkConfig)) -> Arc<Trunk> {
        let mut c = TrunkConfig {
            uri: "sip:carrier.example".into(),
            username: "pbx".into(),
            password: "secret".into(),
            register: true,
            expires: 600,
            ..TrunkConfig::default()
        };
        f(&mut c);
        let t = Trunks::new(&BTreeMap::from([("carrier1".to_string(), c)]));
        t.get("carrier1").expect("valid trunk").clone()
    }

    fn response(status: u16, cseq: u32, extra: &str) -> Outcome {
        let text = format!(
            "SIP/2.0 {status} Whatever\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx\r\n\
             From: <sip:pbx@carrier.example>;tag=f\r\n\
             To: <sip:pbx@carrier.example>;tag=t\r\n\
             Call-ID: reg-1\r\n\
             CSeq: {cseq} REGISTER\r\n\
             {extra}\
             Content-Length: 0\r\n\r\n"
        );
        match crate::sip::parse(text.as_bytes()) {
            Ok((crate::sip::SipMessage::Response(r), _)) => Outcome::Response(Box::new(r)),
            other => panic!("test response does not parse: {other:?}"),
        }
    }

    const CHALLENGE: &str =
        "WWW-Authenticate: Digest realm=\"carrier.example\", nonce=\"n1\", qop=\"auth\", algorithm=MD5\r\n";

    fn sent(a: Action) -> Outgoing {
        match a {
            Action::Send(o) => o,
            other => panic!("expected a REGISTER, got {other:?}"),
        }
    }

    #[test]
    fn refresh_and_retry_rules() {
        assert_eq!(refresh_delay(3600), Duration::from_secs(3570));
        assert_eq!(refresh_delay(60), Duration::from_secs(30));
        assert_eq!(refresh_delay(4), Duration::from_secs(2));
        assert_eq!(refresh_delay(1), Duration::from_secs(1));
        assert_eq!(refresh_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(1, None, 1.0), Duration::from_secs(5));
        assert_eq!(retry_delay(2, None, 1.0), Duration::from_secs(10));
        assert_eq!(retry_delay(7, None, 1.0), Duration::from_secs(300));
        assert_eq!(retry_delay(u32::MAX, None, 1.0), Duration::from_secs(300));
        assert_eq!(retry_delay(1, None, 1.2), Duration::from_secs(6));
        assert_eq!(retry_delay(1, Some(120), 1.0), Duration::from_secs(120));
        assert_eq!(retry_delay(3, Some(1), 1.0), Duration::from_secs(20));
        assert_eq!(retry_delay(1, Some(99_999), 1.0), Duration::from_secs(3600));
        assert_eq!(leading_number(" 120 (busy);duration=5"), Some(120));
        assert_eq!(leading_number("soon"), None);
    }

    #[test]
    fn challenge_answered_once_then_registered_and_refreshed() {
        let t = trunk(|_| {});
        let mut reg = Registration::new(t.clone(), false);
        let first = sent(reg.start());
        assert_eq!((first.cseq, first.expires), (1, 600));
        assert!(first.authorization.is_none());
        let second = sent(reg.on_outcome(response(401, 1, CHALLENGE), 1000));
        assert_eq!(second.cseq, 2);
        let (name, value) = second.authorization.clone().unwrap();
        assert_eq!(name, "Authorization");
        assert!(value.contains("nc=00000001"), "{value}");
        assert!(value.contains("uri=\"sip:carrier.example\""), "{value}");
        // Granted 60 s in our Contact (the Expires header says otherwise).
        let ok = response(
            200,
            2,
            "Contact: <sip:pbx@192.0.2.1:5060;line=other>;expires=900, <sip:pbx@192.0.2.1:5060;line=carrier1>;expires=60\r\nExpires: 3600\r\n",
        );
        assert_eq!(
            reg.on_outcome(ok, 1000),
            Action::Wait(Duration::from_secs(30))
        );
        assert!(t.is_registered());
        let st = t.registration();
        assert_eq!(st.expires_at, Some(1060));
        assert_eq!(st.last_status, Some(200));
        assert_eq!(st.next_retry, None);
        // The refresh: same registration, next CSeq, credentials up front (nc 2).
        let refresh = sent(reg.on_timer());
        assert_eq!(refresh.cseq, 3);
        assert!(refresh.authorization.unwrap().1.contains("nc=00000002"));
        // Only the Expires header: that is the grant.
        assert_eq!(
            reg.on_outcome(response(200, 3, "Expires: 120\r\n"), 1030),
            Action::Wait(Duration::from_secs(90))
        );
        assert_eq!(t.counters.registrations_ok.load(Ordering::Relaxed), 2);
        assert_eq!(t.counters.challenges_answered.load(Ordering::Relaxed), 1);
        // Graceful stop: Expires 0, then done.
        let bye = sent(reg.unregister().unwrap());
        assert_eq!((bye.cseq, bye.expires), (4, 0));
        assert_eq!(reg.on_outcome(response(200, 4, ""), 1040), Action::Done);
        assert!(!t.is_registered());
        assert!(reg.unregister().is_none());
    }

    #[test]
    fn a_second_challenge_is_a_failure_not_a_loop() {
        let t = trunk(|_| {});
        let mut reg = Registration::new(t.clone(), false);
        sent(reg.start());
        sent(reg.on_outcome(response(401, 1, CHALLENGE), 1000));
        let wait = reg.on_outcome(response(401, 2, CHALLENGE), 1000);
        assert_eq!(wait, Action::Wait(Duration::from_secs(5)));
        assert!(!t.is_registered());
        assert_eq!(t.counters.auth_failures.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.registrations_failed.load(Ordering::Relaxed), 1);
        let st = t.registration();
        assert_eq!((st.next_retry, st.last_status), (Some(1005), Some(401)));
        // The retry starts clean: no refused credentials up front; backoff doubles.
        let retry = sent(reg.on_timer());
        assert_eq!(retry.cseq, 3);
        assert!(retry.authorization.is_none());
        sent(reg.on_outcome(response(401, 3, CHALLENGE), 1005));
        assert_eq!(
            reg.on_outcome(response(401, 4, CHALLENGE), 1005),
            Action::Wait(Duration::from_secs(10))
        );
        assert_eq!(t.counters.auth_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn stale_is_answered_once_more() {
        let t = trunk(|_| {});
        let mut reg = Registration::new(t.clone(), false);
        sent(reg.start());
        sent(reg.on_outcome(response(407, 1, &CHALLENGE.replace("WWW-", "Proxy-")), 0));
        let stale = CHALLENGE.replace("nonce=\"n1\"", "nonce=\"n2\", stale=true");
        let again = sent(reg.on_outcome(response(401, 2, &stale), 0));
        assert_eq!(again.cseq, 3);
        // A third (stale again) is refused: two answers per attempt at most.
        assert_eq!(
            reg.on_outcome(response(401, 3, &stale), 0),
            Action::Wait(Duration::from_secs(5))
        );
        assert_eq!(t.counters.auth_failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn failures_back_off_and_honour_retry_after_and_min_expires() {
        let t = trunk(|_| {});
        let mut reg = Registration::new(t.clone(), false);
        sent(reg.start());
        // 423: at once with Min-Expires, which stays.
        let longer = sent(reg.on_outcome(response(423, 1, "Min-Expires: 1800\r\n"), 0));
        assert_eq!((longer.cseq, longer.expires), (2, 1800));
        // 423 with nothing larger: a failure.
        assert_eq!(
            reg.on_outcome(response(423, 2, "Min-Expires: 60\r\n"), 0),
            Action::Wait(Duration::from_secs(5))
        );
        assert_eq!(sent(reg.on_timer()).expires, 1800);
        assert_eq!(
            reg.on_outcome(Outcome::Timeout, 10),
            Action::Wait(Duration::from_secs(10))
        );
        assert_eq!(t.registration().last_status, Some(408));
        sent(reg.on_timer());
        assert_eq!(
            reg.on_outcome(response(503, 4, "Retry-After: 600\r\n"), 20),
            Action::Wait(Duration::from_secs(600))
        );
        sent(reg.on_timer());
        assert_eq!(
            reg.on_outcome(Outcome::TransportError("refused".into()), 30),
            Action::Wait(Duration::from_secs(40))
        );
        assert_eq!(t.registration().last_status, Some(503));
        // Success resets the backoff.
        sent(reg.on_timer());
        reg.on_outcome(response(200, 6, "Expires: 1800\r\n"), 40);
        assert!(t.is_registered());
        sent(reg.on_timer());
        assert_eq!(
            reg.on_outcome(response(403, 7, ""), 50),
            Action::Wait(Duration::from_secs(5))
        );
        assert!(!t.is_registered());
        assert_eq!(t.counters.registrations_failed.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let t = trunk(|_| {});
        let mut reg = Registration::new(t, true);
        sent(reg.start());
        match reg.on_outcome(Outcome::Timeout, 0) {
            Action::Wait(d) => {
                assert!(
                    d >= Duration::from_secs(5) && d < Duration::from_millis(6250),
                    "{d:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
