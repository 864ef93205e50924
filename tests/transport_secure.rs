//! TLS, WebSocket and secure WebSocket transports (issue 17) over real loopback sockets,
//! with certificates from a test CA: delivery with the connection, answers over the same
//! connection, outgoing TLS that verifies the peer (a wrong name and an expired certificate
//! refused), the WebSocket upgrade (subprotocol, origins), pings, the handshake timeout and
//! bound, and the connection-closed notice.

mod common;

use bytes::Bytes;
use common::certs::TestCa;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use strowger::sip::SipMessage;
use strowger::transport::tls::TlsFiles;
use strowger::transport::{
    Inbound, InboundSink, ListenAddr, Sender, Target, TlsContext, TransportKind, TransportLimits,
    Transports,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

enum Event {
    In(Box<Inbound>),
    Closed(Target),
}

struct ChannelSink(mpsc::UnboundedSender<Event>);

impl InboundSink for ChannelSink {
    fn deliver(&self, inbound: Inbound) {
        let _ = self.0.send(Event::In(Box::new(inbound)));
    }
    fn connection_closed(&self, connection: Target) {
        let _ = self.0.send(Event::Closed(connection));
    }
}

fn options(via: &str, call_id: &str) -> String {
    format!(
        "OPTIONS sip:server@127.0.0.1 SIP/2.0\r\n\
         Via: {via}\r\n\
         From: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:server@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    ca: TestCa,
    tls: Arc<TlsContext>,
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a TLS context trusting the
/// CA for outgoing connections.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let server = ca.issue("server", &["localhost", "127.0.0.1"]);
    let tls = TlsContext::load(TlsFiles {
        cert: server.cert,
        key: server.key,
        ca: Some(ca.cert.clone()),
    })
    .unwrap();
    Setup {
        _dir: dir,
        ca,
        tls: Arc::new(tls),
    }
}

async fn start(
    listen: &[&str],
    limits: TransportLimits,
) -> (Transports, mpsc::UnboundedReceiver<Event>) {
    let listen: Vec<ListenAddr> = listen.iter().map(|s| s.parse().unwrap()).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let t = Transports::bind(&listen, limits, Arc::new(ChannelSink(tx)))
        .await
        .unwrap();
    (t, rx)
}

fn limits(tls: &Arc<TlsContext>) -> TransportLimits {
    TransportLimits {
        tls: Some(tls.clone()),
        ..TransportLimits::default()
    }
}

fn addr_of(t: &Transports, kind: TransportKind) -> SocketAddr {
    t.local_addrs()
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, a)| a)
        .unwrap()
}

async fn next_inbound(rx: &mut mpsc::UnboundedReceiver<Event>) -> Inbound {
    loop {
        match timeout(WAIT, rx.recv()).await.expect("delivery in time") {
            Some(Event::In(i)) => return *i,
            Some(Event::Closed(_)) => continue,
            None => panic!("sink closed"),
        }
    }
}

async fn next_closed(rx: &mut mpsc::UnboundedReceiver<Event>) -> Target {
    loop {
        match timeout(WAIT, rx.recv())
            .await
            .expect("close notice in time")
        {
            Some(Event::Closed(t)) => return t,
            Some(Event::In(_)) => continue,
            None => panic!("sink closed"),
        }
    }
}

fn call_id(inb: &Inbound) -> String {
    match &inb.message {
        Ok(SipMessage::Request(r)) => r.base.call_id.clone(),
        other => panic!("expected a request, got {other:?}"),
    }
}

async fn tls_client(ca: &TestCa, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn tls_requests_arrive_with_their_connection_and_answers_go_back_on_it() {
    let s = setup();
    let (t, mut rx) = start(&["tls:127.0.0.1:0"], limits(&s.tls)).await;
    let local = addr_of(&t, TransportKind::Tls);
    let mut client = tls_client(&s.ca, local).await;
    client
        .write_all(options("SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKt1", "tls1").as_bytes())
        .await
        .unwrap();
    let inb = next_inbound(&mut rx).await;
    assert_eq!(call_id(&inb), "tls1");
    assert_eq!(inb.source.transport, TransportKind::Tls);
    assert!(inb.source.connection.is_some());
    t.send(
        &inb.source,
        Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    )
    .unwrap();
    let mut buf = vec![0u8; 200];
    let n = timeout(WAIT, client.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"SIP/2.0 200 OK"));
    let stats = t.stats();
    let tls = stats
        .per_transport
        .iter()
        .find(|(k, _)| *k == TransportKind::Tls)
        .unwrap()
        .1;
    assert_eq!((tls.connections_open, tls.received, tls.sent), (1, 1, 1));
    // The peer goes: the sink hears of it, with the connection it had.
    drop(client);
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed, inb.source);
    t.shutdown();
}

