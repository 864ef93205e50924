//! Transports: UDP, TCP and in-memory, behind one interface.
//!
//! Owns: sockets, TCP connections and framing, Via `received`/`rport` on inbound requests
//! (RFC 3261 18.2.1, RFC 3581), the choice of where a response goes (18.2.2), the
//! server's own addresses per transport and server location per RFC 3263 ([`LocalAddrs`],
//! [`Locator`], [`resolve`]).
//! Must not touch: transactions or anything above; it hands parsed messages to an
//! [`InboundSink`] and sends bytes it is given through [`Sender`].

pub mod config;
mod frame;
mod listen;
mod local;
pub mod locate;
pub mod memory;
mod set;
mod tcp;
pub mod tls;
mod udp;
pub mod via;
mod ws;

pub use listen::ListenAddr;
pub use local::{resolve, ContactFlows, LocalAddrs, ResolveError};
pub use locate::Locator;
pub use memory::{MemoryEndpoint, MemoryNetwork};
pub use set::Transports;
pub use udp::{outbox, MAX_DATAGRAM};
pub use via::{process_inbound, DEFAULT_SIP_PORT};

use crate::sip::{ParseError, SipMessage};
use bytes::Bytes;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
pub use tls::TlsContext;

/// Which transport a message came on or goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Udp,
    Tcp,
    /// In-process datagrams between endpoints of a [`memory`] network (tests, simulated
    /// phones). Unreliable like UDP, so the transaction layer retransmits over it.
    Memory,
    /// TCP with TLS (RFC 3261 26.2; `sips:` hops).
    Tls,
    /// SIP over WebSocket (RFC 7118), one SIP message per WebSocket message.
    Ws,
    /// SIP over secure WebSocket (RFC 7118), WebSocket over TLS.
    Wss,
}

impl TransportKind {
    /// Reliable transports get no retransmissions (RFC 3261 17.1.1.2) and Timer K/J/I of 0.
    pub fn is_reliable(self) -> bool {
        !matches!(self, TransportKind::Udp | TransportKind::Memory)
    }
    /// Whether the hop is encrypted (TLS or WSS): what a `sips:` URI requires.
    pub fn is_secure(self) -> bool {
        matches!(self, TransportKind::Tls | TransportKind::Wss)
    }
    /// WebSocket transports: the server cannot open a connection to the peer (a browser),
    /// so a request reaches it only over the connection it opened (RFC 7118 5).
    pub fn is_websocket(self) -> bool {
        matches!(self, TransportKind::Ws | TransportKind::Wss)
    }
    /// Every kind, in the order of [`TransportKind::index`].
    pub const ALL: [TransportKind; 6] = [
        TransportKind::Udp,
        TransportKind::Tcp,
        TransportKind::Memory,
        TransportKind::Tls,
        TransportKind::Ws,
        TransportKind::Wss,
    ];
    /// A dense index (0..6), for per-transport counters.
    pub fn index(self) -> usize {
        self as usize
    }
    /// Kinds whose connections begin with a handshake (TLS, a WebSocket upgrade, or both).
    pub fn has_handshake(self) -> bool {
        matches!(
            self,
            TransportKind::Tls | TransportKind::Ws | TransportKind::Wss
        )
    }
    /// The name used in Via headers.
    pub fn via_name(self) -> &'static str {
        match self {
            TransportKind::Udp | TransportKind::Memory => "UDP",
            TransportKind::Tcp => "TCP",
            TransportKind::Tls => "TLS",
            TransportKind::Ws => "WS",
            TransportKind::Wss => "WSS",
        }
    }
}

impl TransportKind {
    /// The name as operators see it (`udp`, `tcp`, `tls`, `ws`, `wss`, `memory`).
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Udp => "udp",
            TransportKind::Tcp => "tcp",
            TransportKind::Memory => "memory",
            TransportKind::Tls => "tls",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `transport:address`, e.g. `udp:127.0.0.1:5070`, as call records, traces and the
/// admin API name a peer. Written by hand: `SocketAddr`'s `Display` costs ~1,200
/// instructions for an IPv4 address (issue 14).
pub fn peer_text(transport: TransportKind, addr: &std::net::SocketAddr) -> String {
    let mut out = String::with_capacity(32);
    out.push_str(transport.as_str());
    out.push(':');
    match addr {
        std::net::SocketAddr::V4(a) => {
            let _ = crate::sip::write_ipv4(&mut out, *a.ip());
            let _ = crate::sip::write_port(&mut out, a.port());
        }
        std::net::SocketAddr::V6(_) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{addr}");
        }
    }
    out
}

