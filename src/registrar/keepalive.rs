//! Keep-alive pings of registered contacts: an OPTIONS to every bound contact once per
//! interval; a contact that stops answering is marked unreachable (the registrar's
//! `lookup` then skips it) until it answers again or registers again.
//!
//! Owns: the ping task, its pacing and its bound on pings in flight, the OPTIONS it sends
//! (RFC 3261 11: OPTIONS asks a UA about itself without side effects, so any UA must
//! answer it), and turning each ping's outcome into a reachability mark. Must not touch:
//! sockets (pings go through the transaction layer, which retransmits and times them out),
//! the bindings themselves (an unreachable contact stays registered until it expires or is
//! removed), configuration loading.
//!
//! The pings go where the binding's REGISTER came from (received/rport, the TCP connection),
//! never to the Contact as written: that is the address a NAT mapped for the phone, and
//! traffic to it is what keeps the mapping open (RFC 4787 4.3: UDP mappings may expire after
//! as little as 2 minutes without traffic, often less in practice).
//!
//! Config keys: `registrar.keepalive_interval_s` (0 = off; the server starts the task only
//! when it is set, as [`KeepaliveConfig::interval`]), `sip.domain` (the From of the pings),
//! `sip.timers.t1_ms` (a ping times out after timer F = 64*T1, RFC 3261 17.1.2.2).

use super::{unix_now, Binding, Inner, Registrar};
use crate::sip::{
    new_call_id, new_tag, BaseHeaders, CSeq, Headers, Method, NameAddr, Request, Uri,
};
use crate::transaction::{ClientEvent, TransactionLayer};
use crate::transport::LocalAddrs;
use crate::transport::{ConnectionId, ListenAddr, Target};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Pings waiting for their outcome at most. Only silent contacts hold a slot long (timer F,
/// 32 s by default, retransmitting meanwhile); when a network outage silences thousands,
/// the round slows down instead of piling up that many retransmitting transactions.
const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// How the keep-alive runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepaliveConfig {
    /// Time between two pings of one contact; the pings of a round are spread evenly over
    /// it. The server takes it from `registrar.keepalive_interval_s` (validated 5..=3600);
    /// tests may set anything above zero.
    pub interval: Duration,
    /// Host of the pings' From, `sip:keepalive@DOMAIN` (`sip.domain`).
    pub domain: String,
    /// Pings in flight at most (default `DEFAULT_MAX_IN_FLIGHT`).
    pub max_in_flight: usize,
}

