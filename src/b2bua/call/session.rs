//! RFC 4028 session timers on the call's two legs: negotiated when the call is answered
//! (`start_session_timers`), refreshed by every successful re-INVITE or UPDATE relayed
//! between the legs, refreshed by us (UPDATE when the peer allows it, else a re-INVITE
//! with the SDP we last sent it) on the legs where we are the refresher, and the call ended
//! with BYE on both legs when a leg the peer refreshes goes unrefreshed.
//!
//! Owns: `Call::session` (boxed: calls without timers pay 8 bytes). The per-dialog rules
//! are `dialog::session_timer`'s.

use bytes::Bytes;
use tokio::time::Instant;

use super::{Call, HangupBy, Purpose, Side};
use crate::dialog::session_timer::{
    uac_offer, uas_decide, SessionExpires, SessionTimer, SessionTimerConfig, UasDecision,
};
use crate::dialog::DialogState;
use crate::sip::{Headers, Method, Response};

/// The session timers of the two legs.
#[derive(Debug, Default)]
pub(super) struct SessionTimers {
    a: Option<LegTimer>,
    b: Option<LegTimer>,
}

#[derive(Debug)]
struct LegTimer {
    timer: SessionTimer,
    /// The peer lists UPDATE in Allow: our refreshes go as UPDATE (RFC 4028 7.4/9: either
    /// method refreshes; UPDATE needs no SDP).
    update: bool,
    /// The SDP we last sent this leg, for a re-INVITE refresh (kept only when we refresh
    /// a peer that does not allow UPDATE).
    sdp: Bytes,
    /// A refresh of ours is in flight (its answer is in `Purpose::Refresh`).
    pending: bool,
}

impl SessionTimers {
    fn leg(&self, side: Side) -> Option<&LegTimer> {
        match side {
            Side::A => self.a.as_ref(),
            Side::B => self.b.as_ref(),
        }
    }

    fn leg_mut(&mut self, side: Side) -> Option<&mut LegTimer> {
        match side {
            Side::A => self.a.as_mut(),
            Side::B => self.b.as_mut(),
        }
    }

    fn next_due(&self) -> Option<Instant> {
        [&self.a, &self.b]
            .into_iter()
            .flatten()
            .filter(|l| !l.pending)
            .map(|l| l.timer.due)
            .min()
    }
}

/// We are the UAC of the B leg's dialog and the UAS of the A leg's.
fn we_are_uac(side: Side) -> bool {
    side == Side::B
}

fn allows_update(headers: &Headers) -> bool {
    headers
        .get_all("Allow")
        .flat_map(|v| v.split(','))
        .any(|m| m.trim().eq_ignore_ascii_case("UPDATE"))
}

impl Call {
    pub(super) fn session_config(&self) -> SessionTimerConfig {
        self.inner.session_timers
    }

    /// The Session-Expires and Min-SE of an INVITE we start on a B leg (RFC 4028 7.1).
    pub(super) fn offer_session_timer(&self, headers: &mut Headers, interval: Option<u32>) {
        let cfg = self.session_config();
        if cfg.session_expires == 0 {
            return;
        }
        let interval = interval.unwrap_or(cfg.session_expires);
        for (name, value) in uac_offer(cfg, interval) {
            // One Supported line (with 100rel when the caller has it).
            match headers.get(name).map(str::to_owned) {
                Some(v) if name == "Supported" => headers.set(name, format!("{v}, {value}")),
                _ => headers.push(name, value),
            }
        }
    }

    /// The call is answered with `resp` (the callee's 2xx): the timers of both legs, and the
    /// headers of the caller's 2xx that say what was agreed on its leg.
    pub(super) fn start_session_timers(&mut self, resp: &Response, to_caller: &mut Headers) {
        let cfg = self.session_config();
        if cfg.session_expires == 0 {
            return;
        }
        let now = Instant::now();
        let mut timers = SessionTimers::default();
        if let Some(invite) = self.a_invite.whole() {
            if let UasDecision::Timer { expires, require } = uas_decide(cfg, &invite.headers) {
                to_caller.push("Session-Expires", expires.value());
                if require {
                    to_caller.push("Require", "timer");
                }
                let timer = SessionTimer::from_expires(expires, false, now);
                let update = allows_update(&invite.headers);
                timers.a = Some(LegTimer {
                    sdp: if timer.we_refresh && !update {
                        resp.body.clone()
                    } else {
                        Bytes::new()
                    },
                    timer,
                    update,
                    pending: false,
                });
            }
        }
        if let Some(Ok(se)) = SessionExpires::of(&resp.headers) {
            if se.delta >= 1 {
                let timer = SessionTimer::from_expires(se, true, now);
                let update = allows_update(&resp.headers);
                let sdp = match (timer.we_refresh && !update, self.a_invite.whole()) {
                    (true, Some(invite)) => invite.body.clone(),
                    _ => Bytes::new(),
                };
                timers.b = Some(LegTimer {
                    timer,
                    update,
                    sdp,
                    pending: false,
                });
            }
        }
        if timers.a.is_some() || timers.b.is_some() {
            self.session = Some(Box::new(timers));
        }
    }

