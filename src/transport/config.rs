//! The transport's keys of `[sip]`: `listen`, `max_message_size`, `tcp_idle_timeout_s`,
//! `workers` (the threads that read the sockets and carry each message to its end).
//!
//! Owns: what a valid value of those keys is. The `[sip]` struct itself is the UAS core's
//! (it also holds the server's identity and the transaction timers, which are not ours);
//! it calls these checks. Also the whole `[dns]` section ([`DnsConfig`]: `servers`,
//! `timeout_ms`), read by the locator (`locate.rs`).

use super::ListenAddr;
use crate::config_section::{check_range, InvalidValue, MAX_TIMEOUT_S};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// Smallest `sip.max_message_size`: less than 1 KiB cannot hold a real INVITE.
pub const MIN_MESSAGE_SIZE: usize = 1024;
/// Largest `sip.max_message_size`: more than 16 MiB is a typo that would let one peer make
/// us buffer that much per connection.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Checks the form of a `sip.listen` entry: `udp:IP:PORT`, `tcp:IP:PORT` or
/// `memory:IP:PORT` (the in-process network), IPv6 in brackets (`tcp:[::1]:5060`), the
/// transport in lower case as the docs write it. Host names are refused: a listener binds
/// an address.
pub fn validate_listen_entry(entry: &str) -> Result<ListenAddr, String> {
    let transport = entry.split_once(':').map_or("", |(t, _)| t);
    if transport.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "{entry:?}: unknown transport {transport:?} (expected udp, tcp, tls, ws, wss or memory)"
        ));
    }
    entry.parse()
}

/// `sip.listen`: at least one entry, each of the form [`validate_listen_entry`] accepts.
pub fn check_listen(listen: &[String]) -> Result<(), InvalidValue> {
    if listen.is_empty() {
        return Err(InvalidValue::new(
            "listen",
            "at least one address is required (e.g. \"udp:127.0.0.1:5060\")",
        ));
    }
    for (i, entry) in listen.iter().enumerate() {
        if let Err(problem) = validate_listen_entry(entry) {
            return Err(InvalidValue::entry(
                "listen",
                i,
                format!("bad entry: {problem}"),
            ));
        }
    }
    Ok(())
}

/// `sip.max_message_size` and `sip.tcp_idle_timeout_s`.
pub fn check_limits(max_message_size: usize, tcp_idle_timeout_s: u64) -> Result<(), InvalidValue> {
    check_range(
        "max_message_size",
        max_message_size,
        MIN_MESSAGE_SIZE,
        MAX_MESSAGE_SIZE,
    )?;
    check_range("tcp_idle_timeout_s", tcp_idle_timeout_s, 1, MAX_TIMEOUT_S)
}

/// Most `sip.workers`: more threads than this is a typo.
pub const MAX_WORKERS: usize = 1024;

/// `sip.workers`: 0 (one per core) up to [`MAX_WORKERS`].
pub fn check_workers(workers: usize) -> Result<(), InvalidValue> {
    check_range("workers", workers, 0, MAX_WORKERS)
}

/// Most `dns.servers`: a resolver tries them in turn, and more than this only lengthens
/// the wait for a dead network.
pub const MAX_DNS_SERVERS: usize = 8;
/// Longest `dns.timeout_ms`: a look-up waits at most this times the attempts before a call
/// gets 503; SIP's own Timer B (32 s) bounds the whole attempt.
pub const MAX_DNS_TIMEOUT_MS: u64 = 30_000;

/// `[dns]`: where the locator (RFC 3263 server location) sends its queries.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive name servers, `"IP:PORT"` or `"IP"` (port 53), IPv6 in brackets when a port
    /// is given (`"[::1]:53"`); tried in the order written. Empty: the system's
    /// `/etc/resolv.conf`.
    pub servers: Vec<String>,
    /// How long one query waits for an answer before it is sent again (2 attempts per
    /// server), milliseconds. Short next to a resolver's usual 5 s: a caller is waiting.
    pub timeout_ms: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout_ms: 2000,
        }
    }
}