impl KeepaliveConfig {
    pub fn new(interval: Duration, domain: impl Into<String>) -> KeepaliveConfig {
        KeepaliveConfig {
            interval,
            domain: domain.into(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// What the keep-alive did, for metrics and tests.
#[derive(Debug, Default)]
pub struct KeepaliveStats {
    /// OPTIONS sent (retransmissions not counted).
    pub sent: AtomicU64,
    /// Pings that got a final response of any status.
    pub answered: AtomicU64,
    /// Pings that timed out or could not be sent.
    pub failed: AtomicU64,
    /// Contacts not pinged in a round because their previous ping was still in flight.
    pub skipped: AtomicU64,
    /// Contacts marked unreachable / reachable again by a ping.
    pub went_unreachable: AtomicU64,
    pub came_back: AtomicU64,
}

/// A running keep-alive. Dropping it (or [`stop`](Self::stop)) ends the task; pings in
/// flight still report their outcome. The task also ends when the registrar is dropped.
pub struct Keepalive {
    stats: Arc<KeepaliveStats>,
    _stop: oneshot::Sender<()>,
}

impl Keepalive {
    pub fn stats(&self) -> &KeepaliveStats {
        &self.stats
    }

    /// Ends the task now (the same as dropping the handle, spelled out at call sites).
    pub fn stop(self) {}
}

impl Registrar {
    /// Starts pinging every bound contact through `layer`, one round per
    /// `cfg.interval`, the first one interval from now (a contact that just registered
    /// has just shown it is alive). Needs a tokio runtime.
    pub fn start_keepalive(
        &self,
        cfg: KeepaliveConfig,
        layer: TransactionLayer,
        local: LocalAddrs,
    ) -> Keepalive {
        let (stop_tx, stop_rx) = oneshot::channel();
        let stats = Arc::new(KeepaliveStats::default());
        let from = Uri::parse(&format!("sip:keepalive@{}", cfg.domain)).unwrap_or_else(|e| {
            tracing::warn!(domain = %cfg.domain, error = %e, "keep-alive: sip.domain does not make a From URI; using localhost");
            local_from()
        });
        let pinger = Pinger {
            registrar: Arc::downgrade(&self.inner),
            layer,
            local,
            from,
            stats: stats.clone(),
            slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        };
        tracing::info!(interval = ?cfg.interval, "registrar keep-alive pings on");
        tokio::spawn(pinger.run(cfg.interval, stop_rx));
        Keepalive {
            stats,
            _stop: stop_tx,
        }
    }
}

fn local_from() -> Uri {
    // A constant, not network data: it parses (a unit test says so).
    Uri::parse("sip:keepalive@localhost").expect("constant From URI parses")
}

/// What a ping needs from a binding, copied out of the cache at the start of a round.
#[derive(Debug, Clone)]
struct PingTarget {
    contact: String,
    source: String,
    connection: Option<u64>,
    path: Vec<String>,
    /// The REGISTER that last wrote the binding: when it differs after the ping timed
    /// out, the phone registered meanwhile and is alive (RFC 3261 10.3 step 7: every
    /// refresh from one Call-ID has a higher CSeq).
    call_id: String,
    cseq: u32,
}

impl PingTarget {
    fn of(b: &Binding) -> PingTarget {
        PingTarget {
            contact: b.contact.clone(),
            source: b.source.clone(),
            connection: b.connection,
            path: b.path.clone(),
            call_id: b.call_id.clone(),
            cseq: b.cseq,
        }
    }

    /// Where the REGISTER came from: the NAT's mapping, or the phone's TCP connection.
    fn target(&self) -> Option<Target> {
        let source: ListenAddr = self.source.parse().ok()?;
        Some(Target {
            transport: source.kind,
            addr: source.addr,
            connection: self.connection.and_then(ConnectionId::new),
        })
    }
}

/// The OPTIONS to one contact, built like the B2BUA builds its requests (RFC 3261 8.1.1):
/// Request-URI and To the contact, our own From with a fresh tag, a new Call-ID, a fresh
/// Via towards the target. A binding that came through an edge proxy gets its Path as
/// Route set (RFC 3327 5.3), so that the proxy relays the ping as it would a call.
fn options_request(
    t: &PingTarget,
    target: &Target,
    local: &LocalAddrs,
    from: &Uri,
) -> Option<Request> {
    let uri = Uri::parse(&t.contact).ok()?;
    let mut from = NameAddr::new(from.clone());
    from.set_tag(&new_tag());
    let mut headers = Headers::new();
    for hop in &t.path {
        headers.push("Route", hop.clone());
    }
    let host = local
        .towards(target.transport, &target.addr)
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "strowger".into());
    Some(Request {
        method: Method::Options,
        uri: uri.clone(),
        version: "2.0".into(),
        base: BaseHeaders {
            via: vec![local.via(target)],
            from: from.into(),
            to: NameAddr::new(uri).into(),
            call_id: new_call_id(&host),
            cseq: CSeq {
                seq: 1,
                method: Method::Options,
            },
        },
        max_forwards: Some(70),
        headers,
        body: bytes::Bytes::new(),
    })
}

/// Holds a contact's place among the pings in flight; freed with the ping's outcome.
struct InFlight {
    contact: String,
    set: Arc<Mutex<HashSet<String>>>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().remove(&self.contact);
    }
}

struct Pinger {
    registrar: Weak<Inner>,
    layer: TransactionLayer,
    local: LocalAddrs,
    from: Uri,
    stats: Arc<KeepaliveStats>,
    slots: Arc<Semaphore>,
    /// Contacts whose ping is in flight: with an interval shorter than timer F a silent
    /// contact would otherwise collect one retransmitting ping per round.
    in_flight: Arc<Mutex<HashSet<String>>>,
}

/// Sleeps until `at`; false when the keep-alive was stopped meanwhile.
async fn sleep_or_stop(at: Instant, stop: &mut oneshot::Receiver<()>) -> bool {
    tokio::select! {
        _ = stop => false,
        _ = tokio::time::sleep_until(at) => true,
    }
}

impl Pinger {
    async fn run(self, interval: Duration, mut stop: oneshot::Receiver<()>) {
        let interval = interval.max(Duration::from_millis(1));
        let mut round = Instant::now() + interval;
        loop {
            if !sleep_or_stop(round, &mut stop).await {
                return;
            }
            let targets = {
                let Some(inner) = self.registrar.upgrade() else {
                    return;
                };
                snapshot(&inner, unix_now())
            };
            let n = targets.len();
            for (i, t) in targets.into_iter().enumerate() {
                // Evenly spread over the interval: 100k phones every 30 s is ~3.3k pings a
                // second, not 100k at once every 30 s.
                let at = round + interval.mul_f64(i as f64 / n as f64);
                if !sleep_or_stop(at, &mut stop).await {
                    return;
                }
                let slot = tokio::select! {
                    _ = &mut stop => return,
                    s = self.slots.clone().acquire_owned() => match s {
                        Ok(s) => s,
                        Err(_) => return, // never closed; nothing sensible to do if it were
                    },
                };
                if self.registrar.strong_count() == 0 {
                    return;
                }
                self.ping(t, slot);
            }
            round += interval;
            // A round that overran (slots exhausted by silent contacts) is followed at once,
            // not by a burst of catch-up rounds.
            let now = Instant::now();
            if round < now {
                round = now;
            }
        }
    }

    fn ping(&self, t: PingTarget, slot: OwnedSemaphorePermit) {
        if !self.in_flight.lock().insert(t.contact.clone()) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let guard = InFlight {
            contact: t.contact.clone(),
            set: self.in_flight.clone(),
            _slot: slot,
        };
        let Some(target) = t.target() else {
            tracing::debug!(contact = %t.contact, source = %t.source, "keep-alive: binding has no usable source; not pinged");
            return;
        };
        let Some(req) = options_request(&t, &target, &self.local, &self.from) else {
            tracing::debug!(contact = %t.contact, "keep-alive: contact is not a SIP URI; not pinged");
            return;
        };
        let registrar = self.registrar.clone();
        let stats = self.stats.clone();
        let guard = Mutex::new(Some(guard));
        let sink = Box::new(move |event: ClientEvent| {
            let reachable = match event {
                ClientEvent::Provisional(_) => return,
                // Any final status: something at that address speaks SIP for the contact
                // (even 4xx/5xx: many phones answer OPTIONS with 405 or 403).
                ClientEvent::Final(_) => true,
                ClientEvent::Timeout | ClientEvent::TransportError(_) => false,
            };
            // Only the first outcome counts; the slot is freed with it.
            if guard.lock().take().is_none() {
                return;
            }
            let Some(inner) = registrar.upgrade() else {
                return;
            };
            outcome(&inner, &stats, &t, reachable);
        });
        match self.layer.send_request_with(&req, target, sink) {
            Ok(()) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "keep-alive: OPTIONS not sent");
            }
        }
    }
}

