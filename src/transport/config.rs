//! The transport's keys of `[sip]`: `listen`, `max_message_size`, `tcp_idle_timeout_s`,
//! `workers` (the threads that read the sockets and carry each message to its end).
//!
//! Owns: what a valid value of those keys is. The `[sip]` struct itself is the UAS core's
//! (it also holds the server's identity and the transaction timers, which are not ours);
//! it calls these checks.

use super::ListenAddr;
use crate::config_section::{check_range, InvalidValue, MAX_TIMEOUT_S};

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
            "{entry:?}: unknown transport {transport:?} (expected udp, tcp or memory)"
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

#[cfg(test)]
mod tests {
    use super::*;

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
