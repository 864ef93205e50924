//! UDP: one socket per listen address, a receive loop per socket, and sending from the
//! socket that fits the destination.
//!
//! Owns: the UDP sockets. Must not touch: what the datagrams mean beyond handing them to
//! [`Shared::deliver`](super::set::Shared::deliver).

use super::set::Shared;
use super::{Target, TransportError, TransportKind};
use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::UdpSocket;

/// The largest UDP payload over IPv4 (65535 - 8 octets of UDP header - 20 of IP header).
pub const MAX_DATAGRAM: usize = 65_507;

/// One bound UDP socket.
#[derive(Clone)]
pub(crate) struct UdpTransport {
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) local: SocketAddr,
}

/// Binds `addr`. IPv6 sockets are IPv6-only so that `[::]:5060` and `0.0.0.0:5060` can
/// both be bound (otherwise a dual-stack `[::]` takes the IPv4 port too).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpTransport> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    let local = socket.local_addr()?;
    Ok(UdpTransport {
        socket: Arc::new(socket),
        local,
    })
}

/// Reads datagrams until the task is aborted.
pub(crate) async fn recv_loop(udp: UdpTransport, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match udp.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // Linux reports ICMP errors of earlier sends here on some setups; none of
                // them is fatal for a listening socket. Pause so a persistent error does
                // not spin.
                tracing::debug!(local = %udp.local, error = %e, "udp receive error");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let data = &buf[..n];
        // Empty datagrams and CRLF keep-alives (RFC 5626 3.5.1) carry no message.
        if data.iter().all(|&c| c == b'\r' || c == b'\n') {
            continue;
        }
        if n > shared.limits.max_message_size {
            tracing::debug!(%peer, len = n, "udp datagram over the maximum message size dropped");
            continue;
        }
        let source = Target {
            transport: TransportKind::Udp,
            addr: peer,
            connection: None,
        };
        shared.deliver(data, source, udp.local);
    }
}

/// Picks the socket to send to `dest` from: same IP family, preferring the socket bound to
/// the destination's own IP, then one whose scope fits (a loopback socket cannot reach
/// other hosts, a wildcard socket reaches all), then any.
pub(crate) fn pick(sockets: &[UdpTransport], dest: IpAddr) -> Option<&UdpTransport> {
    let score = |u: &UdpTransport| {
        let ip = u.local.ip();
        if ip == dest {
            3
        } else if ip.is_unspecified() || ip.is_loopback() == dest.is_loopback() {
            2
        } else {
            1
        }
    };
    sockets
        .iter()
        .filter(|u| u.local.is_ipv4() == dest.is_ipv4())
        .max_by_key(|u| score(u))
}

/// Sends one datagram; queues it on a task when the socket buffer is full so the caller
/// never waits.
pub(crate) fn send(
    sockets: &[UdpTransport],
    shared: &Arc<Shared>,
    handle: &tokio::runtime::Handle,
    target: &Target,
    data: Bytes,
) -> Result<(), TransportError> {
    if data.len() > MAX_DATAGRAM {
        return Err(TransportError::TooLarge(data.len(), TransportKind::Udp));
    }
    let dest = SocketAddr::new(target.addr.ip().to_canonical(), target.addr.port());
    let Some(udp) = pick(sockets, dest.ip()) else {
        return Err(TransportError::NoTransport(TransportKind::Udp, target.addr));
    };
    match udp.socket.try_send_to(&data, dest) {
        Ok(_) => {
            shared.counters.sent.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let socket = udp.socket.clone();
            let shared = shared.clone();
            handle.spawn(async move {
                match socket.send_to(&data, dest).await {
                    Ok(_) => shared.counters.sent.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!(%dest, error = %e, "udp send failed");
                        shared.counters.send_errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            });
            Ok(())
        }
        Err(e) => {
            tracing::debug!(%dest, error = %e, "udp send failed");
            Err(TransportError::Io(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pick_prefers_matching_socket() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let both = [a.clone(), b.clone()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(pick(&both, ip("127.0.0.1")).map(|u| u.local), Some(a.local));
        assert_eq!(pick(&both, ip("192.0.2.1")).map(|u| u.local), Some(b.local));
        assert!(pick(&both, ip("::1")).is_none());
        assert_eq!(
            pick(&both[..1], ip("192.0.2.1")).map(|u| u.local),
            Some(a.local)
        );
    }

    #[tokio::test]
    async fn v6only_lets_both_wildcards_share_a_port() {
        let v6 = match bind("[::]:0".parse().unwrap()) {
            Ok(s) => s,
            Err(_) => return, // no IPv6 here
        };
        let port = v6.local.port();
        let v4 = bind(SocketAddr::new("0.0.0.0".parse().unwrap(), port));
        assert!(v4.is_ok(), "{:?}", v4.err());
    }
}
