//! Calls across transports through the whole server (issue 17): phones over WebSocket,
//! secure WebSocket and TLS register, are called from a UDP phone (SIPp) and call it; the
//! outgoing leg's transport comes from the registered flow, a `transport=tls` target or
//! `sips:`; a WebSocket phone's bindings go when its connection closes; a `sips:` call
//! that cannot be secured fails with 480. Certificates come from a test CA.

mod common;

use common::certs::TestCa;
use common::sipp::{self, SeenMessage};
use common::{header, start_with, test_config, TestServer};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use strowger::transport::TransportKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(10);
const LIMIT: Duration = Duration::from_secs(30);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A phone's connection: one SIP message per WebSocket message, or a framed byte stream.
enum Link {
    Ws(Box<WebSocketStream<Box<dyn Io>>>),
    Stream(Box<dyn Io>, Vec<u8>),
}

impl Link {
    async fn send(&mut self, msg: &str) {
        match self {
            Link::Ws(ws) => ws.send(Message::text(msg.to_string())).await.unwrap(),
            Link::Stream(s, _) => s.write_all(msg.as_bytes()).await.unwrap(),
        }
    }

    /// The next SIP message, or `None` when the connection ends or nothing comes in time.
    async fn recv(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self {
                Link::Ws(ws) => match timeout(left, ws.next()).await.ok()?? {
                    Ok(Message::Text(t)) => return Some(t.as_str().to_string()),
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                },
                Link::Stream(s, buf) => {
                    if let Some(n) = framed(buf) {
                        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                        buf.drain(..n);
                        return Some(msg);
                    }
                    let mut chunk = [0u8; 4096];
                    let n = timeout(left, s.read(&mut chunk)).await.ok()?.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
}

/// The length of the first whole message in a stream buffer (RFC 3261 18.3).
fn framed(buf: &[u8]) -> Option<usize> {
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..head]);
    let len = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            let name = name.trim();
            (name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l"))
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head + len).then_some(head + len)
}

/// A raw SIP phone on one connection (the dialogs it takes part in are simple enough to
/// write out by hand).
struct Phone {
    link: Link,
    user: &'static str,
    /// Via transport: WS, WSS or TLS.
    via: &'static str,
    /// Contact host (RFC 7118 5: a WebSocket client's is a `.invalid` name).
    host: &'static str,
    seq: u32,
}

fn branch() -> String {
    format!("z9hG4bK{}", common::unique("b").replace('-', ""))
}

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

impl Phone {
    fn contact(&self) -> String {
        format!(
            "<sip:{}@{};transport={}>",
            self.user,
            self.host,
            self.via.to_ascii_lowercase()
        )
    }

    fn request(
        &mut self,
        method: &str,
        ruri: &str,
        to: &str,
        call_id: &str,
        extra: &str,
        body: &str,
    ) -> String {
        self.seq += 1;
        format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={}\r\nMax-Forwards: 70\r\n\
             From: <sip:{}@strowger.test>;tag={}tag\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
             CSeq: {} {method}\r\nContact: {}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            self.via,
            self.host,
            branch(),
            self.user,
            self.user,
            self.seq,
            self.contact(),
            body.len()
        )
    }

    /// The next message that is not a provisional response.
    async fn next_final(&mut self) -> String {
        loop {
            let m = self.link.recv(WAIT).await.expect("a message in time");
            if !(m.starts_with("SIP/2.0 1")) {
                return m;
            }
        }
    }

    async fn register(&mut self, expires: u32) -> String {
        let call_id = format!("reg-{}", self.user);
        let to = format!("<sip:{}@strowger.test>", self.user);
        let req = self.request(
            "REGISTER",
            "sip:strowger.test",
            &to,
            &call_id,
            &format!("Expires: {expires}\r\n"),
            "",
        );
        self.link.send(&req).await;
        self.next_final().await
    }

