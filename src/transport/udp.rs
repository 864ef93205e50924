//! UDP: one socket per listen address, a receive loop per socket, and sending from the
//! socket that fits the destination.
//!
//! Owns: the UDP sockets. Must not touch: what the datagrams mean beyond handing them to
//! [`Shared::deliver`](super::set::Shared::deliver).
//!
//! Cost per message (issue 14, measured with benches/callgrind.sh): the runtime watches a
//! socket for readability only. Watched for writability too (as `tokio::net::UdpSocket` is),
//! every send on loopback raised a write-space event that woke the runtime's poller once
//! more. Datagrams are read in batches with recvmmsg(2) (the nix crate's wrapper), and a
//! batch that comes back short means the queue is empty: the loop waits for the next
//! readiness event at once instead of paying one more receive call that fails with EAGAIN.

use super::set::Shared;
use super::{Target, TransportError, TransportKind};
use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The largest UDP payload over IPv4 (65535 - 8 octets of UDP header - 20 of IP header).
pub const MAX_DATAGRAM: usize = 65_507;

/// Receive buffer of one datagram: any UDP payload fits.
const SLOT: usize = 65_535;
/// Datagrams read per receive call at most.
const BATCH: usize = 8;

/// One bound UDP socket.
#[derive(Clone)]
pub(crate) struct UdpTransport {
    pub(crate) socket: Arc<AsyncFd<std::net::UdpSocket>>,
    pub(crate) local: SocketAddr,
}

/// Binds `addr`. IPv6 sockets are IPv6-only so that `[::]:5060` and `0.0.0.0:5060` can
/// both be bound (otherwise a dual-stack `[::]` takes the IPv4 port too). `recv_buffer`:
/// SO_RCVBUF to ask for (0: the system's). Must be called inside a tokio runtime.
pub(crate) fn bind(addr: SocketAddr, recv_buffer: usize) -> io::Result<UdpTransport> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if recv_buffer > 0 {
        // A burst (a carrier retransmitting everything) waits here instead of being
        // dropped by the kernel; Linux caps the size at net.core.rmem_max (and reports
        // twice what it keeps for bookkeeping).
        socket.set_recv_buffer_size(recv_buffer)?;
        let granted = socket.recv_buffer_size().unwrap_or(0);
        if granted < recv_buffer {
            tracing::warn!(%addr, asked = recv_buffer, granted, "UDP receive buffer capped by the system (raise net.core.rmem_max)");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    let local = socket.local_addr()?;
    // Readable only: see the module header.
    let socket = register(socket, Interest::READABLE)?;
    Ok(UdpTransport {
        socket: Arc::new(socket),
        local,
    })
}

/// Puts `socket` under the runtime's watch for `interest`.
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the AsyncFd owns the socket, whose descriptor is closed only when the socket
    // is dropped with it (never replaced or closed under it).
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(io::Error::from)
}

/// One datagram of a batch: its length (None: larger than the buffer, dropped) and sender.
type Received = (Option<usize>, SocketAddr);

