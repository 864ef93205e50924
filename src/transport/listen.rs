//! `sip.listen` entries: `udp:127.0.0.1:5060`, `tcp:[::1]:5060`, `memory:10.0.0.1:5060`.
//!
//! Owns: the text form of a listen address. Must not touch: sockets.

use super::TransportKind;
use std::fmt;
use std::net::SocketAddr;

/// One `sip.listen` entry: `udp:127.0.0.1:5060`, `tcp:[::1]:5060`, `memory:10.0.0.1:5060`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub kind: TransportKind,
    pub addr: SocketAddr,
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let Some((transport, addr)) = s.split_once(':') else {
            return Err(format!(
                "{s:?}: expected TRANSPORT:IP:PORT, e.g. \"udp:127.0.0.1:5060\""
            ));
        };
        let kind = match transport.to_ascii_lowercase().as_str() {
            "udp" => TransportKind::Udp,
            "tcp" => TransportKind::Tcp,
            "memory" => TransportKind::Memory,
            "tls" => TransportKind::Tls,
            "ws" => TransportKind::Ws,
            "wss" => TransportKind::Wss,
            _ => {
                return Err(format!(
                    "{s:?}: unknown transport {transport:?} (expected udp, tcp, tls, ws, wss or memory)"
                ))
            }
        };
        // Host names are refused: a listener binds an address.
        let addr = addr.parse::<SocketAddr>().map_err(|_| {
            format!("{s:?}: {addr:?} is not IP:PORT (IPv6 goes in brackets: \"{kind}:[::1]:5060\")")
        })?;
        Ok(ListenAddr { kind, addr })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SocketAddr's Display brackets IPv6, which is the form FromStr reads back.
        write!(f, "{}:{}", self.kind, self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        for s in ["udp:127.0.0.1:5060", "tcp:[::1]:0", "memory:10.0.0.1:5060"] {
            let l: ListenAddr = s.parse().unwrap();
            assert_eq!(l.to_string(), s);
        }
        let l: ListenAddr = "TCP:[::1]:0".parse().unwrap();
        assert_eq!(l.kind, TransportKind::Tcp);
        assert!(l.addr.is_ipv6());
    }

    #[test]
    fn clear_errors() {
        let e = "127.0.0.1".parse::<ListenAddr>().unwrap_err();
        assert!(e.contains("TRANSPORT:IP:PORT"), "{e}");
        let e = "sctp:127.0.0.1:5060".parse::<ListenAddr>().unwrap_err();
        assert!(e.contains("unknown transport \"sctp\""), "{e}");
        let e = "udp:localhost:5060".parse::<ListenAddr>().unwrap_err();
        assert!(e.contains("is not IP:PORT"), "{e}");
        let e = "udp:::1:5060".parse::<ListenAddr>().unwrap_err();
        assert!(e.contains("brackets"), "{e}");
        assert!("udp:127.0.0.1".parse::<ListenAddr>().is_err());
        assert!("udp:127.0.0.1:99999".parse::<ListenAddr>().is_err());
    }
}
