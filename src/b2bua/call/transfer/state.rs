//! A transfer's state (the steps of the module header of `transfer`): what it is for,
//! who is on which side, and where it is. Transitions are methods; the steps that send
//! are the call's (`transfer`).

use super::super::Side;
use super::TransferKind;
use crate::b2bua::DialOutcome;
use crate::dialog::Dialog;
use crate::sip::Request;
use crate::transaction::ServerTransaction;
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Where a transfer is (the steps of the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Step 1: the REFER waits for the script's verdict (`on_refer`).
    Deciding,
    /// Step 2: the target is called (an INVITE without SDP; attended: an offerless
    /// re-INVITE of the leg taken over).
    Calling,
    /// The target answered with its offer; the transferee gets it as soon as it may be
    /// re-INVITEd (RFC 3261 14.1: not before the caller ACKed the call's 2xx).
    Offered,
    /// Step 3: the transferee's re-INVITE with the offer is out; its 2xx switches the
    /// legs (step 4) and ends the transfer.
    Reinviting,
}

/// A transfer in progress.
pub(in crate::b2bua::call) struct Transfer {
    state: State,
    pub(super) kind: TransferKind,
    /// Who asked (None: the server).
    pub(super) transferor: Option<Side>,
    pub(super) transferee: Side,
    /// The transferor hung up while the transfer ran.
    pub(super) transferor_gone: bool,
    /// The REFER until it is answered (after the script's decision).
    pub(super) refer: Option<(ServerTransaction, Request)>,
    /// NOTIFY the transferor (implicit subscription, RFC 3515 2.4.4; not with
    /// `Refer-Sub: false`, RFC 4488).
    pub(super) notify: bool,
    /// The REFER's CSeq: `Event: refer;id=` (RFC 3515 2.4.6).
    pub(super) event_id: u32,
    pub(super) target: String,
    pub(super) referred_by: Option<String>,
    pub(super) replaces: Option<String>,
    /// The target's branch while it rings (blind, server).
    pub(super) leg: Option<u64>,
    pub(super) deadline: Option<Instant>,
    pub(super) ringing: bool,
    /// The target's confirmed dialog and the ACK sent to its 2xx.
    pub(super) leg_dialog: Option<Dialog>,
    pub(super) leg_invite_seq: u32,
    pub(super) leg_ack: Option<Box<super::super::bridge::SentAck>>,
    /// The target's offer and its Content-Type.
    pub(super) offer: Option<(Bytes, Option<String>)>,
    /// Our re-INVITE to the transferee, for its ACK.
    pub(super) reinvite_seq: u32,
    pub(super) reply: Option<oneshot::Sender<DialOutcome>>,
}

impl Transfer {
    pub(super) fn new(
        kind: TransferKind,
        transferor: Option<Side>,
        transferee: Side,
        target: String,
    ) -> Transfer {
        Transfer {
            state: State::Calling,
            kind,
            transferor,
            transferee,
            transferor_gone: false,
            refer: None,
            notify: false,
            event_id: 0,
            target,
            referred_by: None,
            replaces: None,
            leg: None,
            deadline: None,
            ringing: false,
            leg_dialog: None,
            leg_invite_seq: 1,
            leg_ack: None,
            offer: None,
            reinvite_seq: 0,
            reply: None,
        }
    }
}

impl Transfer {
    /// A REFER's transfer: it waits for the script first.
    pub(super) fn refer(kind: TransferKind, transferor: Side, target: String) -> Transfer {
        Transfer {
            state: State::Deciding,
            ..Transfer::new(kind, Some(transferor), transferor.other(), target)
        }
    }

    /// The script allowed the REFER: the target is called.
    pub(super) fn decided(&mut self) {
        if self.state == State::Deciding {
            self.state = State::Calling;
        }
    }

    /// The target has answered (its 2xx again is a retransmission).
    pub(super) fn target_answered(&self) -> bool {
        matches!(self.state, State::Offered | State::Reinviting)
    }

    /// The target's offer: false when it came already (a retransmitted 2xx).
    pub(super) fn offered(&mut self, body: Bytes, content_type: Option<String>) -> bool {
        if self.state != State::Calling {
            return false;
        }
        self.offer = Some((body, content_type));
        self.state = State::Offered;
        true
    }

    /// Whether the transferee may be re-INVITEd with the offer now (`caller_awaiting_ack`:
    /// the call's 2xx to the caller is not ACKed yet, RFC 3261 14.1).
    pub(super) fn may_reinvite(&self, caller_awaiting_ack: bool) -> bool {
        self.state == State::Offered && !(self.transferee == Side::A && caller_awaiting_ack)
    }

    /// The transferee's re-INVITE went with CSeq `seq`.
    pub(super) fn reinviting(&mut self, seq: u32) {
        self.reinvite_seq = seq;
        self.state = State::Reinviting;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transfer's steps: the REFER waits for the script; one offer; the transferee's
    /// re-INVITE waits for the caller's ACK of the call's 2xx (RFC 3261 14.1).
    #[test]
    fn transfer_steps() {
        let mut t = Transfer::refer(TransferKind::Blind, Side::B, "sip:c@h".into());
        assert_eq!((t.state, t.transferee), (State::Deciding, Side::A));
        assert!(
            !t.offered(Bytes::from_static(b"v=0"), None),
            "not called yet"
        );
        t.decided();
        assert_eq!(t.state, State::Calling);
        assert!(!t.target_answered() && !t.may_reinvite(false));
        assert!(t.offered(Bytes::from_static(b"v=0"), None));
        assert!(
            !t.offered(Bytes::from_static(b"v=1"), None),
            "a retransmitted 2xx"
        );
        assert_eq!(
            t.offer.as_ref().map(|o| o.0.clone()),
            Some(Bytes::from_static(b"v=0"))
        );
        assert!(t.target_answered());
        assert!(
            !t.may_reinvite(true),
            "the caller has not ACKed the call's 2xx"
        );
        assert!(t.may_reinvite(false));
        t.reinviting(5);
        assert!(!t.may_reinvite(false), "once");
        assert_eq!((t.state, t.reinvite_seq), (State::Reinviting, 5));
        // A server transfer of the callee side: no REFER, and the caller's ACK does not
        // hold up a re-INVITE of the callee.
        let mut t = Transfer::new(TransferKind::Server, None, Side::B, "sip:c@h".into());
        assert_eq!(t.state, State::Calling);
        t.offered(Bytes::from_static(b"v=0"), None);
        assert!(t.may_reinvite(true));
    }
}
