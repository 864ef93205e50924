//! The fork: the INVITE branches on the call's B side (where the B2BUA is the UAC) and
//! the dial they serve. A sans-IO state machine: the call feeds it what the branches'
//! client transactions report and runs the [`Action`]s it returns (CANCEL, ACK then BYE,
//! relay to the caller, the dial's outcome). Nothing here sends, spawns or sleeps.
//!
//! Owns: each branch's INVITE, target, early dialog and state; the dial in progress (ring
//! deadline, the failures kept for RFC 3261 16.7's choice of the best response). Must not
//! touch: sending (the call runs the actions), the caller's leg, the bridge.
//!
//! RFC 3261 rules it keeps:
//! - 9.1: a CANCEL may only be sent once a provisional came back. A branch cancelled
//!   before that is remembered ([`State::CancelPending`]) and CANCELled when its first 1xx
//!   arrives; without a final response 64*T1 after the CANCEL the branch is given up.
//! - 13.2.2.4: a 2xx nobody wants any more (the dial ended, the caller hung up, another
//!   branch won) is ACKed and then BYEd.
//! - 16.7: a 6xx ends the fork; with no 2xx the best failure is chosen ([`best`]).

use crate::b2bua::{DialOutcome, DialSource};
use crate::dialog::Dialog;
use crate::sip::{BaseHeaders, CSeq, Headers, Method, Request, Response};
use crate::transport::Target;
use bytes::Bytes;
use smallvec::SmallVec;
use std::time::Duration;
use tokio::time::Instant;

/// A branch as the fork sees it (RFC 3261 9.1 over 17.1.1's INVITE client states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// INVITE sent, nothing back yet.
    Calling,
    /// A provisional came back: CANCEL may be sent.
    Proceeding,
    /// Cancelled before any provisional: the CANCEL waits for the first one (9.1).
    CancelPending,
    /// CANCEL sent: waiting for the INVITE's final response (487, or a 2xx that crossed).
    Cancelling,
    /// Its 2xx won the dial: the call's B leg.
    Answered,
    /// Over: a final failure, a 2xx nobody wanted (ACKed and BYEd), or given up.
    Terminated,
}

/// Who a branch works for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// The call's dial number n (a later dial's branches never answer an earlier one).
    Dial(u32),
    /// A transfer's target or a Replaces re-INVITE: the transfer handles its answers.
    Transfer,
}

/// One INVITE branch.
pub(super) struct Branch {
    /// Position of its target in the dial's target list.
    pub index: usize,
    /// The target's key in the B2BUA's `engaged` index while it rings.
    pub ringing: Option<String>,
    invite: BranchInvite,
    pub target: Target,
    /// The early dialog of the last provisional with a To tag (for PRACK and UPDATE).
    pub early: Option<Box<Dialog>>,
    id: u64,
    owner: Owner,
    state: State,
    /// When a CANCELled branch is given up without a final response (RFC 3261 9.1).
    give_up: Option<Instant>,
    /// The trunk channel a call through a trunk holds while this branch rings.
    pub trunk: Option<crate::trunk::Channel>,
    /// Challenges (401/407) answered on this branch: a second one that is not stale is a
    /// refusal of the credentials (RFC 3261 22.2), not a reason to try again.
    pub auth_tries: u8,
    /// Sent again after a 422 (RFC 4028 7.4), which is done once.
    pub timer_retried: bool,
    /// The next addresses of the target, in RFC 3263 order: tried in turn when this one
    /// times out, answers 503 or cannot be reached (RFC 3263 4.3).
    pub alternates: Vec<Target>,
}

/// A branch's INVITE: whole while the branch may be CANCELled, answered or fail; once the
/// call is confirmed only what its leg is still known by (issue 14: memory per held call;
/// the whole request was ~950 bytes of every established call).
enum BranchInvite {
    Whole(Box<Request>),
    Kept {
        seq: u32,
        /// Call-ID, From tag, Request-URI.
        text: Box<str>,
        ends: [u32; 2],
    },
}

impl Branch {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The INVITE sent, until the call is confirmed.
    pub fn invite(&self) -> Option<&Request> {
        match &self.invite {
            BranchInvite::Whole(r) => Some(r),
            BranchInvite::Kept { .. } => None,
        }
    }

    /// The INVITE's CSeq number (its ACK and CANCEL reuse it).
    pub fn seq(&self) -> u32 {
        match &self.invite {
            BranchInvite::Whole(r) => r.base.cseq.seq,
            BranchInvite::Kept { seq, .. } => *seq,
        }
    }

