//! cluster: the record of an established call that lets another node end it, and the
//! ending itself (issue 18: no call stays up without a switch to end it).
//!
//! Owns: the record's content (the cluster module stores it as opaque bytes in
//! `<prefix>:calls:<node>`), when a call's record changes enough to be written again, and
//! what a survivor sends for each record of a dead node: a BYE on each leg as a client
//! transaction, then a call record (`call.records_file`) with `hangup_by = "takeover"`.
//! Must not touch: the live calls (a record is a copy; the call writes it from its own
//! task, see `call/record.rs`), Redis (the cluster module's).
//!
//! Record format: text, one value a line (a parsed header value holds no line break; a
//! value that does is refused rather than written), so a record is the dialogs' own text
//! form (`crate::dialog::Dialog` keeps a dialog as one text buffer) plus a few numbers:
//!
//! ```text
//! strowger-call 1
//! <call id> <a Call-ID> <from> <to> <ruri> <source> <start ms> <answer ms> <route> <script version>
//! then leg A (the caller's, where we are UAS), then leg B (the callee's, we are UAC):
//! <Call-ID> <local tag> <remote tag> <local URI> <remote URI> <remote target>
//! <our last CSeq> <transport> <address> <our Contact> <n> and n Route entries
//! ```
//! (each `<...>` on its own line; times in Unix ms; `<route>` empty when none). About
//! 600 bytes for a call between two phones.
//!
//! Freshness: the record is written when the caller's ACK establishes the call, and
//! again when what a BYE needs changes: a leg's dialog (a transfer), its remote target
//! (a target refresh, RFC 3261 12.2), its flow, or its CSeq passing a multiple of
//! [`SEQ_STEP`]. The takeover BYE's CSeq is the stored one plus [`SEQ_MARGIN`]: RFC 3261
//! 12.2.2 only asks a request's CSeq to be higher than the last one the peer received,
//! and the margin covers the requests sent since the record was written.

use super::records::CallDetail;
use super::B2bua;
use crate::dialog::{Dialog, DialogParts, DialogState};
use crate::sip::{Method, Request, Via};
use crate::transaction::ClientEvent;
use crate::transport::{Target, TransportKind};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first line: the format and its version.
const MAGIC: &str = "strowger-call 1";
/// A leg's record is written again when its CSeq crosses a multiple of this.
pub(super) const SEQ_STEP: u32 = 256;
/// Added to the stored CSeq for the takeover BYE: above [`SEQ_STEP`] and what the writer
/// may not have written yet when the node died.
pub(super) const SEQ_MARGIN: u32 = 1000;
/// The highest CSeq number a request may carry (RFC 3261 8.1.1.5: below 2^31).
const MAX_SEQ: u32 = (1 << 31) - 1;