    fn count_session_expiry(&self) {
        self.inner
            .stats
            .session_expiries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn session_deadline(&self) -> Option<Instant> {
        self.session.as_ref().and_then(|s| s.next_due())
    }

    /// A re-INVITE or UPDATE went through on both legs (relayed, 2xx): both sessions are
    /// refreshed (RFC 4028 10).
    pub(super) fn session_refreshed(&mut self) {
        let now = Instant::now();
        if let Some(s) = self.session.as_mut() {
            for l in [&mut s.a, &mut s.b].into_iter().flatten() {
                l.timer.refreshed(now);
            }
        }
    }

    /// The Session-Expires (and Supported/Require) a relayed re-INVITE or UPDATE towards
    /// `side`, or our 2xx to one from `side`, carries for that leg.
    pub(super) fn session_headers(&self, side: Side, headers: &mut Headers, response: bool) {
        let Some(l) = self.session.as_ref().and_then(|s| s.leg(side)) else {
            return;
        };
        headers.push("Session-Expires", l.timer.expires(we_are_uac(side)).value());
        headers.push(if response { "Require" } else { "Supported" }, "timer");
    }

    /// A leg's timer is due: refresh it (ours) or end the call (theirs, unrefreshed).
    pub(super) fn on_session_timers(&mut self, now: Instant) {
        for side in [Side::A, Side::B] {
            let Some(l) = self.session.as_ref().and_then(|s| s.leg(side)) else {
                continue;
            };
            if l.pending || now < l.timer.due {
                continue;
            }
            if !l.timer.we_refresh {
                tracing::info!(call = %self.id, ?side, "session expired without a refresh (RFC 4028); ending the call");
                self.count_session_expiry();
                self.session = None;
                self.hangup(HangupBy::SessionTimer, None);
                return;
            }
            self.send_session_refresh(side, now);
        }
    }

    fn send_session_refresh(&mut self, side: Side, now: Instant) {
        let (update, sdp, expires) = match self.session.as_ref().and_then(|s| s.leg(side)) {
            Some(l) => (l.update, l.sdp.clone(), l.timer.expires(we_are_uac(side))),
            None => return,
        };
        if !update && !self.bridge.is_idle() {
            // A re-INVITE is under way on the call: it refreshes this leg when it is
            // answered; try again shortly if it does not.
            if let Some(l) = self.session.as_mut().and_then(|s| s.leg_mut(side)) {
                l.timer.due = now + std::time::Duration::from_secs(2);
            }
            return;
        }
        let Some(d) = self.dialog_mut(side) else {
            return;
        };
        if d.state != DialogState::Confirmed {
            return;
        }
        let flow = d.flow;
        let via = self.inner.local.via(&flow);
        let method = if update {
            Method::Update
        } else {
            Method::Invite
        };
        let contact = self.inner.local.contact(&flow);
        let Some(mut req) = self
            .dialog_mut(side)
            .map(|d| d.request(method.clone(), via, Some(&contact)))
        else {
            return;
        };
        req.headers.push("Session-Expires", expires.value());
        req.headers.push("Supported", "timer");
        if !update && !sdp.is_empty() {
            req.headers.push("Content-Type", "application/sdp");
            req.body = sdp;
        }
        let seq = req.base.cseq.seq;
        if let Some(l) = self.session.as_mut().and_then(|s| s.leg_mut(side)) {
            l.pending = true;
        }
        if self
            .send_client(req, flow, Purpose::Refresh { side, seq })
            .is_none()
        {
            self.on_refresh_failed(side, 503);
        }
    }

    /// The answer to our refresh on `side`.
    pub(super) fn on_refresh_answer(&mut self, side: Side, seq: u32, resp: Option<&Response>) {
        match resp {
            Some(r) if r.is_success() => {
                if r.base.cseq.method == Method::Invite {
                    // Our re-INVITE's 2xx wants our ACK (RFC 3261 13.2.2.4).
                    let flow = self.dialog_mut(side).map(|d| d.flow);
                    if let Some(flow) = flow {
                        let via = self.inner.local.via(&flow);
                        let ack = self.dialog_mut(side).map(|d| d.ack(seq, via));
                        if let Some(ack) = ack {
                            let _ = self.send_ack(&flow, &ack);
                        }
                    }
                }
                let now = Instant::now();
                if let Some(l) = self.session.as_mut().and_then(|s| s.leg_mut(side)) {
                    l.pending = false;
                    if let Some(Ok(se)) = SessionExpires::of(&r.headers) {
                        l.timer = SessionTimer::from_expires(se, we_are_uac(side), now);
                    } else {
                        l.timer.refreshed(now);
                    }
                }
            }
            Some(r) => self.on_refresh_failed(side, r.status),
            None => self.on_refresh_failed(side, 408),
        }
    }

    fn on_refresh_failed(&mut self, side: Side, status: u16) {
        // RFC 4028 10 / RFC 3261 12.2.1.2: 408 or 481 means the dialog is gone; any
        // other failure leaves the session to expire (the peer may refresh meanwhile).
        if matches!(status, 408 | 481) {
            tracing::info!(call = %self.id, ?side, status, "session refresh failed; ending the call");
            self.count_session_expiry();
            self.session = None;
            self.hangup(HangupBy::SessionTimer, None);
            return;
        }
        if let Some(l) = self.session.as_mut().and_then(|s| s.leg_mut(side)) {
            l.pending = false;
            l.timer.we_refresh = false;
            let now = Instant::now();
            l.timer.refreshed(now);
        }
    }
}