    fn kept(&self, i: usize) -> &str {
        let BranchInvite::Kept { text, ends, .. } = &self.invite else {
            return "";
        };
        let start = if i == 0 { 0 } else { ends[i - 1] as usize };
        let end = ends.get(i).map_or(text.len(), |e| *e as usize);
        text.get(start..end).unwrap_or("")
    }

    /// The Call-ID and From tag of the branch's INVITE (its dialog's key on our side).
    pub fn call_id_and_tag(&self) -> (&str, &str) {
        match &self.invite {
            BranchInvite::Whole(r) => (&r.base.call_id, r.base.from.tag().unwrap_or("")),
            BranchInvite::Kept { .. } => (self.kept(0), self.kept(1)),
        }
    }

    /// The INVITE's Request-URI, as text.
    pub fn request_uri(&self) -> String {
        match &self.invite {
            BranchInvite::Whole(r) => r.uri.to_text(),
            BranchInvite::Kept { .. } => self.kept(2).to_owned(),
        }
    }

    /// Keeps only the INVITE's CSeq, Call-ID, From tag and Request-URI.
    fn keep_summary(&mut self) {
        let BranchInvite::Whole(r) = &self.invite else {
            return;
        };
        let mut text = String::new();
        text.push_str(&r.base.call_id);
        let e0 = text.len();
        text.push_str(r.base.from.tag().unwrap_or(""));
        let e1 = text.len();
        // Writing into a String cannot fail.
        let _ = r.uri.write_to(&mut text);
        let ends = [e0, e1].map(|e| u32::try_from(e).unwrap_or(u32::MAX));
        self.invite = BranchInvite::Kept {
            seq: r.base.cseq.seq,
            // Exactly its length (as `CallerInvite::compact`).
            text: Box::from(text.as_str()),
            ends,
        };
    }

    /// Its INVITE sent again with credentials (RFC 3261 22.2: new CSeq and branch, same
    /// Call-ID and From tag): the branch is calling again, on a new transaction. False
    /// (nothing changed) once it is being cancelled or is over.
    pub fn resend(&mut self, invite: Request) -> bool {
        if !matches!(self.state, State::Calling | State::Proceeding) {
            return false;
        }
        self.invite = BranchInvite::Whole(Box::new(invite));
        self.state = State::Calling;
        self.early = None;
        true
    }

    /// Still waiting for a final response.
    pub fn is_pending(&self) -> bool {
        matches!(
            self.state,
            State::Calling | State::Proceeding | State::CancelPending | State::Cancelling
        )
    }
}

/// A failure kept for the choice of the dial's status.
struct Failure {
    status: u16,
    reason: String,
    source: DialSource,
    target: Option<usize>,
}

struct Dial {
    owner: Owner,
    deadline: Option<Instant>,
    finals: Vec<Failure>,
    /// Some branch sent a provisional above 100: the ring timeout means 480, not 408.
    ringing: bool,
}

/// What the call does for the fork.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Action {
    /// Send a CANCEL for this branch ([`Fork::cancel_request`]).
    Cancel(u64),
    /// Relay this branch's provisional to the caller (a live branch of the dial).
    Relay(u64),
    /// This branch's 2xx won the dial: it is the call's B leg now.
    Answered(u64),
    /// A 2xx nobody wants: ACK it, then BYE (RFC 3261 13.2.2.4).
    AckBye(u64),
    /// A retransmitted 2xx of a branch already dealt with: ACK it again (no BYE).
    ReAck(u64),
    /// The dial is over: the script gets this outcome.
    DialDone(DialOutcome),
}

/// Most events give one or two actions: no allocation for them.
pub(super) type Actions = SmallVec<[Action; 2]>;

/// The B side's branches and the dial in progress.
pub(super) struct Fork {
    /// On the heap as a whole; shrunk to the answered branch once the call is established.
    branches: Vec<Branch>,
    /// Boxed: only while a dial rings (the fork stays for the call's life).
    dial: Option<Box<Dial>>,
    dials: u32,
    /// 64*T1: how long a CANCELled branch may take to end.
    cancel_wait: Duration,
}

impl Fork {
    pub fn new(t1: Duration) -> Fork {
        Fork {
            branches: Vec::new(),
            dial: None,
            dials: 0,
            cancel_wait: t1 * 64,
        }
    }

    // ---- the dial ---------------------------------------------------------------------