/// Why a record could not be written or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("call record: {0} holds a line break")]
    LineBreak(&'static str),
    #[error("call record: not a record of this version")]
    Version,
    #[error("call record: ends before {0}")]
    Truncated(&'static str),
    #[error("call record: bad {0}")]
    Bad(&'static str),
}

/// What the call record (`call.records_file`) of a taken-over call needs besides the legs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFacts<S> {
    pub id: S,
    pub a_call_id: S,
    pub from: S,
    pub to: S,
    pub ruri: S,
    pub source: S,
    pub start: SystemTime,
    pub answer: SystemTime,
    pub route: Option<S>,
    pub script_version: u64,
}

/// A leg as stored: its dialog (flow without connection: the connection was the dead
/// node's) and the Contact we gave it.
#[derive(Debug, Clone)]
pub struct StoredLeg {
    pub dialog: Dialog,
    pub contact: String,
}

/// A record read back.
#[derive(Debug, Clone)]
pub struct StoredCall {
    pub facts: CallFacts<String>,
    /// Leg A (caller) and leg B (callee).
    pub legs: [StoredLeg; 2],
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

struct Writer(String);

impl Writer {
    fn line(&mut self, what: &'static str, value: &str) -> Result<(), RecordError> {
        if value.contains(['\n', '\r']) {
            return Err(RecordError::LineBreak(what));
        }
        self.0.push_str(value);
        self.0.push('\n');
        Ok(())
    }

    fn leg(&mut self, d: &Dialog, contact: &str) -> Result<(), RecordError> {
        self.line("Call-ID", d.call_id())?;
        self.line("local tag", d.local_tag())?;
        self.line("remote tag", d.remote_tag())?;
        self.line("local URI", d.local_uri_text())?;
        self.line("remote URI", d.remote_uri_text())?;
        self.line("remote target", d.remote_target_text())?;
        self.line("CSeq", &d.local_seq.to_string())?;
        self.line("transport", &d.flow.transport.to_string())?;
        self.line("address", &d.flow.addr.to_string())?;
        self.line("contact", contact)?;
        let routes: Vec<&str> = d.route_set().collect();
        self.line("routes", &routes.len().to_string())?;
        for r in routes {
            self.line("route", r)?;
        }
        Ok(())
    }
}

/// The record of an established call: its facts, leg A and leg B with the Contact we
/// use on each.
pub fn encode(
    facts: &CallFacts<&str>,
    a: (&Dialog, &str),
    b: (&Dialog, &str),
) -> Result<Vec<u8>, RecordError> {
    let mut w = Writer(String::with_capacity(768));
    w.line("magic", MAGIC)?;
    w.line("call id", facts.id)?;
    w.line("A Call-ID", facts.a_call_id)?;
    w.line("from", facts.from)?;
    w.line("to", facts.to)?;
    w.line("ruri", facts.ruri)?;
    w.line("source", facts.source)?;
    w.line("start", &ms(facts.start).to_string())?;
    w.line("answer", &ms(facts.answer).to_string())?;
    w.line("route", facts.route.unwrap_or(""))?;
    w.line("script version", &facts.script_version.to_string())?;
    w.leg(a.0, a.1)?;
    w.leg(b.0, b.1)?;
    Ok(w.0.into_bytes())
}

struct Reader<'a>(std::str::Split<'a, char>);

impl<'a> Reader<'a> {
    fn line(&mut self, what: &'static str) -> Result<&'a str, RecordError> {
        self.0.next().ok_or(RecordError::Truncated(what))
    }

    fn number<T: std::str::FromStr>(&mut self, what: &'static str) -> Result<T, RecordError> {
        self.line(what)?.parse().map_err(|_| RecordError::Bad(what))
    }

    fn leg(&mut self) -> Result<StoredLeg, RecordError> {
        let call_id = self.line("Call-ID")?;
        let local_tag = self.line("local tag")?;
        let remote_tag = self.line("remote tag")?;
        let local_uri = self.line("local URI")?;
        let remote_uri = self.line("remote URI")?;
        let remote_target = self.line("remote target")?;
        let seq: u32 = self.number("CSeq")?;
        let transport = self.line("transport")?;
        let transport = TransportKind::ALL
            .into_iter()
            .find(|k| k.to_string() == transport)
            .ok_or(RecordError::Bad("transport"))?;
        let addr: SocketAddr = self.number("address")?;
        let contact = self.line("contact")?.to_owned();
        let n: usize = self.number("routes")?;
        // Bounded by the record itself: each route is a line of it.
        let mut routes = Vec::new();
        for _ in 0..n {
            routes.push(self.line("route")?.to_owned());
        }
        let dialog = Dialog::from_parts(
            &DialogParts {
                call_id,
                local_tag,
                remote_tag,
                local_uri,
                remote_uri,
                remote_target,
                route_set: &routes,
            },
            seq,
            None,
            DialogState::Confirmed,
            Target {
                transport,
                addr,
                connection: None,
            },
        );
        Ok(StoredLeg { dialog, contact })
    }
}

/// Reads a record back; any damage is an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<StoredCall, RecordError> {
    let text = std::str::from_utf8(bytes).map_err(|_| RecordError::Bad("UTF-8"))?;
    let mut r = Reader(text.split('\n'));
    if r.line("magic")? != MAGIC {
        return Err(RecordError::Version);
    }
    let mut s = |what| r.line(what).map(str::to_owned);
    let (id, a_call_id, from, to, ruri, source) = (
        s("call id")?,
        s("A Call-ID")?,
        s("from")?,
        s("to")?,
        s("ruri")?,
        s("source")?,
    );
    let start = from_ms(r.number("start")?);
    let answer = from_ms(r.number("answer")?);
    let route = Some(r.line("route")?.to_owned()).filter(|s| !s.is_empty());
    let script_version = r.number("script version")?;
    let a = r.leg()?;
    let b = r.leg()?;
    Ok(StoredCall {
        facts: CallFacts {
            id,
            a_call_id,
            from,
            to,
            ruri,
            source,
            start,
            answer,
            route,
            script_version,
        },
        legs: [a, b],
    })
}

/// What of the two dialogs a record depends on, as one number (never 0, which means "no
/// record written"): identifiers, remote target, flow, and the CSeq in steps of
/// [`SEQ_STEP`]. A call compares it after each event; hashing two short texts costs far
/// less than the message that caused the event.
pub fn fingerprint(a: &Dialog, b: &Dialog) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for d in [a, b] {
        d.call_id().hash(&mut h);
        d.local_tag().hash(&mut h);
        d.remote_tag().hash(&mut h);
        d.remote_target_text().hash(&mut h);
        d.flow.transport.index().hash(&mut h);
        d.flow.addr.hash(&mut h);
        (d.local_seq / SEQ_STEP).hash(&mut h);
    }
    h.finish().max(1)
}

