//! Call transfer inside a call (RFC 3515 REFER, RFC 4488 Refer-Sub, RFC 3891 Replaces):
//! the server, not the phones, carries it out, since in a B2BUA neither phone sees the
//! other's dialog.
//!
//! Blind transfer, party T (transferor) asking for party E (transferee) to be connected to
//! target C:
//! 1. REFER from T: exactly one Refer-To (else 400); the script's `on_refer(call, refer)`
//!    may deny (its status) or rewrite the target; a target we cannot dial gets 488; else
//!    202 and (unless `Refer-Sub: false`) a NOTIFY "100 Trying".
//! 2. An INVITE without SDP to C (RFC 3725 flow I): C's 2xx carries the offer.
//! 3. A re-INVITE to E with that offer; E's 2xx carries the answer, which goes to C in the
//!    ACK. E's media now flows to C.
//! 4. C takes T's place in the call; T gets NOTIFY "200 OK" (Subscription-State
//!    terminated) and then BYE.
//!
//! When C fails, T gets a NOTIFY with C's status and the call stays as it was (E's
//! session was not touched). Attended transfer (Refer-To with Replaces naming another
//! call's dialog) takes C's leg over from that call (a hand-over between the two call
//! tasks) and then runs steps 3-4 with an offerless re-INVITE to C instead of step 2.
//! A server-started transfer (`call:transfer`, `POST /calls/{id}/transfer`) runs steps
//! 2-4 with no REFER and no NOTIFYs; the other party gets BYE.

mod messages;
mod state;

use messages::{build_notify, resume_sdp};
pub use messages::{parse_replaces, refer_to};
pub(super) use state::Transfer;

