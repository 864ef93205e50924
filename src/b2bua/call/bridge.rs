//! The bridge: the call's two dialogs (A, where the B2BUA is the UAS; B, the answered
//! callee's, where it is the UAC) and what relaying between them must remember. A sans-IO
//! state machine: the call asks it what to do with an in-dialog INVITE and its ACK, and
//! does the sending.
//!
//! Owns: both dialogs and the A side's Contact, the answered B branch and the ACK sent for
//! its 2xx (for 2xx retransmissions), the re-INVITE in progress (glare, RFC 3261 14.2),
//! the ACK mapping of a relayed re-INVITE (an ACK is end to end: the caller's ACK for the
//! 2xx we relayed goes on as our ACK for the other side's 2xx), and the last hold offer
//! (RFC 3264 8.4) so that a failed transfer can take the held party off hold.
//! Must not touch: the set-up (caller's leg, fork), the transfer's steps, sending.

use super::Side;
use crate::dialog::Dialog;
use crate::sip::Headers;
use bytes::Bytes;

/// Where the bridge's re-INVITE handling is (RFC 3261 14.2, 13.2.2.4 for the ACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No re-INVITE in progress.
    Idle,
    /// A re-INVITE from this side is on its way to the other (or ours to the other side of
    /// it, for a transfer): another INVITE now is glare.
    Reinviting(Side),
    /// The relayed re-INVITE from this side got a 2xx with this CSeq: that side's ACK goes
    /// on as an ACK to the other side.
    AwaitingAck(Side, u32),
}

/// An ACK for a 2xx as it was sent: resent as it is when the 2xx comes again (RFC 3261
/// 13.2.2.4). Kept serialized: one buffer instead of a parsed request's dozens of fields,
/// for the whole life of an established call; a plain box of its exact size (a kept
/// `Bytes` that was also sent carried a shared header, and the Call-ID a copy of its own:
/// issue 14), copied into a new `Bytes` for the rare resend.
///
/// Kept for 64*T1 after it was sent: a UAS gives up retransmitting its 2xx after that
/// long (RFC 3261 13.3.1.4), so the bytes are dropped then (`Call::on_timers`) and an
/// established call holds no ACK for the rest of its life.
#[derive(Clone)]
pub(super) struct SentAck {
    /// The CSeq number of the INVITE it acknowledges.
    pub seq: u32,
    pub bytes: Box<[u8]>,
    /// When it was sent first.
    pub sent: tokio::time::Instant,
}

impl SentAck {
    /// Its Call-ID (for the log and the trace), read from the bytes: we wrote the
    /// header in its long form, one per message.
    pub fn call_id(&self) -> &str {
        // The head only: a body need not be text.
        let end = self
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(self.bytes.len());
        let head = std::str::from_utf8(&self.bytes[..end]).unwrap_or("");
        head.split("\r\n")
            .find_map(|l| l.strip_prefix("Call-ID: "))
            .unwrap_or("")
    }
}

pub(super) struct Bridge {
    /// The caller's dialog (after a transfer of the caller: the target's).
    pub a: Dialog,
    /// Our Contact towards the A side.
    pub a_contact: String,
    /// The callee's dialog once a branch answered.
    pub b: Option<Dialog>,
    /// That branch's id in the fork.
    pub b_branch: Option<u64>,
    /// The ACK for B's 2xx: sent when the caller's ACK arrives, kept for retransmitted
    /// 2xx (RFC 3261 13.2.2.4).
    pub b_ack: Option<Box<SentAck>>,
    state: State,
    /// The last hold offer (sendonly/inactive SDP) a party sent through us.
    /// Boxed, as `b_ack`: rare or short-lived, and every established call has a `Bridge`.
    hold: Option<Box<(Side, Bytes)>>,
}

/// What to do with an INVITE inside the call.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reinvite {
    /// Relay it (it is now the re-INVITE in progress).
    Relay,
    /// One is in progress already: 491 (RFC 3261 14.2).
    Glare,
}

impl Bridge {
    pub fn new(a: Dialog, a_contact: String) -> Bridge {
        Bridge {
            a,
            a_contact,
            b: None,
            b_branch: None,
            b_ack: None,
            state: State::Idle,
            hold: None,
        }
    }

    pub fn dialog_mut(&mut self, side: Side) -> Option<&mut Dialog> {
        match side {
            Side::A => Some(&mut self.a),
            Side::B => self.b.as_mut(),
        }
    }

    /// An INVITE from `from` (or, for a transfer, ours on behalf of `from`) is to go to
    /// the other side.
    pub fn on_reinvite(&mut self, from: Side) -> Reinvite {
        match self.state {
            State::Reinviting(_) => Reinvite::Glare,
            _ => {
                self.state = State::Reinviting(from);
                Reinvite::Relay
            }
        }
    }

