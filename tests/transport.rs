//! Transports over real loopback sockets and the memory network: delivery and sources,
//! Via received/rport, TCP framing, oversize, responses over the same connection,
//! outbound connections, shutdown.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use strowger::sip::SipMessage;
use strowger::transport::{
    response_target, Inbound, InboundSink, ListenAddr, MemoryNetwork, Sender, Target,
    TransportKind, TransportLimits, Transports,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::timeout;

struct ChannelSink(mpsc::UnboundedSender<Inbound>);

impl InboundSink for ChannelSink {
    fn deliver(&self, inbound: Inbound) {
        let _ = self.0.send(inbound);
    }
}

const WAIT: Duration = Duration::from_secs(5);

fn options(via: &str, call_id: &str, body: &str) -> String {
    format!(
        "OPTIONS sip:server@127.0.0.1 SIP/2.0\r\n\
         Via: {via}\r\n\
         From: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:server@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn start(
    listen: &[&str],
    limits: TransportLimits,
) -> (Transports, mpsc::UnboundedReceiver<Inbound>) {
    let listen: Vec<ListenAddr> = listen.iter().map(|s| s.parse().unwrap()).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let t = Transports::bind(&listen, limits, Arc::new(ChannelSink(tx)))
        .await
        .unwrap();
    (t, rx)
}

fn addr_of(t: &Transports, kind: TransportKind) -> SocketAddr {
    t.local_addrs()
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, a)| a)
        .unwrap()
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Inbound>) -> Inbound {
    timeout(WAIT, rx.recv())
        .await
        .expect("delivery in time")
        .expect("sink open")
}

fn request(inb: &Inbound) -> &strowger::sip::Request {
    match &inb.message {
        Ok(SipMessage::Request(r)) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

#[tokio::test]
async fn udp_delivery_source_and_via() {
    let (t, mut rx) = start(
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0"],
        TransportLimits::default(),
    )
    .await;
    let local = addr_of(&t, TransportKind::Udp);
    assert_ne!(local.port(), 0);
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    // Keep-alives and empty datagrams are dropped silently.
    peer.send_to(b"\r\n\r\n", local).await.unwrap();
    peer.send_to(b"", local).await.unwrap();
    let msg = options(
        "SIP/2.0/UDP 10.0.0.99:5070;rport;branch=z9hG4bKu1",
        "udp1",
        "",
    );
    peer.send_to(msg.as_bytes(), local).await.unwrap();
    let inb = next(&mut rx).await;
    assert_eq!(inb.source.transport, TransportKind::Udp);
    assert_eq!(inb.source.addr, peer_addr);
    assert_eq!(inb.source.connection, None);
    assert_eq!(inb.local, local);
    let req = request(&inb);
    assert_eq!(req.base.call_id, "udp1");
    let via = &req.base.via[0];
    assert_eq!(via.received(), Some("127.0.0.1"));
    assert_eq!(via.rport(), Some(Some(peer_addr.port())));
    // The response goes to the source address and port, not to 10.0.0.99:5070.
    let target = response_target(via, &inb.source);
    assert_eq!(target.addr, peer_addr);
    t.send(&target, Bytes::from_static(b"SIP/2.0 200 OK\r\n\r\n"))
        .unwrap();
    let mut buf = [0u8; 100];
    let (n, from) = timeout(WAIT, peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"SIP/2.0 200 OK\r\n\r\n");
    assert_eq!(from, local);
    assert!(rx.try_recv().is_err(), "keep-alives must not be delivered");
    let s = t.stats();
    assert_eq!((s.received, s.sent), (1, 1));
    // Too large for a datagram.
    let big = Bytes::from(vec![b'x'; 70_000]);
    assert!(t.send(&target, big).is_err());
    assert_eq!(t.stats().send_errors, 1);
    t.shutdown();
}

#[tokio::test]
async fn udp_ipv6_when_available() {
    let listen: Vec<ListenAddr> = vec!["udp:[::1]:0".parse().unwrap()];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t = match Transports::bind(
        &listen,
        TransportLimits::default(),
        Arc::new(ChannelSink(tx)),
    )
    .await
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping: no IPv6 loopback ({e})");
            return;
        }
    };
    let local = addr_of(&t, TransportKind::Udp);
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let msg = options(
        "SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bK6",
        "v6",
        "",
    );
    peer.send_to(msg.as_bytes(), local).await.unwrap();
    let inb = next(&mut rx).await;
    let via = &request(&inb).base.via[0];
    assert_eq!(via.received(), Some("::1"));
    let target = response_target(via, &inb.source);
    assert_eq!(target.addr, peer.local_addr().unwrap());
    t.send(&target, Bytes::from_static(b"hello")).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = timeout(WAIT, peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hello");
    t.shutdown();
}

#[tokio::test]
async fn tcp_split_byte_by_byte_and_two_in_one_write() {
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], TransportLimits::default()).await;
    let local = addr_of(&t, TransportKind::Tcp);
    let mut c = TcpStream::connect(local).await.unwrap();
    c.set_nodelay(true).unwrap();
    // A keep-alive first, then a message one octet per write.
    c.write_all(b"\r\n\r\n").await.unwrap();
    let one = options(
        "SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKt1",
        "split",
        "v=0\r\n",
    );
    for b in one.as_bytes() {
        c.write_all(&[*b]).await.unwrap();
        c.flush().await.unwrap();
    }
    let inb = next(&mut rx).await;
    let req = request(&inb);
    assert_eq!(req.base.call_id, "split");
    assert_eq!(&req.body[..], b"v=0\r\n");
    assert_eq!(inb.source.transport, TransportKind::Tcp);
    assert_eq!(inb.source.addr, c.local_addr().unwrap());
    assert!(inb.source.connection.is_some());
    // The sent-by port differs from the source port, but without rport nothing but
    // `received` (same IP: nothing at all) is added.
    assert_eq!(req.base.via[0].received(), None);
    // Two in one write.
    let two = format!(
        "{}{}",
        options("SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKt2", "first", "ab"),
        options("SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKt3", "second", "")
    );
    c.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(request(&next(&mut rx).await).base.call_id, "first");
    assert_eq!(request(&next(&mut rx).await).base.call_id, "second");
    assert!(rx.try_recv().is_err());
    assert_eq!(t.stats().tcp_connections_open, 1);
    t.shutdown();
}