    /// Answers the INVITE that comes next (180, 200 with SDP), takes the ACK, then answers
    /// the BYE that ends the call.
    async fn answer_then_take_bye(&mut self) -> String {
        let invite = self.link.recv(WAIT).await.expect("INVITE");
        assert!(invite.starts_with("INVITE "), "{invite}");
        self.link.send(&response(&invite, 180, "", "")).await;
        let contact = format!(
            "Contact: {}\r\nContent-Type: application/sdp\r\n",
            self.contact()
        );
        self.link.send(&response(&invite, 200, &contact, SDP)).await;
        let ack = self.link.recv(WAIT).await.expect("ACK");
        assert!(ack.starts_with("ACK "), "{ack}");
        let bye = self.link.recv(WAIT).await.expect("BYE");
        assert!(bye.starts_with("BYE "), "{bye}");
        self.link.send(&response(&bye, 200, "", "")).await;
        invite
    }

    /// Calls `user` at the server: INVITE with SDP, the final answer; when 200, ACK, a
    /// moment of call, then BYE and its 200. Returns the final status.
    async fn call(&mut self, user: &str) -> u16 {
        let call_id = common::unique("call");
        let ruri = format!("sip:{user}@strowger.test");
        let to = format!("<{ruri}>");
        let req = self.request(
            "INVITE",
            &ruri,
            &to,
            &call_id,
            "Content-Type: application/sdp\r\n",
            SDP,
        );
        self.link.send(&req).await;
        let fin = self.next_final().await;
        let status = common::status(&fin);
        let to = header(&fin, "To").unwrap().to_string();
        if status != 200 {
            // The ACK of a failure is hop by hop (RFC 3261 17.1.1.3): same branch; a
            // server over a reliable transport does not need it to stop retransmitting.
            return status;
        }
        let target = header(&fin, "Contact")
            .map(|c| {
                c.trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .unwrap();
        let seq = self.seq;
        let ack = self.request("ACK", &target, &to, &call_id, "", "").replace(
            &format!("CSeq: {} ACK", self.seq),
            &format!("CSeq: {seq} ACK"),
        );
        self.seq = seq;
        self.link.send(&ack).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bye = self.request("BYE", &target, &to, &call_id, "", "");
        self.link.send(&bye).await;
        let ok = self.next_final().await;
        assert_eq!(common::status(&ok), 200, "{ok}");
        status
    }
}

/// A response to `req` with its Via, From, To (tagged), Call-ID and CSeq.
fn response(req: &str, code: u16, extra: &str, body: &str) -> String {
    let reason = match code {
        180 => "Ringing",
        200 => "OK",
        _ => "Whatever",
    };
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for line in req.split("\r\n").skip(1) {
        let name = line.split(':').next().unwrap_or("").trim();
        if ["via", "from", "call-id", "cseq"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            out.push_str(line);
            out.push_str("\r\n");
        } else if name.eq_ignore_ascii_case("to") {
            out.push_str(line);
            if !line.contains(";tag=") {
                out.push_str(";tag=phone1");
            }
            out.push_str("\r\n");
        }
    }
    out.push_str(extra);
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out
}

struct Setup {
    server: TestServer,
    dir: PathBuf,
    ca: TestCa,
    _certs: tempfile::TempDir,
    /// A UDP phone (SIPp) the dial plan sends `bob` to.
    bob: u16,
}

/// A server with `listen`, a certificate from the test CA (which it also trusts for
/// outgoing TLS), and a dial plan: `bob` to the SIPp phone, `tlspeer` to `peer` over TLS,
/// `insecure` to bob as sips:, anyone else to their registered phones.
async fn setup(tag: &str, listen: &[&str], peer: Option<SocketAddr>) -> Setup {
    setup_with(tag, listen, peer, |_, _| {}).await
}

/// [`setup`], with a last change to the configuration (given the test CA).
async fn setup_with(
    tag: &str,
    listen: &[&str],
    peer: Option<SocketAddr>,
    change: impl FnOnce(&mut strowger::config::Config, &TestCa),
) -> Setup {
    let dir = sipp::workdir(tag);
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path());
    let pair = ca.issue("server", &["localhost", "127.0.0.1"]);
    let bob = sipp::free_udp_port();
    let peer = peer.map_or("127.0.0.1:9".to_string(), |p| p.to_string());
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "bob" then
    call:dial("sip:bob@127.0.0.1:{bob}", {{ timeout = 10 }})
  elseif u == "tlspeer" then
    call:dial("sip:peer@{peer};transport=tls", {{ timeout = 10 }})
  elseif u == "trunk" or u == "nocert" then
    local r = call:dial({{ trunk = u, user = "+15551234" }}, {{ timeout = 10 }})
    if not r.answered then call:reject(r.status, r.reason) end
  elseif u == "insecure" then
    local r = call:dial("sips:bob@127.0.0.1:{bob};transport=udp", {{ timeout = 10 }})
    call:reject(r.status, r.reason)
  else
    local devices = registrar.lookup("sip:" .. u .. "@strowger.test")
    if #devices == 0 then return call:reject(404, "Not Found") end
    call:dial(devices, {{ timeout = 10 }})
  end
end
"#
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.sip.listen = listen.iter().map(|s| s.to_string()).collect();
    config.script.path = plan.display().to_string();
    config.tls.cert = pair.cert.display().to_string();
    config.tls.key = pair.key.display().to_string();
    config.tls.ca = ca.cert.display().to_string();
    change(&mut config, &ca);
    let server = start_with(config).await;
    Setup {
        server,
        dir,
        ca,
        _certs: certs,
        bob,
    }
}

async fn ws_phone(addr: SocketAddr, secure: Option<&TestCa>, user: &'static str) -> Phone {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (stream, scheme, via): (Box<dyn Io>, _, _) = match secure {
        Some(ca) => (Box::new(tls_connect(ca, tcp).await), "wss", "WSS"),
        None => (Box::new(tcp), "ws", "WS"),
    };
    let mut req = format!("{scheme}://{addr}/").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "sip".parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    Phone {
        link: Link::Ws(Box::new(ws)),
        user,
        via,
        host: "df7jal23ls0d.invalid",
        seq: 0,
    }
}