#[tokio::test]
async fn outgoing_tls_verifies_the_peer_and_refuses_a_wrong_or_expired_certificate() {
    let s = setup();
    let (ours, _ours_rx) = start(&["tls:127.0.0.1:0"], limits(&s.tls)).await;
    // A TLS peer with a good certificate for 127.0.0.1.
    let (peer, mut peer_rx) = start(&["tls:127.0.0.1:0"], limits(&s.tls)).await;
    let target = Target {
        transport: TransportKind::Tls,
        addr: addr_of(&peer, TransportKind::Tls),
        connection: None,
    };
    ours.send(
        &target,
        Bytes::from(options(
            "SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKo1",
            "out1",
        )),
    )
    .unwrap();
    let inb = next_inbound(&mut peer_rx).await;
    assert_eq!(call_id(&inb), "out1");
    assert_eq!(inb.source.transport, TransportKind::Tls);

    // Peers whose certificates do not verify: another name, and one that has expired.
    for (stem, names, from, until) in [
        ("wrong", &["elsewhere.test"][..], 2020, 2099),
        ("expired", &["127.0.0.1"][..], 2010, 2011),
    ] {
        let pair = s.ca.issue_dated(stem, names, from, until);
        // A bare rustls server (our own TlsContext refuses to load an expired certificate).
        let (addr, crossed) = raw_tls_peer(&pair).await;
        let target = Target {
            transport: TransportKind::Tls,
            addr,
            connection: None,
        };
        let before = failed(&ours, TransportKind::Tls);
        ours.send(
            &target,
            Bytes::from(options("SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKo2", stem)),
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while failed(&ours, TransportKind::Tls) == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{stem}: not refused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Nothing crossed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !crossed.load(std::sync::atomic::Ordering::SeqCst),
            "{stem}: a message crossed"
        );
    }
    ours.shutdown();
    peer.shutdown();
}