    /// Starts a dial that gives up at `deadline` (the ring timeout); the owner to give its
    /// branches, or None when a dial is already in progress.
    pub fn start_dial(&mut self, deadline: Option<Instant>) -> Option<Owner> {
        if self.dial.is_some() {
            return None;
        }
        self.dials += 1;
        let owner = Owner::Dial(self.dials);
        self.dial = Some(Box::new(Dial {
            owner,
            deadline,
            finals: Vec::new(),
            ringing: false,
        }));
        Some(owner)
    }

    /// The dial in progress rings until `at` (its targets are sent).
    pub fn set_ring_deadline(&mut self, at: Instant) {
        if let Some(d) = &mut self.dial {
            d.deadline = Some(at);
        }
    }

    /// Target `index` of the dial could not be tried (bad URI, no route, transport).
    pub fn refused(&mut self, index: usize, status: u16, reason: String) {
        if let Some(d) = &mut self.dial {
            d.finals.push(Failure {
                status,
                reason,
                source: DialSource::Local,
                target: Some(index),
            });
        }
    }

    /// All of the dial's branches are started: when none is left (all refused), the dial
    /// ends with the best failure.
    pub fn settle(&mut self) -> Actions {
        let mut out = Actions::new();
        let Some(d) = &self.dial else { return out };
        let owner = d.owner;
        if !self
            .branches
            .iter()
            .any(|b| b.owner == owner && b.is_pending())
        {
            let outcome = best(&d.finals);
            self.dial = None;
            out.push(Action::DialDone(outcome));
        }
        out
    }

    /// The dial ends for a reason outside its branches (the caller CANCELled, the call
    /// ended): every pending branch is cancelled, the script gets `status`.
    pub fn end_dial(&mut self, status: u16, reason: &str, source: DialSource) -> Actions {
        let mut out = self.cancel_all();
        if self.dial.take().is_some() {
            out.push(Action::DialDone(DialOutcome::failed(
                status, reason, source,
            )));
        }
        out
    }

    /// The call ended with nobody waiting for the dial: its pending branches are
    /// cancelled, no outcome is given.
    pub fn abandon_dial(&mut self) -> Actions {
        let out = self.cancel_all();
        self.dial = None;
        out
    }

    // ---- branches ---------------------------------------------------------------------

    /// A new branch whose INVITE is about to be sent.
    pub fn add(
        &mut self,
        id: u64,
        owner: Owner,
        index: usize,
        invite: Request,
        target: Target,
    ) -> &mut Branch {
        self.branches.push(Branch {
            index,
            ringing: None,
            invite: BranchInvite::Whole(Box::new(invite)),
            target,
            early: None,
            id,
            owner,
            state: State::Calling,
            give_up: None,
            trunk: None,
            auth_tries: 0,
            timer_retried: false,
            alternates: Vec::new(),
        });
        self.branches.last_mut().expect("just pushed")
    }

    /// A branch whose dialog already exists (a re-INVITE on a dialog taken over by
    /// Replaces): CANCEL may go at once.
    pub fn add_proceeding(&mut self, id: u64, invite: Request, target: Target) {
        self.add(id, Owner::Transfer, 0, invite, target).state = State::Proceeding;
    }

