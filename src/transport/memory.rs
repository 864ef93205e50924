//! The in-memory transport: a network of endpoints, each with a socket address, exchanging
//! datagrams through channels. For tests, and for running dial plans against simulated
//! phones without a network.
//!
//! Owns: the endpoint table of each [`MemoryNetwork`]. Must not touch: real sockets.
//! Datagram semantics: a datagram to an address nobody holds is dropped silently, like UDP;
//! otherwise it always arrives, in order (the kind is unreliable, so the transaction layer
//! still retransmits, but nothing is lost here).

use crate::shard::ShardMap;
use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

type Datagram = (SocketAddr, Bytes);

/// A set of in-memory endpoints that can reach each other. Cheap to clone.
#[derive(Clone)]
pub struct MemoryNetwork {
    inner: Arc<NetworkInner>,
}

struct NetworkInner {
    /// Each endpoint's sender, with an id so that a replaced endpoint's drop does not
    /// remove its successor.
    endpoints: ShardMap<SocketAddr, (u64, mpsc::UnboundedSender<Datagram>)>,
    /// Where datagrams to an address with no endpoint go (`strowger route-test`: one
    /// simulated device answers whatever the dial plan dials); `None`: they are lost.
    fallback: parking_lot::RwLock<Option<SocketAddr>>,
    next_port: AtomicU16,
    next_id: AtomicU64,
}

impl Default for MemoryNetwork {
    fn default() -> Self {
        MemoryNetwork::new()
    }
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork").finish_non_exhaustive()
    }
}

impl MemoryNetwork {
    pub fn new() -> MemoryNetwork {
        MemoryNetwork {
            inner: Arc::new(NetworkInner {
                endpoints: ShardMap::new(),
                fallback: parking_lot::RwLock::new(None),
                next_port: AtomicU16::new(40_000),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The process-wide network used by `memory:IP:PORT` listen entries.
    pub fn global() -> MemoryNetwork {
        static GLOBAL: OnceLock<MemoryNetwork> = OnceLock::new();
        GLOBAL.get_or_init(MemoryNetwork::new).clone()
    }

    /// An endpoint at `addr` (port 0: a free port is chosen). An endpoint already at that
    /// address is replaced: it receives nothing more.
    pub fn endpoint(&self, addr: SocketAddr) -> MemoryEndpoint {
        let addr = self.resolve_port(addr);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.endpoints.insert(addr, (id, tx));
        self.make(addr, id, rx)
    }

    /// Like [`endpoint`](Self::endpoint) but fails with `AddrInUse` when the address is
    /// taken (what binding a listen address does).
    pub fn try_endpoint(&self, addr: SocketAddr) -> io::Result<MemoryEndpoint> {
        let addr = self.resolve_port(addr);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let taken = self
            .inner
            .endpoints
            .with(&addr, |slot| {
                if slot.1.is_closed() {
                    *slot = (id, tx.clone());
                    false
                } else {
                    true
                }
            })
            .unwrap_or_else(|| {
                // Not there: insert (a racing insert of the same address wins the later).
                self.inner.endpoints.insert(addr, (id, tx));
                false
            });
        if taken {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("memory address {addr} is in use"),
            ));
        }
        Ok(self.make(addr, id, rx))
    }

    fn make(
        &self,
        addr: SocketAddr,
        id: u64,
        rx: mpsc::UnboundedReceiver<Datagram>,
    ) -> MemoryEndpoint {
        MemoryEndpoint {
            addr,
            network: self.clone(),
            id,
            rx,
        }
    }

    fn resolve_port(&self, addr: SocketAddr) -> SocketAddr {
        if addr.port() != 0 {
            return addr;
        }
        // Ephemeral ports from 40000 up, skipping those in use; 0 is never handed out.
        loop {
            let p = self.inner.next_port.fetch_add(1, Ordering::Relaxed);
            if p == 0 {
                continue;
            }
            let candidate = SocketAddr::new(addr.ip(), p);
            if !self.inner.endpoints.contains(&candidate) {
                return candidate;
            }
        }
    }

    /// Sends one datagram from `from` to `to`; returns whether an endpoint was there.
    pub(crate) fn deliver(&self, from: SocketAddr, to: SocketAddr, data: Bytes) -> bool {
        match self.inner.endpoints.get(&to) {
            Some((_, tx)) => tx.send((from, data)).is_ok(),
            None => match *self.inner.fallback.read() {
                Some(fallback) if fallback != to => self.deliver(from, fallback, data),
                _ => false,
            },
        }
    }

    /// Datagrams to addresses with no endpoint go to `addr` from now on (`None`: lost).
    pub fn set_fallback(&self, addr: Option<SocketAddr>) {
        *self.inner.fallback.write() = addr;
    }
}

/// One address on a [`MemoryNetwork`]: a simulated phone or a server's memory transport.
/// Dropping it frees the address.
pub struct MemoryEndpoint {
    addr: SocketAddr,
    network: MemoryNetwork,
    id: u64,
    rx: mpsc::UnboundedReceiver<Datagram>,
}

impl MemoryEndpoint {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends a datagram; returns whether some endpoint was at `to` (false: dropped).
    pub fn send(&self, to: SocketAddr, data: Bytes) -> bool {
        self.network.deliver(self.addr, to, data)
    }

    /// The next datagram and who sent it; `None` once the endpoint has been replaced.
    pub async fn recv(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.rx.recv().await
    }

    /// The network it is on.
    pub fn network(&self) -> &MemoryNetwork {
        &self.network
    }
}

impl Drop for MemoryEndpoint {
    fn drop(&mut self) {
        let id = self.id;
        self.network
            .inner
            .endpoints
            .remove_if(&self.addr, |(owner, _)| *owner == id);
    }
}

impl std::fmt::Debug for MemoryEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEndpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn round_trip_and_drop() {
        let net = MemoryNetwork::new();
        let mut x = net.endpoint(a("10.0.0.1:5060"));
        let mut y = net.endpoint(a("10.0.0.2:0"));
        assert_ne!(y.local_addr().port(), 0);
        assert!(y.send(x.local_addr(), Bytes::from_static(b"hi")));
        assert_eq!(
            x.recv().await,
            Some((y.local_addr(), Bytes::from_static(b"hi")))
        );
        assert!(x.send(y.local_addr(), Bytes::from_static(b"yo")));
        assert_eq!(y.recv().await.map(|d| d.0), Some(x.local_addr()));
        let xa = x.local_addr();
        drop(x);
        assert!(!y.send(xa, Bytes::new()));
    }

    #[tokio::test]
    async fn try_endpoint_refuses_a_taken_address() {
        let net = MemoryNetwork::new();
        let x = net.try_endpoint(a("10.0.0.1:5060")).unwrap();
        assert!(net.try_endpoint(a("10.0.0.1:5060")).is_err());
        drop(x);
        assert!(net.try_endpoint(a("10.0.0.1:5060")).is_ok());
    }

    #[tokio::test]
    async fn replaced_endpoint_ends() {
        let net = MemoryNetwork::new();
        let mut old = net.endpoint(a("10.0.0.1:5060"));
        let mut new = net.endpoint(a("10.0.0.1:5060"));
        let peer = net.endpoint(a("10.0.0.3:5060"));
        peer.send(a("10.0.0.1:5060"), Bytes::from_static(b"x"));
        assert!(new.recv().await.is_some());
        // The old one no longer gets datagrams, and dropping it leaves the new one in place.
        assert_eq!(old.recv().await, None);
        drop(old);
        assert!(peer.send(a("10.0.0.1:5060"), Bytes::from_static(b"y")));
    }
}