/// Identifies one TCP connection while it is open. Never 0, so that an
/// `Option<ConnectionId>` is 8 bytes and a [`Target`] 48 (issue 14: a call, its dialogs,
/// its transactions and its ladder hold several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(std::num::NonZeroU64);

impl ConnectionId {
    /// The connection with number `n`; there is none numbered 0.
    pub fn new(n: u64) -> Option<ConnectionId> {
        std::num::NonZeroU64::new(n).map(ConnectionId)
    }

    /// Its number (as logs and stored bindings show it).
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

/// Where a message goes (or came from): transport, remote address, and for connection
/// transports the connection to use when it is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub transport: TransportKind,
    pub addr: SocketAddr,
    pub connection: Option<ConnectionId>,
}

/// A message read from the network, with where it came from.
#[derive(Debug)]
pub struct Inbound {
    /// The parsed message, or why it could not be parsed.
    pub message: Result<SipMessage, ParseError>,
    /// The remote end (for TCP, with the connection it arrived on).
    pub source: Target,
    /// The local address it arrived on.
    pub local: SocketAddr,
}

/// Receives what the transports read. Called on the transport's own task: do not block.
pub trait InboundSink: Send + Sync + 'static {
    fn deliver(&self, inbound: Inbound);
    /// A connection closed (either end, or an idle or error close): what was reached
    /// through it (RFC 5626 flows, WebSocket registrations) is reached no more.
    fn connection_closed(&self, _connection: Target) {}
    /// Messages queued for a connection that could not be opened or secured (connect or
    /// TLS handshake failed): what was sent is lost, and its sender should know.
    fn undelivered(&self, _target: Target, _data: Bytes, _why: &str) {}
    /// A look at a message before it is parsed: false when the sink has dealt with it
    /// from its bytes alone (e.g. refused a new call under overload), and it is not to be
    /// parsed nor delivered. `queued`: how long it waited in the kernel's socket queue
    /// before it was read, where the transport knows (UDP on Linux). Called on the
    /// transport's own task: do not block.
    fn screen(&self, _data: &[u8], _source: &Target, _queued: Option<std::time::Duration>) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no {0} transport to send to {1}")]
    NoTransport(TransportKind, SocketAddr),
    #[error("connection to {0} is closed")]
    ConnectionClosed(SocketAddr),
    #[error("message of {0} octets is too large for {1}")]
    TooLarge(usize, TransportKind),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("too many connections open; cannot connect to {0}")]
    ConnectionLimit(SocketAddr),
    #[error("transports are shut down")]
    Closed,
}

/// Sends serialized messages. Synchronous and non-blocking: it queues or sends at once and
/// reports only what it knows now, so that the transaction layer never awaits under a lock.
pub trait Sender: Send + Sync + 'static {
    fn send(&self, target: &Target, data: Bytes) -> Result<(), TransportError>;
}

// ---- The transports themselves live in submodules; their public items are re-exported
// here so that `crate::transport::{ListenAddr, Transports, ...}` stay the paths. --------

