//! The script's handle on a call (`CallControl`): `call:dial`, `call:transfer`,
//! `call:authenticate`, hunt-group provisionals and the like become events on the call's
//! queue, and their answers come back on reply channels. Also the admin API's way in
//! (`transfer_via`).
//!
//! Owns: nothing of the call's state; only its event queue's sender and what
//! `call:authenticate()` needs (the INVITE, digest users). Must not touch: the call's
//! parts (they live in the call's task).

use super::{CallEvent, Events, Side};
use crate::auth::{AuthOutcome, ChallengeKind, DigestAuth, Users};
use crate::b2bua::{AuthVerdict, CallControl, DialOptions, DialOutcome, DialSource, DialTarget};
use crate::sip::Request;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::oneshot;

/// The script's handle on the call: turns `call:dial` into a [`CallEvent::Dial`].
pub(super) struct Control {
    pub events: Events,
    pub ended: tokio::sync::watch::Receiver<bool>,
    /// Present when users are configured: what `call:authenticate()` needs. Boxed: the
    /// script keeps this control for the whole call, and inline the INVITE made it ~850
    /// bytes of every call even without users.
    pub auth: Option<Box<CallAuth>>,
}

pub(super) struct CallAuth {
    pub auth: DigestAuth,
    pub users: Arc<Users>,
    pub invite: Request,
    pub source: std::net::IpAddr,
}

impl CallControl for Control {
    fn set_route(&self, route: usize) {
        let _ = self.events.post(CallEvent::Route(route));
    }

    fn transfer(
        &self,
        target: String,
        to_caller: bool,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        let party = if to_caller { Side::A } else { Side::B };
        let events = self.events.clone();
        Box::pin(async move { transfer_via(&events, target, party).await })
    }

    fn authenticate(&self) -> AuthVerdict {
        let Some(a) = &self.auth else {
            return AuthVerdict::NotConfigured;
        };
        // RFC 3261 22.3: a B2BUA acting for the domain challenges with 407.
        let outcome = a
            .auth
            .verify(&a.invite, ChallengeKind::Proxy, a.source, |u| {
                a.users.get(u).cloned()
            });
        if let AuthOutcome::Ok { user } = outcome {
            return AuthVerdict::Ok(user);
        }
        match a.auth.respond(&a.invite, ChallengeKind::Proxy, &outcome) {
            Some(resp) => {
                let headers = resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("Proxy-Authenticate"))
                    .map(|h| (h.name.to_string(), h.value.clone()))
                    .collect();
                let _ = self.events.post(CallEvent::FinalHeaders(headers));
                AuthVerdict::Reject(resp.status, resp.reason)
            }
            None => AuthVerdict::Reject(403, "Forbidden".into()),
        }
    }

    fn dial_indexed(
        &self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = (DialOutcome, Option<usize>)> + Send>> {
        let (winner, mut winner_rx) = oneshot::channel();
        let outcome = self.send_dial(targets, opts, Some(winner));
        Box::pin(async move {
            let outcome = outcome.await;
            (outcome, winner_rx.try_recv().ok())
        })
    }

    fn provisional(&self, status: u16, reason: &str, headers: Vec<(String, String)>) {
        let _ = self.events.post(CallEvent::Provisional {
            status,
            reason: reason.to_owned(),
            headers,
        });
    }

    fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    fn ended(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut rx = self.ended.clone();
        Box::pin(async move {
            // An error means the call (the sender) is gone: ended too.
            let _ = rx.wait_for(|ended| *ended).await;
        })
    }

    fn dial(
        &self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        self.send_dial(targets, opts, None)
    }
}

impl Control {
    fn send_dial(
        &self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
        winner: Option<oneshot::Sender<usize>>,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.events.post(CallEvent::Dial {
            targets,
            opts,
            reply,
            winner,
        });
        Box::pin(async move {
            // No call to dial from any more: it ended (the caller hung up, mostly).
            let gone = || DialOutcome::failed(487, "Call ended", DialSource::Caller);
            if sent.is_err() {
                return gone();
            }
            rx.await.unwrap_or_else(|_| gone())
        })
    }
}

/// Asks the call behind `events` to connect `party` to `target` (`call:transfer`, the
/// admin API) and waits for the outcome.
pub async fn transfer_via(events: &Events, target: String, party: Side) -> DialOutcome {
    let (reply, rx) = oneshot::channel();
    let gone = DialOutcome::failed(481, "Call ended", DialSource::Local);
    if events
        .post(CallEvent::Transfer {
            target,
            party,
            reply,
        })
        .is_err()
    {
        return gone;
    }
    rx.await.unwrap_or(gone)
}
