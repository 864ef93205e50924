//! The ordering rules over an in-memory record table (no network), with a fixed draw for
//! the SRV weights. The real resolver is exercised against dnsmasq in tests/dns.rs.

use super::*;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// An in-memory zone; every query is recorded.
#[derive(Default)]
struct Zone {
    naptr: HashMap<String, Vec<Naptr>>,
    srv: HashMap<String, Vec<Srv>>,
    ips: HashMap<String, Vec<IpAddr>>,
    failing: HashSet<String>,
    queries: Arc<Mutex<Vec<String>>>,
}

impl Zone {
    fn naptr(mut self, name: &str, order: u16, pref: u16, services: &str, repl: &str) -> Self {
        self.naptr.entry(name.into()).or_default().push(Naptr {
            order,
            preference: pref,
            flags: "S".into(),
            services: services.into(),
            replacement: repl.into(),
        });
        self
    }
    fn srv(mut self, name: &str, priority: u16, weight: u16, port: u16, target: &str) -> Self {
        self.srv.entry(name.into()).or_default().push(Srv {
            priority,
            weight,
            port,
            target: target.into(),
        });
        self
    }
    fn ip(mut self, name: &str, ip: &str) -> Self {
        self.ips
            .entry(name.into())
            .or_default()
            .push(ip.parse().unwrap());
        self
    }
    fn failing(mut self, query: &str) -> Self {
        self.failing.insert(query.into());
        self
    }
    fn answer<T: Clone>(
        &self,
        kind: &str,
        name: &str,
        table: &HashMap<String, Vec<T>>,
    ) -> Result<Vec<T>, LookupError> {
        let query = format!("{kind} {name}");
        self.queries.lock().unwrap().push(query.clone());
        if self.failing.contains(&query) {
            return Err(LookupError("timed out".into()));
        }
        Ok(table.get(name).cloned().unwrap_or_default())
    }
}

impl RecordSource for Zone {
    async fn naptr(&self, name: &str) -> Result<Vec<Naptr>, LookupError> {
        self.answer("NAPTR", name, &self.naptr)
    }
    async fn srv(&self, name: &str) -> Result<Vec<Srv>, LookupError> {
        self.answer("SRV", name, &self.srv)
    }
    async fn ips(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
        self.answer("IP", name, &self.ips)
    }
}

fn local() -> LocalAddrs {
    LocalAddrs::new(vec![
        (TransportKind::Udp, "127.0.0.1:5060".parse().unwrap()),
        (TransportKind::Tcp, "127.0.0.1:5060".parse().unwrap()),
    ])
}

fn with_tls() -> LocalAddrs {
    LocalAddrs::new(vec![
        (TransportKind::Udp, "127.0.0.1:5060".parse().unwrap()),
        (TransportKind::Tls, "127.0.0.1:5061".parse().unwrap()),
    ])
}

fn udp_only() -> LocalAddrs {
    LocalAddrs::new(vec![(
        TransportKind::Udp,
        "127.0.0.1:5060".parse().unwrap(),
    )])
}

/// A locator over `zone` whose draw is always 0 (the first record of a priority with
/// weight reaching 0), and the zone's query log.
fn locator(zone: Zone) -> (Locator<Zone>, Arc<Mutex<Vec<String>>>) {
    let queries = zone.queries.clone();
    (
        Locator::with_source(zone).with_pick(Arc::new(|_| 0)),
        queries,
    )
}

async fn targets(loc: &Locator<Zone>, uri: &str, local: &LocalAddrs) -> Vec<String> {
    loc.locate(&Uri::parse(uri).unwrap(), local)
        .await
        .unwrap()
        .iter()
        .map(|t| format!("{}:{}", t.transport, t.addr))
        .collect()
}

fn srv(priority: u16, weight: u16, target: &str) -> Srv {
    Srv {
        priority,
        weight,
        port: 5060,
        target: target.into(),
    }
}

fn names(records: &[Srv]) -> Vec<&str> {
    records.iter().map(|r| r.target.as_str()).collect()
}

