//! Connections: TCP, and TLS and WebSocket (RFC 7118) on TCP: listeners, connections
//! (accepted and outbound), handshakes, framing by Content-Length on byte streams, a
//! writer per connection fed by a channel, and the connection table.
//!
//! Owns: every TCP socket and the table of open connections (by id, and by transport and
//! remote address for reuse), the handshake bound. Must not touch: message contents beyond
//! framing; parsing is [`crate::sip::parse`] and delivery is [`Shared::deliver`](super::set::Shared).
//! The WebSocket upgrade and message loop are in [`super::ws`]; certificates in
//! [`super::tls`].

use super::frame::{frame, Frame};
use super::set::Shared;
use super::{ConnectionId, Target, TransportError, TransportKind};
use crate::shard::ShardMap;
use crate::sip::{parse, ParseError, ParseErrorKind, RequestHead, SipMessage};
use bytes::{Buf, Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How long an outbound connect may take before the queued data is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's byte stream: plain TCP or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

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
    kind: TransportKind,
    peer: SocketAddr,
    /// Accepted from the peer (counted against its address's share), not opened by us.
    inbound: bool,
    /// The task driving the connection, once spawned (aborted on shutdown).
    task: Option<AbortHandle>,
}

/// The connection side (TCP, TLS, WS, WSS) of one [`Transports`](super::Transports).
pub(crate) struct TcpTransport {
    pub(crate) shared: Arc<Shared>,
    pub(crate) handle: tokio::runtime::Handle,
    conns: ShardMap<ConnectionId, Conn>,
    /// The newest open connection of each transport to each remote address, for reuse
    /// (RFC 3261 18.1.1 lets a client reuse a connection; 18.2.2 asks the server to use
    /// it for responses; RFC 5626 flows).
    by_addr: ShardMap<(TransportKind, SocketAddr), ConnectionId>,
    next_id: AtomicU64,
    /// Accepted connections open per remote IP (`sip.tcp_max_connections_per_source`).
    per_source: ShardMap<std::net::IpAddr, usize>,
    /// The bound listeners; outbound connections leave from the listener IP of the
    /// destination's family so the peer sees the address our Via carries.
    listeners: Vec<(TransportKind, SocketAddr)>,
    /// TLS handshakes and WebSocket upgrades in progress (bounded by `max_handshakes`).
    handshakes: AtomicUsize,
}