    /// The re-INVITE in progress ended without a 2xx to relay an ACK for (a failure, a
    /// timeout, or ours).
    /// No re-INVITE is in progress or awaiting its ACK.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    pub fn reinvite_ended(&mut self) {
        if matches!(self.state, State::Reinviting(_)) {
            self.state = State::Idle;
        }
    }

    /// The other side answered `from`'s relayed re-INVITE with a 2xx for CSeq `seq`:
    /// `from`'s ACK is to go on.
    pub fn reinvite_answered(&mut self, from: Side, seq: u32) {
        self.state = State::AwaitingAck(from, seq);
    }

    /// An ACK from `side`: the CSeq of the ACK to send to the other side, when it is the
    /// ACK of a relayed re-INVITE's 2xx.
    pub fn on_ack(&mut self, side: Side) -> Option<u32> {
        match self.state {
            State::AwaitingAck(from, seq) if from == side => {
                self.state = State::Idle;
                Some(seq)
            }
            _ => None,
        }
    }

    /// A re-INVITE from `from` with this SDP went through: remember a hold offer (RFC
    /// 3264 8.4: sendonly or inactive), forget it when the same party resumes.
    pub fn note_offer(&mut self, from: Side, body: &Bytes) {
        if body.is_empty() {
            return;
        }
        let holds = String::from_utf8_lossy(body)
            .lines()
            .any(|l| matches!(l.trim(), "a=sendonly" | "a=inactive"));
        if holds {
            self.hold = Some(Box::new((from, body.clone())));
        } else if self.hold.as_ref().is_some_and(|h| h.0 == from) {
            self.hold = None;
        }
    }

    /// The hold offer `holder` sent, taken (to resume the held party).
    pub fn take_hold(&mut self, holder: Side) -> Option<Bytes> {
        match &self.hold {
            Some(h) if h.0 == holder => self.hold.take().map(|h| h.1),
            _ => None,
        }
    }
}

/// Headers relayed from one leg's message to the other's: what describes the body and the
/// capabilities of the far end; never topology (Via, Route, Record-Route, Contact, Call-ID).
const RELAYED: &[&str] = &[
    "Content-Type",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Event",
    "Subscription-State",
    "Refer-To",
    "Referred-By",
    "Info-Package",
    "Allow-Events",
    "Reason",
];

pub(super) fn copy_relayed(from: &Headers, to: &mut Headers) {
    for name in RELAYED {
        for v in from.get_all(name) {
            to.push(name, v);
        }
    }
}

pub(super) fn has_tag(headers: &Headers, name: &str, tag: &str) -> bool {
    headers
        .list(name)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(tag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Target, TransportKind};

    fn bridge() -> Bridge {
        let invite = super::super::test_util::caller_invite();
        let flow = Target {
            transport: TransportKind::Udp,
            addr: "192.0.2.1:5060".parse().unwrap(),
            connection: None,
        };
        Bridge::new(
            Dialog::uas(&invite, "ours", flow),
            "<sip:b2bua@192.0.2.100>".into(),
        )
    }

    /// RFC 3261 14.2: an INVITE while one is in progress, from either side, is glare.
    #[test]
    fn glare_while_a_reinvite_is_in_progress() {
        let mut b = bridge();
        assert_eq!(b.on_reinvite(Side::A), Reinvite::Relay);
        assert_eq!(b.on_reinvite(Side::B), Reinvite::Glare);
        assert_eq!(b.on_reinvite(Side::A), Reinvite::Glare);
        b.reinvite_ended();
        assert_eq!(b.on_reinvite(Side::B), Reinvite::Relay);
    }

    /// The ACK of a relayed re-INVITE's 2xx goes on once, from the side that sent it.
    #[test]
    fn ack_of_a_relayed_reinvite_goes_to_the_other_side() {
        let mut b = bridge();
        b.on_reinvite(Side::B);
        b.reinvite_answered(Side::B, 7);
        assert_eq!(b.on_ack(Side::A), None, "not from the other side");
        assert_eq!(b.on_ack(Side::B), Some(7));
        assert_eq!(b.on_ack(Side::B), None, "once");
        assert_eq!(
            b.on_reinvite(Side::A),
            Reinvite::Relay,
            "a new one may start"
        );
    }

    /// RFC 3264 8.4: sendonly/inactive is a hold; the holder's next offer resumes.
    #[test]
    fn hold_is_remembered_until_the_holder_resumes() {
        let mut b = bridge();
        let hold = Bytes::from_static(b"v=0\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n");
        let resume = Bytes::from_static(b"v=0\r\nm=audio 4000 RTP/AVP 0\r\na=sendrecv\r\n");
        b.note_offer(Side::B, &hold);
        b.note_offer(Side::A, &resume);
        assert_eq!(b.take_hold(Side::A), None, "A did not hold");
        b.note_offer(Side::B, &Bytes::new());
        assert_eq!(b.take_hold(Side::B), Some(hold.clone()));
        assert_eq!(b.take_hold(Side::B), None, "taken");
        b.note_offer(Side::B, &hold);
        b.note_offer(Side::B, &resume);
        assert_eq!(b.take_hold(Side::B), None, "resumed");
    }

    #[test]
    fn a_sent_ack_names_its_call_id_from_its_head() {
        let mut ack = super::super::test_util::caller_invite();
        ack.method = crate::sip::Method::Ack;
        ack.body = Bytes::from_static(b"\xff\xfe Call-ID: not-this\r\n");
        let sent = SentAck {
            seq: 1,
            bytes: Box::from(&ack.to_bytes()[..]),
            sent: tokio::time::Instant::now(),
        };
        assert_eq!(sent.call_id(), ack.base.call_id);
    }
}
