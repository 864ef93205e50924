//! The transport's keys of `[sip]`: `listen`, `max_message_size`, `tcp_idle_timeout_s`,
//! `workers` (the threads that read the sockets and carry each message to its end).
//!
//! Owns: what a valid value of those keys is. The `[sip]` struct itself is the UAS core's
//! (it also holds the server's identity and the transaction timers, which are not ours);
//! it calls these checks. Also the whole `[dns]` section ([`DnsConfig`]: `servers`,
//! `timeout_ms`), read by the locator (`locate.rs`), and the `[tls]` ([`TlsConfig`]) and
//! `[ws]` ([`WsConfig`]) sections, read by the server into `TransportLimits`.
//!
//! Only the form of `[tls]` is checked here (both files or neither, numbers in range, a
//! `tls:`/`wss:` listener has a certificate: [`check_tls_listeners`]); whether the files
//! hold a usable certificate and key is `tls::check_files`' business, at start and in
//! `strowger check`, because a file can change between the two.

use super::ListenAddr;
use crate::config_section::{check_range, InvalidValue, MAX_TIMEOUT_S};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

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

/// Longest `tls.handshake_timeout_ms`: a handshake is a few round trips; a minute is
/// already a peer holding a slot for nothing.
pub const MAX_HANDSHAKE_TIMEOUT_MS: u64 = 60_000;
/// Least `tls.handshake_timeout_ms`: below it a slow mobile link cannot finish.
pub const MIN_HANDSHAKE_TIMEOUT_MS: u64 = 100;
/// Most `tls.max_handshakes`: each costs a task and buffers; more is a typo.
pub const MAX_HANDSHAKES: usize = 100_000;

/// `[tls]`: the certificate of `tls:` and `wss:` listeners, the roots outgoing TLS
/// verifies servers against, and the bounds on handshakes (TLS and WebSocket upgrades).
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first) presented by `tls:`/`wss:` listeners; "": none
    /// (then no such listener may be configured). Relative paths from the working directory.
    pub cert: String,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// PEM CA bundle outgoing TLS verifies servers against; "": the system's roots.
    pub ca: String,
    /// A TLS handshake or WebSocket upgrade not done within this is closed, milliseconds.
    pub handshake_timeout_ms: u64,
    /// Handshakes and upgrades in progress at once; past it new connections are closed.
    pub max_handshakes: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: String::new(),
            key: String::new(),
            ca: String::new(),
            handshake_timeout_ms: 10_000,
            max_handshakes: 256,
        }
    }
}