/// A handshake slot, given back when the handshake ends either way.
struct HandshakeSlot<'a>(&'a AtomicUsize);

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TcpTransport {
    pub(crate) fn new(
        shared: Arc<Shared>,
        handle: tokio::runtime::Handle,
        listeners: Vec<(TransportKind, SocketAddr)>,
    ) -> TcpTransport {
        TcpTransport {
            shared,
            handle,
            conns: ShardMap::new(),
            by_addr: ShardMap::new(),
            next_id: AtomicU64::new(1),
            per_source: ShardMap::new(),
            listeners,
            handshakes: AtomicUsize::new(0),
        }
    }

    /// Whether requests can go out on `kind`: TCP with a TCP listener, TLS with the TLS
    /// context (no listener needed: a trunk over TLS), WebSocket only over connections
    /// the peer opened (checked at send).
    pub(crate) fn supports(&self, kind: TransportKind) -> bool {
        match kind {
            TransportKind::Tls => self.shared.limits.tls.is_some(),
            _ => self.listeners.iter().any(|(k, _)| *k == kind),
        }
    }

    /// Takes a handshake slot under `max_handshakes`; `None` when they are all taken.
    fn handshake_slot(&self) -> Option<HandshakeSlot<'_>> {
        let before = self.handshakes.fetch_add(1, Ordering::AcqRel);
        let slot = HandshakeSlot(&self.handshakes);
        (before < self.shared.limits.max_handshakes).then_some(slot)
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
        kind: TransportKind,
        peer: SocketAddr,
        tx: mpsc::UnboundedSender<Bytes>,
        inbound: bool,
    ) -> ConnectionId {
        // Counted from 1: an id is never 0.
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = ConnectionId(std::num::NonZeroU64::new(n).unwrap_or(std::num::NonZeroU64::MAX));
        self.conns.insert(
            id,
            Conn {
                tx,
                kind,
                peer,
                inbound,
                task: None,
            },
        );
        self.by_addr.insert((kind, peer), id);
        self.shared
            .counters
            .kind(kind)
            .open
            .fetch_add(1, Ordering::Relaxed);
        id
    }

    fn set_task(&self, id: ConnectionId, task: AbortHandle) {
        self.conns.with(&id, |c| c.task = Some(task));
    }

    /// Removes a connection from the table and frees its slot; a no-op when it is gone
    /// already (so both the connection's own end and shutdown may call it).
    fn forget(&self, id: ConnectionId) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        self.by_addr
            .remove_if(&(conn.kind, conn.peer), |v| *v == id);
        if conn.inbound {
            self.release_source(conn.peer.ip());
        }
        self.shared
            .counters
            .tcp_connections_open
            .fetch_sub(1, Ordering::AcqRel);
        self.shared
            .counters
            .kind(conn.kind)
            .open
            .fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(peer = %conn.peer, conn = id.get(), transport = %conn.kind, "connection closed");
        if !self.shared.closed.load(Ordering::Acquire) {
            self.shared.sink.connection_closed(Target {
                transport: conn.kind,
                addr: conn.peer,
                connection: Some(id),
            });
        }
        Some(conn)
    }

    /// Accepts connections until the task is aborted.
    pub(crate) async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        local: SocketAddr,
        kind: TransportKind,
    ) {
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
            let id = self.register(kind, peer, tx, true);
            tracing::debug!(%peer, %local, conn = id.get(), transport = %kind, "connection accepted");
            let guard = ForgetGuard {
                tcp: self.clone(),
                id,
            };
            let task = self
                .handle
                .spawn(serve_accepted(guard, stream, kind, peer, local, rx));
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
        if let Some(id) = self.by_addr.get(&(target.transport, target.addr)) {
            match self.try_queue(id, data) {
                Ok(()) => return Ok(()),
                Err(d) => data = d,
            }
        }
        if target.transport.is_websocket() {
            // RFC 7118 5: the server cannot open a WebSocket connection to a browser; what
            // it reaches, it reaches over the connection the peer opened.
            return Err(TransportError::ConnectionClosed(target.addr));
        }
        self.connect(target.transport, target.addr, data)
    }

    fn try_queue(&self, id: ConnectionId, data: Bytes) -> Result<(), Bytes> {
        match self.conns.get(&id) {
            Some(conn) => conn.tx.send(data).map_err(|e| e.0),
            None => Err(data),
        }
    }

    /// Opens a connection to `addr` in the background with `data` queued on it.
    fn connect(
        self: &Arc<Self>,
        kind: TransportKind,
        addr: SocketAddr,
        data: Bytes,
    ) -> Result<(), TransportError> {
        // Leave from the IP of a listener of this transport (else of any connection
        // transport, else any: TLS towards a trunk needs no TLS listener of ours).
        let same_family = |k: Option<TransportKind>| {
            self.listeners
                .iter()
                .find(|(lk, l)| k.is_none_or(|k| k == *lk) && l.is_ipv4() == addr.is_ipv4())
                .map(|(_, l)| *l)
        };
        let local = match kind {
            TransportKind::Tcp => same_family(Some(TransportKind::Tcp)),
            TransportKind::Tls if self.shared.limits.tls.is_some() => Some(
                same_family(Some(TransportKind::Tls))
                    .or_else(|| same_family(None))
                    .unwrap_or_else(|| {
                        if addr.is_ipv4() {
                            SocketAddr::from(([0, 0, 0, 0], 0))
                        } else {
                            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
                        }
                    }),
            ),
            _ => None,
        };
        let Some(local) = local else {
            return Err(TransportError::NoTransport(kind, addr));
        };
        if !self.reserve() {
            tracing::debug!(%addr, "tcp connect refused: max_connections reached");
            return Err(TransportError::ConnectionLimit(addr));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // The receiver is held below, so this cannot fail.
        let _ = tx.send(data);
        let id = self.register(kind, addr, tx, false);
        let guard = ForgetGuard {
            tcp: self.clone(),
            id,
        };
        let task = self.handle.spawn(async move {
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect_from(local, addr)).await;
            let why = match connected {
                Ok(Ok(stream)) => {
                    let local = stream.local_addr().unwrap_or(local);
                    tracing::debug!(peer = %addr, %local, conn = id.get(), transport = %kind, "connection opened");
                    let _ = stream.set_nodelay(true);
                    if kind != TransportKind::Tls {
                        return drive(guard, stream, kind, addr, local, rx).await;
                    }
                    match tls_connect(&guard, stream, addr).await {
                        Ok(tls) => return drive(guard, tls, kind, addr, local, rx).await,
                        Err(why) => why,
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "tcp connect failed");
                    format!("connect failed: {e}")
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "tcp connect timed out");
                    "connect timed out".to_string()
                }
            };
            let shared = &guard.tcp.shared;
            shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            // What was queued for this connection will not go: tell the sender.
            let mut rx = rx;
            let target = Target {
                transport: kind,
                addr,
                connection: None,
            };
            while let Ok(data) = rx.try_recv() {
                shared.sink.undelivered(target, data, &why);
            }
        });
        self.set_task(id, task.abort_handle());
        Ok(())
    }

    /// Closes every connection and aborts their tasks (shutdown).
    pub(crate) fn shutdown(&self) {
        let conns = self.conns.drain();
        for (id, conn) in conns {
            self.by_addr
                .remove_if(&(conn.kind, conn.peer), |v| *v == id);
            self.shared
                .counters
                .tcp_connections_open
                .fetch_sub(1, Ordering::AcqRel);
            self.shared
                .counters
                .kind(conn.kind)
                .open
                .fetch_sub(1, Ordering::Relaxed);
            if let Some(task) = conn.task {
                task.abort();
            }
            tracing::debug!(peer = %conn.peer, conn = id.get(), "tcp connection closed (shutdown)");
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
pub(crate) struct ForgetGuard {
    pub(crate) tcp: Arc<TcpTransport>,
    pub(crate) id: ConnectionId,
}

impl Drop for ForgetGuard {
    fn drop(&mut self) {
        self.tcp.forget(self.id);
    }
}

/// Aborts a task when dropped (the writer, when the connection's task ends).
pub(crate) struct AbortOnDrop(pub(crate) AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Last traffic on a connection, in milliseconds since it opened (for the idle timeout).
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }
    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    pub(crate) fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Why a connection ended (for the debug log).
#[derive(Debug)]
pub(crate) enum End {
    Eof,
    Idle,
    SlowMessage,
    Oversize,
    Unframed,
    ReadError,
    WriteEnded,
    Closed,
}

/// Runs an accepted connection: its handshake (TLS, the WebSocket upgrade, both for WSS)
/// within `handshake_timeout` and under `max_handshakes`, then its messages.
async fn serve_accepted(
    guard: ForgetGuard,
    stream: TcpStream,
    kind: TransportKind,
    peer: SocketAddr,
    local: SocketAddr,
    rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let _ = stream.set_nodelay(true);
    if kind == TransportKind::Tcp {
        return drive(guard, stream, kind, peer, local, rx).await;
    }
    let tcp = guard.tcp.clone();
    let counters = tcp.shared.counters.kind(kind);
    let Some(slot) = tcp.handshake_slot() else {
        counters.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, transport = %kind, "connection refused: max_handshakes in progress");
        return;
    };
    let limits = &tcp.shared.limits;
    let within = limits.handshake_timeout;
    let failed = |e: String| {
        counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, transport = %kind, error = %e, "handshake failed");
    };
    match kind {
        TransportKind::Tls => {
            match settle(tokio::time::timeout(within, tls_accept(limits, stream)).await) {
                Ok(tls) => {
                    drop(slot);
                    drive(guard, tls, kind, peer, local, rx).await
                }
                Err(e) => failed(e),
            }
        }
        TransportKind::Ws => {
            match settle(tokio::time::timeout(within, super::ws::accept(stream, limits)).await) {
                Ok(ws) => {
                    drop(slot);
                    super::ws::drive(guard, ws, kind, peer, local, rx).await
                }
                Err(e) => failed(e),
            }
        }
        TransportKind::Wss => {
            let upgrade = async {
                let tls = tls_accept(limits, stream).await?;
                super::ws::accept(tls, limits).await
            };
            match settle(tokio::time::timeout(within, upgrade).await) {
                Ok(ws) => {
                    drop(slot);
                    super::ws::drive(guard, ws, kind, peer, local, rx).await
                }
                Err(e) => failed(e),
            }
        }
        TransportKind::Udp | TransportKind::Memory | TransportKind::Tcp => {}
    }
}