async fn tls_connect(ca: &TestCa, tcp: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

async fn tls_phone(addr: SocketAddr, ca: &TestCa, user: &'static str) -> Phone {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let tls = tls_connect(ca, tcp).await;
    Phone {
        link: Link::Stream(Box::new(tls), Vec::new()),
        user,
        via: "TLS",
        // Leaked once per test: the phone's own address as its Contact host.
        host: Box::leak(local.to_string().into_boxed_str()),
        seq: 0,
    }
}

fn addr(s: &Setup, kind: TransportKind) -> SocketAddr {
    s.server.handle.addr(kind).expect("bound")
}

/// SIPp calling `user` at the server from UDP.
fn udp_caller(s: &Setup, user: &str) -> sipp::Sipp {
    sipp::start(
        &s.dir,
        "caller",
        Path::new("uac_call.xml"),
        sipp::free_udp_port(),
        Some(s.server.udp),
        &["-s", user, "-d", "300"],
    )
}

fn udp_bob(s: &Setup) -> sipp::Sipp {
    sipp::start(&s.dir, "bob", Path::new("uas_answer.xml"), s.bob, None, &[])
}

fn kinds(seen: &[SeenMessage]) -> Vec<String> {
    seen.iter().filter(|m| !m.sent).map(|m| m.kind()).collect()
}

async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// A WebSocket (`ws:`, then `wss:`) phone registers, is called from UDP and calls UDP; its
/// binding goes when its connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_phones_call_udp_phones_and_back() {
    let s = setup(
        "ws-calls",
        &[
            "udp:127.0.0.1:0",
            "tcp:127.0.0.1:0",
            "ws:127.0.0.1:0",
            "wss:127.0.0.1:0",
        ],
        None,
    )
    .await;
    for secure in [false, true] {
        let (kind, ca) = if secure {
            (TransportKind::Wss, Some(&s.ca))
        } else {
            (TransportKind::Ws, None)
        };
        let mut alice = ws_phone(addr(&s, kind), ca, "alice").await;
        let ok = alice.register(300).await;
        assert_eq!(common::status(&ok), 200, "{ok}");
        assert_eq!(
            s.server
                .handle
                .registrar()
                .lookup("sip:alice@strowger.test")
                .len(),
            1
        );

        // UDP -> WebSocket: the INVITE reaches alice over her own connection.
        let caller = udp_caller(&s, "alice");
        let invite = alice.answer_then_take_bye().await;
        assert!(
            invite.contains(&format!("SIP/2.0/{}", kind.to_string().to_uppercase())),
            "{invite}"
        );
        let seen = caller.expect_success(LIMIT).await;
        assert!(
            kinds(&seen).contains(&"200".to_string()),
            "{:?}",
            kinds(&seen)
        );

        // WebSocket -> UDP.
        let bob = udp_bob(&s);
        assert_eq!(alice.call("bob").await, 200);
        let seen = bob.expect_success(LIMIT).await;
        assert_eq!(kinds(&seen), ["INVITE", "ACK", "BYE"]);

        // The connection closes: the binding goes (RFC 7118 5), and a call to alice
        // finds nobody.
        drop(alice);
        let registrar = s.server.handle.registrar().clone();
        assert!(
            eventually(WAIT, || registrar
                .lookup("sip:alice@strowger.test")
                .is_empty())
            .await,
            "binding kept after the WebSocket closed ({kind})"
        );
    }
    let m = strowger::admin::get(s.server.handle.admin_addr(), "/metrics")
        .await
        .unwrap();
    for needle in [
        r#"strowger_transport_messages_total{direction="in",transport="ws"}"#,
        r#"strowger_transport_messages_total{direction="out",transport="wss"}"#,
        r#"strowger_transport_connections{transport="ws"} 0"#,
        r#"strowger_transport_handshakes_failed_total{reason="failed",transport="wss"} 0"#,
    ] {
        assert!(m.contains(needle), "{needle} missing from\n{m}");
    }
}