#[test]
fn srv_by_priority_then_weight() {
    let records = vec![
        srv(20, 0, "c"),
        srv(10, 10, "a"),
        srv(10, 30, "b"),
        srv(10, 0, "z"),
        srv(5, 1, ""), // "." target: not there
    ];
    // Draw 0: weight-0 records first, then each time the first of the rest.
    assert_eq!(
        names(&order_srv(records.clone(), &|_| 0)),
        ["z", "a", "b", "c"]
    );
    // Draw the maximum: each time the last record of the priority.
    assert_eq!(
        names(&order_srv(records.clone(), &|max| max)),
        ["b", "a", "z", "c"]
    );
    // Draw 11 of 0..=40 over [z 0, a 10, b 30]: running sums 0, 10, 40 → b; then 11 of
    // 0..=10 over [z, a] is capped at 10 → a.
    assert_eq!(names(&order_srv(records, &|_| 11)), ["b", "a", "z", "c"]);
}

#[test]
fn srv_weights_are_proportional() {
    // RFC 2782 draws over 0..=sum (here 0..=4): a draw of 0 or 1 takes the weight-1
    // record, 2..=4 the weight-3 one.
    let records = vec![srv(1, 1, "light"), srv(1, 3, "heavy")];
    let firsts: Vec<String> = (0..=4)
        .map(|r| order_srv(records.clone(), &move |_| r)[0].target.clone())
        .collect();
    assert_eq!(firsts, ["light", "light", "heavy", "heavy", "heavy"]);
}

#[test]
fn naptr_filter_and_order() {
    let n = |order, preference, flags: &str, services: &str, repl: &str| Naptr {
        order,
        preference,
        flags: flags.into(),
        services: services.into(),
        replacement: repl.into(),
    };
    let records = vec![
        n(20, 10, "s", "SIP+D2U", "_sip._udp.late"),
        n(10, 20, "S", "SIP+D2T", "_sip._tcp.x"),
        n(10, 10, "S", "SIPS+D2T", "_sips._tcp.x"),
        n(10, 10, "S", "SIP+D2S", "_sip._sctp.x"),
        n(10, 10, "S", "SIP+D2W", "_sip._ws.x"),
        n(10, 15, "S", "SIP+D2U", "_sip._udp.x"),
        n(10, 16, "A", "SIP+D2U", "host.x"),
        n(10, 17, "S", "SIP+D2U", ""),
    ];
    assert_eq!(
        usable_naptrs(records.clone(), &local()),
        [
            (TransportKind::Udp, "_sip._udp.x".to_string()),
            (TransportKind::Tcp, "_sip._tcp.x".to_string()),
            (TransportKind::Udp, "_sip._udp.late".to_string()),
        ]
    );
    // Without a TCP listener the D2T record is dropped.
    assert_eq!(
        usable_naptrs(records, &udp_only()),
        [
            (TransportKind::Udp, "_sip._udp.x".to_string()),
            (TransportKind::Udp, "_sip._udp.late".to_string()),
        ]
    );
}

#[tokio::test]
async fn ip_host_needs_no_dns() {
    let (loc, queries) = locator(Zone::default());
    assert_eq!(
        targets(&loc, "sip:bob@192.0.2.1", &local()).await,
        ["udp:192.0.2.1:5060"]
    );
    assert_eq!(
        targets(&loc, "sip:bob@[2001:db8::1]:5070;transport=tcp", &local()).await,
        ["tcp:[2001:db8::1]:5070"]
    );
    assert!(queries.lock().unwrap().is_empty());
}

#[tokio::test]
async fn naptr_then_srv_then_addresses() {
    let zone = Zone::default()
        .naptr("example.test", 10, 20, "SIP+D2T", "_sip._tcp.example.test")
        .naptr("example.test", 10, 10, "SIP+D2U", "_sip._udp.example.test")
        .srv("_sip._udp.example.test", 20, 0, 5080, "backup.example.test")
        .srv("_sip._udp.example.test", 10, 0, 5070, "main.example.test")
        .srv("_sip._tcp.example.test", 10, 0, 5071, "main.example.test")
        .ip("main.example.test", "2001:db8::10")
        .ip("main.example.test", "192.0.2.10")
        .ip("backup.example.test", "192.0.2.20");
    let (loc, _) = locator(zone);
    assert_eq!(
        targets(&loc, "sip:bob@Example.Test", &local()).await,
        [
            // A v4-only server tries the IPv4 address first, the IPv6 one after.
            "udp:192.0.2.10:5070",
            "udp:[2001:db8::10]:5070",
            "udp:192.0.2.20:5080",
            "tcp:192.0.2.10:5071",
            "tcp:[2001:db8::10]:5071",
        ]
    );
    // Without TCP, the D2T branch is not followed.
    let zone = Zone::default()
        .naptr("example.test", 10, 10, "SIP+D2T", "_sip._tcp.example.test")
        .srv("_sip._tcp.example.test", 10, 0, 5071, "main.example.test")
        .srv("_sip._udp.example.test", 10, 0, 5070, "main.example.test")
        .ip("main.example.test", "192.0.2.10");
    let (loc, _) = locator(zone);
    assert_eq!(
        targets(&loc, "sip:example.test", &udp_only()).await,
        ["udp:192.0.2.10:5070"]
    );
}