/// A TLS server presenting `pair` that accepts one connection; the flag says whether any
/// application data crossed the handshake.
async fn raw_tls_peer(
    pair: &common::certs::Pair,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&pair.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&pair.key).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let crossed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = crossed.clone();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        if let Ok(Ok(mut tls)) = timeout(WAIT, acceptor.accept(tcp)).await {
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) = timeout(WAIT, tls.read(&mut buf)).await {
                if n > 0 {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    (addr, crossed)
}

fn failed(t: &Transports, kind: TransportKind) -> u64 {
    t.stats()
        .per_transport
        .iter()
        .find(|(k, _)| *k == kind)
        .unwrap()
        .1
        .handshakes_failed
}

fn ws_request(
    addr: SocketAddr,
    scheme: &str,
    protocol: Option<&str>,
    origin: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("{scheme}://{addr}/").into_client_request().unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn websocket_carries_one_message_per_frame_both_ways() {
    let limits = TransportLimits {
        ws_allowed_origins: vec!["http://127.0.0.1:8080".into()],
        ws_ping_interval: Duration::from_millis(200),
        ..TransportLimits::default()
    };
    let (t, mut rx) = start(&["ws:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Ws);
    let tcp = TcpStream::connect(local).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(
        ws_request(local, "ws", Some("sip"), Some("http://127.0.0.1:8080")),
        tcp,
    )
    .await
    .unwrap();
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "sip");
    // Content-Length is optional on a message transport (RFC 7118 5).
    let msg = options("SIP/2.0/WS df7jal23ls0d.invalid;branch=z9hG4bKw1", "ws1")
        .replace("Content-Length: 0\r\n", "");
    ws.send(Message::text(msg)).await.unwrap();
    let inb = next_inbound(&mut rx).await;
    assert_eq!(call_id(&inb), "ws1");
    assert_eq!(inb.source.transport, TransportKind::Ws);
    assert!(inb.source.connection.is_some());
    // The answer comes back as one text message; pings arrive meanwhile.
    t.send(
        &inb.source,
        Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    )
    .unwrap();
    let mut got_answer = false;
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(got_answer && pings >= 2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "answer {got_answer}, pings {pings}"
        );
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => {
                assert!(t.as_str().starts_with("SIP/2.0 200 OK"));
                got_answer = true;
            }
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // A WebSocket target with no open connection cannot be reached: the server cannot
    // connect to a browser.
    let gone = Target {
        transport: TransportKind::Ws,
        addr: "127.0.0.1:9".parse().unwrap(),
        connection: None,
    };
    assert!(t.send(&gone, Bytes::from_static(b"x")).is_err());
    ws.close(None).await.unwrap();
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed, inb.source);
    t.shutdown();
}

#[tokio::test]
async fn websocket_upgrades_without_sip_or_from_a_foreign_origin_are_refused() {
    let limits = TransportLimits {
        ws_allowed_origins: vec!["https://phones.example.com".into()],
        ..TransportLimits::default()
    };
    let (t, _rx) = start(&["ws:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Ws);
    for (protocol, origin, status) in [
        (None, Some("https://phones.example.com"), 400),
        (Some("sip"), Some("https://evil.example"), 403),
        (Some("sip"), None, 403),
    ] {
        let tcp = TcpStream::connect(local).await.unwrap();
        let err = tokio_tungstenite::client_async(ws_request(local, "ws", protocol, origin), tcp)
            .await
            .expect_err("refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status().as_u16(), status, "{protocol:?} {origin:?}")
            }
            other => panic!("expected an HTTP refusal, got {other}"),
        }
    }
    assert!(failed(&t, TransportKind::Ws) >= 3);
    t.shutdown();
}

#[tokio::test]
async fn secure_websocket_runs_over_tls() {
    let s = setup();
    let (t, mut rx) = start(&["wss:127.0.0.1:0"], limits(&s.tls)).await;
    let local = addr_of(&t, TransportKind::Wss);
    let tls = tls_client(&s.ca, local).await;
    let (mut ws, _) =
        tokio_tungstenite::client_async(ws_request(local, "wss", Some("sip"), None), tls)
            .await
            .unwrap();
    ws.send(Message::text(options(
        "SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bKs1",
        "wss1",
    )))
    .await
    .unwrap();
    let inb = next_inbound(&mut rx).await;
    assert_eq!(call_id(&inb), "wss1");
    assert_eq!(inb.source.transport, TransportKind::Wss);
    t.send(
        &inb.source,
        Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    )
    .unwrap();
    loop {
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => {
                assert!(t.as_str().starts_with("SIP/2.0 200 OK"));
                break;
            }
            Message::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    t.shutdown();
}

#[tokio::test]
async fn a_silent_handshake_times_out_and_handshakes_in_progress_are_bounded() {
    let s = setup();
    let limits = TransportLimits {
        tls: Some(s.tls.clone()),
        handshake_timeout: Duration::from_millis(300),
        max_handshakes: 1,
        ..TransportLimits::default()
    };
    let (t, _rx) = start(&["tls:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Tls);
    // One connection that says nothing holds the only handshake slot...
    let mut silent = TcpStream::connect(local).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...so a second one is closed at once.
    let mut second = TcpStream::connect(local).await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(Duration::from_millis(250), second.read(&mut buf))
        .await
        .expect("refused at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let refused = t
        .stats()
        .per_transport
        .iter()
        .find(|(k, _)| *k == TransportKind::Tls)
        .unwrap()
        .1
        .handshakes_refused;
    assert_eq!(refused, 1);
    // The silent one is closed by the handshake timeout.
    let n = timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .expect("closed by the handshake timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(failed(&t, TransportKind::Tls), 1);
    // The slot is free again: a real client gets through.
    let mut client = tls_client(&s.ca, local).await;
    client
        .write_all(options("SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKt9", "after").as_bytes())
        .await
        .unwrap();
    t.shutdown();
}

#[tokio::test]
async fn a_tls_listener_without_a_certificate_is_refused_at_bind() {
    let listen: Vec<ListenAddr> = vec!["wss:127.0.0.1:0".parse().unwrap()];
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = Transports::bind(
        &listen,
        TransportLimits::default(),
        Arc::new(ChannelSink(tx)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("tls.cert"), "{err}");
}

#[tokio::test]
async fn a_reload_changes_new_handshakes_and_keeps_established_connections() {
    use rustls::pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    let first = ca.issue("first", &["127.0.0.1"]);
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let tls = Arc::new(
        TlsContext::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: None,
        })
        .unwrap(),
    );
    let (t, mut rx) = start(&["tls:127.0.0.1:0"], limits(&tls)).await;
    let local = addr_of(&t, TransportKind::Tls);
    let mut old = tls_client(&ca, local).await;
    let presented = |c: &tokio_rustls::client::TlsStream<TcpStream>| {
        c.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let old_cert = presented(&old);
    old.write_all(options("SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKr1", "before").as_bytes())
        .await
        .unwrap();
    assert_eq!(call_id(&next_inbound(&mut rx).await), "before");

    // The renewed certificate is written in place and reloaded.
    let second = ca.issue("second", &["127.0.0.1", "renewed.test"]);
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    tls.reload().unwrap();

    // The established connection goes on, both ways.
    old.write_all(options("SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKr2", "after").as_bytes())
        .await
        .unwrap();
    let inb = next_inbound(&mut rx).await;
    assert_eq!(call_id(&inb), "after");
    t.send(
        &inb.source,
        Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    )
    .unwrap();
    let mut buf = vec![0u8; 200];
    let n = timeout(WAIT, old.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"SIP/2.0 200 OK"));
    // A new connection gets the new certificate.
    let new = tls_client(&ca, local).await;
    assert_ne!(presented(&new), old_cert);
    assert_eq!(
        presented(&new),
        rustls::pki_types::CertificateDer::from_pem_file(&second.cert)
            .unwrap()
            .to_vec()
    );
    t.shutdown();
}
