//! Per-call SIP message traces: the ladder that `GET /calls/{id}/trace` shows (time,
//! direction, leg, peer, first line of every message of the call, both legs, in order),
//! what an operator would otherwise reach for sngrep or a HEP capture for.
//!
//! Owns: the traces and the index from SIP Call-IDs to them. Must not touch: messages
//! (it copies first lines) or calls (the B2BUA tells it which Call-IDs belong to which
//! call and leg). It sees what goes over the wire as the transaction layer's
//! `MessageObserver`, which the server installs; the transaction layer does not know it.
//!
//! Recording is one sharded-map lookup by Call-ID per message and, for a traced call, one
//! short push under that call's own lock: no lock that other calls contend on. A trace
//! keeps at most `call.trace_max_messages` messages; the traces of the last
//! `call.trace_keep_ended` ended calls stay readable.
//!
//! Config keys: `call.trace` (default true), `call.trace_max_messages` (100),
//! `call.trace_keep_ended` (100). Endpoint: `GET /calls/{id}/trace` (admin API).

use crate::allocator::short_lived;
use crate::shard::ShardMap;
use crate::transport::{Target, TransportKind};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Which way a message went, seen from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// One message of a call's ladder.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    /// Seconds since the call's INVITE arrived.
    pub t: f64,
    pub dir: Direction,
    /// `"A"` for the caller's leg, `"B1"`, `"B2"`... for the legs the server dialled.
    pub leg: String,
    /// The other end, e.g. `udp:127.0.0.1:5070`.
    pub peer: String,
    /// The request or status line.
    pub line: String,
}

/// A call's trace as the admin API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct TraceView {
    pub id: String,
    /// RFC 3339 UTC time of the INVITE.
    pub started: String,
    pub ended: bool,
    /// Messages beyond `call.trace_max_messages` that were not kept.
    pub dropped: u64,
    pub messages: Vec<TraceEntry>,
}

/// 144 bytes, 160 with its `Arc`'s counts: an allocator size class (issue 14: every held
/// call has one; at 176 bytes it took 192). Hence times as integers and no copy of the
/// server's message limit.
struct Trace {
    id: Arc<str>,
    /// When the call's INVITE arrived: milliseconds since the Unix epoch.
    started_ms: u64,
    /// The same instant on the monotonic clock: microseconds since [`clock_base`].
    t0_us: u64,
    state: Mutex<TraceState>,
}

