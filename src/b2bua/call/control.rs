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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{oneshot, Notify};

/// Whether the call has ended, as the script and hunt groups ask it (`is_ended`,
/// `ended()`): a flag set once and a `Notify`, ~64 bytes. (Issue 14: a tokio watch
/// channel, with its eight receiver queues, was ~380 bytes of every call for this bool.)
#[derive(Default)]
pub(super) struct Ended {
    ended: AtomicBool,
    notify: Notify,
}

impl Ended {
    pub fn is_set(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Until the call has ended.
    pub async fn wait(&self) {
        loop {
            // Created before the flag is read: a `Notified` receives every
            // `notify_waiters` from its creation on, so the end cannot slip in between.
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// The call's side of [`Ended`]: set when the call ends, or when its task is gone
/// without ending it (dropped: ended too).
pub(super) struct EndedTx(Arc<Ended>);

impl EndedTx {
    pub fn new() -> EndedTx {
        EndedTx(Arc::default())
    }

    pub fn subscribe(&self) -> Arc<Ended> {
        self.0.clone()
    }

    pub fn set(&self) {
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
}

impl Drop for EndedTx {
    fn drop(&mut self) {
        self.set();
    }
}

/// The script's handle on the call: turns `call:dial` into a [`CallEvent::Dial`].
pub(super) struct Control {
    pub events: Events,
    pub ended: Arc<Ended>,
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
        self.ended.is_set()
    }

    fn ended(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let ended = self.ended.clone();
        Box::pin(async move { ended.wait().await })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_see_the_end_and_a_dropped_call_is_ended() {
        let tx = EndedTx::new();
        let ended = tx.subscribe();
        assert!(!ended.is_set());
        let waiter = tokio::spawn({
            let ended = ended.clone();
            async move { ended.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        tx.set();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(ended.is_set());
        ended.wait().await; // already ended: at once

        let tx = EndedTx::new();
        let ended = tx.subscribe();
        let waiter = tokio::spawn(async move { ended.wait().await });
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the drop")
            .unwrap();
    }
}