/// A TLS phone registers and calls a UDP phone and a TLS peer (the outgoing leg over
/// TLS, verified against the test CA); a `sips:` dial over UDP is refused with 480.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_phone_calls_udp_and_a_tls_peer() {
    // The TLS peer: a raw UAS presenting a certificate for 127.0.0.1 from the same CA
    // (made before the server so that its address can go into the dial plan).
    let peer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer_listener.local_addr().unwrap();
    let s = setup(
        "tls-calls",
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0", "tls:127.0.0.1:0"],
        Some(peer_addr),
    )
    .await;
    let pair = s.ca.issue("peer", &["127.0.0.1"]);
    let acceptor = tls_acceptor(&pair);
    let peer = tokio::spawn(async move {
        let (tcp, _) = peer_listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut phone = Phone {
            link: Link::Stream(Box::new(tls), Vec::new()),
            user: "peer",
            via: "TLS",
            host: "127.0.0.1",
            seq: 0,
        };
        phone.answer_then_take_bye().await
    });

    let mut alice = tls_phone(addr(&s, TransportKind::Tls), &s.ca, "alice").await;
    let ok = alice.register(300).await;
    assert_eq!(common::status(&ok), 200, "{ok}");

    // TLS -> UDP.
    let bob = udp_bob(&s);
    assert_eq!(alice.call("bob").await, 200);
    let seen = bob.expect_success(LIMIT).await;
    assert_eq!(kinds(&seen), ["INVITE", "ACK", "BYE"]);

    // UDP -> TLS, over alice's registered connection.
    let caller = udp_caller(&s, "alice");
    let invite = alice.answer_then_take_bye().await;
    assert!(invite.contains("SIP/2.0/TLS"), "{invite}");
    caller.expect_success(LIMIT).await;

    // TLS -> a TLS peer the server connects to (transport=tls).
    assert_eq!(alice.call("tlspeer").await, 200);
    let invite = timeout(LIMIT, peer).await.unwrap().unwrap();
    assert!(invite.contains("SIP/2.0/TLS"), "{invite}");
    // Our Contact on a TLS leg of a sip: call names the transport (a sips: URI only in a
    // sips: dialog, RFC 3261 12.1.1).
    assert!(
        header(&invite, "Contact")
            .unwrap()
            .contains(";transport=tls"),
        "{invite}"
    );

    // sips: over UDP cannot be secured.
    assert_eq!(alice.call("insecure").await, 480);
}

