//! A device's log of every message it sent and received, and the ladder diagram drawn
//! from the logs of several devices.

use super::Device;
use crate::sip::{canonical_name, SipMessage};
use bytes::Bytes;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The next number of [`LogEntry::seq`].
pub(super) fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

/// One message a device sent or received.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Since the device started, on the tokio clock.
    pub at: Duration,
    /// The same moment as an instant, to merge the logs of several devices.
    pub instant: tokio::time::Instant,
    /// Order among every device's messages in this process: on a paused clock many share
    /// one instant, and this tells which came first (e.g. which trunk was tried first).
    pub seq: u64,
    pub direction: Direction,
    /// The other end: where it went or where it came from.
    pub peer: SocketAddr,
    pub message: SipMessage,
    /// The bytes as they went over the network.
    pub raw: Bytes,
}

impl LogEntry {
    /// The method of a request, or the status of a response ("INVITE", "180").
    pub fn label(&self) -> String {
        match &self.message {
            SipMessage::Request(r) => r.method.to_string(),
            SipMessage::Response(r) => r.status.to_string(),
        }
    }

    /// One line: `INVITE sip:1001@strowger.test` or `180 Ringing (INVITE)`.
    pub fn summary(&self) -> String {
        match &self.message {
            SipMessage::Request(r) => format!("{} {}", r.method, r.uri),
            SipMessage::Response(r) => {
                format!("{} {} ({})", r.status, r.reason, r.base.cseq.method)
            }
        }
    }

    pub fn call_id(&self) -> &str {
        &self.message.base().call_id
    }

    pub fn is_request(&self) -> bool {
        matches!(self.message, SipMessage::Request(_))
    }

    /// Every header in the order it was on the wire.
    pub fn headers(&self) -> Vec<(String, String)> {
        wire_headers(&self.raw)
    }

    /// The first value of a header (case-insensitive; compact names expanded).
    pub fn header(&self, name: &str) -> Option<String> {
        let name = canonical_name(name);
        self.headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v)
    }
}

/// The header lines of a message's head, unfolded (RFC 3261 7.3.1), names canonical.
pub(super) fn wire_headers(raw: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n").skip(1) {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            out.push((
                canonical_name(name.trim()).into_owned(),
                value.trim().to_owned(),
            ));
        }
    }
    out
}

/// The ladder of several devices' messages, in time order: one line per message with the
/// time since the earliest device started, the device, the direction and the peer.
pub fn ladder(devices: &[&Device]) -> String {
    let start = devices.iter().map(|d| d.started()).min();
    let mut lines: Vec<(u64, String)> = Vec::new();
    for d in devices {
        for e in d.log() {
            let since = start.map_or(Duration::ZERO, |s| e.instant.duration_since(s));
            let arrow = match e.direction {
                Direction::Sent => "->",
                Direction::Received => "<-",
            };
            let line = format!(
                "{:>9.3}s  {} {arrow} {}  {}",
                since.as_secs_f64(),
                d.name(),
                e.peer,
                e.summary()
            );
            lines.push((e.seq, line));
        }
    }
    // Logging order is causal order: a send is logged before the receipt it causes.
    lines.sort_by_key(|l| l.0);
    let mut out = String::new();
    for (_, l) in lines {
        let _ = writeln!(out, "{l}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_in_wire_order_unfolded_and_expanded() {
        let raw = b"INVITE sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP 1.2.3.4\r\nX-A: one\r\n two\r\nf: <sip:x@y>\r\n\r\nbody: no";
        assert_eq!(
            wire_headers(raw),
            vec![
                ("Via".to_owned(), "SIP/2.0/UDP 1.2.3.4".to_owned()),
                ("X-A".to_owned(), "one two".to_owned()),
                ("From".to_owned(), "<sip:x@y>".to_owned()),
            ]
        );
    }
}
