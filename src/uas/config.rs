//! `[sip]`: the SIP side of the server as a whole.
//!
//! Owns: the section's struct and defaults, and the checks of the keys that are the
//! server's identity (`domain`, `user_agent`, used by this core in realms, To domains and
//! Server headers). The transport's keys (`listen`, `max_message_size`,
//! `tcp_idle_timeout_s`, `workers`) and `[sip.timers]` are checked by the layers that use
//! them.

use crate::config_section::InvalidValue;
use crate::transaction::TimersConfig;
use crate::transport::config::{check_limits, check_listen, check_workers};
use serde::{Deserialize, Serialize};

/// `[sip]`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// `TRANSPORT:IP:PORT` entries (`udp` or `tcp`, IPv6 in brackets); port 0 = any free port.
    pub listen: Vec<String>,
    /// The domain the server is responsible for.
    pub domain: String,
    pub timers: TimersConfig,
    /// Largest accepted SIP message, bytes.
    pub max_message_size: usize,
    /// Value of the Server / User-Agent headers.
    pub user_agent: String,
    /// Idle TCP connections are closed after this many seconds.
    pub tcp_idle_timeout_s: u64,
    /// Threads that carry SIP (the async runtime's workers); 0 = one per core.
    pub workers: usize,
    /// Requests outside dialogs one source address may send per second before it is
    /// blocked (its new requests dropped) for `pike_block_s`; 0 = no limit.
    pub pike_requests: u32,
    pub pike_block_s: u64,
    /// Source addresses the flood limit tracks at most.
    pub pike_max_sources: usize,
    /// SO_RCVBUF of each UDP socket, KiB (0: the system's default).
    pub udp_recv_buffer_kb: usize,
    /// A message begun on a TCP connection must be complete within this many seconds.
    pub tcp_message_timeout_s: u64,
    /// Percentage of UDP datagrams dropped at random, in and out, to rehearse packet loss
    /// (tests/loss.rs); 0 in production. A warning at start says it is set.
    pub udp_loss_percent: u32,
    /// Most SIP transactions alive; past it requests outside dialogs get 503 (0: no bound).
    pub max_transactions: usize,
    /// Most TCP connections open at once (accepted and opened), and most accepted from one
    /// IP address (0: no per-address bound).
    pub tcp_max_connections: usize,
    pub tcp_max_connections_per_source: usize,
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            listen: vec!["udp:127.0.0.1:5060".into(), "tcp:127.0.0.1:5060".into()],
            domain: "localhost".into(),
            timers: TimersConfig::default(),
            max_message_size: 65535,
            user_agent: concat!("Strowger/", env!("CARGO_PKG_VERSION")).into(),
            tcp_idle_timeout_s: 300,
            // One thread reads, handles and answers each message: measured on 2 cores
            // (benches/callgrind.sh), a second worker tripled the context switches per call
            // and added 9 system calls per call for the hand-offs between the two.
            workers: 1,
            pike_requests: 0,
            pike_block_s: 60,
            pike_max_sources: 100_000,
            udp_recv_buffer_kb: 4096,
            tcp_message_timeout_s: 10,
            udp_loss_percent: 0,
            // A call makes about five transactions that live 32 s after it (RFC 6026 Timer
            // L/M, Timer J): 5,000 calls/s (the highest rate measured on 2 cores) hold about
            // 800,000.
            max_transactions: 1_000_000,
            tcp_max_connections: 10_000,
            // Phones behind one NAT share its address: room for a large office, while ten
            // addresses are needed to take every connection.
            tcp_max_connections_per_source: 1_000,
        }
    }
}

impl SipConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        check_listen(&self.listen)?;
        if self.domain.is_empty() {
            return Err(InvalidValue::new("domain", "must not be empty"));
        }
        if self
            .domain
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(InvalidValue::new(
                "domain",
                format!(
                    "must be a host name, without spaces or control characters (got {:?})",
                    self.domain
                ),
            ));
        }
        self.timers.check().map_err(|e| e.within("timers"))?;
        check_limits(self.max_message_size, self.tcp_idle_timeout_s)?;
        check_workers(self.workers)?;
        crate::config_section::check_range(
            "tcp_message_timeout_s",
            self.tcp_message_timeout_s,
            1,
            3600,
        )?;
        crate::config_section::check_range(
            "udp_recv_buffer_kb",
            self.udp_recv_buffer_kb as u64,
            0,
            1 << 20,
        )?;
        // More than half lost is no rehearsal of a network: nothing would get through.
        crate::config_section::check_range("udp_loss_percent", self.udp_loss_percent, 0, 50)?;
        crate::config_section::check_range(
            "tcp_max_connections",
            self.tcp_max_connections as u64,
            1,
            10_000_000,
        )?;
        crate::config_section::check_range(
            "tcp_max_connections_per_source",
            self.tcp_max_connections_per_source as u64,
            0,
            10_000_000,
        )?;
        crate::config_section::check_range(
            "max_transactions",
            self.max_transactions as u64,
            0,
            100_000_000,
        )?;
        if self.pike_requests > 0 {
            crate::config_section::check_range("pike_block_s", self.pike_block_s, 1, 86_400)?;
            crate::config_section::check_range(
                "pike_max_sources",
                self.pike_max_sources as u64,
                1,
                10_000_000,
            )?;
        }
        // The value goes into a header verbatim; CR or LF would inject header lines.
        if self.user_agent.is_empty() || self.user_agent.chars().any(char::is_control) {
            return Err(InvalidValue::new(
                "user_agent",
                format!(
                    "must be non-empty text without control characters (got {:?})",
                    self.user_agent
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = SipConfig::default();
        assert!(c.check().is_ok());
        assert_eq!(c.listen, vec!["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]);
        assert_eq!(c.domain, "localhost");
        assert_eq!(c.max_message_size, 65535);
        assert_eq!(
            c.user_agent,
            format!("Strowger/{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(c.tcp_idle_timeout_s, 300);
        assert_eq!(c.workers, 1);
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = |f: fn(&mut SipConfig)| {
            let mut c = SipConfig::default();
            f(&mut c);
            c.check().unwrap_err()
        };
        assert_eq!(bad(|c| c.domain.clear()).key, "domain");
        assert_eq!(bad(|c| c.domain = "a b".into()).key, "domain");
        assert_eq!(bad(|c| c.timers.t1_ms = 0).key, "timers.t1_ms");
        assert_eq!(bad(|c| c.max_message_size = 100).key, "max_message_size");
        assert_eq!(bad(|c| c.workers = 100_000).key, "workers");
        assert_eq!(
            bad(|c| c.user_agent = "a\r\nX-Injected: 1".into()).key,
            "user_agent"
        );
        let e = bad(|c| c.listen = vec!["udp:127.0.0.1:1".into(), "udp:nohost".into()]);
        assert_eq!((e.key.as_str(), e.index), ("listen", Some(1)));
    }
}