/// Mutual TLS towards a trunk: the carrier asks for a client certificate from the test CA;
/// the trunk with `tls_cert`/`tls_key` gets through, one without is refused at the
/// handshake and its call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_over_mutual_tls() {
    let with_cert = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let without = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (
        with_cert.local_addr().unwrap(),
        without.local_addr().unwrap(),
    );
    let s = setup_with(
        "mtls",
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0", "tls:127.0.0.1:0"],
        None,
        |config, ca| {
            let client = ca.issue("pbx-client", &["pbx.strowger.test"]);
            config.trunks.insert(
                "trunk".into(),
                strowger::trunk::TrunkConfig {
                    uri: format!("sip:{a};transport=tls"),
                    tls_cert: client.cert.display().to_string(),
                    tls_key: client.key.display().to_string(),
                    ..Default::default()
                },
            );
        },
    )
    .await;
    let pair = s.ca.issue("carrier", &["127.0.0.1"]);
    let acceptor = tls_acceptor_requiring_clients(&pair, &s.ca);
    let carrier = {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let (tcp, _) = with_cert.accept().await.unwrap();
            let tls = acceptor
                .accept(tcp)
                .await
                .expect("the trunk's certificate accepted");
            let mut phone = Phone {
                link: Link::Stream(Box::new(tls), Vec::new()),
                user: "carrier",
                via: "TLS",
                host: "127.0.0.1",
                seq: 0,
            };
            phone.answer_then_take_bye().await
        })
    };
    let refused = tokio::spawn(async move {
        let (tcp, _) = without.accept().await.unwrap();
        acceptor.accept(tcp).await.is_err()
    });

    let mut alice = tls_phone(addr(&s, TransportKind::Tls), &s.ca, "alice").await;
    assert_eq!(common::status(&alice.register(300).await), 200);
    assert_eq!(alice.call("trunk").await, 200);
    let invite = timeout(LIMIT, carrier).await.unwrap().unwrap();
    assert!(invite.contains("+15551234@"), "{invite}");

    // Another server, trusting the carrier's CA but with no client certificate for it (a
    // server's identities go by the peer's name: the first server would present its own).
    let ca = s.ca.cert.clone();
    let s2 = setup_with(
        "mtls-none",
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0", "tls:127.0.0.1:0"],
        None,
        |config, _| {
            config.tls.ca = ca.display().to_string();
            config.trunks.insert(
                "nocert".into(),
                strowger::trunk::TrunkConfig {
                    uri: format!("sip:{b};transport=tls"),
                    ..Default::default()
                },
            );
        },
    )
    .await;
    let mut bob = tls_phone(addr(&s2, TransportKind::Tls), &s2.ca, "bob").await;
    assert_eq!(common::status(&bob.register(300).await), 200);
    // Refused at the handshake: the call fails at once (the request was never delivered:
    // RFC 3261 8.1.3.1), not after Timer B.
    let started = std::time::Instant::now();
    let status = bob.call("nocert").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        timeout(LIMIT, refused).await.unwrap().unwrap(),
        "handshake without a client certificate accepted"
    );
    assert!(
        status >= 500,
        "a call over a refused TLS trunk got {status}"
    );
}

/// A TLS acceptor that requires a client certificate issued by `ca`.
fn tls_acceptor_requiring_clients(
    pair: &common::certs::Pair,
    ca: &TestCa,
) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&pair.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&pair.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca.cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