#[tokio::test]
async fn tcp_response_over_the_same_connection() {
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], TransportLimits::default()).await;
    let local = addr_of(&t, TransportKind::Tcp);
    let mut c = TcpStream::connect(local).await.unwrap();
    let msg = options(
        "SIP/2.0/TCP client.invalid:5070;branch=z9hG4bKr1",
        "resp",
        "",
    );
    c.write_all(msg.as_bytes()).await.unwrap();
    let inb = next(&mut rx).await;
    let via = &request(&inb).base.via[0];
    // A name as sent-by always gets `received` (RFC 3261 18.2.1).
    assert_eq!(via.received(), Some("127.0.0.1"));
    let target = response_target(via, &inb.source);
    assert_eq!(target, inb.source);
    t.send(
        &target,
        Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    )
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = timeout(WAIT, c.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n");
    // Without a connection id, the open connection to that address is reused.
    let again = Target {
        connection: None,
        ..target
    };
    t.send(&again, Bytes::from_static(b"x")).unwrap();
    let n = timeout(WAIT, c.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"x");
    assert_eq!(t.stats().tcp_connections_open, 1);
    t.shutdown();
}

#[tokio::test]
async fn tcp_oversize_closes_and_counts() {
    let limits = TransportLimits {
        max_message_size: 600,
        ..TransportLimits::default()
    };
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Tcp);
    let mut c = TcpStream::connect(local).await.unwrap();
    let big = options(
        "SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKo1",
        "big",
        &"x".repeat(1000),
    );
    c.write_all(big.as_bytes()).await.unwrap();
    let mut buf = [0u8; 16];
    // The server closes: read sees EOF (or a reset).
    let r = timeout(WAIT, c.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(rx.try_recv().is_err());
    let s = t.stats();
    assert_eq!(s.tcp_oversize_closed, 1);
    // Give the connection's task a moment to leave the table.
    for _ in 0..50 {
        if t.stats().tcp_connections_open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.stats().tcp_connections_open, 0);
    t.shutdown();
}