impl TlsConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        for (key, value) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
            if value.chars().any(char::is_control) {
                return Err(InvalidValue::new(
                    key,
                    "a file path without control characters",
                ));
            }
        }
        match (self.cert.trim().is_empty(), self.key.trim().is_empty()) {
            (false, true) => {
                return Err(InvalidValue::new(
                    "key",
                    "tls.cert is set: tls.key must name its private key file",
                ))
            }
            (true, false) => {
                return Err(InvalidValue::new(
                    "cert",
                    "tls.key is set: tls.cert must name its certificate file",
                ))
            }
            _ => {}
        }
        check_range(
            "handshake_timeout_ms",
            self.handshake_timeout_ms,
            MIN_HANDSHAKE_TIMEOUT_MS,
            MAX_HANDSHAKE_TIMEOUT_MS,
        )?;
        check_range("max_handshakes", self.max_handshakes, 1, MAX_HANDSHAKES)
    }

    /// Whether a server certificate is configured.
    pub fn has_cert(&self) -> bool {
        !self.cert.trim().is_empty()
    }

    /// The files as the TLS context reads them.
    pub fn files(&self) -> super::tls::TlsFiles {
        let path = |s: &str| PathBuf::from(s.trim());
        super::tls::TlsFiles {
            cert: path(&self.cert),
            key: path(&self.key),
            ca: (!self.ca.trim().is_empty()).then(|| path(&self.ca)),
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// `sip.listen` against `[tls]`: a `tls:` or `wss:` entry needs `tls.cert` (the key is
/// then required by [`TlsConfig::check`]). The error names the entry (`listen`, its index),
/// which is in the operator's file, where an unset `tls.cert` may not be.
pub fn check_tls_listeners(listen: &[String], tls: &TlsConfig) -> Result<(), InvalidValue> {
    if tls.has_cert() {
        return Ok(());
    }
    for (i, entry) in listen.iter().enumerate() {
        if let Ok(addr) = entry.parse::<ListenAddr>() {
            if addr.kind.is_secure() {
                return Err(InvalidValue::entry(
                    "listen",
                    i,
                    format!("{entry:?} needs a certificate: set tls.cert and tls.key (PEM files)"),
                ));
            }
        }
    }
    Ok(())
}

/// Longest `ws.ping_interval_s`: NAT bindings and proxies drop idle connections in minutes.
pub const MAX_WS_PING_INTERVAL_S: u64 = 3600;
/// Least `ws.ping_interval_s` (when not 0): more often is traffic for nothing.
pub const MIN_WS_PING_INTERVAL_S: u64 = 5;
/// Most `ws.allowed_origins` entries.
pub const MAX_WS_ORIGINS: usize = 256;

/// `[ws]`: WebSocket (`ws:`, `wss:` listeners, RFC 7118).
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// `Origin` values (RFC 6454: `scheme://host[:port]`, no path) an upgrade may carry;
    /// others are refused with 403. Empty: any origin, and upgrades without one.
    pub allowed_origins: Vec<String>,
    /// Seconds between WebSocket pings on an idle connection (0: none).
    pub ping_interval_s: u64,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            allowed_origins: Vec::new(),
            ping_interval_s: 30,
        }
    }
}

impl WsConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        if self.allowed_origins.len() > MAX_WS_ORIGINS {
            return Err(InvalidValue::new(
                "allowed_origins",
                format!(
                    "at most {MAX_WS_ORIGINS} origins (got {})",
                    self.allowed_origins.len()
                ),
            ));
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if let Err(problem) = check_origin(origin) {
                return Err(InvalidValue::entry("allowed_origins", i, problem));
            }
        }
        if self.ping_interval_s != 0 {
            check_range(
                "ping_interval_s",
                self.ping_interval_s,
                MIN_WS_PING_INTERVAL_S,
                MAX_WS_PING_INTERVAL_S,
            )?;
        }
        Ok(())
    }

    /// The origins as compared with an upgrade's `Origin` header: lower case (RFC 6454
    /// 6.1 serialises scheme and host in lower case).
    pub fn origins(&self) -> Vec<String> {
        self.allowed_origins
            .iter()
            .map(|o| o.trim().to_ascii_lowercase())
            .collect()
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_s)
    }
}