fn tls_acceptor(pair: &common::certs::Pair) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&pair.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&pair.key).unwrap();
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// A baresip process (Debian's baresip-core), killed with its process group when dropped.
struct Baresip {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

impl Baresip {
    fn command(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        // Only what this test started: its process group (baresip has no children, but
        // a group kill is the same either way).
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is
        // shared with it.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// baresip with `conf` (which holds its `accounts`) given a fresh `config`: SIP on a run
/// of two ports below the ephemeral range (UDP and TCP on the first, TLS on the next),
/// trusting `ca`, its output in `log` (truncated).
fn start_baresip(conf: &std::path::Path, ca: &std::path::Path, log: &std::path::Path) -> Baresip {
    let sip_port = common::free_port_run(2);
    let rtp = sipp::free_udp_port();
    std::fs::write(
        conf.join("config"),
        format!(
            "poll_method epoll\n\
             sip_listen 127.0.0.1:{sip_port}\n\
             sip_cafile {ca}\n\
             audio_player aufile,/dev/null\n\
             audio_source ausine,440\n\
             audio_alert aufile,/dev/null\n\
             ausrc_srate 48000\nauplay_srate 48000\nausrc_channels 2\n\
             rtp_ports {rtp}-{rtp_end}\n\
             module_path /usr/lib/baresip/modules\n\
             module stdio.so\nmodule g711.so\nmodule ausine.so\nmodule aufile.so\n\
             module_app account.so\nmodule_app menu.so\n",
            ca = ca.display(),
            rtp_end = rtp.saturating_add(20),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(log).unwrap();
    let mut child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("baresip")
            .args(["-4", "-n", "127.0.0.1", "-t", "60", "-f"])
            .arg(conf)
            .stdin(std::process::Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let stdin = child.stdin.take().unwrap();
    Baresip { child, stdin }
}

/// A real softphone (baresip) registers over TLS, verifying the server against the test
/// CA, is called from a UDP phone and calls one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_softphone_registers_and_calls_over_tls() {
    if std::process::Command::new("baresip")
        .arg("-h")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: no `baresip` binary (apt-get install baresip-core)");
        return;
    }
    let s = setup(
        "baresip",
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0", "tls:127.0.0.1:0"],
        None,
    )
    .await;
    let tls = addr(&s, TransportKind::Tls);
    let conf = s.dir.join("baresip");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("accounts"),
        format!(
            "<sip:alice@strowger.test;transport=tls>;outbound=\"sip:{tls};transport=tls\";regint=300;answermode=auto\n"
        ),
    )
    .unwrap();
    let log_text = || std::fs::read_to_string(s.dir.join("baresip.log")).unwrap_or_default();
    // A port checked free can still be taken before baresip binds it (CI saw its TLS
    // port, SIP port + 1, in use): start it again on other ports, at most three times.
    let mut phone = None;
    for _ in 0..3 {
        let started = start_baresip(&conf, &s.ca.cert, &s.dir.join("baresip.log"));
        let mut bound = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let text = log_text();
            if text.contains("Address already in use") {
                break;
            }
            if !s
                .server
                .handle
                .registrar()
                .lookup("sip:alice@strowger.test")
                .is_empty()
            {
                bound = true;
                break;
            }
        }
        if bound || !log_text().contains("Address already in use") {
            phone = Some(started);
            break;
        }
        drop(started);
    }
    let mut phone = phone.unwrap_or_else(|| panic!("baresip found no free port:\n{}", log_text()));
    let registrar = s.server.handle.registrar().clone();
    assert!(
        eventually(WAIT, || !registrar
            .lookup("sip:alice@strowger.test")
            .is_empty())
        .await,
        "baresip did not register over TLS:\n{}",
        log_text()
    );
    let binding = &registrar.lookup("sip:alice@strowger.test")[0];
    assert!(binding.source.starts_with("tls:"), "{}", binding.source);

    // UDP -> baresip (it answers by itself), the caller hangs up.
    let caller = udp_caller(&s, "alice");
    let seen = caller.expect_success(LIMIT).await;
    assert!(
        kinds(&seen).contains(&"200".to_string()),
        "{:?}\n{}",
        kinds(&seen),
        log_text()
    );

    // baresip -> UDP: dial, wait for the call to be up, hang up.
    let bob = udp_bob(&s);
    phone.command("/dial sip:bob@strowger.test");
    let handle = &s.server.handle;
    assert!(
        eventually(WAIT, || handle.active_calls() == 1
            && log_text().contains("Call established: sip:bob@"))
        .await,
        "the call from baresip did not come up:\n{}",
        log_text()
    );
    phone.command("/hangup");
    let seen = bob.expect_success(LIMIT).await;
    assert_eq!(kinds(&seen), ["INVITE", "ACK", "BYE"], "{}", log_text());
    drop(phone);
}
