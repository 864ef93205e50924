//! The caller's leg (leg A, where the B2BUA is the UAS) while its INVITE is answered: which
//! responses may still go, reliable provisionals and their PRACKs (RFC 3262), the 2xx
//! retransmitted until the caller's ACK (RFC 3261 13.3.1.4), CANCEL (9.2). A sans-IO state
//! machine: the call writes the responses (it has the INVITE and the dialog), asks here
//! which may go and with what RSeq, hands back the bytes it sent of those to be
//! retransmitted, and sends what comes back on the INVITE's server transaction; timers
//! come in as [`CallerLeg::on_timer`].
//!
//! Owns: the leg's answer state, the 2xx and reliable provisionals kept for retransmission,
//! RSeq numbering, the extra headers for the final answer (a 407's challenges). Must not
//! touch: the B side, the bridge's in-dialog relaying, sending.

use crate::sip::Response;
use bytes::Bytes;
use smallvec::SmallVec;
use std::time::Duration;
use tokio::time::Instant;

/// Where the caller's INVITE is (RFC 3261 17.2.1, 13.3.1.4; RFC 6026's Accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No final response yet: provisionals may go.
    Proceeding,
    /// The caller CANCELled: 487 went (9.2).
    Cancelled,
    /// A final failure or redirect went.
    Completed,
    /// A 2xx went; retransmitted until the caller's ACK.
    Accepted,
    /// The caller ACKed the 2xx.
    Confirmed,
}

/// A response retransmitted until acknowledged: at T1, doubling, capped at T2, given up
/// after 64*T1.
struct Retransmit {
    next: Instant,
    interval: Duration,
    give_up: Instant,
}

impl Retransmit {
    fn start(now: Instant, t1: Duration) -> Retransmit {
        Retransmit {
            next: now + t1,
            interval: t1,
            give_up: now + t1 * 64,
        }
    }

    fn deadline(&self) -> Instant {
        self.next.min(self.give_up)
    }
}

/// A response as sent to the caller, kept to be sent again: its bytes, not the parsed
/// message (issue 14: keeping the 2xx as a `Response` cloned it, ~2,000 instructions a
/// call, for bytes that never change).
#[derive(Debug, Clone)]
pub(super) struct Written {
    pub status: u16,
    pub bytes: Bytes,
}

/// A reliable provisional sent to the caller, waiting for its PRACK.
struct Reliable {
    rseq: u32,
    resp: Written,
    timer: Retransmit,
    /// The B branch, its RSeq and its INVITE's CSeq when the 18x came reliably from B:
    /// the caller's PRACK goes on there.
    from_b: Option<(u64, u32, u32)>,
}

/// A provisional that may go to the caller (see [`CallerLeg::provisional`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Provisional {
    /// The call's first 18x (the set-up time to ringing is observed once).
    pub first: bool,
    /// The RSeq it carries, when it goes reliably.
    pub rseq: Option<u32>,
}

/// What the call does for the caller's leg.
#[derive(Debug)]
pub(super) enum Action {
    /// Send this response again on the caller's INVITE transaction.
    Resend(Written),
    /// No ACK for the 2xx within 64*T1: end the call with BYE (13.3.1.4).
    NoAck,
    /// A reliable provisional got no PRACK within 64*T1: the INVITE must fail (RFC 3262 3).
    NoPrack,
}

pub(super) type Actions = SmallVec<[Action; 1]>;

/// What a PRACK from the caller acknowledges.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Prack {
    /// No reliable provisional with that RSeq: 481.
    NoMatch,
    /// One of ours: answer 200 here.
    Ours,
    /// The caller's side of a reliable provisional from B branch `.0` (RSeq `.1` of its
    /// INVITE with CSeq `.2`): PRACK B.
    FromB(u64, u32, u32),
}

pub(super) struct CallerLeg {
    state: State,
    /// The caller supports or requires 100rel (RFC 3262).
    supports_100rel: bool,
    /// A 18x has gone to the caller (the set-up time to first 18x is observed once).
    rang: bool,
    rseq: u32,
    /// What only the answer needs, in one box made when first needed and freed at the
    /// caller's ACK: an established call holds None here for hours (memory per held call:
    /// the leg is 16 bytes of the call instead of 64).
    set_up: Option<Box<SetUp>>,
}

#[derive(Default)]
struct SetUp {
    /// The 2xx until the caller's ACK.
    ok: Option<(Written, Retransmit)>,
    reliable: Vec<Reliable>,
    /// Extra headers for the final answer (a 407's Proxy-Authenticate challenges).
    final_headers: Vec<(String, String)>,
}

impl CallerLeg {
    pub fn new(supports_100rel: bool) -> CallerLeg {
        CallerLeg {
            state: State::Proceeding,
            supports_100rel,
            rang: false,
            rseq: 0,
            set_up: None,
        }
    }

    fn set_up(&mut self) -> &mut SetUp {
        self.set_up.get_or_insert_with(Box::default)
    }

    /// A final response (or CANCEL's 487) went: nothing else answers the INVITE.
    pub fn answered(&self) -> bool {
        self.state != State::Proceeding
    }

    pub fn cancelled(&self) -> bool {
        self.state == State::Cancelled
    }

    pub fn supports_100rel(&self) -> bool {
        self.supports_100rel
    }

    /// The 2xx is out and not yet ACKed (RFC 3261 14.1: no re-INVITE to the caller now).
    pub fn awaiting_ack(&self) -> bool {
        self.state == State::Accepted
    }

    pub fn set_final_headers(&mut self, headers: Vec<(String, String)>) {
        if !headers.is_empty() || self.set_up.is_some() {
            self.set_up().final_headers = headers;
        }
    }