/// A handshake's outcome within its timeout, as one error.
fn settle<T>(r: Result<io::Result<T>, tokio::time::error::Elapsed>) -> Result<T, String> {
    match r {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The server side of a TLS handshake with the certificate configured now (a reload
/// changes what later handshakes get, not this connection).
async fn tls_accept<S: Io>(
    limits: &super::TransportLimits,
    stream: S,
) -> io::Result<tokio_rustls::server::TlsStream<S>> {
    let config = limits
        .tls
        .as_ref()
        .and_then(|t| t.server_config())
        .ok_or_else(|| io::Error::other("no certificate configured (tls.cert, tls.key)"))?;
    tokio_rustls::TlsAcceptor::from(config).accept(stream).await
}

/// The client side of a TLS handshake towards `addr`, verifying the server's certificate
/// against the name the locator found it by (RFC 5922 7: the SIP domain), or its IP.
async fn tls_connect(
    guard: &ForgetGuard,
    stream: TcpStream,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let shared = &guard.tcp.shared;
    let counters = shared.counters.kind(TransportKind::Tls);
    let Some(tls) = shared.limits.tls.as_ref() else {
        return Err("no TLS configured".into());
    };
    let name = super::tls::server_name_for(addr).unwrap_or_else(|| addr.ip().to_string());
    let (config, server_name) = match tls.client_for(&name) {
        Ok(c) => c,
        Err(e) => {
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, error = %e, "tls: cannot connect");
            return Err(format!("TLS: {e}"));
        }
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let within = shared.limits.handshake_timeout;
    settle(tokio::time::timeout(within, connector.connect(server_name, stream)).await).map_err(
        |e| {
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            // A peer whose certificate does not verify is an operator's problem to see.
            tracing::warn!(peer = %addr, server_name = %name, error = %e, "tls handshake failed");
            format!("TLS handshake with {name} failed: {e}")
        },
    )
}

/// Runs one byte-stream connection (TCP or TLS): a writer task fed by `rx` and the reader
/// here.
async fn drive<S: Io>(
    guard: ForgetGuard,
    stream: S,
    kind: TransportKind,
    peer: SocketAddr,
    local: SocketAddr,
    rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let (reader, writer) = tokio::io::split(stream);
    let activity = Activity::new();
    let shared = guard.tcp.shared.clone();
    // On a connection we opened, what we wrote before the peer said anything: if the
    // peer closes first (a TLS 1.3 server refusing our client certificate does so after
    // the handshake), it never arrived and its senders are told.
    let outbound = guard
        .tcp
        .conns
        .with(&guard.id, |c| !c.inbound)
        .unwrap_or(false);
    let unanswered = Arc::new(Unanswered(parking_lot::Mutex::new(outbound.then(Vec::new))));
    // The writer runs in this task, not its own, so that what is still queued when the
    // connection ends stays here to be reported: a TLS 1.3 server refusing our client
    // certificate can close before a separate writer task has even taken the first request.
    let mut rx = rx;
    let source = Target {
        transport: kind,
        addr: peer,
        connection: Some(guard.id),
    };
    let end = tokio::select! {
        end = read_loop(reader, &shared, source, local, &activity, &unanswered) => end,
        _ = write_loop(writer, &mut rx, &shared, &activity, peer, &unanswered) => End::WriteEnded,
    };
    tracing::debug!(%peer, conn = guard.id.get(), transport = %kind, reason = ?end, "connection ending");
    let target = Target {
        transport: kind,
        addr: peer,
        connection: None,
    };
    if matches!(end, End::Eof | End::ReadError | End::WriteEnded) {
        let lost = unanswered.0.lock().take().unwrap_or_default();
        for data in lost {
            shared
                .sink
                .undelivered(target, data, "the connection closed before any answer");
        }
    }
    // Queued and never written, whatever the reason the connection ended.
    rx.close();
    while let Ok(data) = rx.try_recv() {
        shared
            .sink
            .undelivered(target, data, "the connection closed before it was sent");
    }
    drop(guard);
}

/// Messages written on an outbound connection before anything was read from it (`None`
/// once something was, or on accepted connections). At most [`MAX_UNANSWERED`] are kept.
struct Unanswered(parking_lot::Mutex<Option<Vec<Bytes>>>);

const MAX_UNANSWERED: usize = 16;

impl Unanswered {
    fn written(&self, data: &Bytes) {
        if let Some(list) = self.0.lock().as_mut() {
            if list.len() < MAX_UNANSWERED {
                list.push(data.clone());
            }
        }
    }
    fn answered(&self) {
        let mut list = self.0.lock();
        if list.is_some() {
            *list = None;
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    shared: &Shared,
    activity: &Activity,
    peer: SocketAddr,
    unanswered: &Unanswered,
) {
    while let Some(data) = rx.recv().await {
        unanswered.written(&data);
        if let Err(e) = w.write_all(&data).await {
            tracing::debug!(%peer, error = %e, "write failed");
            shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // TLS buffers what it encrypts: push it out now (a no-op on plain TCP).
        if let Err(e) = w.flush().await {
            tracing::debug!(%peer, error = %e, "write failed");
            shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        activity.touch();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    shared: &Shared,
    source: Target,
    local: SocketAddr,
    activity: &Activity,
    unanswered: &Unanswered,
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
                    unanswered.answered();
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
