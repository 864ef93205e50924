//! RFC 3263 server location against a real DNS server: dnsmasq (Debian's `dnsmasq-base`,
//! installed by tests/setup-and-run.sh) on 127.0.0.1 with a port chosen at run time,
//! serving NAPTR, SRV and A records, asked by the locator's hickory resolver. Without
//! dnsmasq each test says it is skipped and why, and passes.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strowger::sip::Uri;
use strowger::transport::config::DnsConfig;
use strowger::transport::{LocalAddrs, Locator, ResolveError, TransportKind};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A dnsmasq process, killed (by its PID) when dropped.
struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts dnsmasq answering only from `records` (its `--naptr-record`, `--srv-host`,
/// `--host-record` options) for `example.test`, or `None` when it is not installed.
fn dnsmasq(records: &[&str]) -> Option<Dnsmasq> {
    if !Path::new(DNSMASQ).exists() {
        eprintln!(
            "skipped: {DNSMASQ} not found (install the dnsmasq-base package; \
             tests/setup-and-run.sh does)"
        );
        return None;
    }
    // A free port (UDP and TCP: dnsmasq listens on both), let go; dnsmasq takes it right
    // after.
    let port = common::free_udp_and_tcp_port();
    let child = Command::new(DNSMASQ)
        .args([
            "-k",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={port}"),
            "--pid-file=",
            // Names in the zone that have no record: NXDOMAIN (not REFUSED for want of
            // an upstream server).
            "--local=/example.test/",
        ])
        .args(records)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dnsmasq");
    let mut server = Dnsmasq { child, port };
    // Ready when it accepts on its TCP port (binding the port to see whether it is taken
    // could take it from dnsmasq at the wrong moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = server.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = server.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("dnsmasq exited ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not bind port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

fn locator(dns: &Dnsmasq) -> Arc<Locator> {
    let config = DnsConfig {
        servers: vec![format!("127.0.0.1:{}", dns.port)],
        timeout_ms: 1000,
    };
    Arc::new(Locator::new(&config).unwrap())
}

fn local(locator: Arc<Locator>) -> LocalAddrs {
    LocalAddrs::new(vec![
        (TransportKind::Udp, "127.0.0.1:5060".parse().unwrap()),
        (TransportKind::Tcp, "127.0.0.1:5060".parse().unwrap()),
    ])
    .with_locator(locator)
}

async fn targets(local: &LocalAddrs, uri: &str) -> Vec<String> {
    local
        .locate(&Uri::parse(uri).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{uri}: {e}"))
        .iter()
        .map(|t| format!("{}:{}", t.transport, t.addr))
        .collect()
}

#[tokio::test]
async fn naptr_to_srv_to_a_in_priority_order() {
    let Some(dns) = dnsmasq(&[
        "--naptr-record=example.test,10,10,S,SIP+D2U,,_sip._udp.example.test",
        // A service we do not speak, ordered first: skipped.
        "--naptr-record=example.test,5,10,S,SIPS+D2T,,_sips._tcp.example.test",
        // Listed lowest priority first so that the order is the locator's, not dnsmasq's.
        "--srv-host=_sip._udp.example.test,backup.example.test,5080,20,0",
        "--srv-host=_sip._udp.example.test,main.example.test,5070,10,0",
        "--srv-host=_sips._tcp.example.test,main.example.test,5061,10,0",
        "--host-record=main.example.test,192.0.2.10",
        "--host-record=backup.example.test,192.0.2.20",
    ]) else {
        return;
    };
    let local = local(locator(&dns));
    assert_eq!(
        targets(&local, "sip:alice@example.test").await,
        ["udp:192.0.2.10:5070", "udp:192.0.2.20:5080"]
    );
    // The first target is what `resolve` gives the callers that do not fail over yet.
    let first =
        strowger::transport::resolve(&Uri::parse("sip:alice@example.test").unwrap(), &local)
            .await
            .unwrap();
    assert_eq!(first.addr.to_string(), "192.0.2.10:5070");
}

#[tokio::test]
async fn srv_without_naptr_udp_then_tcp() {
    let Some(dns) = dnsmasq(&[
        "--srv-host=_sip._tcp.srv.example.test,t.example.test,5071,10,0",
        "--srv-host=_sip._udp.srv.example.test,u.example.test,5070,10,0",
        "--host-record=t.example.test,192.0.2.2",
        "--host-record=u.example.test,192.0.2.1",
    ]) else {
        return;
    };
    let local = local(locator(&dns));
    assert_eq!(
        targets(&local, "sip:bob@srv.example.test").await,
        ["udp:192.0.2.1:5070", "tcp:192.0.2.2:5071"]
    );
    assert_eq!(
        targets(&local, "sip:bob@srv.example.test;transport=tcp").await,
        ["tcp:192.0.2.2:5071"]
    );
}

#[tokio::test]
async fn a_record_only_and_explicit_port() {
    let Some(dns) = dnsmasq(&[
        "--host-record=plain.example.test,192.0.2.30",
        // SRV for a name dialled with a port: must not be used (RFC 3263 4.2).
        "--srv-host=_sip._udp.plain.example.test,other.example.test,5999,10,0",
        "--host-record=other.example.test,192.0.2.99",
        "--host-record=bare.example.test,192.0.2.31",
    ]) else {
        return;
    };
    let local = local(locator(&dns));
    assert_eq!(
        targets(&local, "sip:carol@bare.example.test").await,
        ["udp:192.0.2.31:5060"]
    );
    assert_eq!(
        targets(&local, "sip:carol@plain.example.test:5090").await,
        ["udp:192.0.2.30:5090"]
    );
    assert_eq!(
        targets(&local, "sip:carol@plain.example.test:5090;transport=tcp").await,
        ["tcp:192.0.2.30:5090"]
    );
}

#[tokio::test]
async fn unknown_name_is_unresolvable() {
    let Some(dns) = dnsmasq(&["--host-record=known.example.test,192.0.2.40"]) else {
        return;
    };
    let local = local(locator(&dns));
    let e = local
        .locate(&Uri::parse("sip:dave@nobody.example.test").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ResolveError::Unresolvable(ref name) if name == "nobody.example.test"),
        "{e}"
    );
}

#[tokio::test]
async fn dead_server_names_the_query() {
    // A port nothing answers on (refused or timed out): the error names the query.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = DnsConfig {
        servers: vec![format!("127.0.0.1:{port}")],
        timeout_ms: 100,
    };
    let local = local(Arc::new(Locator::new(&config).unwrap()));
    let e = local
        .locate(&Uri::parse("sip:erin@example.test").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ResolveError::Lookup { ref query, .. } if query == "NAPTR example.test"),
        "{e}"
    );
}

