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
    // The kernel stamps each datagram as it queues it, so a batch read says how long the
    // socket's queue stands: the overload detector's earliest signal (issue 15). Without
    // it (an old kernel), the detector has the SIP thread's lateness alone.
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimestampns,
        &true,
    ) {
        tracing::debug!(%addr, error = %e, "SO_TIMESTAMPNS not set");
    }
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
    let mut stamps: [Option<Stamp>; BATCH] = [None; BATCH];
    loop {
        let mut guard = match udp.socket.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(local = %udp.local, error = %e, "udp socket not readable");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let n = match guard.try_io(|s| batch.recv(s.get_ref(), &mut got, &mut stamps)) {
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
        let drained = n < BATCH;
        if drained {
            // Fewer than asked for: the queue is empty. (A datagram that arrived since
            // raised a new event, which this does not clear.)
            guard.clear_ready();
        }
        drop(guard);
        // How long each datagram stood in the queue: its own wait is what the look
        // before its parse is told (a new INVITE read with older datagrams did not wait
        // as long as they did: CoDel's per-packet sojourn time). The first of a batch
        // waited longest (the queue is FIFO): the overload detector's sample.
        let now = std::time::SystemTime::now();
        let wait_ns = |i: usize| stamps[i].and_then(|s| waited_ns(s, now));
        if let Some(ns) = wait_ns(0) {
            shared.udp_wait_min_ns.fetch_min(ns, Ordering::Relaxed);
        }
        for (i, slot) in got.iter_mut().take(n).enumerate() {
            let Some((len, peer)) = slot.take() else {
                continue;
            };
            let waited = wait_ns(i).map(std::time::Duration::from_nanos);
            deliver(&udp, &shared, batch.datagram(i, len), peer, waited);
        }
        // Let the tasks this batch woke (calls, transactions, timers) run before reading
        // more: a backlog then waits in the socket, where the kernel's receive timestamps
        // measure it for the overload detector, rather than in the runtime's run queue,
        // where nothing does (tokio's budget alone let ~4,000 datagrams through per turn).
        // When the socket was drained the wait for readability below yields anyway; an
        // explicit yield there only made the runtime poll epoll once more per batch (one
        // system call of the ~14 a call costs).
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// One received datagram to the sink (`None`: it did not fit the buffer). `waited`: how
/// long it stood in the socket's queue.
fn deliver(
    udp: &UdpTransport,
    shared: &Shared,
    data: Option<&[u8]>,
    peer: SocketAddr,
    waited: Option<std::time::Duration>,
) {
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
    shared.deliver_queued(data, source, udp.local, waited);
}

/// Responses and ACKs sent by a SIP worker thread while it has work, held and sent with
/// one sendmmsg(2) per socket when the thread runs out of work (the runtime's park hook,
/// see `main.rs`) or [`outbox::OUTBOX_MAX`](outbox::OUTBOX_MAX) are held. Issue 14: a call is seven datagrams out, and
/// each was a sendto(2); those caused by one batch of received datagrams (a BYE's 200 and
/// the BYE relayed, a 100 Trying...) now leave in one call. Requests other than ACK are
/// never held: a send error (no route to the host) must reach their transaction at once
/// (RFC 3261 17.1.1.2). A response or an ACK that fails to send is counted and logged, as
/// a datagram lost on the way would be.
///
/// Hand-written: nix's sendmmsg reports how many went out only through an iterator that
/// reads the (unset) source addresses, socket2 has none, and quinn-udp sets options on
/// the socket (don't-fragment) that SIP's large datagrams must not get.
pub mod outbox {
    use super::{send_now, Shared, UdpTransport};
    use bytes::Bytes;
    use std::cell::RefCell;
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// Held datagrams at most before they are sent anyway (a busy thread that does not
    /// park for a while must not hold messages back).
    pub const OUTBOX_MAX: usize = 32;

    struct Held {
        udp: UdpTransport,
        shared: Arc<Shared>,
        handle: tokio::runtime::Handle,
        dest: SocketAddr,
        data: Bytes,
    }

    #[derive(Default)]
    struct Outbox {
        enabled: bool,
        items: Vec<Held>,
    }

    thread_local! {
        static OUTBOX: RefCell<Outbox> = RefCell::new(Outbox::default());
    }

    /// From now on this thread holds its responses and ACKs until [`flush`]. Only for
    /// threads that call [`flush`] whenever they run out of work (the SIP workers).
    pub fn hold_on_this_thread() {
        OUTBOX.with_borrow_mut(|o| o.enabled = true);
    }

    /// Sends what this thread holds.
    pub fn flush() {
        let items = OUTBOX.with_borrow_mut(|o| std::mem::take(&mut o.items));
        if !items.is_empty() {
            send_all(items);
        }
    }

    /// Sends what this thread holds when any of it goes to `dest`: a request sent now must
    /// not overtake a response to the same peer (a NOTIFY before the 200 of its SUBSCRIBE
    /// is legal, RFC 6665 4.1.2.4, but peers rightly expect the order we produced).
    pub(super) fn flush_for(dest: SocketAddr) {
        let holding = OUTBOX.with_borrow(|o| o.items.iter().any(|h| h.dest == dest));
        if holding {
            flush();
        }
    }

    /// Holds `data` when this thread holds and it is a response or an ACK (None: held);
    /// gives it back otherwise.
    pub(super) fn hold(
        udp: &UdpTransport,
        shared: &Arc<Shared>,
        handle: &tokio::runtime::Handle,
        dest: SocketAddr,
        data: Bytes,
    ) -> Option<Bytes> {
        if !(data.starts_with(b"SIP/2.0 ") || data.starts_with(b"ACK ")) {
            return Some(data);
        }
        let full = OUTBOX.with_borrow_mut(|o| {
            if !o.enabled {
                return Err(data);
            }
            o.items.push(Held {
                udp: udp.clone(),
                shared: shared.clone(),
                handle: handle.clone(),
                dest,
                data,
            });
            Ok(o.items.len() >= OUTBOX_MAX)
        });
        match full {
            Err(data) => Some(data),
            Ok(true) => {
                flush();
                None
            }
            Ok(false) => None,
        }
    }

    /// Sends `items`, one sendmmsg per run of datagrams for the same socket; what it does
    /// not take goes one by one.
    fn send_all(items: Vec<Held>) {
        let mut rest = &items[..];
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|h| Arc::ptr_eq(&h.udp.socket, &first.udp.socket))
                .count();
            let (now, later) = rest.split_at(run);
            let sent = if now.len() > 1 { send_many(now) } else { 0 };
            for h in &now[..sent] {
                h.shared.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            for h in &now[sent..] {
                if let Err(e) = send_now(&h.udp, &h.shared, &h.handle, h.dest, h.data.clone()) {
                    tracing::debug!(dest = %h.dest, error = %e, "udp send failed");
                    h.shared
                        .counters
                        .send_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            rest = later;
        }
    }

    /// One sendmmsg(2) for datagrams of one socket: how many it sent (0 on an error, and
    /// the caller sends them one by one, which reports each error).
    #[cfg(target_os = "linux")]
    fn send_many(items: &[Held]) -> usize {
        use std::os::fd::AsRawFd;
        let addrs: Vec<socket2::SockAddr> = items.iter().map(|h| h.dest.into()).collect();
        let mut iovs: Vec<libc::iovec> = items
            .iter()
            .map(|h| libc::iovec {
                iov_base: h.data.as_ptr() as *mut libc::c_void,
                iov_len: h.data.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(&addrs)
            .map(|(iov, addr)| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_namelen = addr.len();
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let fd = items[0].udp.socket.get_ref().as_raw_fd();
        // SAFETY: every header points at an address and one iovec that live (in `addrs`,
        // `iovs` and `items`) until the call returns; the kernel only reads them and
        // writes each header's msg_len.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).unwrap_or(0)
    }

    #[cfg(not(target_os = "linux"))]
    fn send_many(_items: &[Held]) -> usize {
        0
    }
}

/// Whether `sip.udp_loss_percent` drops this datagram (the rehearsal of a lossy network).
fn lost(limits: &super::TransportLimits) -> bool {
    limits.udp_loss_percent > 0 && rand::random_range(0..100) < limits.udp_loss_percent
}

/// When the kernel queued a datagram (CLOCK_REALTIME).
#[cfg(target_os = "linux")]
type Stamp = nix::sys::time::TimeSpec;
#[cfg(not(target_os = "linux"))]
type Stamp = std::convert::Infallible;

/// How long before `now` `stamp` was, in nanoseconds (`None` if the clock stepped back).
#[cfg(target_os = "linux")]
fn waited_ns(stamp: Stamp, now: std::time::SystemTime) -> Option<u64> {
    let queued = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(stamp.tv_sec()).ok()?,
            u32::try_from(stamp.tv_nsec()).ok()?,
        );
    let waited = now.duration_since(queued).ok()?;
    u64::try_from(waited.as_nanos()).ok()
}
#[cfg(not(target_os = "linux"))]
fn waited_ns(stamp: Stamp, _now: std::time::SystemTime) -> Option<u64> {
    match stamp {}
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

    /// Reads up to [`BATCH`] datagrams with one recvmmsg(2), and when the kernel queued
    /// each (`stamps`); WouldBlock when none is there.
    #[cfg(target_os = "linux")]
    fn recv(
        &mut self,
        socket: &std::net::UdpSocket,
        out: &mut [Option<Received>; BATCH],
        stamps: &mut [Option<Stamp>; BATCH],
    ) -> io::Result<usize> {
        use nix::sys::socket::{
            recvmmsg, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
        };
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        HEADERS.with_borrow_mut(|headers| {
            let mut iovs = self.bufs.each_mut().map(|b| [IoSliceMut::new(&mut b[..])]);
            // Room for one SO_TIMESTAMPNS message per datagram. (nix sets each header's
            // control length once; the kernel writes back the length it used, the same
            // for every timestamp, so the headers can be reused batch after batch.)
            let headers = headers.get_or_insert_with(|| {
                MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(nix::sys::time::TimeSpec)))
            });
            let results = recvmmsg(
                socket.as_raw_fd(),
                headers,
                iovs.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)?;
            let mut n = 0;
            for ((slot, stamp), msg) in out.iter_mut().zip(stamps.iter_mut()).zip(results) {
                n += 1;
                *stamp = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmTimestampns(ts) => Some(ts),
                        _ => None,
                    })
                });
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
        stamps: &mut [Option<Stamp>; BATCH],
    ) -> io::Result<usize> {
        let (len, peer) = socket.recv_from(&mut self.bufs[0])?;
        out[0] = Some((Some(len), peer));
        stamps[0] = None;
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
    let data = match outbox::hold(udp, shared, handle, dest, data) {
        None => return Ok(()),
        Some(data) => data,
    };
    outbox::flush_for(dest);
    send_now(udp, shared, handle, dest, data)
}

/// Sends one datagram at once; queues it on a task when the socket buffer is full.
fn send_now(
    udp: &UdpTransport,
    shared: &Arc<Shared>,
    handle: &tokio::runtime::Handle,
    dest: SocketAddr,
    data: Bytes,
) -> Result<(), TransportError> {
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

/// Datagrams the kernel dropped because one of `sockets`' receive queues was full (or,
/// rarely, for a bad checksum or a memory shortage), since each was bound: the `drops`
/// column of `/proc/net/udp` and `/proc/net/udp6` for the sockets' inodes. Read when
/// asked (a scrape), so the receive path pays nothing for it; 0 where `/proc` is absent.
pub(crate) fn receive_drops(sockets: &[UdpTransport]) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let inodes: Vec<u64> = sockets
        .iter()
        .filter_map(|u| {
            std::fs::metadata(format!("/proc/self/fd/{}", u.socket.get_ref().as_raw_fd()))
                .ok()
                .map(|m| m.ino())
        })
        .collect();
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| drops_of(&table, &inodes))
        .sum()
}

/// The drops of the sockets with `inodes` in one `/proc/net/udp{,6}` table (a header line,
/// then per socket: sl, local and remote address, st, queues, tr:tm, retrnsmt, uid,
/// timeout, inode, ref, pointer, drops).
fn drops_of(table: &str, inodes: &[u64]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let inode = fields.nth(9)?.parse::<u64>().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            // ref and pointer, then drops.
            fields.nth(2)?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_read_from_the_sockets_own_lines() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 13: 0100007F:13C4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41234 2 0000000000000000 17\n\
            \x20 14: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 999 2 0000000000000000 5\n";
        assert_eq!(drops_of(table, &[41234]), 17);
        assert_eq!(drops_of(table, &[41234, 999]), 22);
        assert_eq!(drops_of(table, &[1]), 0);
        assert_eq!(drops_of("", &[41234]), 0);
    }

    /// A socket nobody reads, sent more than its smallest receive queue holds: the
    /// kernel's drops are counted for it (and only for it).
    #[tokio::test]
    async fn the_kernels_drops_of_a_full_receive_queue_are_counted() {
        if !std::path::Path::new("/proc/net/udp").exists() {
            eprintln!("skipped: no /proc/net/udp here");
            return;
        }
        let full = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let other = bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        assert_eq!(receive_drops(std::slice::from_ref(&full)), 0);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let datagram = [b'x'; 1200];
        for _ in 0..200 {
            sender.send_to(&datagram, full.local).unwrap();
        }
        let dropped = receive_drops(std::slice::from_ref(&full));
        assert!(dropped > 0 && dropped < 200, "{dropped}");
        assert_eq!(receive_drops(std::slice::from_ref(&other)), 0);
    }

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