/// One `ws.allowed_origins` entry: what a browser sends as `Origin` (RFC 6454 6.1),
/// `http://` or `https://`, a host, an optional port, nothing after. A trailing `/` or a
/// path would never equal a browser's header and so silently refuse everyone.
fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| {
            format!(
                "{origin:?}: an origin is http:// or https:// and a host, e.g. \"https://phone.example.com\""
            )
        })?;
    let shape = || format!("{origin:?}: scheme://host[:port] only, no path, query or trailing /");
    let (host, port) = match rest.strip_prefix('[') {
        Some(inner) => {
            let (ip, after) = inner.split_once(']').ok_or_else(shape)?;
            ip.parse::<std::net::Ipv6Addr>().map_err(|_| shape())?;
            match after {
                "" => (ip, None),
                _ => ("ipv6", Some(after.strip_prefix(':').ok_or_else(shape)?)),
            }
        }
        None => match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':')
    {
        return Err(shape());
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{origin:?}: bad port {port:?}"));
        }
    }
    Ok(())
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
    fn tls_section() {
        assert!(TlsConfig::default().check().is_ok());
        let tls = |f: fn(&mut TlsConfig)| {
            let mut t = TlsConfig::default();
            f(&mut t);
            t.check().err().map(|e| e.key)
        };
        assert_eq!(tls(|t| t.cert = "c.pem".into()).as_deref(), Some("key"));
        assert_eq!(tls(|t| t.key = "k.pem".into()).as_deref(), Some("cert"));
        assert_eq!(
            tls(|t| {
                t.cert = "c.pem".into();
                t.key = "k.pem".into();
            }),
            None
        );
        assert_eq!(
            tls(|t| t.handshake_timeout_ms = 10).as_deref(),
            Some("handshake_timeout_ms")
        );
        assert_eq!(
            tls(|t| t.handshake_timeout_ms = 600_000).as_deref(),
            Some("handshake_timeout_ms")
        );
        assert_eq!(
            tls(|t| t.max_handshakes = 0).as_deref(),
            Some("max_handshakes")
        );
        assert_eq!(tls(|t| t.ca = "a\nb".into()).as_deref(), Some("ca"));
        let files = TlsConfig {
            cert: " c.pem ".into(),
            key: "k.pem".into(),
            ..TlsConfig::default()
        }
        .files();
        assert_eq!(files.cert, PathBuf::from("c.pem"));
        assert_eq!(files.ca, None);
    }

    #[test]
    fn tls_listeners_need_a_certificate() {
        let listen: Vec<String> = vec!["udp:127.0.0.1:5060".into(), "wss:127.0.0.1:7443".into()];
        let e = check_tls_listeners(&listen, &TlsConfig::default()).unwrap_err();
        assert_eq!((e.key.as_str(), e.index), ("listen", Some(1)));
        assert!(e.message.contains("tls.cert"), "{e}");
        let e = check_tls_listeners(&["tls:[::1]:5061".into()], &TlsConfig::default());
        assert!(e.is_err());
        let with_cert = TlsConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            ..TlsConfig::default()
        };
        assert!(check_tls_listeners(&listen, &with_cert).is_ok());
        // ws: is plain: no certificate needed.
        assert!(check_tls_listeners(&["ws:127.0.0.1:8080".into()], &TlsConfig::default()).is_ok());
    }

    #[test]
    fn ws_section() {
        assert!(WsConfig::default().check().is_ok());
        for ok in [
            "https://phone.example.com",
            "http://localhost:8080",
            "https://[::1]:8443",
            "https://[2001:db8::1]",
            "https://192.0.2.1",
        ] {
            assert!(check_origin(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "*",
            "phone.example.com",
            "https://",
            "https://phone.example.com/",
            "https://phone.example.com/app",
            "https://phone.example.com:0",
            "https://phone.example.com:x",
            "wss://phone.example.com",
            "https://[::1",
            "https://[nope]",
            "https://a b",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
        let c = WsConfig {
            allowed_origins: vec!["https://a.example".into(), "https://b.example/".into()],
            ..WsConfig::default()
        };
        let e = c.check().unwrap_err();
        assert_eq!((e.key.as_str(), e.index), ("allowed_origins", Some(1)));
        let c = WsConfig {
            allowed_origins: vec!["HTTPS://Phone.Example.com".into()],
            ping_interval_s: 0,
        };
        assert!(c.check().is_err(), "the scheme as browsers write it");
        let c = WsConfig {
            allowed_origins: vec!["https://Phone.Example.com".into()],
            ping_interval_s: 0,
        };
        assert!(c.check().is_ok());
        assert_eq!(c.origins(), vec!["https://phone.example.com"]);
        assert_eq!(c.ping_interval(), Duration::ZERO);
        let c = WsConfig {
            ping_interval_s: 2,
            ..WsConfig::default()
        };
        assert_eq!(c.check().unwrap_err().key, "ping_interval_s");
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