/// The BYE a survivor sends on a stored leg (RFC 3261 15.1.1, as the B2BUA's own BYEs),
/// with a CSeq [`SEQ_MARGIN`] above the stored one and a Reason (RFC 3326) naming the
/// node that failed.
pub fn takeover_bye(leg: &mut StoredLeg, via: Via, reason: &str) -> Request {
    let d = &mut leg.dialog;
    d.local_seq = d.local_seq.saturating_add(SEQ_MARGIN - 1).min(MAX_SEQ - 1);
    let mut bye = d.request(Method::Bye, via, None);
    bye.headers.push("Reason", reason);
    bye
}

/// The Reason header value of a takeover BYE.
fn reason(node: &str, restarted: bool) -> String {
    let what = if restarted { "restarted" } else { "failed" };
    // A node name holds no quote or space (`cluster.node` is checked).
    format!("SIP;cause=503;text=\"node {node} {what}\"")
}

impl B2bua {
    /// Gives this node's call records to `records` (`cluster.enabled`): from now on each
    /// established call keeps a record there. Set once, before calls arrive.
    pub fn set_cluster(&self, records: crate::cluster::CallRecords) {
        let _ = self.inner.cluster.set(records);
    }

    /// Ends the calls of a node that died (or of this node's previous life): a BYE to
    /// both parties, and a call record with `hangup_by = "takeover"` and the stored
    /// start and answer times. Returns the calls ended (records that do not read are
    /// logged and skipped).
    pub fn take_over(&self, t: &crate::cluster::Takeover) -> usize {
        let reason = reason(&t.node, t.restarted);
        let mut ended = 0;
        for (id, bytes) in &t.calls {
            let mut call = match decode(bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(node = %t.node, call = %id, error = %e, "call record of a dead node unreadable; call not ended");
                    continue;
                }
            };
            for leg in &mut call.legs {
                let flow = leg.dialog.flow;
                let via = self.inner.local.via(&flow);
                let bye = takeover_bye(leg, via, &reason);
                let (call_id, seq) = (bye.base.call_id.clone(), bye.base.cseq.seq);
                let node = t.node.clone();
                let sink = Box::new(move |ev: ClientEvent| match ev {
                    ClientEvent::Provisional(_) => {}
                    ClientEvent::Final(r) => {
                        tracing::info!(%node, %call_id, status = r.status, "takeover BYE answered")
                    }
                    ClientEvent::Timeout | ClientEvent::TransportError(_) => {
                        tracing::warn!(%node, %call_id, "takeover BYE not answered (the party may be gone too)")
                    }
                });
                if let Err(e) = self.inner.layer.send_request_with(&bye, flow, sink) {
                    tracing::warn!(node = %t.node, call = %id, error = %e, "takeover BYE not sent");
                } else {
                    tracing::debug!(node = %t.node, call = %id, seq, peer = %flow.addr, "takeover BYE sent");
                }
            }
            ended += 1;
            if let Some(records) = &self.inner.records {
                records.send(takeover_detail(&call, &t.node, SystemTime::now()));
            }
        }
        tracing::warn!(node = %t.node, calls = ended, "calls of a node that is gone ended (BYE to both parties)");
        ended
    }
}

