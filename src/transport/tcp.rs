//! TCP: listeners, connections (accepted and outbound), framing by Content-Length, a
//! writer per connection fed by a channel, and the connection table.
//!
//! Owns: every TCP socket and the table of open connections (by id, and by remote address
//! for reuse). Must not touch: message contents beyond framing; parsing is
//! [`crate::sip::parse`] and delivery is [`Shared::deliver`](super::set::Shared).

use super::frame::{frame, Frame};
use super::set::Shared;
use super::{ConnectionId, Target, TransportError, TransportKind};
use crate::shard::ShardMap;
use crate::sip::{parse, ParseError, ParseErrorKind, RequestHead, SipMessage};
use bytes::{Buf, Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How long an outbound connect may take before the queued data is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a listener on `addr` (IPv6-only for IPv6, like UDP; SO_REUSEADDR so a restart
/// does not wait for old connections in TIME_WAIT).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[derive(Clone)]
struct Conn {
    tx: mpsc::UnboundedSender<Bytes>,
    peer: SocketAddr,
    /// Accepted from the peer (counted against its address's share), not opened by us.
    inbound: bool,
    /// The task driving the connection, once spawned (aborted on shutdown).
    task: Option<AbortHandle>,
}

/// The TCP side of one [`Transports`](super::Transports).
pub(crate) struct TcpTransport {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    conns: ShardMap<ConnectionId, Conn>,
    /// The newest open connection to each remote address, for reuse (RFC 3261 18.1.1
    /// lets a client reuse a connection; 18.2.2 asks the server to use it for responses).
    by_addr: ShardMap<SocketAddr, ConnectionId>,
    next_id: AtomicU64,
    /// Accepted connections open per remote IP (`sip.tcp_max_connections_per_source`).
    per_source: ShardMap<std::net::IpAddr, usize>,
    /// The bound listeners; outbound connections leave from the listener IP of the
    /// destination's family so the peer sees the address our Via carries.
    listeners: Vec<SocketAddr>,
}

impl TcpTransport {
    pub(crate) fn new(
        shared: Arc<Shared>,
        handle: tokio::runtime::Handle,
        listeners: Vec<SocketAddr>,
    ) -> TcpTransport {
        TcpTransport {
            shared,
            handle,
            conns: ShardMap::new(),
            by_addr: ShardMap::new(),
            next_id: AtomicU64::new(1),
            per_source: ShardMap::new(),
            listeners,
        }
    }

    /// Takes a slot under `max_connections`; false when full.
    fn reserve(&self) -> bool {
        let open = &self.shared.counters.tcp_connections_open;
        let before = open.fetch_add(1, Ordering::AcqRel);
        if before as usize >= self.shared.limits.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Takes one of `ip`'s accepted-connection slots; false when it has them all.
    fn reserve_source(&self, ip: std::net::IpAddr) -> bool {
        let max = self.shared.limits.max_connections_per_source;
        if max == 0 {
            return true;
        }
        self.per_source
            .with(&ip, |n| {
                if *n >= max {
                    false
                } else {
                    *n += 1;
                    true
                }
            })
            .unwrap_or_else(|| {
                // First from this address (a racing first insert of the same address
                // loses one count: harmless, the bound is approximate by one).
                self.per_source.insert(ip, 1);
                true
            })
    }

    fn release_source(&self, ip: std::net::IpAddr) {
        let now_zero = self
            .per_source
            .with(&ip, |n| {
                *n = n.saturating_sub(1);
                *n == 0
            })
            .unwrap_or(false);
        if now_zero {
            self.per_source.remove_if(&ip, |n| *n == 0);
        }
    }

    /// Enters a connection whose slot is reserved into the table.
    fn register(
        &self,
        peer: SocketAddr,
        tx: mpsc::UnboundedSender<Bytes>,
        inbound: bool,
    ) -> ConnectionId {
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.conns.insert(
            id,
            Conn {
                tx,
                peer,
                inbound,
                task: None,
            },
        );
        self.by_addr.insert(peer, id);
        id
    }

    fn set_task(&self, id: ConnectionId, task: AbortHandle) {
        self.conns.with(&id, |c| c.task = Some(task));
    }

    /// Removes a connection from the table and frees its slot; a no-op when it is gone
    /// already (so both the connection's own end and shutdown may call it).
    fn forget(&self, id: ConnectionId) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        self.by_addr.remove_if(&conn.peer, |v| *v == id);
        if conn.inbound {
            self.release_source(conn.peer.ip());
        }
        self.shared
            .counters
            .tcp_connections_open
            .fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(peer = %conn.peer, conn = id.0, "tcp connection closed");
        Some(conn)
    }

    /// Accepts connections until the task is aborted.
    pub(crate) async fn accept_loop(self: Arc<Self>, listener: TcpListener, local: SocketAddr) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::debug!(%local, error = %e, "tcp accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !self.reserve() {
                tracing::debug!(%peer, %local, "tcp connection refused: max_connections reached");
                self.shared
                    .counters
                    .tcp_refused_total
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self.reserve_source(peer.ip()) {
                // Give back the slot taken under the total bound.
                self.shared
                    .counters
                    .tcp_connections_open
                    .fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(%peer, %local, "tcp connection refused: max_connections_per_source reached");
                self.shared
                    .counters
                    .tcp_refused_per_source
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let id = self.register(peer, tx, true);
            tracing::debug!(%peer, %local, conn = id.0, "tcp connection accepted");
            let guard = ForgetGuard {
                tcp: self.clone(),
                id,
            };
            let task = self.handle.spawn(drive(guard, stream, peer, local, rx));
            self.set_task(id, task.abort_handle());
        }
    }

    /// Queues `data` on the target's connection, another open one to the same address, or
    /// a new outbound connection. Never waits.
    pub(crate) fn send(
        self: &Arc<Self>,
        target: &Target,
        data: Bytes,
    ) -> Result<(), TransportError> {
        let mut data = data;
        if let Some(id) = target.connection {
            match self.try_queue(id, data) {
                Ok(()) => return Ok(()),
                Err(d) => data = d,
            }
        }
        // RFC 3261 18.2.2: when the request's connection is gone, use (or open) another.
        if let Some(id) = self.by_addr.get(&target.addr) {
            match self.try_queue(id, data) {
                Ok(()) => return Ok(()),
                Err(d) => data = d,
            }
        }
        self.connect(target.addr, data)
    }

    fn try_queue(&self, id: ConnectionId, data: Bytes) -> Result<(), Bytes> {
        match self.conns.get(&id) {
            Some(conn) => conn.tx.send(data).map_err(|e| e.0),
            None => Err(data),
        }
    }

    /// Opens a connection to `addr` in the background with `data` queued on it.
    fn connect(self: &Arc<Self>, addr: SocketAddr, data: Bytes) -> Result<(), TransportError> {
        let Some(local) = self
            .listeners
            .iter()
            .find(|l| l.is_ipv4() == addr.is_ipv4())
            .copied()
        else {
            return Err(TransportError::NoTransport(TransportKind::Tcp, addr));
        };
        if !self.reserve() {
            tracing::debug!(%addr, "tcp connect refused: max_connections reached");
            return Err(TransportError::ConnectionLimit(addr));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // The receiver is held below, so this cannot fail.
        let _ = tx.send(data);
        let id = self.register(addr, tx, false);
        let guard = ForgetGuard {
            tcp: self.clone(),
            id,
        };
        let task = self.handle.spawn(async move {
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect_from(local, addr)).await;
            match connected {
                Ok(Ok(stream)) => {
                    let local = stream.local_addr().unwrap_or(local);
                    tracing::debug!(peer = %addr, %local, conn = id.0, "tcp connection opened");
                    drive(guard, stream, addr, local, rx).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "tcp connect failed");
                    guard
                        .tcp
                        .shared
                        .counters
                        .send_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "tcp connect timed out");
                    guard
                        .tcp
                        .shared
                        .counters
                        .send_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        self.set_task(id, task.abort_handle());
        Ok(())
    }

    /// Closes every connection and aborts their tasks (shutdown).
    pub(crate) fn shutdown(&self) {
        let conns = self.conns.drain();
        for (id, conn) in conns {
            self.by_addr.remove_if(&conn.peer, |v| *v == id);
            self.shared
                .counters
                .tcp_connections_open
                .fetch_sub(1, Ordering::AcqRel);
            if let Some(task) = conn.task {
                task.abort();
            }
            tracing::debug!(peer = %conn.peer, conn = id.0, "tcp connection closed (shutdown)");
        }
    }
}

/// Connects to `addr` from the IP of our listener (port chosen by the system).
async fn connect_from(local: SocketAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !local.ip().is_unspecified() {
        socket.bind(SocketAddr::new(local.ip(), 0))?;
    }
    socket.connect(addr).await
}

/// Removes the connection from the table when its task ends or is aborted.
struct ForgetGuard {
    tcp: Arc<TcpTransport>,
    id: ConnectionId,
}

impl Drop for ForgetGuard {
    fn drop(&mut self) {
        self.tcp.forget(self.id);
    }
}

/// Aborts a task when dropped (the writer, when the connection's task ends).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Last traffic on a connection, in milliseconds since it opened (for the idle timeout).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Why a connection ended (for the debug log).
#[derive(Debug)]
enum End {
    Eof,
    Idle,
    SlowMessage,
    Oversize,
    Unframed,
    ReadError,
    WriteEnded,
}

/// Runs one connection: a writer task fed by `rx` and the reader here.
async fn drive(
    guard: ForgetGuard,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let shared = guard.tcp.shared.clone();
    let mut write_task = guard.tcp.handle.spawn(write_loop(
        writer,
        rx,
        shared.clone(),
        activity.clone(),
        peer,
    ));
    let _abort_writer = AbortOnDrop(write_task.abort_handle());
    let source = Target {
        transport: TransportKind::Tcp,
        addr: peer,
        connection: Some(guard.id),
    };
    let end = tokio::select! {
        end = read_loop(reader, &shared, source, local, &activity) => end,
        _ = &mut write_task => End::WriteEnded,
    };
    tracing::debug!(%peer, conn = guard.id.0, reason = ?end, "tcp connection ending");
    drop(guard);
}

async fn write_loop(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    peer: SocketAddr,
) {
    while let Some(data) = rx.recv().await {
        if let Err(e) = w.write_all(&data).await {
            tracing::debug!(%peer, error = %e, "tcp write failed");
            shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        activity.touch();
    }
}

async fn read_loop(
    mut r: OwnedReadHalf,
    shared: &Shared,
    source: Target,
    local: SocketAddr,
    activity: &Activity,
) -> End {
    let max = shared.limits.max_message_size;
    let idle = shared.limits.idle_timeout;
    let slow = shared.limits.message_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    // When the message now in `buf` must be complete.
    let mut due: Option<Instant> = None;
    loop {
        // Deliver every whole message already buffered.
        loop {
            match frame(&buf, max) {
                Frame::Incomplete => break,
                Frame::KeepAlive(n) => buf.advance(n),
                Frame::Message(n) => {
                    let msg = buf.split_to(n);
                    shared.deliver(&msg, source, local);
                    // What is left is the start of another message: its own deadline.
                    due = None;
                }
                Frame::TooLarge => {
                    shared
                        .counters
                        .tcp_oversize_closed
                        .fetch_add(1, Ordering::Relaxed);
                    return End::Oversize;
                }
                Frame::NoLength(head) => {
                    let err = missing_length(&buf[..head]);
                    shared.deliver_parsed(Err(err), source, local);
                    return End::Unframed;
                }
                Frame::BadLength(head) => {
                    let err = match parse(&buf[..head]) {
                        Err(e) => e,
                        Ok(_) => {
                            with_head_of(&buf[..head], ParseErrorKind::BadValue("Content-Length"))
                        }
                    };
                    shared.deliver_parsed(Err(err), source, local);
                    return End::Unframed;
                }
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let now = Instant::now();
        due = if buf.is_empty() {
            None
        } else {
            Some(due.unwrap_or(now + slow))
        };
        if due.is_some_and(|d| now >= d) {
            shared
                .counters
                .tcp_slow_closed
                .fetch_add(1, Ordering::Relaxed);
            return End::SlowMessage;
        }
        let waited = activity.idle_for();
        if waited >= idle {
            return End::Idle;
        }
        let mut wait = idle - waited;
        if let Some(d) = due {
            wait = wait.min(d - now);
        }
        match tokio::time::timeout(wait, r.read_buf(&mut buf)).await {
            Err(_) => continue, // re-check: the writer may have been busy meanwhile
            Ok(Ok(0)) => return End::Eof,
            Ok(Ok(_)) => activity.touch(),
            Ok(Err(e)) => {
                tracing::debug!(peer = %source.addr, error = %e, "tcp read failed");
                return End::ReadError;
            }
        }
    }
}

/// The error for a message on a stream without Content-Length (RFC 3261 18.3: it is
/// mandatory there). The parser's own error wins when the head is broken anyway.
fn missing_length(head: &[u8]) -> ParseError {
    match parse(head) {
        Err(e) => e,
        Ok(_) => with_head_of(head, ParseErrorKind::Missing("Content-Length")),
    }
}

/// A parse error of `kind` that keeps what the 400 needs when `head` is a request that
/// otherwise parses.
fn with_head_of(head: &[u8], kind: ParseErrorKind) -> ParseError {
    let head = match parse(head) {
        Ok((SipMessage::Request(req), _)) => {
            let mut headers = crate::sip::Headers::new();
            for via in &req.base.via {
                headers.push("Via", via.to_string());
            }
            headers.push("From", req.base.from.to_string());
            headers.push("To", req.base.to.to_string());
            headers.push("Call-ID", req.base.call_id.clone());
            headers.push("CSeq", req.base.cseq.to_string());
            Some(Box::new(RequestHead {
                method: req.method.to_string(),
                headers,
            }))
        }
        _ => None,
    };
    ParseError { kind, head }
}