/// Applies one ping's outcome to the contact's reachability mark.
fn outcome(inner: &Inner, stats: &KeepaliveStats, t: &PingTarget, reachable: bool) {
    let now = unix_now();
    if reachable {
        stats.answered.fetch_add(1, Ordering::Relaxed);
        if inner.mark(&t.contact, true, now, |_| true) {
            stats.came_back.fetch_add(1, Ordering::Relaxed);
            tracing::info!(contact = %t.contact, "contact answers keep-alive pings again; reachable");
        }
        return;
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
    // Not when the phone registered again after the ping's round began: it is alive.
    let unchanged = |b: &Binding| b.call_id == t.call_id && b.cseq == t.cseq;
    if inner.mark(&t.contact, false, now, unchanged) {
        stats.went_unreachable.fetch_add(1, Ordering::Relaxed);
        tracing::info!(contact = %t.contact, source = %t.source, "contact stopped answering keep-alive pings; unreachable");
    }
}

/// Every live binding, unreachable ones included (they are pinged to find them back).
fn snapshot(inner: &Inner, now: u64) -> Vec<PingTarget> {
    inner
        .cache
        .read()
        .values()
        .flatten()
        .filter(|b| b.expires_at > now)
        .map(PingTarget::of)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportKind;

    fn binding(contact: &str, source: &str, path: &[&str]) -> PingTarget {
        PingTarget {
            contact: contact.into(),
            source: source.into(),
            connection: None,
            path: path.iter().map(|p| p.to_string()).collect(),
            call_id: "c1".into(),
            cseq: 1,
        }
    }

    fn register(cseq: u32, contacts: &[&str]) -> Request {
        let mut s = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK{cseq}k\r\n\
             From: <sip:alice@example.com>;tag=f1\r\n\
             To: <sip:alice@example.com>\r\n\
             Call-ID: ka-1\r\n\
             CSeq: {cseq} REGISTER\r\n"
        );
        for c in contacts {
            s.push_str(&format!("Contact: {c}\r\n"));
        }
        s.push_str("Content-Length: 0\r\n\r\n");
        match crate::sip::parse(s.as_bytes()) {
            Ok((crate::sip::SipMessage::Request(r), _)) => r,
            other => panic!("test request does not parse: {other:?}"),
        }
    }

    const AOR: &str = "sip:alice@example.com";
    const C1: &str = "sip:alice@192.0.2.1:5060";
    const C2: &str = "sip:alice@192.0.2.1:5062";

    #[tokio::test]
    async fn marks_hide_contacts_from_lookups_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(super::super::SqliteStore::open(dir.path()).unwrap());
        let r = Registrar::start(super::super::RegistrarConfig::default(), store)
            .await
            .unwrap();
        let src = super::super::RegisterSource {
            transport: TransportKind::Udp,
            addr: "192.0.2.1:5060".parse().unwrap(),
            connection: None,
        };
        let resp = r
            .register(
                &register(1, &[&format!("<{C1}>"), &format!("<{C2}>")]),
                src,
                AOR,
            )
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(r.lookup(AOR).len(), 2);

        // Unreachable: out of lookups, still bound.
        r.mark_reachable(C1, false);
        assert!(!r.is_reachable(C1));
        let found: Vec<String> = r.lookup(AOR).into_iter().map(|b| b.contact).collect();
        assert_eq!(found, [C2]);
        assert!(r.binding_for_contact(C1).is_none());
        assert!(r.binding_for_contact(C2).is_some());
        assert_eq!(r.bindings().len(), 2);
        // An unbound contact gets no mark.
        r.mark_reachable("sip:nobody@192.0.2.9", false);
        assert_eq!(r.unreachable_count(), 1);
        r.mark_reachable(C1, true);
        assert_eq!(r.lookup(AOR).len(), 2);

        // A timed-out ping from before a refresh does not mark: the phone registered since.
        let stats = KeepaliveStats::default();
        let old = PingTarget::of(&r.lookup(AOR)[0]);
        let resp = r
            .register(
                &register(2, &[&format!("<{C1}>"), &format!("<{C2}>")]),
                src,
                AOR,
            )
            .await;
        assert_eq!(resp.status, 200);
        outcome(&r.inner, &stats, &old, false);
        assert_eq!(r.unreachable_count(), 0);
        // One from after it does.
        let fresh = r.lookup(AOR).into_iter().find(|b| b.contact == C1).unwrap();
        outcome(&r.inner, &stats, &PingTarget::of(&fresh), false);
        assert!(!r.is_reachable(C1));
        assert_eq!(stats.went_unreachable.load(Ordering::Relaxed), 1);

        // A REGISTER refresh clears the mark of the contact it lists.
        let resp = r
            .register(&register(3, &[&format!("<{C1}>")]), src, AOR)
            .await;
        assert_eq!(resp.status, 200);
        assert!(r.is_reachable(C1));
        assert_eq!(r.lookup(AOR).len(), 2);

        // A removed binding takes its mark with it.
        r.mark_reachable(C2, false);
        assert_eq!(r.unreachable_count(), 1);
        let resp = r
            .register(&register(4, &[&format!("<{C2}>;expires=0")]), src, AOR)
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(r.unreachable_count(), 0);
        assert!(r.is_reachable(C2));
    }

    #[test]
    fn fallback_from_parses() {
        assert_eq!(local_from().to_string(), "sip:keepalive@localhost");
    }

    #[test]
    fn target_is_the_register_source() {
        let mut t = binding("sip:alice@10.0.0.5:5060", "udp:203.0.113.7:40123", &[]);
        let target = t.target().unwrap();
        assert_eq!(target.transport, TransportKind::Udp);
        assert_eq!(target.addr, "203.0.113.7:40123".parse().unwrap());
        assert_eq!(target.connection, None);
        t.source = "tcp:[2001:db8::1]:5070".into();
        t.connection = Some(42);
        let target = t.target().unwrap();
        assert_eq!(target.transport, TransportKind::Tcp);
        assert_eq!(target.connection.map(ConnectionId::get), Some(42));
        t.source = "garbage".into();
        assert!(t.target().is_none());
    }

    #[test]
    fn options_request_is_well_formed() {
        let local = LocalAddrs::new(vec![(
            TransportKind::Udp,
            "192.0.2.1:5060".parse().unwrap(),
        )]);
        let t = binding(
            "sip:alice@10.0.0.5:5060;ob",
            "udp:203.0.113.7:40123",
            &["<sip:edge.example.com;lr>"],
        );
        let target = t.target().unwrap();
        let from = Uri::parse("sip:keepalive@example.com").unwrap();
        let req = options_request(&t, &target, &local, &from).unwrap();
        let text = String::from_utf8(req.to_bytes().to_vec()).unwrap();
        assert!(
            text.starts_with("OPTIONS sip:alice@10.0.0.5:5060;ob SIP/2.0\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK"),
            "{text}"
        );
        assert!(
            text.contains("From: <sip:keepalive@example.com>;tag="),
            "{text}"
        );
        assert!(
            text.contains("To: <sip:alice@10.0.0.5:5060;ob>\r\n"),
            "{text}"
        );
        assert!(text.contains("CSeq: 1 OPTIONS\r\n"), "{text}");
        assert!(text.contains("Max-Forwards: 70\r\n"), "{text}");
        assert!(
            text.contains("Route: <sip:edge.example.com;lr>\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 0\r\n"), "{text}");
        assert!(req.base.call_id.ends_with("@192.0.2.1"));
        // Re-parses as what it claims to be.
        match crate::sip::parse(&req.to_bytes()) {
            Ok((crate::sip::SipMessage::Request(r), _)) => assert_eq!(r.method, Method::Options),
            other => panic!("{other:?}"),
        }
        let bad = binding("not a uri", "udp:203.0.113.7:40123", &[]);
        assert!(options_request(&bad, &target, &local, &from).is_none());
    }
}
