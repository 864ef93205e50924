//! The set of bound transports behind one [`Sender`]: binding every listen address,
//! delivering what is read, routing each send to UDP, TCP or memory, counters, shutdown.
//!
//! Owns: the tasks it starts and the counters. Must not touch: message contents (Via
//! processing is [`super::via`], framing [`super::frame`]).

use super::memory::{MemoryEndpoint, MemoryNetwork};
use super::tcp::TcpTransport;
use super::udp::{self, UdpTransport, MAX_DATAGRAM};
use super::{
    via, InboundSink, ListenAddr, Sender, Target, TransportError, TransportKind, TransportLimits,
    TransportStats,
};
use crate::sip::{ParseError, SipMessage};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::task::AbortHandle;

/// Counters behind [`TransportStats`]; `tcp_connections_open` is a gauge (it goes down
/// when connections close), the others only grow.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) tcp_oversize_closed: AtomicU64,
    pub(crate) tcp_slow_closed: AtomicU64,
    /// Accepted connections closed at once: `max_connections` open.
    pub(crate) tcp_refused_total: AtomicU64,
    /// Accepted connections closed at once: the source has `max_connections_per_source`.
    pub(crate) tcp_refused_per_source: AtomicU64,
    pub(crate) tcp_connections_open: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    /// Per transport, indexed by [`TransportKind::index`].
    pub(crate) by_kind: [KindCounters; 6],
}

#[derive(Default)]
pub(crate) struct KindCounters {
    pub(crate) open: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) handshakes_refused: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
}

impl Counters {
    pub(crate) fn kind(&self, kind: TransportKind) -> &KindCounters {
        &self.by_kind[kind.index()]
    }
}

/// What every reading task needs.
pub(crate) struct Shared {
    pub(crate) sink: Arc<dyn InboundSink>,
    pub(crate) limits: TransportLimits,
    pub(crate) counters: Counters,
    pub(crate) closed: AtomicBool,
    /// The smallest time a datagram waited in a UDP socket's kernel queue since
    /// [`Transports::take_udp_queue_delay`] last asked, in nanoseconds (`u64::MAX`: none
    /// read). The overload detector's view of the queue it cannot see from user space.
    pub(crate) udp_wait_min_ns: AtomicU64,
}

impl Shared {
    /// Parses one message (a datagram, or one framed TCP message) and delivers it.
    pub(crate) fn deliver(&self, data: &[u8], source: Target, local: SocketAddr) {
        self.deliver_queued(data, source, local, None);
    }

    /// [`Shared::deliver`] for a message that waited `queued` in a socket's kernel queue.
    pub(crate) fn deliver_queued(
        &self,
        data: &[u8],
        source: Target,
        local: SocketAddr,
        queued: Option<std::time::Duration>,
    ) {
        if !self.sink.screen(data, &source, queued) {
            self.count_received(&source);
            return;
        }
        let message = crate::sip::parse(data).map(|(m, _)| m);
        self.deliver_parsed(message, source, local);
    }

    /// Delivers a parsed message, after the Via processing every inbound request gets
    /// (RFC 3261 18.2.1, RFC 3581 4).
    pub(crate) fn deliver_parsed(
        &self,
        mut message: Result<SipMessage, ParseError>,
        source: Target,
        local: SocketAddr,
    ) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Ok(SipMessage::Request(req)) = &mut message {
            via::process_inbound(req, &source);
        }
        self.count_received(&source);
        self.sink.deliver(super::Inbound {
            message,
            source,
            local,
        });
    }

    fn count_received(&self, source: &Target) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.counters
            .kind(source.transport)
            .received
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Every bound transport; cheap to clone; implements [`Sender`].
#[derive(Clone)]
pub struct Transports {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    /// What was bound, in the order of `listen`, then memory attachments.
    bound: RwLock<Vec<(TransportKind, SocketAddr)>>,
    udp: Vec<UdpTransport>,
    tcp: Option<Arc<TcpTransport>>,
    /// Memory addresses this set sends from. A lock, but only the memory transport reads
    /// it, and writes happen only when an endpoint is attached.
    memory: RwLock<Vec<(MemoryNetwork, SocketAddr)>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("bound", &*self.inner.bound.read())
            .finish_non_exhaustive()
    }
}