#[tokio::test]
async fn tcp_missing_content_length_is_an_error_and_closes() {
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], TransportLimits::default()).await;
    let local = addr_of(&t, TransportKind::Tcp);
    let mut c = TcpStream::connect(local).await.unwrap();
    let msg = options("SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKm1", "nolen", "")
        .replace("Content-Length: 0\r\n", "");
    c.write_all(msg.as_bytes()).await.unwrap();
    let inb = next(&mut rx).await;
    let err = inb.message.unwrap_err();
    assert_eq!(err.to_string(), "Missing Content-Length header");
    // The 400 can still be built from what was read.
    assert!(strowger::sip::error_response(&err).is_some());
    let mut buf = [0u8; 16];
    let r = timeout(WAIT, c.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    t.shutdown();
}

#[tokio::test]
async fn tcp_outbound_connect_and_reply() {
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], TransportLimits::default()).await;
    let remote = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let remote_addr = remote.local_addr().unwrap();
    let target = Target {
        transport: TransportKind::Tcp,
        addr: remote_addr,
        connection: None,
    };
    let msg = options("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKc1", "out", "");
    t.send(&target, Bytes::from(msg.clone())).unwrap();
    let (mut s, _) = timeout(WAIT, remote.accept()).await.unwrap().unwrap();
    let mut got = vec![0u8; msg.len()];
    timeout(WAIT, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, msg.as_bytes());
    // The outbound connection is read like an inbound one.
    let reply = "SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKc1\r\n\
                 From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:server@127.0.0.1>;tag=b\r\n\
                 Call-ID: out\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    s.write_all(reply.as_bytes()).await.unwrap();
    let inb = next(&mut rx).await;
    assert!(matches!(inb.message, Ok(SipMessage::Response(ref r)) if r.status == 200));
    assert_eq!(inb.source.addr, remote_addr);
    // A second send reuses the connection.
    t.send(&target, Bytes::from_static(b"\r\n\r\n")).unwrap();
    let mut ka = [0u8; 4];
    timeout(WAIT, s.read_exact(&mut ka)).await.unwrap().unwrap();
    assert_eq!(t.stats().tcp_connections_open, 1);
    t.shutdown();
    assert_eq!(t.stats().tcp_connections_open, 0);
}

#[tokio::test]
async fn tcp_connect_failure_counts() {
    let (t, _rx) = start(&["tcp:127.0.0.1:0"], TransportLimits::default()).await;
    // A port nobody listens on: bind one, note it, close it.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let target = Target {
        transport: TransportKind::Tcp,
        addr: dead,
        connection: None,
    };
    t.send(&target, Bytes::from_static(b"x")).unwrap();
    for _ in 0..100 {
        if t.stats().send_errors == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.stats().send_errors, 1);
    assert_eq!(t.stats().tcp_connections_open, 0);
    t.shutdown();
}

#[tokio::test]
async fn memory_round_trip() {
    let net = MemoryNetwork::new();
    let (t, mut rx) = start(&[], TransportLimits::default()).await;
    let server: SocketAddr = "10.0.0.1:5060".parse().unwrap();
    t.attach_memory(&net, server);
    let mut phone = net.endpoint("10.0.0.2:5062".parse().unwrap());
    let msg = options(
        "SIP/2.0/UDP 10.0.0.2:5062;rport;branch=z9hG4bKm1",
        "mem",
        "",
    );
    assert!(phone.send(server, Bytes::from(msg)));
    let inb = next(&mut rx).await;
    assert_eq!(inb.source.transport, TransportKind::Memory);
    assert_eq!(inb.source.addr, phone.local_addr());
    assert_eq!(inb.local, server);
    let via = &request(&inb).base.via[0];
    assert_eq!(via.rport(), Some(Some(5062)));
    let target = response_target(via, &inb.source);
    assert_eq!(target.transport, TransportKind::Memory);
    t.send(&target, Bytes::from_static(b"SIP/2.0 200 OK\r\n\r\n"))
        .unwrap();
    let (from, data) = timeout(WAIT, phone.recv()).await.unwrap().unwrap();
    assert_eq!(from, server);
    assert_eq!(&data[..], b"SIP/2.0 200 OK\r\n\r\n");
    assert!(t.local_addrs().contains(&(TransportKind::Memory, server)));
    t.shutdown();
}