#[tokio::test]
async fn srv_per_transport_without_naptr() {
    let zone = Zone::default()
        .srv("_sip._tcp.example.test", 10, 0, 5071, "t.example.test")
        .srv("_sip._udp.example.test", 10, 0, 5070, "u.example.test")
        .ip("t.example.test", "192.0.2.2")
        .ip("u.example.test", "192.0.2.1")
        .ip("example.test", "192.0.2.99");
    let (loc, queries) = locator(zone);
    assert_eq!(
        targets(&loc, "sip:example.test", &local()).await,
        ["udp:192.0.2.1:5070", "tcp:192.0.2.2:5071"]
    );
    assert!(!queries
        .lock()
        .unwrap()
        .contains(&"IP example.test".to_string()));
    // A transport parameter: only that transport's SRV.
    assert_eq!(
        targets(&loc, "sip:example.test;transport=tcp", &local()).await,
        ["tcp:192.0.2.2:5071"]
    );
}

#[tokio::test]
async fn addresses_when_no_srv() {
    let zone = Zone::default().ip("example.test", "192.0.2.99");
    let (loc, _) = locator(zone);
    assert_eq!(
        targets(&loc, "sip:example.test", &local()).await,
        ["udp:192.0.2.99:5060"]
    );
    assert_eq!(
        targets(&loc, "sip:example.test;transport=tcp", &local()).await,
        ["tcp:192.0.2.99:5060"]
    );
}

#[tokio::test]
async fn explicit_port_skips_naptr_and_srv() {
    let zone = Zone::default()
        .naptr("example.test", 10, 10, "SIP+D2U", "_sip._udp.example.test")
        .srv("_sip._udp.example.test", 10, 0, 5070, "u.example.test")
        .ip("u.example.test", "192.0.2.1")
        .ip("example.test", "192.0.2.99");
    let (loc, queries) = locator(zone);
    assert_eq!(
        targets(&loc, "sip:bob@example.test:5099", &local()).await,
        ["udp:192.0.2.99:5099"]
    );
    assert_eq!(
        targets(&loc, "sip:bob@example.test:5099;transport=tcp", &local()).await,
        ["tcp:192.0.2.99:5099"]
    );
    assert_eq!(
        *queries.lock().unwrap(),
        ["IP example.test", "IP example.test"]
    );
}

#[tokio::test]
async fn dot_target_means_no_service() {
    // RFC 2782: a lone "." target says the service is not offered; no A fall-back.
    let zone = Zone::default()
        .srv("_sip._udp.example.test", 0, 0, 0, "")
        .ip("example.test", "192.0.2.99");
    let (loc, _) = locator(zone);
    let e = loc
        .locate(&Uri::parse("sip:example.test").unwrap(), &udp_only())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ResolveError::Unresolvable(ref n) if n == "example.test"),
        "{e}"
    );
}