/// The origin of the traces' monotonic times, taken the first time it is asked for.
fn clock_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Microseconds since [`clock_base`].
fn monotonic_us() -> u64 {
    u64::try_from(clock_base().elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A message's first line as the caller has it at hand, written into the trace's text
/// only when the Call-ID belongs to a traced call.
pub enum Line<'a> {
    /// Serialized bytes (outgoing messages): their first line is kept.
    Sent(&'a [u8]),
    /// Text as it is.
    Text(&'a str),
    /// A request received: method and Request-URI.
    Request(&'a crate::sip::Method, &'a crate::sip::Uri),
    /// A response received: status and reason.
    Status(u16, &'a str),
}

/// How a kept first line was shortened: every SIP/2.0 message's first line carries the
/// version, 8 bytes of each line of a ladder kept for the call's whole life (issue 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Kept as it was.
    None,
    /// A request line without its trailing " SIP/2.0".
    VersionSuffix,
    /// A status line without its leading "SIP/2.0 ".
    VersionPrefix,
}

const VERSION_SUFFIX: &str = " SIP/2.0";
const VERSION_PREFIX: &str = "SIP/2.0 ";

impl Line<'_> {
    /// Appends the line to `out` without its SIP version, and says what was cut.
    fn write_to(&self, out: &mut String) -> Cut {
        // Pieces appended, not write!: once per message (issue 14).
        match self {
            Line::Sent(bytes) => {
                // What we send is text we wrote: the strict check is the cheap one (the
                // lossy conversion walks the line in chunks, ~270 instructions a line).
                let line = first_line_bytes(bytes);
                match std::str::from_utf8(line) {
                    Ok(text) => cut_version(text, out),
                    Err(_) => cut_version(&String::from_utf8_lossy(line), out),
                }
            }
            Line::Text(t) => cut_version(t, out),
            Line::Request(m, uri) => {
                out.push_str(m.as_str());
                out.push(' ');
                // Writing to a String cannot fail.
                let _ = uri.write_to(out);
                Cut::VersionSuffix
            }
            Line::Status(code, reason) => {
                out.push_str(itoa::Buffer::new().format(*code));
                out.push(' ');
                out.push_str(reason);
                Cut::VersionPrefix
            }
        }
    }
}

/// Appends `line` to `out`, without the SIP version where it has one.
fn cut_version(line: &str, out: &mut String) -> Cut {
    if let Some(rest) = line.strip_prefix(VERSION_PREFIX) {
        out.push_str(rest);
        Cut::VersionPrefix
    } else if let Some(rest) = line.strip_suffix(VERSION_SUFFIX) {
        out.push_str(rest);
        Cut::VersionSuffix
    } else {
        out.push_str(line);
        Cut::None
    }
}

/// A kept line as it was: the version put back.
fn uncut(kept: &str, cut: Cut) -> String {
    match cut {
        Cut::None => kept.to_owned(),
        Cut::VersionSuffix => [kept, VERSION_SUFFIX].concat(),
        Cut::VersionPrefix => [VERSION_PREFIX, kept].concat(),
    }
}

/// One message as kept: 12 bytes, its first line in the trace's text and its peer in the
/// trace's peer list. (Issue 14: a trace was ~2 KiB of every established call with a
/// `String`s and a cloned URI per message; this is under half of that.)
#[derive(Clone, Copy)]
struct Stored {
    /// When, since the call's INVITE: see [`Stored::time`].
    t: u32,
    /// Where the line ends in `TraceState::text` (it starts where the previous one ends).
    end: u32,
    /// 0: the caller's leg (A); n: the nth leg dialled (Bn).
    leg: u16,
    /// Index in `TraceState::peers`.
    peer: u8,
    /// The direction and what was cut off the line, in the one byte left (`Stored::how`).
    how: u8,
}

/// Times below 2^31 microseconds (35 minutes) are kept in microseconds; later ones (a BYE
/// after hours) in milliseconds with the top bit set, up to 24 days.
const T_MS: u32 = 1 << 31;

impl Stored {
    fn time(us: u64) -> u32 {
        match u32::try_from(us) {
            Ok(t) if t < T_MS => t,
            _ => T_MS | u32::try_from(us / 1000).unwrap_or(u32::MAX).min(T_MS - 1),
        }
    }

    /// Seconds since the call's INVITE.
    fn seconds(&self) -> f64 {
        if self.t & T_MS == 0 {
            f64::from(self.t) / 1e6
        } else {
            f64::from(self.t & !T_MS) / 1e3
        }
    }

    fn how(dir: Direction, cut: Cut) -> u8 {
        let d = match dir {
            Direction::In => 0,
            Direction::Out => 1,
        };
        let c = match cut {
            Cut::None => 0,
            Cut::VersionSuffix => 2,
            Cut::VersionPrefix => 4,
        };
        d | c
    }

    fn dir(&self) -> Direction {
        if self.how & 1 == 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }

    fn cut(&self) -> Cut {
        match self.how & 6 {
            2 => Cut::VersionSuffix,
            4 => Cut::VersionPrefix,
            _ => Cut::None,
        }
    }
}

struct TraceState {
    entries: Vec<Stored>,
    /// Every kept first line, one after the other.
    text: String,
    /// The peers the messages went to or came from (a call has few), as the ladder shows
    /// them: transport and address, 36 bytes where a `Target` (with its connection) is 48.
    peers: Vec<(TransportKind, SocketAddr)>,
    /// Messages not kept (past `call.trace_max_messages`); saturates.
    dropped: u32,
    /// The keys of the call's legs in `Inner::by_call_id` (to unindex them at the end).
    call_ids: Vec<u128>,
    ended: bool,
}

impl TraceState {
    /// The index of `peer` in `peers`, added when new; None past 255 peers.
    fn peer_index(&mut self, peer: &Target) -> Option<u8> {
        let peer = (peer.transport, peer.addr);
        match self.peers.iter().position(|p| *p == peer) {
            Some(i) => u8::try_from(i).ok(),
            None => {
                let i = u8::try_from(self.peers.len()).ok()?;
                // As the text and entries (`CallTraces::record`).
                short_lived(|| self.peers.push(peer));
                Some(i)
            }
        }
    }
}

/// A SIP Call-ID's key in `Inner::by_call_id`.
fn call_key(call_id: &str) -> u128 {
    crate::shard::keyed_id(&[call_id])
}

fn leg_name(leg: u16) -> String {
    if leg == 0 {
        "A".to_owned()
    } else {
        format!("B{leg}")
    }
}

#[derive(Clone)]
struct LegRef {
    trace: Arc<Trace>,
    leg: u16,
}

struct Inner {
    max_messages: usize,
    keep_ended: usize,
    /// SIP Call-ID -> the trace and leg it belongs to. By a 128-bit keyed hash of the
    /// Call-ID rather than a copy of it (`shard::keyed_id`; issue 14: the copies and the
    /// list of them were ~150 bytes of every held call).
    by_call_id: ShardMap<u128, LegRef>,
    /// Call id (as in `GET /calls`) -> trace, for calls in progress.
    calls: ShardMap<Arc<str>, Arc<Trace>>,
    ended: Mutex<VecDeque<(Arc<str>, Arc<Trace>)>>,
}

/// The server's call traces; a cheap handle. `None` where tracing is off.
#[derive(Clone)]
pub struct CallTraces {
    inner: Arc<Inner>,
}

impl CallTraces {
    pub fn new(max_messages: usize, keep_ended: usize) -> CallTraces {
        CallTraces {
            inner: Arc::new(Inner {
                max_messages: max_messages.max(1),
                keep_ended,
                by_call_id: ShardMap::with_shards(64),
                calls: ShardMap::new(),
                ended: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// A call starts: its caller leg (A) has SIP Call-ID `a_call_id`. The INVITE that
    /// started it arrived just now.
    pub fn start_call(&self, id: &Arc<str>, a_call_id: &str) {
        let trace = Arc::new(Trace {
            id: id.clone(),
            started_ms: u64::try_from(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
            t0_us: monotonic_us(),
            state: Mutex::new(TraceState {
                entries: Vec::new(),
                text: String::new(),
                peers: Vec::new(),
                dropped: 0,
                call_ids: Vec::new(),
                ended: false,
            }),
        });
        self.inner.calls.insert(id.clone(), trace.clone());
        self.index(&trace, a_call_id, 0);
    }

    /// The call `id` dials a leg with SIP Call-ID `call_id`, its `n`th (from 1).
    pub fn add_leg(&self, id: &str, call_id: &str, n: u64) {
        if let Some(trace) = self.inner.calls.get(id) {
            self.index(&trace, call_id, u16::try_from(n).unwrap_or(u16::MAX));
        }
    }

    fn index(&self, trace: &Arc<Trace>, call_id: &str, leg: u16) {
        let key = call_key(call_id);
        {
            let ids = &mut trace.state.lock().call_ids;
            // Grown while the call is set up, copied exactly once it is up (`settle`).
            short_lived(|| ids.push(key));
        }
        self.inner.by_call_id.insert(
            key,
            LegRef {
                trace: trace.clone(),
                leg,
            },
        );
    }

    /// The call is over: its trace joins the bounded list of ended calls, and goes on
    /// recording (the 200 to a BYE, late retransmissions) until it drops off that list.
    pub fn end_call(&self, id: &Arc<str>) {
        let Some(trace) = self.inner.calls.remove(id) else {
            return;
        };
        trace.state.lock().ended = true;
        if self.inner.keep_ended == 0 {
            self.unindex(&trace);
            return;
        }
        let evicted = {
            let mut ended = self.inner.ended.lock();
            ended.push_back((id.clone(), trace));
            if ended.len() > self.inner.keep_ended {
                ended.pop_front()
            } else {
                None
            }
        };
        if let Some((_, old)) = evicted {
            self.unindex(&old);
        }
    }

    fn unindex(&self, trace: &Trace) {
        let call_ids = std::mem::take(&mut trace.state.lock().call_ids);
        for key in call_ids {
            self.inner.by_call_id.remove(&key);
        }
    }

    /// The call is established: its ladder stays as it is until the call ends, hours
    /// later maybe. Its buffers grew message by message on the heap of short-lived
    /// objects (`record`); they are copied here, at their exact size, onto the main heap,
    /// and the grown ones go. (Issue 14: a third of a held call's ladder was spare
    /// capacity; and grown among the calls' long-lived state, each outgrown buffer left a
    /// hole: with 10,000 calls held the ladder cost ~1.5 KB of RSS per call for ~0.8 KB
    /// of heap.)
    pub fn settle(&self, id: &str) {
        if let Some(trace) = self.inner.calls.get(id) {
            let mut st = trace.state.lock();
            // `clone` allocates exactly the length (a shrinking realloc may stay put).
            st.entries = st.entries.clone();
            st.text = st.text.clone();
            st.peers = st.peers.clone();
            st.call_ids = st.call_ids.clone();
        }
    }

    /// A message of SIP Call-ID `call_id` went `dir` to or from `peer`; `line` gives its
    /// first line (only asked for when the Call-ID belongs to a traced call).
    pub fn record(&self, call_id: &str, dir: Direction, peer: &Target, line: Line<'_>) {
        let Some(r) = self.inner.by_call_id.get(&call_key(call_id)) else {
            return;
        };
        let t_us = monotonic_us().saturating_sub(r.trace.t0_us);
        let mut st = r.trace.state.lock();
        let st = &mut *st;
        let peer = match st.peer_index(peer) {
            Some(p)
                if st.entries.len() < self.inner.max_messages
                    && st.text.len() < u32::MAX as usize / 2 =>
            {
                p
            }
            _ => {
                st.dropped = st.dropped.saturating_add(1);
                return;
            }
        };
        // Grown while the call is set up, copied exactly once it is up (`settle`).
        short_lived(|| {
            let cut = line.write_to(&mut st.text);
            st.entries.push(Stored {
                t: Stored::time(t_us),
                end: u32::try_from(st.text.len()).unwrap_or(u32::MAX),
                leg: r.leg,
                peer,
                how: Stored::how(dir, cut),
            });
        });
    }

    /// The trace of a call in progress or among the recently ended ones, by the call's id
    /// or by the SIP Call-ID of any of its legs (what a phone's log or a capture shows).
    pub fn get(&self, id: &str) -> Option<TraceView> {
        let trace = self
            .inner
            .calls
            .get(id)
            .or_else(|| {
                self.inner
                    .ended
                    .lock()
                    .iter()
                    .rev()
                    .find(|(i, _)| &**i == id)
                    .map(|(_, t)| t.clone())
            })
            .or_else(|| self.inner.by_call_id.get(&call_key(id)).map(|r| r.trace))?;
        let st = trace.state.lock();
        Some(TraceView {
            id: trace.id.to_string(),
            started: rfc3339_millis(
                UNIX_EPOCH + std::time::Duration::from_millis(trace.started_ms),
            ),
            ended: st.ended,
            dropped: u64::from(st.dropped),
            messages: st
                .entries
                .iter()
                .scan(0usize, |start, e| {
                    let end = e.end as usize;
                    let line = uncut(st.text.get(*start..end).unwrap_or(""), e.cut());
                    *start = end;
                    let peer = st
                        .peers
                        .get(usize::from(e.peer))
                        .map(|(transport, addr)| crate::transport::peer_text(*transport, addr))
                        .unwrap_or_default();
                    Some(TraceEntry {
                        t: e.seconds(),
                        dir: e.dir(),
                        leg: leg_name(e.leg),
                        peer,
                        line,
                    })
                })
                .collect(),
        })
    }

    /// Calls in progress being traced.
    pub fn active(&self) -> usize {
        self.inner.calls.len()
    }
}

/// What the transaction layer passes is recorded for the calls being traced (one map
/// lookup by Call-ID otherwise).
impl crate::transaction::MessageObserver for CallTraces {
    fn on_message(
        &self,
        call_id: &str,
        dir: crate::transaction::Direction,
        peer: &Target,
        msg: crate::transaction::Passing<'_>,
    ) {
        use crate::transaction::Passing;
        let dir = match dir {
            crate::transaction::Direction::In => Direction::In,
            crate::transaction::Direction::Out => Direction::Out,
        };
        let line = match msg {
            Passing::Sent(bytes) => Line::Sent(bytes),
            Passing::Request(req) => Line::Request(&req.method, &req.uri),
            Passing::Response(resp) => Line::Status(resp.status, &resp.reason),
        };
        self.record(call_id, dir, peer, line);
    }
}

/// The first line of serialized SIP bytes (without CRLF).
fn first_line_bytes(bytes: &[u8]) -> &[u8] {
    // A byte search for CR, then its LF: `memmem::find` builds a searcher on every call
    // (~350 instructions, for a line that ends within the first hundred bytes; issue 14).
    let end = memchr::memchr_iter(b'\r', bytes)
        .find(|&i| bytes.get(i + 1) == Some(&b'\n'))
        .unwrap_or(bytes.len().min(200));
    &bytes[..end]
}

/// A ladder as text, one message per line: `  0.000  A  <-  INVITE sip:... SIP/2.0`.
pub fn render_text(view: &TraceView) -> String {
    let mut out = format!(
        "call {} started {}{}\n",
        view.id,
        view.started,
        if view.ended { " (ended)" } else { "" }
    );
    for e in &view.messages {
        let arrow = match e.dir {
            Direction::In => "<-",
            Direction::Out => "->",
        };
        out.push_str(&format!(
            "{:>9.3}  {:<3} {} {:<28} {}\n",
            e.t, e.leg, arrow, e.peer, e.line
        ));
    }
    if view.dropped > 0 {
        out.push_str(&format!(
            "({} later messages not kept: call.trace_max_messages)\n",
            view.dropped
        ));
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC). Times before 1970 are written as the epoch: the
/// clock of a running server is never there.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Counted in 400-year eras starting on 0000-03-01, so the leap day ends each year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153; // month from March = 0
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportKind;
    use std::time::Duration;

    fn peer() -> Target {
        Target {
            transport: TransportKind::Udp,
            addr: "127.0.0.1:5070".parse().unwrap(),
            connection: None,
        }
    }

    /// Issue 14: a trace with its `Arc`'s counts fits the allocator's 160-byte class, and
    /// a kept message is 12 bytes.
    #[test]
    fn a_trace_is_144_bytes_and_a_kept_message_12() {
        assert_eq!(std::mem::size_of::<Trace>(), 144);
        assert_eq!(std::mem::size_of::<Stored>(), 12);
    }

    /// A message's time: microseconds for the first 35 minutes of a call, milliseconds
    /// after that, saturating at 24 days.
    #[test]
    fn times_are_kept_in_microseconds_then_milliseconds() {
        let at = |us: u64| {
            let e = Stored {
                t: Stored::time(us),
                end: 0,
                leg: 0,
                peer: 0,
                how: 0,
            };
            e.seconds()
        };
        assert_eq!(at(0), 0.0);
        assert_eq!(at(1_234_567), 1.234567);
        let hours = 3 * 3_600_000_000 + 456_789;
        assert_eq!(at(hours), 10_800.456);
        assert_eq!(at(u64::MAX), f64::from(T_MS - 1) / 1e3);
    }

    /// Lines are kept without their SIP version and shown with it, whatever form they came
    /// in; a line without the version is shown as it came.
    #[test]
    fn lines_are_kept_without_the_version_and_shown_whole() {
        let t = CallTraces::new(20, 0);
        let id: Arc<str> = Arc::from("c1");
        t.start_call(&id, "a@x");
        let uri = crate::sip::Uri::parse("sip:bob@example.com;transport=udp").unwrap();
        let method = crate::sip::Method::Invite;
        let sent = b"SIP/2.0 180 Ringing\r\nVia: x\r\n\r\n";
        let sent_req = b"BYE sip:a@10.0.0.1:5060 SIP/2.0\r\nVia: y\r\n\r\n";
        let lines: [(Direction, Line<'_>); 8] = [
            (Direction::In, Line::Request(&method, &uri)),
            (Direction::Out, Line::Status(100, "Trying")),
            (Direction::Out, Line::Status(200, "")),
            (Direction::In, Line::Sent(sent)),
            (Direction::Out, Line::Sent(sent_req)),
            (Direction::In, Line::Text("ACK sip:b@x SIP/2.0")),
            (Direction::Out, Line::Text("garbage without a version")),
            (Direction::In, Line::Text("SIP/2.0 ")),
        ];
        for (dir, line) in lines {
            t.record("a@x", dir, &peer(), line);
        }
        let v = t.get("c1").unwrap();
        let got: Vec<_> = v
            .messages
            .iter()
            .map(|e| (e.dir, e.line.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    Direction::In,
                    "INVITE sip:bob@example.com;transport=udp SIP/2.0"
                ),
                (Direction::Out, "SIP/2.0 100 Trying"),
                (Direction::Out, "SIP/2.0 200 "),
                (Direction::In, "SIP/2.0 180 Ringing"),
                (Direction::Out, "BYE sip:a@10.0.0.1:5060 SIP/2.0"),
                (Direction::In, "ACK sip:b@x SIP/2.0"),
                (Direction::Out, "garbage without a version"),
                (Direction::In, "SIP/2.0 "),
            ]
        );
        // The kept text has no version left in it.
        assert!(!t
            .inner
            .calls
            .get("c1")
            .unwrap()
            .state
            .lock()
            .text
            .contains("SIP/2.0"));
    }

    #[test]
    fn records_both_legs_in_order_and_keeps_ended_calls() {
        let t = CallTraces::new(3, 1);
        let id: Arc<str> = Arc::from("c1");
        t.start_call(&id, "a@x");
        t.record(
            "a@x",
            Direction::In,
            &peer(),
            Line::Text("INVITE sip:b@x SIP/2.0"),
        );
        t.add_leg("c1", "b@y", 1);
        t.record(
            "b@y",
            Direction::Out,
            &peer(),
            Line::Text("INVITE sip:b@y SIP/2.0"),
        );
        t.record("other", Direction::In, &peer(), Line::Text("not traced"));
        t.record(
            "b@y",
            Direction::In,
            &peer(),
            Line::Text("SIP/2.0 180 Ringing"),
        );
        t.record(
            "a@x",
            Direction::Out,
            &peer(),
            Line::Text("SIP/2.0 180 Ringing"),
        );
        let v = t.get("c1").unwrap();
        let legs: Vec<_> = v.messages.iter().map(|e| e.leg.as_str()).collect();
        assert_eq!(legs, ["A", "B1", "B1"]);
        assert_eq!(v.dropped, 1);
        assert_eq!(t.active(), 1);
        assert_eq!(t.get("b@y").unwrap().id, "c1", "found by a leg's Call-ID");
        assert!(!v.ended);
        t.end_call(&id);
        assert!(t.get("c1").unwrap().ended);
        let id2: Arc<str> = Arc::from("c2");
        t.start_call(&id2, "a2@x");
        t.end_call(&id2);
        t.record("a@x", Direction::In, &peer(), Line::Text("dropped off"));
        assert!(t.get("c1").is_none(), "only the last ended call is kept");
        assert!(t.get("c2").is_some());
        assert!(render_text(&t.get("c2").unwrap()).starts_with("call c2"));
    }

    #[test]
    fn settled_ladder_keeps_recording_and_unindexes_every_leg() {
        let t = CallTraces::new(10, 0);
        let id: Arc<str> = Arc::from("c1");
        t.start_call(&id, "a@x");
        t.add_leg("c1", "b@y", 1);
        t.record(
            "a@x",
            Direction::In,
            &peer(),
            Line::Text("ACK sip:b@x SIP/2.0"),
        );
        t.settle("c1");
        t.record(
            "b@y",
            Direction::Out,
            &peer(),
            Line::Text("BYE sip:b@y SIP/2.0"),
        );
        let lines: Vec<_> = t
            .get("c1")
            .unwrap()
            .messages
            .into_iter()
            .map(|e| e.line)
            .collect();
        assert_eq!(lines, ["ACK sip:b@x SIP/2.0", "BYE sip:b@y SIP/2.0"]);
        assert!(t.get("b@y").is_some());
        t.end_call(&id);
        assert!(t.get("a@x").is_none() && t.get("b@y").is_none());
        assert_eq!(t.inner.by_call_id.len(), 0);
    }

    #[test]
    fn first_line_stops_at_crlf() {
        assert_eq!(
            first_line_bytes(b"SIP/2.0 200 OK\r\nVia: x\r\n"),
            b"SIP/2.0 200 OK"
        );
        // A lone CR is part of the line; no CRLF at all: the first 200 bytes.
        assert_eq!(first_line_bytes(b"A\rB\r\nC"), b"A\rB");
        assert_eq!(first_line_bytes(b"ABC\r"), b"ABC\r");
        assert_eq!(first_line_bytes(&[b'x'; 300]).len(), 200);
    }

    #[test]
    fn formats_rfc3339_utc() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_007); // leap day 2000
        assert_eq!(rfc3339_millis(t), "2000-02-29T00:00:00.007Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31T23:59:59Z
        assert_eq!(rfc3339_millis(t), "2026-12-31T23:59:59.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400); // 2100-03-01, no leap day
        assert_eq!(rfc3339_millis(t), "2100-03-01T00:00:00.000Z");
    }
}