impl DnsConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        if self.servers.len() > MAX_DNS_SERVERS {
            return Err(InvalidValue::new(
                "servers",
                format!(
                    "at most {MAX_DNS_SERVERS} servers (got {})",
                    self.servers.len()
                ),
            ));
        }
        for (i, entry) in self.servers.iter().enumerate() {
            if let Err(problem) = parse_dns_server(entry) {
                return Err(InvalidValue::entry("servers", i, problem));
            }
        }
        check_range("timeout_ms", self.timeout_ms, 1, MAX_DNS_TIMEOUT_MS)
    }

    /// The servers as socket addresses (entries that do not parse are left out; `check`
    /// has refused them at start-up).
    pub fn server_addrs(&self) -> Vec<SocketAddr> {
        self.servers
            .iter()
            .filter_map(|s| parse_dns_server(s).ok())
            .collect()
    }
}

/// One `dns.servers` entry: `IP:PORT`, `[IPv6]:PORT`, or a bare IP for port 53. A name is
/// refused: it would need a resolver to find the resolver.
pub fn parse_dns_server(entry: &str) -> Result<SocketAddr, String> {
    let entry = entry.trim();
    let addr = match entry.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match entry.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => {
                return Err(format!(
                    "{entry:?} is not an IP address or IP:PORT (e.g. \"192.0.2.53\", \"[::1]:53\")"
                ))
            }
        },
    };
    if addr.port() == 0 {
        return Err(format!("{entry:?}: port 0"));
    }
    if addr.ip().is_unspecified() {
        return Err(format!(
            "{entry:?}: an unspecified address cannot be queried"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_servers() {
        for (ok, want) in [
            ("192.0.2.53", "192.0.2.53:53"),
            ("127.0.0.1:5353", "127.0.0.1:5353"),
            ("::1", "[::1]:53"),
            ("[2001:db8::53]:5300", "[2001:db8::53]:5300"),
        ] {
            assert_eq!(parse_dns_server(ok).unwrap().to_string(), want, "{ok}");
        }
        for bad in [
            "",
            "dns.example",
            "127.0.0.1:0",
            "0.0.0.0",
            "1.2.3.4:99999",
            "[::1]",
        ] {
            assert!(parse_dns_server(bad).is_err(), "{bad}");
        }
        let c = DnsConfig {
            servers: vec!["127.0.0.1".into(), "nope".into()],
            ..DnsConfig::default()
        };
        let e = c.check().unwrap_err();
        assert_eq!((e.key.as_str(), e.index), ("servers", Some(1)));
        assert!(e.message.contains("nope"), "{e}");
        let c = DnsConfig {
            servers: vec!["127.0.0.1".into(); MAX_DNS_SERVERS + 1],
            ..DnsConfig::default()
        };
        assert_eq!(c.check().unwrap_err().key, "servers");
        let c = DnsConfig {
            timeout_ms: 0,
            ..DnsConfig::default()
        };
        assert_eq!(c.check().unwrap_err().key, "timeout_ms");
        assert!(DnsConfig::default().check().is_ok());
    }

    #[test]
    fn listen_entries() {
        for ok in [
            "udp:127.0.0.1:5060",
            "tcp:0.0.0.0:0",
            "udp:[::1]:5060",
            "tcp:[2001:db8::1]:5080",
        ] {
            assert!(validate_listen_entry(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "udp",
            "udp:nohost",
            "udp:127.0.0.1",
            "sctp:127.0.0.1:5060",
            "UDP:127.0.0.1:5060",
            "udp:::1:5060",
            "udp:example.com:5060",
            "udp:127.0.0.1:70000",
        ] {
            assert!(validate_listen_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_list_names_the_entry() {
        let e = check_listen(&["udp:127.0.0.1:5060".into(), "udp:nohost".into()]).unwrap_err();
        assert_eq!((e.key.as_str(), e.index), ("listen", Some(1)));
        assert!(e.message.contains("udp:nohost"), "{e}");
        assert_eq!(check_listen(&[]).unwrap_err().key, "listen");
    }

    #[test]
    fn limits() {
        assert!(check_limits(65535, 300).is_ok());
        assert_eq!(check_limits(100, 300).unwrap_err().key, "max_message_size");
        assert_eq!(
            check_limits(65535, 0).unwrap_err().key,
            "tcp_idle_timeout_s"
        );
    }
}