/// Limits the transports enforce.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// Largest message accepted (TCP: over it the connection is closed and counted).
    pub max_message_size: usize,
    /// A TCP connection with no traffic for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// Most TCP connections open at once (accepted + outgoing).
    pub max_connections: usize,
    /// Most connections accepted from one IP address open at once (0: no bound).
    pub max_connections_per_source: usize,
    /// A message begun on a TCP connection must be complete within this, or the connection
    /// is closed (a slow sender holding a connection and a buffer, "slowloris").
    pub message_timeout: std::time::Duration,
    /// SO_RCVBUF asked for each UDP socket, bytes (0: the system's default). The kernel
    /// caps it at `net.core.rmem_max`; what it granted is logged at start.
    pub udp_recv_buffer: usize,
    /// Percentage of UDP datagrams dropped at random on receive and on send (a rehearsal
    /// of a lossy network; 0 = none).
    pub udp_loss_percent: u32,
    /// Certificates for `tls:`/`wss:` listeners and outgoing TLS; `None`: no TLS (a `tls:`
    /// or `wss:` listener then fails to bind with a clear error).
    pub tls: Option<Arc<TlsContext>>,
    /// A TLS handshake (or WebSocket upgrade) not done within this closes the connection.
    pub handshake_timeout: std::time::Duration,
    /// Most TLS handshakes and WebSocket upgrades in progress at once; more are refused.
    pub max_handshakes: usize,
    /// `Origin` values a WebSocket upgrade may carry (RFC 6455 10.2); empty: any.
    pub ws_allowed_origins: Vec<String>,
    /// A WebSocket connection is pinged this often (0: never); a peer that does not
    /// answer within the idle timeout is closed.
    pub ws_ping_interval: std::time::Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            max_message_size: 65535,
            idle_timeout: std::time::Duration::from_secs(300),
            max_connections: 10_000,
            max_connections_per_source: 1_000,
            message_timeout: std::time::Duration::from_secs(10),
            udp_recv_buffer: 0,
            udp_loss_percent: 0,
            tls: None,
            handshake_timeout: std::time::Duration::from_secs(10),
            max_handshakes: 256,
            ws_allowed_origins: Vec::new(),
            ws_ping_interval: std::time::Duration::from_secs(30),
        }
    }
}

/// Counters of the transports: monotonic, except `tcp_connections_open`, which is the
/// number open now.
#[derive(Debug, Clone, Default)]
pub struct TransportStats {
    pub received: u64,
    pub sent: u64,
    pub tcp_oversize_closed: u64,
    /// Connections closed because a message took longer than `message_timeout`.
    pub tcp_slow_closed: u64,
    /// Connections refused at accept: `max_connections` open, or the source's share.
    pub tcp_refused_total: u64,
    pub tcp_refused_per_source: u64,
    pub tcp_connections_open: u64,
    pub send_errors: u64,
    /// Per transport, in the order of [`TransportKind::ALL`].
    pub per_transport: Vec<(TransportKind, TransportKindStats)>,
}

/// One transport's counters (connections are those of TCP, TLS, WS and WSS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportKindStats {
    /// Connections open now (accepted and outgoing, handshakes in progress included).
    pub connections_open: u64,
    /// TLS handshakes or WebSocket upgrades that failed or timed out.
    pub handshakes_failed: u64,
    /// Connections refused before their handshake: `max_handshakes` in progress.
    pub handshakes_refused: u64,
    /// Messages read.
    pub received: u64,
    /// Messages handed to the transport to send.
    pub sent: u64,
}

/// Where a response to a request goes (RFC 3261 18.2.2, RFC 3581 section 4): over the
/// connection it came on for TCP; for UDP to the source IP (`received`) and the `rport` port
/// when present, else the sent-by port (5060 by default). `maddr` is ignored: the server never
/// sends to an address other than the one the request came from.
pub fn response_target(via: &crate::sip::Via, source: &Target) -> Target {
    via::response_target(via, source)
}

/// [`response_target`] from the top Via's `rport` (`Some(None)`: asked for without a
/// value) and sent-by port, for a request read without a parse (`sip::peek_request`).
pub fn response_target_of(
    rport: Option<Option<u16>>,
    sent_by_port: Option<u16>,
    source: &Target,
) -> Target {
    via::response_target_of(rport, sent_by_port, source)
}

/// RFC 3261 18.1.1: a request larger than 1300 octets (path MTU unknown) must go over a
/// congestion-controlled transport.
pub fn needs_reliable(len: usize) -> bool {
    len > 1300
}

#[cfg(test)]
mod peer_text_tests {
    use super::{peer_text, TransportKind};

    #[test]
    fn peer_text_prints_as_core_prints_the_address() {
        for (kind, addr) in [
            (TransportKind::Udp, "127.0.0.1:5070"),
            (TransportKind::Tls, "10.200.3.4:5061"),
            (TransportKind::Ws, "[::1]:8080"),
            (TransportKind::Tcp, "[2001:db8::1]:5060"),
        ] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(peer_text(kind, &addr), format!("{kind}:{addr}"));
        }
    }
}