    pub fn get(&self, id: u64) -> Option<&Branch> {
        self.branches.iter().find(|b| b.id == id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Branch> {
        self.branches.iter_mut().find(|b| b.id == id)
    }

    /// Forgets a branch (its dialog goes elsewhere, or it never got sent).
    pub fn remove(&mut self, id: u64) -> Option<Branch> {
        let pos = self.branches.iter().position(|b| b.id == id)?;
        Some(self.branches.swap_remove(pos))
    }

    pub fn branches_mut(&mut self) -> impl Iterator<Item = &mut Branch> + '_ {
        self.branches.iter_mut()
    }

    /// The branch whose early dialog an in-dialog request before the answer goes to: the
    /// newest live one with an early dialog.
    pub fn early_branch(&self) -> Option<u64> {
        self.branches
            .iter()
            .filter(|b| b.is_pending() && b.early.is_some())
            .map(|b| b.id)
            .max()
    }

    /// Nothing is waiting for a final response: the call's task may end.
    pub fn is_settled(&self) -> bool {
        !self.branches.iter().any(|b| b.is_pending())
    }

    /// A branch that will not get a final response through the fork (its transfer gave
    /// it up).
    pub fn terminate(&mut self, id: u64) {
        if let Some(b) = self.get_mut(id) {
            b.state = State::Terminated;
        }
    }

    /// A transfer's branch whose 2xx the transfer took.
    pub fn set_answered(&mut self, id: u64) {
        if let Some(b) = self.get_mut(id) {
            b.state = State::Answered;
            b.give_up = None;
        }
    }

    /// Keeps only the answered branch (the B leg of an established call), without its
    /// INVITE's headers and body: memory per held call.
    pub fn compact(&mut self, winner: Option<u64>) {
        self.branches
            .retain(|b| Some(b.id) == winner || b.is_pending());
        self.branches.shrink_to_fit();
        if let Some(b) = winner.and_then(|w| self.get_mut(w)) {
            b.keep_summary();
            b.early = None;
        }
    }

    // ---- cancelling -------------------------------------------------------------------

    /// CANCELs one branch (RFC 3261 9.1: now when it has sent a provisional, else when it
    /// does).
    pub fn cancel(&mut self, id: u64) -> Actions {
        let mut out = Actions::new();
        let now = Instant::now();
        let wait = self.cancel_wait;
        if let Some(b) = self.get_mut(id) {
            cancel_one(b, now, wait, &mut out);
        }
        out
    }

    /// CANCELs every pending branch but the answered one.
    pub fn cancel_all(&mut self) -> Actions {
        let mut out = Actions::new();
        let now = Instant::now();
        for b in &mut self.branches {
            cancel_one(b, now, self.cancel_wait, &mut out);
        }
        out
    }

    /// The CANCEL of a branch's INVITE: same Request-URI, Call-ID, From, To, CSeq number
    /// and top Via (RFC 3261 9.1).
    pub fn cancel_request(&self, id: u64) -> Option<(Request, Target)> {
        let b = self.get(id)?;
        let inv = b.invite()?;
        let cancel = Request {
            method: Method::Cancel,
            uri: inv.uri.clone(),
            version: "2.0".into(),
            base: BaseHeaders {
                via: inv.base.via.first().cloned().into_iter().collect(),
                from: inv.base.from.clone(),
                to: inv.base.to.clone(),
                call_id: inv.base.call_id.clone(),
                cseq: CSeq {
                    seq: inv.base.cseq.seq,
                    method: Method::Cancel,
                },
            },
            max_forwards: Some(70),
            headers: Headers::new(),
            body: Bytes::new(),
        };
        Some((cancel, b.target))
    }

    // ---- what the branches report -----------------------------------------------------

    /// A provisional response on branch `id`.
    pub fn on_provisional(&mut self, id: u64, resp: &Response) -> Actions {
        let mut out = Actions::new();
        let dial = self.dial.as_ref().map(|d| d.owner);
        let now = Instant::now();
        let wait = self.cancel_wait;
        let Some(b) = self.get_mut(id) else {
            return out;
        };
        if resp.status > 100 {
            if let Some(tag) = resp.base.to.tag() {
                match &mut b.early {
                    Some(d) if d.remote_tag() == tag => d.refresh_target(&resp.headers),
                    _ => {
                        if let Some(inv) = b.invite() {
                            b.early = Some(Box::new(Dialog::uac(inv, resp, b.target)));
                        }
                    }
                }
            }
        }
        match b.state {
            State::Calling => b.state = State::Proceeding,
            State::CancelPending => {
                // RFC 3261 9.1: the CANCEL wanted earlier may go now.
                b.state = State::Cancelling;
                b.give_up = Some(now + wait);
                out.push(Action::Cancel(id));
                return out;
            }
            _ => {}
        }
        let relay =
            resp.status > 100 && b.state == State::Proceeding && dial.is_some_and(|o| o == b.owner);
        if relay {
            if let Some(d) = &mut self.dial {
                d.ringing = true;
            }
            out.push(Action::Relay(id));
        }
        out
    }

    /// A 2xx on branch `id` (of a dial; a transfer's branches are the transfer's).
    pub fn on_success(&mut self, id: u64, resp: &Response) -> Actions {
        let mut out = Actions::new();
        let dial = self.dial.as_ref().map(|d| d.owner);
        let Some(b) = self.get_mut(id) else {
            return out;
        };
        match b.state {
            State::Answered | State::Terminated => out.push(Action::ReAck(id)),
            State::Calling | State::Proceeding if dial == Some(b.owner) => {
                b.state = State::Answered;
                let index = b.index;
                out.push(Action::Answered(id));
                out.extend(self.cancel_all());
                self.dial = None;
                out.push(Action::DialDone(DialOutcome {
                    answered: true,
                    status: resp.status,
                    reason: resp.reason.clone(),
                    source: DialSource::Callee,
                    target: Some(index),
                }));
            }
            _ => {
                // Cancelled (its CANCEL crossed this 2xx), or of a dial that is over.
                b.state = State::Terminated;
                out.push(Action::AckBye(id));
            }
        }
        out
    }

    /// A final failure on branch `id`: `status` 408 when it never answered, 503 when it
    /// could not be reached.
    pub fn on_failure(&mut self, id: u64, status: u16, reason: &str) -> Actions {
        let mut out = Actions::new();
        let Some(b) = self.get_mut(id) else {
            return out;
        };
        let was = b.state;
        b.state = State::Terminated;
        b.give_up = None;
        let (owner, index) = (b.owner, b.index);
        let Some(d) = self.dial.as_mut().filter(|d| d.owner == owner) else {
            return out;
        };
        let cancelled = matches!(was, State::Cancelling | State::CancelPending);
        // The 487 of a branch we cancelled says nothing about the callee.
        if !cancelled || status != 487 {
            d.finals.push(Failure {
                status,
                reason: reason.to_owned(),
                source: DialSource::Callee,
                target: Some(index),
            });
        }
        if status >= 600 {
            // RFC 3261 16.7 step 5: a 6xx ends the fork.
            out.extend(self.cancel_all());
            let d = self.dial.take().expect("checked above");
            out.push(Action::DialDone(best(&d.finals)));
            return out;
        }
        out.extend(self.settle());
        out
    }

    // ---- time -------------------------------------------------------------------------

    /// The next instant [`Fork::on_timer`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        let ring = self.dial.as_ref().and_then(|d| d.deadline);
        let give_up = self.branches.iter().filter_map(|b| b.give_up).min();
        match (ring, give_up) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The ring timeout: every pending branch is CANCELled and the dial fails with 480
    /// when something rang, 408 when nothing answered at all. A CANCELled branch with no
    /// final response 64*T1 later is given up (RFC 3261 9.1).
    pub fn on_timer(&mut self, now: Instant) -> Actions {
        let mut out = Actions::new();
        for b in &mut self.branches {
            if b.give_up.is_some_and(|t| now >= t) {
                b.give_up = None;
                b.state = State::Terminated;
            }
        }
        let expired = self
            .dial
            .as_ref()
            .is_some_and(|d| d.deadline.is_some_and(|t| now >= t));
        if expired {
            let ringing = self.dial.as_ref().is_some_and(|d| d.ringing);
            let (status, reason) = if ringing {
                (480, "No Answer")
            } else {
                (408, "Request Timeout")
            };
            out = self.end_dial(status, reason, DialSource::Timeout);
        }
        out
    }
}

fn cancel_one(b: &mut Branch, now: Instant, wait: Duration, out: &mut Actions) {
    match b.state {
        State::Calling => b.state = State::CancelPending,
        State::Proceeding => {
            b.state = State::Cancelling;
            b.give_up = Some(now + wait);
            out.push(Action::Cancel(b.id));
        }
        _ => {}
    }
}

/// RFC 3261 16.7 step 6: a 6xx if any; else the lowest class, preferring the statuses a
/// caller can act on, then a callee's answer over a local refusal (a busy callee says
/// more than a bad second target); a callee's 503 becomes 500; none at all is 408.
fn best(finals: &[Failure]) -> DialOutcome {
    let pick = finals.iter().find(|f| f.status >= 600).or_else(|| {
        let class = finals.iter().map(|f| f.status / 100).min()?;
        let mut in_class = finals.iter().filter(|f| f.status / 100 == class);
        in_class
            .clone()
            .find(|f| matches!(f.status, 401 | 407 | 415 | 420 | 484))
            .or_else(|| in_class.clone().find(|f| f.source == DialSource::Callee))
            .or_else(|| in_class.next())
    });
    let Some(f) = pick else {
        return DialOutcome::failed(408, "Request Timeout", DialSource::Local);
    };
    // A callee's 503 says that callee is unavailable, not this server: 500 upstream. A
    // 503 of our own (a trunk down or at max_channels, no route) keeps its status and
    // reason, so that the dial plan tells it apart and fails over.
    let (status, reason) = if f.status == 503 && f.source != DialSource::Local {
        (500, "Server Internal Error".to_owned())
    } else {
        (f.status, f.reason.clone())
    };
    DialOutcome {
        answered: false,
        status,
        reason,
        source: f.source,
        target: f.target,
    }
}

#[cfg(test)]
mod tests;