/// End to end (issue 16): a trunk whose carrier publishes NAPTR and SRV with two targets of
/// different priority; the first does not answer (nothing listens there), so the INVITE
/// times out (64*T1 with T1 = 20 ms) and goes to the second, which answers (RFC 3263 4.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_fails_over_to_the_next_srv_target() {
    use common::sipp;
    let dead = sipp::free_udp_port();
    let live = sipp::free_udp_port();
    let Some(dns) = dnsmasq(&[
        "--naptr-record=example.test,10,10,S,SIP+D2U,,_sip._udp.example.test",
        &format!("--srv-host=_sip._udp.example.test,main.example.test,{dead},10,0"),
        &format!("--srv-host=_sip._udp.example.test,backup.example.test,{live},20,0"),
        "--host-record=main.example.test,127.0.0.1",
        "--host-record=backup.example.test,127.0.0.1",
    ]) else {
        return;
    };
    let dir = sipp::workdir("dns-failover");
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        "function on_invite(call)\n  call:dial({ trunk = \"carrier\", user = call.ruri.user })\nend\n",
    )
    .unwrap();
    let mut config = common::test_config();
    config.script.path = plan.display().to_string();
    config.sip.timers.t1_ms = 20;
    config.dns.servers = vec![format!("127.0.0.1:{}", dns.port)];
    config.trunks.insert(
        "carrier".into(),
        strowger::trunk::TrunkConfig {
            uri: "sip:example.test".into(),
            ..Default::default()
        },
    );
    let server = common::start_with(config).await;
    let callee = sipp::start(&dir, "backup", Path::new("uas_answer.xml"), live, None, &[]);
    let caller = sipp::start(
        &dir,
        "caller",
        Path::new("uac_call.xml"),
        sipp::free_udp_port(),
        Some(server.udp),
        &["-s", "+15551234", "-d", "300"],
    );
    caller.expect_success(Duration::from_secs(40)).await;
    let seen = callee.expect_success(Duration::from_secs(40)).await;
    let invite = seen
        .iter()
        .find(|m| !m.sent && m.kind() == "INVITE")
        .expect("the backup target got the INVITE");
    assert!(
        invite
            .first_line()
            .starts_with("INVITE sip:+15551234@example.test "),
        "{}",
        invite.first_line()
    );
}