/// The call record of a call ended by takeover.
fn takeover_detail(call: &StoredCall, node: &str, end: SystemTime) -> CallDetail {
    let f = &call.facts;
    CallDetail {
        call_id: f.id.clone(),
        a_call_id: f.a_call_id.clone(),
        b_call_id: Some(call.legs[1].dialog.call_id().to_owned()),
        from: f.from.clone(),
        to: f.to.clone(),
        ruri: f.ruri.clone(),
        source: f.source.clone(),
        start: f.start,
        answer: Some(f.answer),
        end,
        duration_s: end
            .duration_since(f.answer)
            .unwrap_or_default()
            .as_secs_f64(),
        final_status: 200,
        hangup_by: "takeover".into(),
        script_version: f.script_version,
        route: f.route.clone(),
        transfers: Vec::new(),
        taken_over_from: Some(node.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, Response, SipMessage};

    fn invite() -> Request {
        let text = "INVITE sip:bob@b2bua.example SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKcaller\r\n\
             From: \"Alice\" <sip:alice@a.example>;tag=alice\r\n\
             To: <sip:bob@b2bua.example>\r\n\
             Call-ID: caller@a.example\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:alice@192.0.2.1>\r\n\
             Record-Route: <sip:lb.example;lr>\r\n\
             Content-Length: 0\r\n\r\n";
        match parse(text.as_bytes()) {
            Ok((SipMessage::Request(r), _)) => r,
            other => panic!("fixture: {other:?}"),
        }
    }

    fn flow(addr: &str, transport: TransportKind) -> Target {
        Target {
            transport,
            addr: addr.parse().unwrap(),
            connection: None,
        }
    }

    /// Leg A (we are UAS) and leg B (we are UAC, after a 200 with a Contact).
    fn legs() -> (Dialog, Dialog) {
        let inv = invite();
        let mut a = Dialog::uas(&inv, "ours-a", flow("192.0.2.1:5060", TransportKind::Udp));
        a.state = DialogState::Confirmed;
        let mut out = inv.clone();
        out.base.call_id = "b-leg@b2bua".into();
        out.base.from.set_tag("ours-b");
        out.base.cseq.seq = 1;
        out.headers = crate::sip::Headers::new();
        let mut ok: Response = out.response(200);
        ok.set_to_tag("bob");
        ok.headers
            .push("Contact", "<sip:bob@198.51.100.7:5070;transport=tcp>");
        let b = Dialog::uac(&out, &ok, flow("198.51.100.7:5070", TransportKind::Tcp));
        (a, b)
    }

    fn facts() -> CallFacts<&'static str> {
        CallFacts {
            id: "call1",
            a_call_id: "caller@a.example",
            from: "sip:alice@a.example",
            to: "sip:bob@b2bua.example",
            ruri: "sip:bob@b2bua.example",
            source: "udp:192.0.2.1:5060",
            start: from_ms(1_700_000_000_000),
            answer: from_ms(1_700_000_004_250),
            route: Some("pstn"),
            script_version: 3,
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let (mut a, b) = legs();
        a.local_seq = 4;
        let bytes = encode(
            &facts(),
            (&a, "<sip:10.0.0.11:5060>"),
            (&b, "<sip:10.0.0.11:5060;transport=tcp>"),
        )
        .unwrap();
        assert!(bytes.len() < 800, "compact: {} bytes", bytes.len());
        let call = decode(&bytes).unwrap();
        let f = &call.facts;
        assert_eq!(
            (f.id.as_str(), f.a_call_id.as_str(), f.route.as_deref()),
            ("call1", "caller@a.example", Some("pstn"))
        );
        assert_eq!((f.start, f.answer), (facts().start, facts().answer));
        assert_eq!(f.script_version, 3);
        let [ra, rb] = &call.legs;
        for (stored, live) in [(&ra.dialog, &a), (&rb.dialog, &b)] {
            assert_eq!(stored.call_id(), live.call_id());
            assert_eq!(stored.local_tag(), live.local_tag());
            assert_eq!(stored.remote_tag(), live.remote_tag());
            assert_eq!(stored.local_uri_text(), live.local_uri_text());
            assert_eq!(stored.remote_uri_text(), live.remote_uri_text());
            assert_eq!(stored.remote_target_text(), live.remote_target_text());
            assert_eq!(
                stored.route_set().collect::<Vec<_>>(),
                live.route_set().collect::<Vec<_>>()
            );
            assert_eq!(stored.local_seq, live.local_seq);
            assert_eq!(
                (stored.flow.transport, stored.flow.addr),
                (live.flow.transport, live.flow.addr)
            );
        }
        assert_eq!(ra.contact, "<sip:10.0.0.11:5060>");
        assert_eq!(ra.dialog.route_set().count(), 1);
        assert_eq!(rb.dialog.flow.transport, TransportKind::Tcp);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let (a, b) = legs();
        let bytes = encode(&facts(), (&a, "<sip:x>"), (&b, "<sip:y>")).unwrap();
        // Every truncation.
        for n in 0..bytes.len() {
            let _ = decode(&bytes[..n]);
        }
        assert_eq!(
            decode(b"strowger-call 2\n").unwrap_err(),
            RecordError::Version
        );
        assert!(decode(&[0xff, 0xfe]).is_err());
        let text = String::from_utf8(bytes).unwrap();
        let bad = text.replacen("\nudp\n", "\nsctp\n", 1);
        assert_eq!(
            decode(bad.as_bytes()).unwrap_err(),
            RecordError::Bad("transport")
        );
        // A huge route count only reads the lines there are.
        let lines: Vec<&str> = text.lines().collect();
        let mut cut = lines[..21].join("\n");
        cut.push_str("\n4000000000\n");
        assert!(decode(cut.as_bytes()).is_err());
    }

    #[test]
    fn a_line_break_in_a_value_is_refused() {
        let (a, b) = legs();
        let mut f = facts();
        f.from = "sip:a@x\r\nEvil: 1";
        assert_eq!(
            encode(&f, (&a, "<sip:x>"), (&b, "<sip:y>")).unwrap_err(),
            RecordError::LineBreak("from")
        );
    }

    #[test]
    fn the_fingerprint_moves_with_what_a_bye_needs() {
        let (mut a, b) = legs();
        let first = fingerprint(&a, &b);
        assert_ne!(first, 0);
        // A few requests sent: same record.
        a.local_seq += 3;
        assert_eq!(fingerprint(&a, &b), first);
        // A target refresh (RFC 3261 12.2.2): written again.
        let mut h = crate::sip::Headers::new();
        h.push("Contact", "<sip:alice@192.0.2.99:5062>");
        a.refresh_target(&h);
        let moved = fingerprint(&a, &b);
        assert_ne!(moved, first);
        // The CSeq crossing a step: written again.
        a.local_seq = SEQ_STEP;
        assert_ne!(fingerprint(&a, &b), moved);
    }

    #[test]
    fn the_takeover_bye_is_in_the_dialog_with_a_higher_cseq_and_a_reason() {
        let (mut a, b) = legs();
        a.local_seq = 7;
        let bytes = encode(&facts(), (&a, "<sip:x>"), (&b, "<sip:y>")).unwrap();
        let mut call = decode(&bytes).unwrap();
        let via = Via::parse("SIP/2.0/UDP 10.0.0.12:5060;branch=z9hG4bKsurvivor").unwrap();
        let r = reason("node-a", false);
        let bye = takeover_bye(&mut call.legs[0], via.clone(), &r);
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.base.call_id, "caller@a.example");
        assert_eq!(bye.base.from.tag(), Some("ours-a"));
        assert_eq!(bye.base.to.tag(), Some("alice"));
        assert_eq!(bye.base.cseq.seq, 7 + SEQ_MARGIN);
        assert_eq!(bye.uri.to_string(), "sip:alice@192.0.2.1");
        assert_eq!(bye.headers.get("Route"), Some("<sip:lb.example;lr>"));
        assert_eq!(
            bye.headers.get("Reason"),
            Some("SIP;cause=503;text=\"node node-a failed\"")
        );
        let bye = takeover_bye(&mut call.legs[1], via, &r);
        assert_eq!(bye.base.call_id, "b-leg@b2bua");
        assert_eq!(bye.base.from.tag(), Some("ours-b"));
        assert_eq!(bye.base.to.tag(), Some("bob"));
        assert_eq!(bye.base.cseq.seq, 1 + SEQ_MARGIN);
        assert_eq!(
            bye.uri.to_string(),
            "sip:bob@198.51.100.7:5070;transport=tcp"
        );
    }

    #[test]
    fn the_record_of_a_taken_over_call() {
        let (a, b) = legs();
        let bytes = encode(&facts(), (&a, "<sip:x>"), (&b, "<sip:y>")).unwrap();
        let call = decode(&bytes).unwrap();
        let end = from_ms(1_700_000_064_250);
        let d = takeover_detail(&call, "n1", end);
        assert_eq!(d.hangup_by, "takeover");
        assert_eq!(d.taken_over_from.as_deref(), Some("n1"));
        assert_eq!(d.final_status, 200);
        assert_eq!(d.b_call_id.as_deref(), Some("b-leg@b2bua"));
        assert_eq!(d.duration_s, 60.0);
        assert_eq!(d.route.as_deref(), Some("pstn"));
        assert_eq!(
            reason("n1", true),
            "SIP;cause=503;text=\"node n1 restarted\""
        );
    }
}