    /// A provisional for the caller; `reliable`: B sent it reliably. None when the INVITE
    /// is answered already (nothing goes); else whether it is the call's first 18x and,
    /// when the caller gets it reliably too (RFC 3262), the RSeq it carries: the call then
    /// adds `Require: 100rel` and that RSeq, and hands what it sent to
    /// [`CallerLeg::sent_reliable`].
    pub fn provisional(&mut self, status: u16, reliable: bool) -> Option<Provisional> {
        if self.state != State::Proceeding {
            return None;
        }
        let rseq = (reliable && self.supports_100rel).then(|| {
            self.rseq += 1;
            self.rseq
        });
        let first = !self.rang && status > 100;
        self.rang |= first;
        Some(Provisional { first, rseq })
    }

    /// The reliable provisional with `rseq` went as `sent`: retransmitted from `t1` on
    /// until its PRACK (`from_b` says where the caller's PRACK goes on).
    pub fn sent_reliable(
        &mut self,
        rseq: u32,
        sent: Written,
        from_b: Option<(u64, u32, u32)>,
        t1: Duration,
    ) {
        self.set_up().reliable.push(Reliable {
            rseq,
            resp: sent,
            timer: Retransmit::start(Instant::now(), t1),
            from_b,
        });
    }

    /// The INVITE fails with `r` (a 4xx-6xx, or a 3xx with its Contacts); the extra final
    /// headers go with it. None when already answered.
    pub fn reject(&mut self, mut r: Response) -> Option<Response> {
        if self.state != State::Proceeding {
            return None;
        }
        self.state = State::Completed;
        // Nothing is retransmitted any more (no 2xx went: the state was Proceeding).
        if let Some(set_up) = self.set_up.take() {
            for (name, value) in set_up.final_headers {
                r.headers.push(&name, value);
            }
        }
        Some(r)
    }

    /// The caller CANCELled (RFC 3261 9.2): `r` is the INVITE's 487. None when already
    /// answered (the CANCEL changes nothing then).
    pub fn cancel(&mut self, r: Response) -> Option<Response> {
        let r = self.reject(r)?;
        self.state = State::Cancelled;
        Some(r)
    }

    /// The caller was answered with the 2xx `sent`, kept for retransmission until its ACK.
    pub fn accept(&mut self, sent: Written, t1: Duration) {
        self.state = State::Accepted;
        let set_up = self.set_up();
        set_up.reliable = Vec::new();
        set_up.final_headers = Vec::new();
        set_up.ok = Some((sent, Retransmit::start(Instant::now(), t1)));
    }

    /// An ACK from the caller for its INVITE's CSeq: true when it acknowledges the 2xx
    /// (retransmission stops; the leg is confirmed).
    pub fn on_ack(&mut self) -> bool {
        if self.state != State::Accepted {
            return false;
        }
        self.state = State::Confirmed;
        // Accepted: no reliable provisional or final header is left, only the 2xx.
        self.set_up = None;
        true
    }

    /// A PRACK from the caller with `rack`'s response number (RFC 3262 7.2).
    pub fn on_prack(&mut self, rseq: Option<u32>) -> Prack {
        let Some(set_up) = self.set_up.as_deref_mut() else {
            return Prack::NoMatch;
        };
        let Some(pos) = rseq.and_then(|n| set_up.reliable.iter().position(|r| r.rseq == n)) else {
            return Prack::NoMatch;
        };
        match set_up.reliable.remove(pos).from_b {
            Some((bid, rseq, cseq)) => Prack::FromB(bid, rseq, cseq),
            None => Prack::Ours,
        }
    }

    /// The call ends: nothing more is retransmitted.
    pub fn stop(&mut self) {
        if let Some(set_up) = self.set_up.as_deref_mut() {
            set_up.ok = None;
            set_up.reliable = Vec::new();
        }
    }

    /// Once established: what only the set-up needed goes (memory per held call).
    pub fn compact(&mut self) {
        if let Some(set_up) = self.set_up.as_deref_mut() {
            set_up.reliable = Vec::new();
            set_up.final_headers = Vec::new();
            if set_up.ok.is_none() {
                self.set_up = None;
            }
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        let set_up = self.set_up.as_deref()?;
        let ok = set_up.ok.as_ref().map(|(_, r)| r.deadline());
        let rel = set_up.reliable.iter().map(|r| r.timer.deadline()).min();
        match (ok, rel) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Retransmissions due at `now` (RFC 3261 13.3.1.4: the 2xx at T1, 2T1... capped at
    /// T2; RFC 3262 3: reliable provisionals likewise) and what gave up (64*T1).
    pub fn on_timer(&mut self, now: Instant, t2: Duration) -> Actions {
        let mut out = Actions::new();
        let Some(set_up) = self.set_up.as_deref_mut() else {
            return out;
        };
        let mut no_ack = false;
        if let Some((resp, r)) = set_up.ok.as_mut() {
            if now >= r.give_up {
                no_ack = true;
            } else if now >= r.next {
                out.push(Action::Resend(resp.clone()));
                r.interval = (r.interval * 2).min(t2);
                r.next = now + r.interval;
            }
        }
        if no_ack {
            set_up.ok = None;
            out.push(Action::NoAck);
        }
        let mut failed = false;
        for r in &mut set_up.reliable {
            if now >= r.timer.give_up {
                failed = true;
            } else if now >= r.timer.next {
                out.push(Action::Resend(r.resp.clone()));
                r.timer.interval = (r.timer.interval * 2).min(t2.max(r.timer.interval));
                r.timer.next = now + r.timer.interval;
            }
        }
        if failed {
            set_up.reliable = Vec::new();
            if self.state == State::Proceeding {
                out.push(Action::NoPrack);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