#[tokio::test]
async fn errors() {
    let zone = Zone::default()
        .failing("NAPTR broken.test")
        .srv("_sip._udp.half.test", 10, 0, 5070, "dead.half.test")
        .srv("_sip._udp.half.test", 20, 0, 5070, "ok.half.test")
        .failing("IP dead.half.test")
        .ip("ok.half.test", "192.0.2.5");
    let (loc, _) = locator(zone);
    let err = |uri: &'static str, local: LocalAddrs| {
        let loc = &loc;
        async move {
            loc.locate(&Uri::parse(uri).unwrap(), &local)
                .await
                .unwrap_err()
        }
    };
    let e = err("sip:nobody.test", local()).await;
    assert!(
        matches!(e, ResolveError::Unresolvable(ref n) if n == "nobody.test"),
        "{e}"
    );
    let e = err("sip:broken.test", local()).await;
    assert_eq!(e.to_string(), "DNS NAPTR broken.test failed: timed out");
    // RFC 3261 26.2: sips: only over TLS; without a tls: listener it cannot be secured.
    let e = err("sips:bob@192.0.2.1;transport=udp", with_tls()).await;
    assert!(matches!(e, ResolveError::Insecure(_)), "{e}");
    assert!(e.to_string().contains("cannot be reached over udp"), "{e}");
    let e = err("sip:bob@192.0.2.1;transport=tcp", udp_only()).await;
    assert!(
        matches!(e, ResolveError::NoTransport(TransportKind::Tcp)),
        "{e}"
    );
    let e = err("sip:bob@192.0.2.1;transport=sctp", local()).await;
    assert!(matches!(e, ResolveError::BadUri(_)), "{e}");
    // One SRV target failing while another answers: the others are still tried.
    assert_eq!(
        targets(&loc, "sip:half.test;transport=udp", &local()).await,
        ["udp:192.0.2.5:5070"]
    );
}

#[tokio::test]
async fn list_is_capped() {
    let mut zone = Zone::default();
    for i in 0..40u16 {
        let host = format!("h{i}.example.test");
        zone = zone
            .srv("_sip._udp.example.test", i, 0, 5060, &host)
            .ip(&host, &format!("192.0.2.{i}"));
    }
    let (loc, _) = locator(zone);
    let found = targets(&loc, "sip:example.test;transport=udp", &local()).await;
    assert_eq!(found.len(), MAX_TARGETS);
    assert_eq!(found[0], "udp:192.0.2.0:5060");
}

#[tokio::test]
async fn sips_goes_over_tls_only() {
    let zone = Zone::default()
        .naptr("secure.test", 10, 10, "SIPS+D2T", "_sips._tcp.secure.test")
        .naptr("secure.test", 20, 10, "SIP+D2U", "_sip._udp.secure.test")
        .srv("_sips._tcp.secure.test", 10, 0, 5071, "edge.secure.test")
        .srv("_sip._udp.secure.test", 10, 0, 5060, "edge.secure.test")
        .ip("edge.secure.test", "192.0.2.30")
        .ip("plain.test", "192.0.2.31");
    let (loc, _) = locator(zone);
    // sips: the _sips._tcp SRV, never the UDP service.
    assert_eq!(
        targets(&loc, "sips:bob@secure.test", &with_tls()).await,
        ["tls:192.0.2.30:5071"]
    );
    // The certificate must name the URI's domain (RFC 5922 7.2), not the SRV target.
    assert_eq!(
        crate::transport::tls::server_name_for("192.0.2.30:5071".parse().unwrap()).as_deref(),
        Some("secure.test")
    );
    // No SRV: the name's addresses on 5061.
    assert_eq!(
        targets(&loc, "sips:bob@plain.test", &with_tls()).await,
        ["tls:192.0.2.31:5061"]
    );
    assert_eq!(
        targets(&loc, "sips:bob@192.0.2.1", &with_tls()).await,
        ["tls:192.0.2.1:5061"]
    );
    // A sip: URI is not upgraded by a SIPS NAPTR: it follows SIP+D2U.
    assert_eq!(
        targets(&loc, "sip:bob@secure.test", &with_tls()).await,
        ["udp:192.0.2.30:5060"]
    );
    // transport=tls on a sip: URI: TLS, 5061 by default; outgoing TLS needs no tls:
    // listener (Via then names our TCP address).
    assert_eq!(
        targets(&loc, "sip:bob@192.0.2.1;transport=tls", &with_tls()).await,
        ["tls:192.0.2.1:5061"]
    );
    assert_eq!(
        targets(&loc, "sips:bob@192.0.2.1", &local()).await,
        ["tls:192.0.2.1:5061"]
    );
    let via = local().via(&Target {
        transport: TransportKind::Tls,
        addr: "192.0.2.1:5061".parse().unwrap(),
        connection: None,
    });
    assert_eq!(
        via.to_string().split(';').next().unwrap(),
        "SIP/2.0/TLS 127.0.0.1:5060"
    );
}