/// Reads datagrams until the task is aborted.
pub(crate) async fn recv_loop(udp: UdpTransport, shared: Arc<Shared>) {
    let mut batch = Batch::new();
    let mut got: [Option<Received>; BATCH] = [None; BATCH];
    loop {
        let mut guard = match udp.socket.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(local = %udp.local, error = %e, "udp socket not readable");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let n = match guard.try_io(|s| batch.recv(s.get_ref(), &mut got)) {
            Ok(Ok(n)) => n,
            // WouldBlock: readiness is cleared, wait for the next event.
            Err(_would_block) => continue,
            Ok(Err(e)) => {
                // Linux reports ICMP errors of earlier sends here on some setups; none of
                // them is fatal for a listening socket. Pause so a persistent error does
                // not spin.
                tracing::debug!(local = %udp.local, error = %e, "udp receive error");
                drop(guard);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if n < BATCH {
            // Fewer than asked for: the queue is empty. (A datagram that arrived since
            // raised a new event, which this does not clear.)
            guard.clear_ready();
        }
        drop(guard);
        for (i, slot) in got.iter_mut().take(n).enumerate() {
            let Some((len, peer)) = slot.take() else {
                continue;
            };
            deliver(&udp, &shared, batch.datagram(i, len), peer);
        }
    }
}

/// One received datagram to the sink (`None`: it did not fit the buffer).
fn deliver(udp: &UdpTransport, shared: &Shared, data: Option<&[u8]>, peer: SocketAddr) {
    let Some(data) = data else {
        tracing::debug!(%peer, "udp datagram larger than the receive buffer dropped");
        return;
    };
    if lost(&shared.limits) {
        return;
    }
    // Empty datagrams and CRLF keep-alives (RFC 5626 3.5.1) carry no message.
    if data.iter().all(|&c| c == b'\r' || c == b'\n') {
        return;
    }
    if data.len() > shared.limits.max_message_size {
        tracing::debug!(%peer, len = data.len(), "udp datagram over the maximum message size dropped");
        return;
    }
    let source = Target {
        transport: TransportKind::Udp,
        addr: peer,
        connection: None,
    };
    shared.deliver(data, source, udp.local);
}

/// Whether `sip.udp_loss_percent` drops this datagram (the rehearsal of a lossy network).
fn lost(limits: &super::TransportLimits) -> bool {
    limits.udp_loss_percent > 0 && rand::random_range(0..100) < limits.udp_loss_percent
}

/// Buffers for one batch of datagrams.
struct Batch {
    bufs: Box<[[u8; SLOT]; BATCH]>,
}

#[cfg(target_os = "linux")]
thread_local! {
    /// recvmmsg's message headers (they hold raw pointers, so they are not `Send` and cannot
    /// live in the receive task, which may move between threads): one set per thread,
    /// reused by every batch read on it.
    static HEADERS: std::cell::RefCell<
        Option<nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>>,
    > = const { std::cell::RefCell::new(None) };
}

impl Batch {
    fn new() -> Batch {
        let bufs: Box<[[u8; SLOT]]> = vec![[0u8; SLOT]; BATCH].into_boxed_slice();
        Batch {
            bufs: bufs
                .try_into()
                .unwrap_or_else(|_| unreachable!("BATCH slots")),
        }
    }

    /// Datagram `i` of the last batch.
    fn datagram(&self, i: usize, len: Option<usize>) -> Option<&[u8]> {
        len.and_then(|n| self.bufs.get(i).and_then(|b| b.get(..n)))
    }

    /// Reads up to [`BATCH`] datagrams with one recvmmsg(2); WouldBlock when none is there.
    #[cfg(target_os = "linux")]
    fn recv(
        &mut self,
        socket: &std::net::UdpSocket,
        out: &mut [Option<Received>; BATCH],
    ) -> io::Result<usize> {
        use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        HEADERS.with_borrow_mut(|headers| {
            let mut iovs = self.bufs.each_mut().map(|b| [IoSliceMut::new(&mut b[..])]);
            let headers = headers.get_or_insert_with(|| MultiHeaders::preallocate(BATCH, None));
            let results = recvmmsg(
                socket.as_raw_fd(),
                headers,
                iovs.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)?;
            let mut n = 0;
            for (slot, msg) in out.iter_mut().zip(results) {
                n += 1;
                let addr = msg.address.as_ref().and_then(|a: &SockaddrStorage| {
                    match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                        (Some(v4), _) => Some(SocketAddr::V4((*v4).into())),
                        (_, Some(v6)) => Some(SocketAddr::V6((*v6).into())),
                        _ => None,
                    }
                });
                *slot = addr.map(|peer| {
                    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                    ((!truncated).then_some(msg.bytes), peer)
                });
            }
            Ok(n)
        })
    }

    /// Elsewhere: one datagram per call.
    #[cfg(not(target_os = "linux"))]
    fn recv(
        &mut self,
        socket: &std::net::UdpSocket,
        out: &mut [Option<Received>; BATCH],
    ) -> io::Result<usize> {
        let (len, peer) = socket.recv_from(&mut self.bufs[0])?;
        out[0] = Some((Some(len), peer));
        Ok(1)
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
    if lost(&shared.limits) {
        // As if the network dropped it after the send.
        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    match udp.socket.get_ref().send_to(&data, dest) {
        Ok(_) => {
            shared.counters.sent.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            // Rare (the socket's send buffer is full): only then is writability watched,
            // on a second descriptor of the same socket, until the datagram is out.
            let socket = udp.socket.get_ref().try_clone()?;
            let shared = shared.clone();
            handle.spawn(async move {
                let sent = match register(socket, Interest::WRITABLE) {
                    Ok(fd) => {
                        fd.async_io(Interest::WRITABLE, |s| s.send_to(&data, dest))
                            .await
                    }
                    Err(e) => Err(e),
                };
                match sent {
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

    /// `sip.udp_recv_buffer_kb` reaches the socket (Linux reports twice what it keeps, and
    /// caps it at net.core.rmem_max: at least the smaller of the two is granted).
    #[tokio::test]
    async fn the_receive_buffer_asked_for_is_set() {
        let asked = 1 << 20;
        let t = bind("127.0.0.1:0".parse().unwrap(), asked).unwrap();
        let granted = socket2::SockRef::from(t.socket.get_ref())
            .recv_buffer_size()
            .unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(asked);
        assert!(granted >= asked.min(cap), "granted {granted}");
        let default = bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let system = socket2::SockRef::from(default.socket.get_ref())
            .recv_buffer_size()
            .unwrap();
        if cap >= asked * 2 {
            assert!(granted > system, "{granted} vs the default {system}");
        }
    }

    #[tokio::test]
    async fn pick_prefers_matching_socket() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let b = bind("0.0.0.0:0".parse().unwrap(), 0).unwrap();
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
        let v6 = match bind("[::]:0".parse().unwrap(), 0) {
            Ok(s) => s,
            Err(_) => return, // no IPv6 here
        };
        let port = v6.local.port();
        let v4 = bind(SocketAddr::new("0.0.0.0".parse().unwrap(), port), 0);
        assert!(v4.is_ok(), "{:?}", v4.err());
    }
}