#[tokio::test]
async fn memory_listen_entry_uses_the_global_network() {
    let (t, mut rx) = start(&["memory:10.9.0.1:0"], TransportLimits::default()).await;
    let server = addr_of(&t, TransportKind::Memory);
    assert_ne!(server.port(), 0);
    let phone = MemoryNetwork::global().endpoint("10.9.0.2:5060".parse().unwrap());
    let msg = options("SIP/2.0/UDP 10.9.0.2;branch=z9hG4bKg1", "global", "");
    assert!(phone.send(server, Bytes::from(msg)));
    assert_eq!(request(&next(&mut rx).await).base.call_id, "global");
    t.shutdown();
}

#[tokio::test]
async fn shutdown_stops_delivery() {
    let (t, mut rx) = start(
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0"],
        TransportLimits::default(),
    )
    .await;
    let udp = addr_of(&t, TransportKind::Udp);
    let tcp = addr_of(&t, TransportKind::Tcp);
    let mut c = TcpStream::connect(tcp).await.unwrap();
    c.write_all(options("SIP/2.0/TCP h;branch=z9hG4bKs0", "before", "").as_bytes())
        .await
        .unwrap();
    next(&mut rx).await;
    t.shutdown();
    t.shutdown(); // idempotent
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    peer.send_to(
        options("SIP/2.0/UDP h;branch=z9hG4bKs1", "after", "").as_bytes(),
        udp,
    )
    .await
    .unwrap();
    // The TCP connection is closed and new ones are refused.
    let mut buf = [0u8; 8];
    let r = timeout(WAIT, c.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(tcp).await.is_err());
    assert!(rx.try_recv().is_err());
    let target = Target {
        transport: TransportKind::Udp,
        addr: peer.local_addr().unwrap(),
        connection: None,
    };
    assert!(t.send(&target, Bytes::from_static(b"x")).is_err());
    assert_eq!(t.stats().tcp_connections_open, 0);
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let listen = vec![ListenAddr {
        kind: TransportKind::Udp,
        addr,
    }];
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = Transports::bind(
        &listen,
        TransportLimits::default(),
        Arc::new(ChannelSink(tx)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn tcp_idle_connection_is_closed() {
    let limits = TransportLimits {
        idle_timeout: Duration::from_millis(200),
        ..TransportLimits::default()
    };
    let (t, _rx) = start(&["tcp:127.0.0.1:0"], limits).await;
    let mut c = TcpStream::connect(addr_of(&t, TransportKind::Tcp))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let r = timeout(WAIT, c.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    t.shutdown();
}

/// Issue 15 item 3 (slowloris): a message begun but not finished within
/// `message_timeout` closes the connection (counted), while a connection that keeps
/// sending whole messages, even with the next one's first bytes behind each, stays.
#[tokio::test]
async fn tcp_slow_message_is_closed() {
    let limits = TransportLimits {
        message_timeout: Duration::from_millis(300),
        ..TransportLimits::default()
    };
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Tcp);
    // Busy but honest: whole messages with a trailing partial one, for longer than the
    // timeout in all.
    let mut busy = TcpStream::connect(local).await.unwrap();
    let msg = |n: u32| options(&format!("SIP/2.0/TCP h;branch=z9hG4bKs{n}"), "busy", "");
    let mut pending = String::new();
    for n in 0..6 {
        let whole = format!("{pending}{}", msg(n));
        let (now, later) = whole.split_at(whole.len() - 10);
        busy.write_all(now.as_bytes()).await.unwrap();
        pending = later.to_owned();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    busy.write_all(pending.as_bytes()).await.unwrap();
    for _ in 0..6 {
        next(&mut rx).await;
    }
    // Slow: a head that never ends.
    let mut slow = TcpStream::connect(local).await.unwrap();
    slow.write_all(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let r = timeout(WAIT, slow.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(t.stats().tcp_slow_closed, 1);
    // The busy one is still open.
    busy.write_all(msg(99).as_bytes()).await.unwrap();
    next(&mut rx).await;
    t.shutdown();
}

#[tokio::test]
async fn tcp_max_connections() {
    let limits = TransportLimits {
        max_connections: 1,
        ..TransportLimits::default()
    };
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Tcp);
    let mut first = TcpStream::connect(local).await.unwrap();
    first
        .write_all(options("SIP/2.0/TCP h;branch=z9hG4bKx1", "one", "").as_bytes())
        .await
        .unwrap();
    next(&mut rx).await;
    // The second is accepted by the kernel and closed by us at once.
    let mut second = TcpStream::connect(local).await.unwrap();
    let mut buf = [0u8; 8];
    let r = timeout(WAIT, second.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(t.stats().tcp_connections_open, 1);
    // Outbound connections count too.
    let target = Target {
        transport: TransportKind::Tcp,
        addr: "127.0.0.1:9".parse().unwrap(),
        connection: None,
    };
    assert!(t.send(&target, Bytes::from_static(b"x")).is_err());
    t.shutdown();
}

/// Issue 15 item 3: one address cannot take every connection; the slot comes back when a
/// connection closes.
#[tokio::test]
async fn tcp_max_connections_per_source() {
    let limits = TransportLimits {
        max_connections_per_source: 2,
        ..TransportLimits::default()
    };
    let (t, mut rx) = start(&["tcp:127.0.0.1:0"], limits).await;
    let local = addr_of(&t, TransportKind::Tcp);
    let mut open = Vec::new();
    for i in 0..2 {
        let mut c = TcpStream::connect(local).await.unwrap();
        let via = format!("SIP/2.0/TCP h;branch=z9hG4bKps{i}");
        c.write_all(options(&via, &format!("ps{i}"), "").as_bytes())
            .await
            .unwrap();
        next(&mut rx).await;
        open.push(c);
    }
    // The third from the same address is accepted by the kernel and closed by us at once.
    let mut third = TcpStream::connect(local).await.unwrap();
    let mut buf = [0u8; 8];
    let r = timeout(WAIT, third.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(t.stats().tcp_refused_per_source, 1);
    assert_eq!(t.stats().tcp_connections_open, 2);
    // One closes: a new one is taken again.
    drop(open.pop());
    let mut ok = false;
    for _ in 0..50 {
        if t.stats().tcp_connections_open == 1 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the closed connection gave its slot back");
    let mut again = TcpStream::connect(local).await.unwrap();
    again
        .write_all(options("SIP/2.0/TCP h;branch=z9hG4bKps9", "again", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(request(&next(&mut rx).await).base.call_id, "again");
    t.shutdown();
}

#[tokio::test]
async fn large_requests_go_over_tcp() {
    let (t, _rx) = start(&["udp:127.0.0.1:0"], TransportLimits::default()).await;
    let udp = Target {
        transport: TransportKind::Udp,
        addr: "127.0.0.1:5060".parse().unwrap(),
        connection: None,
    };
    // No TCP bound: stays UDP.
    assert_eq!(t.request_target(&udp, 5000), udp);
    t.shutdown();
    let (t, _rx) = start(
        &["udp:127.0.0.1:0", "tcp:127.0.0.1:0"],
        TransportLimits::default(),
    )
    .await;
    assert_eq!(t.request_target(&udp, 1300), udp);
    assert_eq!(t.request_target(&udp, 1301).transport, TransportKind::Tcp);
    t.shutdown();
}

/// Issue 14: a SIP worker holds the responses and ACKs it sends until it runs out of work
/// (`outbox::flush`, the runtime's park hook in the binary) and sends them in one
/// sendmmsg(2); requests other than ACK go at once, so that their send errors reach their
/// transaction, but never ahead of what is held for the same peer (a NOTIFY must not
/// overtake the 200 of its SUBSCRIBE).
#[tokio::test]
async fn held_responses_leave_together_and_requests_at_once_in_order() {
    let (t, _rx) = start(&["udp:127.0.0.1:0"], TransportLimits::default()).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = |s: &UdpSocket| Target {
        transport: TransportKind::Udp,
        addr: s.local_addr().unwrap(),
        connection: None,
    };
    let target = to(&peer);
    strowger::transport::outbox::hold_on_this_thread();
    for i in 0..3 {
        t.send(
            &target,
            Bytes::from(format!("SIP/2.0 200 OK\r\nX: {i}\r\n\r\n")),
        )
        .unwrap();
    }
    t.send(&target, Bytes::from_static(b"ACK sip:a@b SIP/2.0\r\n\r\n"))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        timeout(Duration::from_millis(100), peer.recv_from(&mut buf))
            .await
            .is_err(),
        "held until flushed"
    );
    // A request other than ACK to another peer is not held, and does not send the rest.
    t.send(
        &to(&other),
        Bytes::from_static(b"BYE sip:o@b SIP/2.0\r\n\r\n"),
    )
    .unwrap();
    let (n, _) = timeout(WAIT, other.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"BYE "));
    assert!(
        timeout(Duration::from_millis(100), peer.recv_from(&mut buf))
            .await
            .is_err(),
        "still held"
    );
    // One to the same peer goes at once, after what was held for it.
    let sent_before = t.stats().sent;
    t.send(
        &target,
        Bytes::from_static(b"NOTIFY sip:a@b SIP/2.0\r\n\r\n"),
    )
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let (n, _) = timeout(WAIT, peer.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].contains("X: 0") && got[1].contains("X: 1") && got[2].contains("X: 2"));
    assert!(got[3].starts_with("ACK "));
    assert!(got[4].starts_with("NOTIFY "), "{got:?}");
    assert_eq!(t.stats().sent, sent_before + 5);
    strowger::transport::outbox::flush();
    t.shutdown();
}

/// The kernel's receive timestamps say how long datagrams stood in the socket's queue:
/// the overload detector's earliest signal, and what the look before a datagram's parse
/// is told of that datagram (a new call whose INVITE waited past the target is refused;
/// issue 15 item 1).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn udp_queue_delay_is_measured_from_kernel_timestamps() {
    let listen: Vec<ListenAddr> = vec!["udp:127.0.0.1:0".parse().unwrap()];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = Arc::new(QueuedSink(tx, Default::default()));
    let t = Transports::bind(&listen, TransportLimits::default(), sink.clone())
        .await
        .unwrap();
    let local = addr_of(&t, TransportKind::Udp);
    assert_eq!(t.take_udp_queue_delay(), None, "nothing read yet");
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(
        options("SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKq1", "q1", "").as_bytes(),
        local,
    )
    .unwrap();
    // This test's runtime has one thread: blocking it keeps the datagram in the queue.
    std::thread::sleep(Duration::from_millis(80));
    // Another one, read in the same batch: it waited only as long as it stood there.
    peer.send_to(
        options("SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKq1b", "q1b", "").as_bytes(),
        local,
    )
    .unwrap();
    next(&mut rx).await;
    next(&mut rx).await;
    // The detector's sample is the batch's oldest wait.
    let waited = t.take_udp_queue_delay().expect("a delay measured");
    assert!(waited >= Duration::from_millis(75), "waited {waited:?}");
    assert_eq!(t.take_udp_queue_delay(), None, "taken");
    // Read at once: a small wait.
    peer.send_to(
        options("SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKq2", "q2", "").as_bytes(),
        local,
    )
    .unwrap();
    next(&mut rx).await;
    let waited = t.take_udp_queue_delay().expect("a delay measured");
    assert!(waited < Duration::from_millis(75), "waited {waited:?}");
    // The look before each parse was told each datagram's own wait.
    let queued = sink.1.lock().unwrap().clone();
    assert_eq!(queued.len(), 3, "{queued:?}");
    assert!(
        queued[0].unwrap() >= Duration::from_millis(75),
        "{queued:?}"
    );
    assert!(queued[1].unwrap() < Duration::from_millis(75), "{queued:?}");
    assert!(queued[2].unwrap() < Duration::from_millis(75), "{queued:?}");
    t.shutdown();
}

/// Records how long each screened datagram stood in the socket's queue.
struct QueuedSink(
    mpsc::UnboundedSender<Inbound>,
    std::sync::Mutex<Vec<Option<Duration>>>,
);

impl InboundSink for QueuedSink {
    fn deliver(&self, inbound: Inbound) {
        let _ = self.0.send(inbound);
    }
    fn screen(&self, _data: &[u8], _source: &Target, queued: Option<Duration>) -> bool {
        self.1.lock().unwrap().push(queued);
        true
    }
}