use super::fork::Owner;
use super::{Call, CallEvent, HangupBy, Purpose, Side};
use crate::b2bua::{CallRef, DialogKey};
use crate::b2bua::{DialOutcome, DialSource, ReferInfo, ReferVerdict};
use crate::dialog::{Dialog, DialogState};
use crate::sip::{new_tag, Headers, Method, NameAddr, Request, Response, Uri};
use crate::transaction::{ClientEvent, ServerTransaction};
use crate::transport::resolve;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How a transfer started (the `kind` label of `strowger_transfers_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    Blind = 0,
    Attended = 1,
    Server = 2,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        ["blind", "attended", "server"][self as usize]
    }
}

/// What a client transaction of a transfer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TransferStep {
    /// The INVITE to the target (its branch id).
    Leg(u64),
    /// The offerless re-INVITE to the target's existing dialog (attended).
    LegReinvite,
    /// The re-INVITE to the transferee with the target's offer.
    Reinvite,
    /// The final NOTIFY to the transferor: BYE it once answered.
    FinalNotify,
    /// The re-INVITE of the party an INVITE with Replaces is joined to (its branch id).
    Replace(u64),
    /// The re-INVITE taking the transferee off hold after a failed transfer.
    Resume,
}

/// A leg another call hands over for an attended transfer or a Replaces.
pub struct HandedLeg {
    pub dialog: Dialog,
}

/// A transfer as the call record shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TransferNote {
    pub kind: &'static str,
    /// `"caller"`, `"callee"` or `"server"`.
    pub by: &'static str,
    pub target: String,
    /// 200 when it succeeded, else the failure status.
    pub status: u16,
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::A => "caller",
        Side::B => "callee",
    }
}

impl Call {
    /// Counts a transfer event (`strowger_transfers_total{kind,result}`).
    fn count_transfer(&self, kind: TransferKind, result: usize) {
        self.inner.stats.transfers[kind as usize][result].fetch_add(1, Ordering::Relaxed);
    }

    /// A REFER in one of the call's dialogs.
    pub(super) fn on_refer(&mut self, side: Side, tx: ServerTransaction, req: Request) {
        let (uri, replaces) = match refer_to(&req) {
            Ok(v) => v,
            Err(why) => {
                let _ = tx.respond(req.response(400).with_reason(why));
                return;
            }
        };
        if self.bridge.b.is_none() || self.bridge.a.state != DialogState::Confirmed {
            let _ = tx.respond(
                req.response(403)
                    .with_reason("Transfer of a call that is not answered"),
            );
            return;
        }
        if self.transfer.is_some() {
            let _ = tx.respond(req.response(491).with_reason("A transfer is in progress"));
            return;
        }
        let kind = if replaces.is_some() {
            TransferKind::Attended
        } else {
            TransferKind::Blind
        };
        self.count_transfer(kind, 0);
        let notify = !req
            .headers
            .get("Refer-Sub")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
        let referred_by = req.headers.get("Referred-By").map(str::to_owned);
        let target = uri.to_text();
        let info = ReferInfo {
            by: side_name(side).to_owned(),
            target: target.clone(),
            referred_by: referred_by.clone(),
            replaces: replaces.clone(),
        };
        let mut t = Transfer::refer(kind, side, target);
        t.event_id = req.base.cseq.seq;
        t.refer = Some((tx, req));
        t.notify = notify;
        t.referred_by = referred_by;
        t.replaces = replaces;
        self.transfer = Some(Box::new(t));
        // The script decides (it may wait): its verdict comes back as an event.
        match &self.script {
            Some(handle) if self.version.has_on_refer() => {
                let hook = handle.on_refer(info);
                let events = self.events.clone();
                tokio::spawn(async move {
                    let verdict = hook.await;
                    let _ = events.post(CallEvent::ReferDecided(verdict));
                });
            }
            _ => {
                let _ = self
                    .events
                    .post(CallEvent::ReferDecided(ReferVerdict::Allow {
                        target: info.target,
                        referred_by: info.referred_by,
                    }));
            }
        }
    }

    /// The script's say on a REFER.
    pub(super) async fn on_refer_decided(&mut self, verdict: ReferVerdict) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        let Some((tx, req)) = t.refer.take() else {
            return;
        };
        let kind = t.kind;
        let (target, referred_by) = match verdict {
            ReferVerdict::Deny(code, reason) => {
                let _ = tx.respond(req.response(code).with_reason(reason));
                self.transfer_ended(code);
                return;
            }
            ReferVerdict::Failed(_) => {
                let _ = tx.respond(req.response(500).with_reason("Script Error"));
                self.transfer_ended(500);
                return;
            }
            ReferVerdict::Allow {
                target,
                referred_by,
            } => (target, referred_by),
        };
        // RFC 3515 2.4.2: a URI we cannot act on is refused (488 here: not acceptable).
        let dialable = Uri::parse(target.trim()).is_ok_and(|u| u.scheme.is_sip());
        if !dialable {
            let _ = tx.respond(
                req.response(488)
                    .with_reason(format!("Cannot transfer to {target}")),
            );
            self.transfer_ended(488);
            return;
        }
        t.target = target;
        t.referred_by = referred_by;
        t.decided();
        let mut ok = req.response(202);
        if !t.notify {
            ok.headers.push("Refer-Sub", "false");
        }
        let _ = tx.respond(ok);
        self.refer_notify("SIP/2.0 100 Trying", false);
        if kind == TransferKind::Attended {
            self.start_attended().await;
        } else {
            self.start_transfer_leg().await;
        }
    }

    /// `call:transfer` / the admin API: connect `party` to `target`, release the other.
    pub(super) async fn start_server_transfer(
        &mut self,
        target: String,
        party: Side,
        reply: oneshot::Sender<DialOutcome>,
    ) {
        let fail = |reply: oneshot::Sender<DialOutcome>, status: u16, reason: &str| {
            let _ = reply.send(DialOutcome::failed(status, reason, DialSource::Local));
        };
        if self.ended || self.bridge.b.is_none() || self.bridge.a.state != DialogState::Confirmed {
            return fail(reply, 481, "The call is not answered");
        }
        if self.transfer.is_some() {
            return fail(reply, 491, "A transfer is in progress");
        }
        if !Uri::parse(target.trim()).is_ok_and(|u| u.scheme.is_sip()) {
            return fail(reply, 488, "Not a SIP URI");
        }
        self.count_transfer(TransferKind::Server, 0);
        let mut t = Transfer::new(TransferKind::Server, None, party, target);
        t.reply = Some(reply);
        self.transfer = Some(Box::new(t));
        self.start_transfer_leg().await;
    }

    /// Step 2: an INVITE without SDP to the target, from the transferee's identity.
    async fn start_transfer_leg(&mut self) {
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        let target = t.target.trim().to_owned();
        let referred_by = t.referred_by.clone();
        let transferee = t.transferee;
        let Ok(aor) = Uri::parse(&target) else {
            return self.transfer_failed(400, "Bad target", DialSource::Local);
        };
        // An extension of ours (an address of record with devices registered) is rung at
        // its best device, as `registrar.lookup` would give a dial plan; anything else is
        // reached by its URI.
        let contact = self
            .inner
            .location
            .as_ref()
            .and_then(|l| l.lookup(&target).into_iter().next());
        let dial = contact.unwrap_or_else(|| target.clone());
        let Ok(uri) = Uri::parse(&dial) else {
            return self.transfer_failed(400, "Bad target", DialSource::Local);
        };
        let flow = self.inner.flows.as_ref().and_then(|f| f.flow(&dial));
        let dest = match &flow {
            Some((t, _)) => *t,
            None => match resolve(&uri, &self.inner.local).await {
                Ok(d) => d,
                Err(e) => return self.transfer_failed(503, &e.to_string(), DialSource::Local),
            },
        };
        // The new leg shows the party being connected as the caller.
        let mut from = match transferee {
            Side::A => self.bridge.a.remote_uri().clone(),
            Side::B => self
                .bridge
                .b
                .as_ref()
                .map(|d| d.remote_uri().clone())
                .unwrap_or_else(|| self.bridge.a.local_uri().clone()),
        };
        from.set_tag(&new_tag());
        let mut headers = Headers::new();
        if let Some((_, path)) = &flow {
            for hop in path {
                headers.push("Route", hop.clone());
            }
        }
        headers.push("Contact", self.inner.local.contact(&dest));
        headers.push("Allow", Method::allow_list());
        // RFC 3892: the new leg learns who referred it.
        if let Some(rb) = referred_by {
            headers.push("Referred-By", rb);
        }
        let leg = self.new_leg(
            super::NewLeg {
                dest,
                to: NameAddr::new(aor),
                uri,
                from,
                headers,
                body: Bytes::new(),
                max_forwards: 70,
                index: 0,
            },
            Owner::Transfer,
        );
        let bid = leg.bid;
        if let Some(t) = self.transfer.as_mut() {
            t.leg = Some(bid);
            t.deadline = Some(Instant::now() + self.inner.default_ring_timeout);
        }
        if !self.send_leg(leg, Purpose::Transfer(TransferStep::Leg(bid)), |_| {}) {
            self.transfer_failed(503, "Transport error", DialSource::Local);
        }
    }

    /// Attended: take the leg named by Replaces over from its call, then re-INVITE it
    /// without SDP for a fresh offer.
    async fn start_attended(&mut self) {
        let Some(replaces) = self.transfer.as_ref().and_then(|t| t.replaces.clone()) else {
            return;
        };
        let Some((call_id, to_tag, from_tag)) = parse_replaces(&replaces) else {
            return self.transfer_failed(400, "Bad Replaces", DialSource::Local);
        };
        let handed = match take_leg(&self.inner, &self.events, &call_id, &to_tag, &from_tag).await {
            Ok(h) => h,
            Err((status, reason)) => {
                return self.transfer_failed(status, &reason, DialSource::Local)
            }
        };
        let mut dialog = handed.dialog;
        let flow = dialog.flow;
        let key = DialogKey::new(dialog.call_id(), dialog.local_tag());
        let bid = self.new_id();
        self.inner
            .dialogs
            .insert(key, CallRef::new(self.events.clone(), Side::B, Some(bid)));
        let via = self.inner.local.via(&flow);
        let contact = self.inner.local.contact(&flow);
        let reinvite = dialog.request(Method::Invite, via, Some(&contact));
        if let Some(t) = self.transfer.as_mut() {
            t.leg = Some(bid);
            t.leg_invite_seq = reinvite.base.cseq.seq;
            t.leg_dialog = Some(dialog);
        }
        if self
            .send_client(reinvite, flow, Purpose::Transfer(TransferStep::LegReinvite))
            .is_none()
        {
            self.transfer_failed(503, "Transport error", DialSource::Local);
        }
    }

    /// Another call takes our `named.other()` leg: we end `named` (BYE) and give the
    /// other leg's dialog away without a BYE.
    pub(super) fn on_handover(
        &mut self,
        named: Side,
        from_tag: &str,
        reply: oneshot::Sender<Result<HandedLeg, (u16, String)>>,
    ) {
        let named_dialog = match named {
            Side::A => Some(&self.bridge.a),
            Side::B => self.bridge.b.as_ref(),
        };
        let matches = named_dialog.is_some_and(|d| d.remote_tag() == from_tag);
        if !matches || self.ended {
            let _ = reply.send(Err((481, "Replaces matches no dialog".into())));
            return;
        }
        // RFC 3891 3: only a confirmed dialog is replaced here (an early one that we did
        // not initiate must get 481; we do not pick up ringing calls).
        if self.bridge.a.state != DialogState::Confirmed || self.bridge.b.is_none() {
            let _ = reply.send(Err((481, "Replaces matches an early dialog".into())));
            return;
        }
        let give = named.other();
        let dialog = match give {
            Side::A => self.bridge.a.clone(),
            Side::B => self.bridge.b.clone().expect("checked above"),
        };
        // Forget the leg we give away (its new call indexes it), then end the other one.
        self.unindex(&DialogKey::new(dialog.call_id(), dialog.local_tag()));
        match give {
            Side::A => self.bridge.a.state = DialogState::Terminated,
            Side::B => {
                self.bridge.b = None;
            }
        }
        let _ = reply.send(Ok(HandedLeg { dialog }));
        self.hangup(HangupBy::System, Some(give));
    }

    /// An INVITE with Replaces (RFC 3891): the leg it names is taken from its call; its
    /// other party is re-INVITEd with our caller's offer and answers it.
    pub(super) fn on_replaces_ready(&mut self, leg: Result<HandedLeg, (u16, String)>) {
        self.hook_running = false;
        let handed = match leg {
            Ok(h) => h,
            Err((status, reason)) => {
                self.reply_a_final(status, &reason);
                self.end(HangupBy::System);
                return;
            }
        };
        if self.ended || self.caller.cancelled() {
            // Our caller gave up meanwhile: the other party has nobody now.
            self.release_dialog(handed.dialog);
            return;
        }
        let mut dialog = handed.dialog;
        let flow = dialog.flow;
        let bid = self.new_id();
        self.inner.dialogs.insert(
            DialogKey::new(dialog.call_id(), dialog.local_tag()),
            CallRef::new(self.events.clone(), Side::B, Some(bid)),
        );
        let via = self.inner.local.via(&flow);
        let contact = self.inner.local.contact(&flow);
        let mut reinvite = dialog.request(Method::Invite, via, Some(&contact));
        if let Some(a) = self.a_invite.whole().filter(|a| !a.body.is_empty()) {
            reinvite.headers.push(
                "Content-Type",
                a.headers
                    .get("Content-Type")
                    .unwrap_or("application/sdp")
                    .to_owned(),
            );
            reinvite.body = a.body.clone();
        }
        self.fork.add_proceeding(bid, reinvite.clone(), flow);
        self.after_transfer().replacing = Some(dialog);
        if self
            .send_client(
                reinvite,
                flow,
                Purpose::Transfer(TransferStep::Replace(bid)),
            )
            .is_none()
        {
            self.replace_failed(bid, 503, "Transport error");
        }
    }

    /// The other party answered our re-INVITE: our caller gets the 200 (with its answer,
    /// or with its offer when our caller's INVITE had none: then the caller's ACK carries
    /// the answer, which goes on in the ACK of this 2xx, as with a late offer).
    fn on_replace_answered(&mut self, bid: u64, resp: Response) {
        if self.bridge.b_branch == Some(bid) {
            if let (Some(ack), Some(d)) = (&self.bridge.b_ack, &self.bridge.b) {
                self.resend_ack(&d.flow, ack);
            }
            return;
        }
        let Some(mut dialog) = self.after.as_mut().and_then(|t| t.replacing.take()) else {
            return;
        };
        dialog.refresh_target(&resp.headers);
        let seq = self.fork.get(bid).map_or(1, super::fork::Branch::seq);
        self.fork.set_answered(bid);
        if self.a_invite.whole().is_some_and(|a| !a.body.is_empty()) {
            let via = self.inner.local.via(&dialog.flow);
            let ack = dialog.ack(seq, via);
            self.bridge.b_ack = Some(self.send_ack(&dialog.flow, &ack));
        }
        self.bridge.b_branch = Some(bid);
        self.bridge.b = Some(dialog);
        self.answer_caller(&resp);
        self.count_transfer(TransferKind::Attended, 1);
    }

    fn replace_failed(&mut self, bid: u64, status: u16, reason: &str) {
        self.remove_branch_key(bid);
        self.fork.remove(bid);
        if let Some(d) = self.after.as_mut().and_then(|t| t.replacing.take()) {
            self.release_dialog(d);
        }
        self.count_transfer(TransferKind::Attended, 2);
        self.reply_a_final(status, reason);
        self.end(HangupBy::System);
    }

    /// BYE on a dialog nobody wants any more.
    fn release_dialog(&mut self, mut d: Dialog) {
        self.unindex(&DialogKey::new(d.call_id(), d.local_tag()));
        let flow = d.flow;
        let via = self.inner.local.via(&flow);
        let bye = d.request(Method::Bye, via, None);
        self.send_client(bye, flow, Purpose::Own);
    }

    /// Events of a transfer's client transactions.
    pub(super) fn on_transfer_client(&mut self, id: u64, step: TransferStep, event: ClientEvent) {
        let is_final = !matches!(event, ClientEvent::Provisional(_));
        match step {
            TransferStep::Leg(bid) => match event {
                ClientEvent::Provisional(resp) => self.on_leg_provisional(bid, &resp),
                ClientEvent::Final(resp) if resp.is_success() => self.on_leg_answered(bid, resp),
                ClientEvent::Final(resp) => {
                    self.clients.remove(&id);
                    self.on_leg_failed(bid, resp.status, &resp.reason);
                }
                ClientEvent::Timeout => {
                    self.clients.remove(&id);
                    self.on_leg_failed(bid, 408, "Request Timeout");
                }
                ClientEvent::TransportError(e) => {
                    self.clients.remove(&id);
                    self.on_leg_failed(bid, 503, &format!("Transport error: {e}"));
                }
            },
            TransferStep::LegReinvite => match event {
                ClientEvent::Final(resp) if resp.is_success() => self.on_leg_offer(resp),
                ClientEvent::Final(resp) => {
                    self.clients.remove(&id);
                    self.leg_lost(resp.status, &resp.reason, DialSource::Callee);
                }
                ClientEvent::Timeout | ClientEvent::TransportError(_) => {
                    self.clients.remove(&id);
                    self.leg_lost(408, "Request Timeout", DialSource::Callee);
                }
                ClientEvent::Provisional(_) => {}
            },
            TransferStep::Reinvite => match event {
                ClientEvent::Final(resp) if resp.is_success() => self.on_transferee_answer(resp),
                ClientEvent::Final(resp) => {
                    self.clients.remove(&id);
                    self.bridge.reinvite_ended();
                    self.leg_lost(resp.status, &resp.reason, DialSource::Callee);
                }
                ClientEvent::Timeout | ClientEvent::TransportError(_) => {
                    self.clients.remove(&id);
                    self.bridge.reinvite_ended();
                    self.leg_lost(408, "Request Timeout", DialSource::Callee);
                }
                ClientEvent::Provisional(_) => {}
            },
            TransferStep::Replace(bid) => match event {
                ClientEvent::Final(resp) if resp.is_success() => {
                    self.on_replace_answered(bid, resp)
                }
                ClientEvent::Final(resp) => {
                    self.clients.remove(&id);
                    self.replace_failed(bid, resp.status, &resp.reason);
                }
                ClientEvent::Timeout | ClientEvent::TransportError(_) => {
                    self.clients.remove(&id);
                    self.replace_failed(bid, 408, "Request Timeout");
                }
                ClientEvent::Provisional(_) => {}
            },
            TransferStep::Resume => match event {
                ClientEvent::Final(resp) if resp.is_success() => {
                    // ACK the 2xx (and its retransmissions) on the resumed dialog.
                    let side = self
                        .after
                        .as_ref()
                        .and_then(|t| t.resume_side)
                        .unwrap_or(Side::A);
                    let inner = self.inner.clone();
                    if let Some(d) = self.dialog_mut(side) {
                        let flow = d.flow;
                        let ack = d.ack(resp.base.cseq.seq, inner.local.via(&flow));
                        let _ = self.send_ack(&flow, &ack);
                    }
                }
                ClientEvent::Provisional(_) => {}
                _ => {
                    self.clients.remove(&id);
                }
            },
            TransferStep::FinalNotify => {
                if is_final {
                    self.clients.remove(&id);
                    self.bye_old_legs();
                }
            }
        }
    }

    fn on_leg_provisional(&mut self, bid: u64, resp: &Response) {
        let a = self.fork.on_provisional(bid, resp);
        if !a.is_empty() {
            // A CANCEL wanted before the target rang goes now (RFC 3261 9.1).
            self.run_fork(a, None);
            return;
        }
        if resp.status > 100 {
            if let Some(t) = self.transfer.as_mut() {
                t.ringing = true;
            }
        }
    }

    /// The target answered a blind transfer's INVITE: its 2xx has the offer.
    fn on_leg_answered(&mut self, bid: u64, resp: Response) {
        let current = self.transfer.as_ref().is_some_and(|t| t.leg == Some(bid));
        if !current {
            // Too late (the transfer ended): the fork ACKs and BYEs it (RFC 3261 13.2.2.4).
            let a = self.fork.on_success(bid, &resp);
            self.run_fork(a, Some(&resp));
            return;
        }
        if let Some(t) = self.transfer.as_ref() {
            if let (Some(ack), Some(d)) = (&t.leg_ack, &t.leg_dialog) {
                // A retransmitted 2xx: our ACK got lost (RFC 3261 13.2.2.4).
                self.resend_ack(&d.flow, ack);
                return;
            }
            if t.target_answered() {
                // Waiting for the transferee's answer; the ACK follows then.
                return;
            }
        }
        let Some(b) = self.fork.get(bid) else {
            return;
        };
        let Some(invite) = b.invite() else {
            return;
        };
        let mut dialog = Dialog::uac(invite, &resp, b.target);
        dialog.state = DialogState::Confirmed;
        let seq = b.seq();
        self.fork.set_answered(bid);
        if let Some(t) = self.transfer.as_mut() {
            t.deadline = None;
            t.leg_invite_seq = seq;
            t.leg_dialog = Some(dialog);
        }
        self.on_leg_offer(resp);
    }

    /// The target's 2xx with its offer (to our INVITE or offerless re-INVITE): re-INVITE
    /// the transferee with it (step 3).
    fn on_leg_offer(&mut self, resp: Response) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        if t.target_answered() {
            // A retransmitted 2xx of the offerless re-INVITE: ACK again if we have.
            if let (Some(ack), Some(d)) = (&t.leg_ack, &t.leg_dialog) {
                let (ack, flow) = (ack.clone(), d.flow);
                self.resend_ack(&flow, &ack);
            }
            return;
        }
        if resp.body.is_empty() {
            // RFC 3261 13.2.1: a 2xx to an offerless INVITE must carry the offer.
            self.leg_lost(488, "Target answered without an offer", DialSource::Callee);
            return;
        }
        t.offered(
            resp.body.clone(),
            resp.headers.get("Content-Type").map(str::to_owned),
        );
        // RFC 3261 14.1: no re-INVITE to the caller before it ACKed the call's 2xx.
        if t.may_reinvite(self.caller.awaiting_ack()) {
            self.send_transfer_reinvite();
        }
    }

    /// The caller ACKed the call's 2xx: a transfer waiting for that goes on.
    pub(super) fn on_caller_acked(&mut self) {
        let waiting = self
            .transfer
            .as_ref()
            .is_some_and(|t| t.may_reinvite(false));
        if waiting {
            self.send_transfer_reinvite();
        }
    }

    /// Step 3: the transferee gets the target's offer in a re-INVITE.
    fn send_transfer_reinvite(&mut self) {
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        let transferee = t.transferee;
        let (body, ctype) = t.offer.clone().unwrap_or_default();
        let contact = self.contact_for(transferee);
        let inner = self.inner.clone();
        let Some(d) = self.dialog_mut(transferee) else {
            return self.leg_lost(481, "Transferee gone", DialSource::Local);
        };
        let flow = d.flow;
        let via = inner.local.via(&flow);
        let mut reinvite = d.request(Method::Invite, via, Some(&contact));
        reinvite.headers.push(
            "Content-Type",
            ctype.unwrap_or_else(|| "application/sdp".into()),
        );
        reinvite.body = body;
        let seq = reinvite.base.cseq.seq;
        if let Some(t) = self.transfer.as_mut() {
            t.reinviting(seq);
        }
        // Our own re-INVITE counts for glare (RFC 3261 14.2).
        let _ = self.bridge.on_reinvite(transferee.other());
        if self
            .send_client(reinvite, flow, Purpose::Transfer(TransferStep::Reinvite))
            .is_none()
        {
            self.bridge.reinvite_ended();
            self.leg_lost(503, "Transport error", DialSource::Local);
        }
    }

    /// The transferee's 2xx with the answer: ACK both, and the target takes the
    /// transferor's place (step 4).
    fn on_transferee_answer(&mut self, resp: Response) {
        let Some(t) = self.transfer.as_ref() else {
            // A retransmission after the switch: ACK it again.
            if let Some((flow, ack)) = self.after.as_ref().and_then(|t| t.reinvite_ack.as_ref()) {
                self.resend_ack(flow, ack);
            }
            return;
        };
        let transferee = t.transferee;
        let seq = t.reinvite_seq;
        self.bridge.reinvite_ended();
        let inner = self.inner.clone();
        let Some(d) = self.dialog_mut(transferee) else {
            return;
        };
        d.refresh_target(&resp.headers);
        let flow = d.flow;
        let via = inner.local.via(&flow);
        let ack = d.ack(seq, via);
        let sent = self.send_ack(&flow, &ack);
        self.after_transfer().reinvite_ack = Some((flow, sent));
        // The answer goes to the target in its ACK (RFC 3264 offer/answer across legs).
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        let Some(leg) = t.leg_dialog.as_ref() else {
            return;
        };
        let lflow = leg.flow;
        let via = self.inner.local.via(&lflow);
        let mut leg_ack = leg.ack(t.leg_invite_seq, via);
        if !resp.body.is_empty() {
            leg_ack.headers.push(
                "Content-Type",
                resp.headers
                    .get("Content-Type")
                    .unwrap_or("application/sdp")
                    .to_owned(),
            );
            leg_ack.body = resp.body.clone();
        }
        let sent = self.send_ack(&lflow, &leg_ack);
        if let Some(t) = self.transfer.as_mut() {
            t.leg_ack = Some(sent);
        }
        self.switch_legs();
    }

    /// The target replaces the transferor (or, server-started, the other party).
    fn switch_legs(&mut self) {
        let Some(mut t) = self.transfer.take() else {
            return;
        };
        let Some(new_dialog) = t.leg_dialog.take() else {
            return;
        };
        let replaced = t.transferee.other();
        let bid = t.leg;
        let new_key = DialogKey::new(new_dialog.call_id(), new_dialog.local_tag());
        let old = match replaced {
            Side::B => {
                let old = self.bridge.b.replace(new_dialog);
                self.bridge.b_branch = bid;
                self.bridge.b_ack = t.leg_ack.take();
                old
            }
            Side::A => {
                let contact = self.inner.local.contact(&new_dialog.flow);
                let old = std::mem::replace(&mut self.bridge.a, new_dialog);
                self.bridge.a_contact = contact;
                // The target's dialog is now side A; its branch entry goes (keeping the
                // dialog's index key, now pointing at side A).
                if let Some(bid) = bid {
                    self.fork.remove(bid);
                }
                self.inner
                    .dialogs
                    .insert(new_key, CallRef::new(self.events.clone(), Side::A, None));
                Some(old)
            }
        };
        self.snapshot_new_party(replaced, &t.target);
        // Hunt groups see who is on a call: the target now, not the replaced party.
        let stays = match t.transferee {
            Side::A => self.a_invite.from().uri.to_text(),
            Side::B => self
                .bridge
                .b_branch
                .and_then(|b| self.fork.get(b))
                .map(super::fork::Branch::request_uri)
                .unwrap_or_default(),
        };
        self.re_engage(&[t.target.clone(), stays.clone()]);
        // Busy lamps: the party that stays is now on a call with the target.
        if let (Ok(stays), Ok(target)) = (Uri::parse(&stays), Uri::parse(t.target.trim())) {
            let (caller, callee) = match t.transferee {
                Side::A => (stays, target),
                Side::B => (target, stays),
            };
            self.watch_new_parties(caller, callee);
        }
        let status = 200;
        self.count_transfer(t.kind, 1);
        self.note_transfer(&t, status);
        if let Some(reply) = t.reply.take() {
            let _ = reply.send(DialOutcome {
                answered: true,
                status,
                reason: "OK".into(),
                source: DialSource::Callee,
                target: Some(0),
            });
        }
        tracing::info!(call = %self.id, kind = t.kind.as_str(), target = %t.target, "transfer done");
        if let Some(old) = old {
            if !t.transferor_gone {
                self.after_transfer().old_legs.push(old);
            } else {
                self.unindex(&DialogKey::new(old.call_id(), old.local_tag()));
            }
        }
        if t.notify && !t.transferor_gone && t.transferor.is_some() {
            // The final NOTIFY to the old leg; its BYE follows the NOTIFY's answer.
            self.notify_old_leg(&t, "SIP/2.0 200 OK", true);
        } else {
            self.bye_old_legs();
        }
    }

    /// `GET /calls`: the target is the `replaced` party of the call now (its address, its
    /// leg's Call-ID and where that leg goes).
    fn snapshot_new_party(&self, replaced: Side, target: &str) {
        let (dialog, target) = match replaced {
            Side::A => (&self.bridge.a, target.trim().to_owned()),
            Side::B => match &self.bridge.b {
                Some(d) => (d, target.trim().to_owned()),
                None => return,
            },
        };
        use crate::b2bua::summary::Field;
        let call_id = dialog.call_id();
        let to = crate::transport::peer_text(dialog.flow.transport, &dialog.flow.addr);
        let changes = match replaced {
            Side::A => [
                (Field::From, target.as_str()),
                (Field::ACallId, call_id),
                (Field::Source, to.as_str()),
            ],
            Side::B => [
                (Field::To, target.as_str()),
                (Field::BCallId, call_id),
                (Field::BTarget, to.as_str()),
            ],
        };
        self.inner.calls.with(&self.id, |e| e.summary.set(&changes));
    }

    /// The transfer failed before the switch: the call stays as it was.
    fn transfer_failed(&mut self, status: u16, reason: &str, source: DialSource) {
        let Some(mut t) = self.transfer.take() else {
            return;
        };
        if let Some(bid) = t.leg {
            self.cancel_branch(bid);
        }
        self.count_transfer(t.kind, 2);
        self.note_transfer(&t, status);
        tracing::info!(call = %self.id, kind = t.kind.as_str(), target = %t.target, status, reason, "transfer failed");
        if let Some(reply) = t.reply.take() {
            let target = (source == DialSource::Callee).then_some(0);
            let _ = reply.send(DialOutcome {
                target,
                ..DialOutcome::failed(status, reason, source)
            });
        }
        self.resume_after_failed_transfer(&t);
        if t.notify && !t.transferor_gone && t.transferor.is_some() {
            let line = format!(
                "SIP/2.0 {status} {}",
                if reason.is_empty() {
                    crate::sip::reason_phrase(status)
                } else {
                    reason
                }
            );
            self.transfer = Some(t);
            self.refer_notify(&line, true);
            self.transfer = None;
        } else if t.transferor_gone {
            // Nobody to go back to: the transferee is alone.
            self.hangup(HangupBy::System, Some(t.transferee.other()));
        }
    }

    /// The target's leg answered but could not be joined: release it, then fail.
    fn leg_lost(&mut self, status: u16, reason: &str, source: DialSource) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        let dialog = t.leg_dialog.take();
        // A 2xx to our INVITE is ACKed before the BYE (RFC 3261 13.2.2.4).
        let needs_ack = t.leg_ack.is_none() && t.kind != TransferKind::Attended;
        let seq = t.leg_invite_seq;
        let bid = t.leg.take();
        if let Some(mut d) = dialog {
            let flow = d.flow;
            if needs_ack {
                let via = self.inner.local.via(&flow);
                let ack = d.ack(seq, via);
                let _ = self.send_ack(&flow, &ack);
            }
            let via = self.inner.local.via(&flow);
            let bye = d.request(Method::Bye, via, None);
            self.unindex(&DialogKey::new(d.call_id(), d.local_tag()));
            self.send_client(bye, flow, Purpose::Own);
        }
        if let Some(bid) = bid {
            self.remove_branch_key(bid);
            self.fork.remove(bid);
        }
        self.transfer_failed(status, reason, source);
    }

    fn on_leg_failed(&mut self, bid: u64, status: u16, reason: &str) {
        self.fork.terminate(bid);
        self.remove_branch_key(bid);
        self.fork.remove(bid);
        if self.transfer.as_ref().is_some_and(|t| t.leg == Some(bid)) {
            if let Some(t) = self.transfer.as_mut() {
                t.leg = None;
            }
            self.transfer_failed(status, reason, DialSource::Callee);
        }
    }

    /// The ring timeout of a transfer's target.
    pub(super) fn transfer_deadline(&self) -> Option<Instant> {
        self.transfer.as_ref().and_then(|t| t.deadline)
    }

    pub(super) fn on_transfer_timeout(&mut self) {
        let (ringing, bid) = match self.transfer.as_mut() {
            Some(t) if t.deadline.is_some_and(|d| Instant::now() >= d) => {
                t.deadline = None;
                (t.ringing, t.leg)
            }
            _ => return,
        };
        if let Some(bid) = bid {
            self.cancel_branch(bid);
        }
        let (status, reason) = if ringing {
            (480, "No Answer")
        } else {
            (408, "Request Timeout")
        };
        if let Some(t) = self.transfer.as_mut() {
            t.leg = None;
        }
        self.transfer_failed(status, reason, DialSource::Timeout);
    }

    /// A NOTIFY of the REFER's implicit subscription (RFC 3515 2.4.4) with a sipfrag
    /// body; `last` ends the subscription.
    fn refer_notify(&mut self, status_line: &str, last: bool) {
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        if !t.notify || t.transferor_gone {
            return;
        }
        let Some(side) = t.transferor else { return };
        let event_id = t.event_id;
        let contact = self.contact_for(side);
        let inner = self.inner.clone();
        let Some(d) = self.dialog_mut(side) else {
            return;
        };
        let notify = build_notify(d, event_id, status_line, last, &contact, &inner);
        let flow = d.flow;
        self.send_client(notify, flow, Purpose::Own);
    }

    fn notify_old_leg(&mut self, t: &Transfer, status_line: &str, last: bool) {
        let Some(old) = self.after.as_mut().and_then(|a| a.old_legs.last_mut()) else {
            return;
        };
        let contact = self.inner.local.contact(&old.flow);
        let notify = build_notify(old, t.event_id, status_line, last, &contact, &self.inner);
        let flow = old.flow;
        self.send_client(notify, flow, Purpose::Transfer(TransferStep::FinalNotify));
    }

    /// BYE to every replaced leg still up (the transferor's, after its last NOTIFY).
    pub(super) fn bye_old_legs(&mut self) {
        let legs = self
            .after
            .as_mut()
            .map(|a| std::mem::take(&mut a.old_legs))
            .unwrap_or_default();
        for mut d in legs {
            let flow = d.flow;
            let via = self.inner.local.via(&flow);
            let bye = d.request(Method::Bye, via, None);
            self.send_client(bye, flow, Purpose::Own);
            self.after_transfer()
                .old_keys
                .push(DialogKey::new(d.call_id(), d.local_tag()));
        }
    }

    /// A request on a leg that was transferred away: its BYE is answered here.
    pub(super) fn on_old_leg_request(&mut self, tx: &ServerTransaction, req: &Request) -> bool {
        let Some(after) = self.after.as_mut() else {
            return false;
        };
        let in_old = after.old_legs.iter().position(|d| d.matches(req));
        let tag = req.base.to.tag().unwrap_or("");
        let gone = after.old_keys.iter().any(|k| k.is(&req.base.call_id, tag));
        match (in_old, gone) {
            (Some(i), _) if req.method == Method::Bye => {
                let d = after.old_legs.remove(i);
                self.unindex(&DialogKey::new(d.call_id(), d.local_tag()));
                let _ = tx.respond(req.response(200));
                true
            }
            (Some(_), _) | (None, true) => {
                let status = if req.method == Method::Bye { 200 } else { 481 };
                let _ = tx.respond(req.response(status));
                true
            }
            _ => false,
        }
    }

    /// The transferor hung up while its transfer runs: only its leg ends.
    pub(super) fn transferor_left(&mut self, side: Side) -> bool {
        match self.transfer.as_mut() {
            Some(t) if t.transferor == Some(side) && !t.transferor_gone => {
                t.transferor_gone = true;
                true
            }
            _ => false,
        }
    }

    /// A transfer in progress when the call ends: stop ringing the target, release it.
    pub(super) fn abort_transfer(&mut self) {
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        if let Some(bid) = t.leg {
            self.cancel_branch(bid);
        }
        self.leg_lost(487, "Call ended", DialSource::Caller);
    }

    fn resume_after_failed_transfer(&mut self, t: &Transfer) {
        let Some(transferor) = t.transferor else {
            return;
        };
        if t.transferor_gone {
            return;
        }
        let Some(sdp) = self.bridge.take_hold(transferor) else {
            return;
        };
        let body = resume_sdp(&String::from_utf8_lossy(&sdp));
        let side = t.transferee;
        let contact = self.contact_for(side);
        let inner = self.inner.clone();
        let Some(d) = self.dialog_mut(side) else {
            return;
        };
        let flow = d.flow;
        let mut reinvite = d.request(Method::Invite, inner.local.via(&flow), Some(&contact));
        reinvite.headers.push("Content-Type", "application/sdp");
        reinvite.body = Bytes::from(body);
        self.after_transfer().resume_side = Some(side);
        self.send_client(reinvite, flow, Purpose::Transfer(TransferStep::Resume));
    }

    /// Replaces the addresses this call marks as on a call (hunt groups' busy check).
    fn re_engage(&mut self, uris: &[String]) {
        if !crate::b2bua::B2bua::tracks_busy(&self.inner) {
            return;
        }
        for k in std::mem::take(&mut self.engaged) {
            crate::b2bua::disengage(&self.inner.engaged, &k);
        }
        self.engaged = uris
            .iter()
            .filter_map(|u| crate::b2bua::engaged_key(u))
            .collect();
        for k in &self.engaged {
            crate::b2bua::engage(&self.inner.engaged, k);
        }
    }

    fn transfer_ended(&mut self, status: u16) {
        if let Some(t) = self.transfer.take() {
            self.count_transfer(t.kind, 2);
            self.note_transfer(&t, status);
        }
    }

    fn note_transfer(&mut self, t: &Transfer, status: u16) {
        self.after_transfer().notes.push(TransferNote {
            kind: t.kind.as_str(),
            by: t.transferor.map_or("server", side_name),
            target: t.target.clone(),
            status,
        });
    }
}

/// Asks the call owning dialog (`call_id`, our tag `to_tag`, their tag `from_tag`) for
/// the leg facing away from that dialog (RFC 3891: the dialog named is the one being
/// replaced; the other party of that call is who the new party gets connected to).
pub(super) async fn take_leg(
    inner: &crate::b2bua::B2buaInner,
    me: &super::Events,
    call_id: &str,
    to_tag: &str,
    from_tag: &str,
) -> Result<HandedLeg, (u16, String)> {
    let no_match = || (481, "Replaces matches no dialog".to_owned());
    let Some(r) = inner.dialogs.get(&DialogKey::new(call_id, to_tag)) else {
        return Err(no_match());
    };
    if r.events.same(me) {
        return Err((400, "Replaces names this call".to_owned()));
    }
    let (reply, rx) = oneshot::channel();
    r.events
        .post(CallEvent::Handover {
            named: r.side,
            from_tag: from_tag.to_owned(),
            reply,
        })
        .map_err(|_| no_match())?;
    rx.await.unwrap_or_else(|_| Err(no_match()))
}