impl Transports {
    /// Binds every listen address (port 0 = any free port) and starts reading into `sink`.
    /// `memory:` entries are endpoints on [`MemoryNetwork::global`].
    pub async fn bind(
        listen: &[ListenAddr],
        limits: TransportLimits,
        sink: Arc<dyn InboundSink>,
    ) -> Result<Transports, TransportError> {
        let handle = tokio::runtime::Handle::current();
        let shared = Arc::new(Shared {
            sink,
            limits,
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            udp_wait_min_ns: AtomicU64::new(u64::MAX),
        });
        // Bind everything first, so that a failure leaves nothing running.
        enum Bound {
            Udp(UdpTransport),
            Tcp(tokio::net::TcpListener, SocketAddr, TransportKind),
            Memory(MemoryEndpoint),
        }
        let mut bound = Vec::with_capacity(listen.len());
        for l in listen {
            let b = match l.kind {
                TransportKind::Udp => Bound::Udp(
                    udp::bind(l.addr, shared.limits.udp_recv_buffer)
                        .map_err(|e| TransportError::Bind(l.addr, e))?,
                ),
                TransportKind::Tcp
                | TransportKind::Tls
                | TransportKind::Ws
                | TransportKind::Wss => {
                    let secure = l.kind.is_secure();
                    if secure
                        && shared
                            .limits
                            .tls
                            .as_ref()
                            .and_then(|t| t.server_config())
                            .is_none()
                    {
                        return Err(TransportError::Bind(
                            l.addr,
                            std::io::Error::other(format!(
                                "a {} listener needs a certificate and key (tls.cert, tls.key)",
                                l.kind
                            )),
                        ));
                    }
                    let listener =
                        super::tcp::bind(l.addr).map_err(|e| TransportError::Bind(l.addr, e))?;
                    let local = listener
                        .local_addr()
                        .map_err(|e| TransportError::Bind(l.addr, e))?;
                    Bound::Tcp(listener, local, l.kind)
                }
                TransportKind::Memory => Bound::Memory(
                    MemoryNetwork::global()
                        .try_endpoint(l.addr)
                        .map_err(|e| TransportError::Bind(l.addr, e))?,
                ),
            };
            bound.push(b);
        }
        let addrs: Vec<(TransportKind, SocketAddr)> = bound
            .iter()
            .map(|b| match b {
                Bound::Udp(u) => (TransportKind::Udp, u.local),
                Bound::Tcp(_, a, kind) => (*kind, *a),
                Bound::Memory(e) => (TransportKind::Memory, e.local_addr()),
            })
            .collect();
        let udp: Vec<UdpTransport> = bound
            .iter()
            .filter_map(|b| match b {
                Bound::Udp(u) => Some(u.clone()),
                _ => None,
            })
            .collect();
        // TCP, TLS, WS and WSS connections all run on TCP and share one table and limits;
        // outgoing TLS needs it even without a listener of ours (a trunk over TLS).
        let tcp_addrs: Vec<(TransportKind, SocketAddr)> = addrs
            .iter()
            .filter(|(k, _)| k.is_reliable())
            .copied()
            .collect();
        let tcp = (!tcp_addrs.is_empty() || shared.limits.tls.is_some())
            .then(|| Arc::new(TcpTransport::new(shared.clone(), handle.clone(), tcp_addrs)));
        let memory = addrs
            .iter()
            .filter(|(k, _)| *k == TransportKind::Memory)
            .map(|(_, a)| (MemoryNetwork::global(), *a))
            .collect();
        let mut tasks = Vec::new();
        for b in bound {
            let task = match b {
                Bound::Udp(u) => handle.spawn(udp::recv_loop(u, shared.clone())),
                Bound::Tcp(listener, local, kind) => match &tcp {
                    Some(tcp) => handle.spawn(tcp.clone().accept_loop(listener, local, kind)),
                    None => continue, // cannot happen: a listener implies the TCP side
                },
                Bound::Memory(ep) => handle.spawn(memory_loop(ep, shared.clone())),
            };
            tasks.push(task.abort_handle());
        }
        for (kind, addr) in &addrs {
            tracing::debug!(%kind, %addr, "listening");
        }
        Ok(Transports {
            inner: Arc::new(Inner {
                shared,
                handle,
                bound: RwLock::new(addrs),
                udp,
                tcp,
                memory: RwLock::new(memory),
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// Puts this set on `network` at `addr` (port 0: a free port): datagrams to that address
    /// are delivered to the sink with [`TransportKind::Memory`], and sends with that kind go
    /// through the network. An endpoint already at `addr` is replaced.
    pub fn attach_memory(&self, network: &MemoryNetwork, addr: SocketAddr) {
        let ep = network.endpoint(addr);
        let local = ep.local_addr();
        let task = self
            .inner
            .handle
            .spawn(memory_loop(ep, self.inner.shared.clone()));
        self.inner.tasks.lock().push(task.abort_handle());
        self.inner.memory.write().push((network.clone(), local));
        self.inner
            .bound
            .write()
            .push((TransportKind::Memory, local));
    }

    /// What is actually bound, in the order of `listen` (memory attachments after).
    pub fn local_addrs(&self) -> Vec<(TransportKind, SocketAddr)> {
        self.inner.bound.read().clone()
    }

    /// Whether a transport of `kind` is there to send on (RFC 3261 18.1.1: a request too
    /// large for UDP goes over TCP when there is TCP).
    pub fn supports(&self, kind: TransportKind) -> bool {
        match kind {
            TransportKind::Udp => !self.inner.udp.is_empty(),
            TransportKind::Memory => !self.inner.memory.read().is_empty(),
            TransportKind::Tcp | TransportKind::Tls | TransportKind::Ws | TransportKind::Wss => {
                self.inner.tcp.as_ref().is_some_and(|t| t.supports(kind))
            }
        }
    }

    /// RFC 3261 18.1.1: where a request of `len` octets bound for `target` should go. A
    /// request over 1300 octets for UDP goes over TCP to the same address when TCP is
    /// bound (the caller then writes TCP in its Via before serializing); otherwise the
    /// target is unchanged (and a datagram over [`MAX_DATAGRAM`] fails with `TooLarge`).
    pub fn request_target(&self, target: &Target, len: usize) -> Target {
        if target.transport == TransportKind::Udp
            && super::needs_reliable(len)
            && self.supports(TransportKind::Tcp)
        {
            return Target {
                transport: TransportKind::Tcp,
                addr: target.addr,
                connection: None,
            };
        }
        *target
    }

    /// The smallest wait of a datagram in a UDP socket's kernel queue (from the kernel's
    /// receive timestamp, SO_TIMESTAMPNS, to the batch read) since the last call; `None`
    /// when nothing was read. Linux only.
    pub fn take_udp_queue_delay(&self) -> Option<std::time::Duration> {
        let ns = self
            .inner
            .shared
            .udp_wait_min_ns
            .swap(u64::MAX, Ordering::Relaxed);
        (ns != u64::MAX).then(|| std::time::Duration::from_nanos(ns))
    }

    /// Datagrams the kernel dropped because a UDP socket's receive queue was full
    /// (`sip.udp_recv_buffer_kb`), since the sockets were bound. Reads `/proc`: for a
    /// scrape, not for every message.
    pub fn udp_receive_drops(&self) -> u64 {
        udp::receive_drops(&self.inner.udp)
    }

    pub fn stats(&self) -> TransportStats {
        let c = &self.inner.shared.counters;
        TransportStats {
            received: c.received.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            tcp_oversize_closed: c.tcp_oversize_closed.load(Ordering::Relaxed),
            tcp_slow_closed: c.tcp_slow_closed.load(Ordering::Relaxed),
            tcp_refused_total: c.tcp_refused_total.load(Ordering::Relaxed),
            tcp_refused_per_source: c.tcp_refused_per_source.load(Ordering::Relaxed),
            tcp_connections_open: c.tcp_connections_open.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
            per_transport: TransportKind::ALL
                .iter()
                .map(|&k| {
                    let kc = c.kind(k);
                    (
                        k,
                        super::TransportKindStats {
                            connections_open: kc.open.load(Ordering::Relaxed),
                            handshakes_failed: kc.handshakes_failed.load(Ordering::Relaxed),
                            handshakes_refused: kc.handshakes_refused.load(Ordering::Relaxed),
                            received: kc.received.load(Ordering::Relaxed),
                            sent: kc.sent.load(Ordering::Relaxed),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Stops reading and closes every listener and connection; sends fail afterwards.
    /// Idempotent. UDP sockets are released when the last clone is dropped.
    pub fn shutdown(&self) {
        if self.inner.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for task in self.inner.tasks.lock().drain(..) {
            task.abort();
        }
        if let Some(tcp) = &self.inner.tcp {
            tcp.shutdown();
        }
        self.inner.memory.write().clear();
        tracing::debug!("transports shut down");
    }

    fn send_memory(&self, target: &Target, data: Bytes) -> Result<(), TransportError> {
        if data.len() > MAX_DATAGRAM {
            return Err(TransportError::TooLarge(data.len(), TransportKind::Memory));
        }
        let memory = self.inner.memory.read();
        let dest = target.addr;
        let from = memory
            .iter()
            .filter(|(_, a)| a.is_ipv4() == dest.is_ipv4())
            .max_by_key(|(_, a)| a.ip() == dest.ip())
            .or_else(|| memory.first());
        let Some((network, from)) = from else {
            return Err(TransportError::NoTransport(TransportKind::Memory, dest));
        };
        // Datagram semantics: nobody at `dest` means the datagram is lost, not an error.
        network.deliver(*from, dest, data);
        self.inner
            .shared
            .counters
            .sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Sender for Transports {
    fn send(&self, target: &Target, data: Bytes) -> Result<(), TransportError> {
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let result = match target.transport {
            TransportKind::Udp => udp::send(
                &self.inner.udp,
                &self.inner.shared,
                &self.inner.handle,
                target,
                data,
            ),
            TransportKind::Tcp | TransportKind::Tls | TransportKind::Ws | TransportKind::Wss => {
                match &self.inner.tcp {
                    Some(tcp) => tcp.send(target, data),
                    None => Err(TransportError::NoTransport(target.transport, target.addr)),
                }
            }
            TransportKind::Memory => self.send_memory(target, data),
        };
        if result.is_ok() {
            self.inner
                .shared
                .counters
                .kind(target.transport)
                .sent
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = &result {
            tracing::debug!(%target.addr, transport = %target.transport, error = %e, "send failed");
            self.inner
                .shared
                .counters
                .send_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

/// Reads an attached memory endpoint until the task is aborted.
async fn memory_loop(mut ep: MemoryEndpoint, shared: Arc<Shared>) {
    let local = ep.local_addr();
    while let Some((from, data)) = ep.recv().await {
        if data.iter().all(|&c| c == b'\r' || c == b'\n') {
            continue;
        }
        let source = Target {
            transport: TransportKind::Memory,
            addr: from,
            connection: None,
        };
        shared.deliver(&data, source, local);
    }
}
