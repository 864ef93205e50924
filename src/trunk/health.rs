//! OPTIONS pings of a trunk (`ping_interval_s`): whether the carrier answers.
//!
//! Owns: the ping task of one trunk and turning each ping's outcome into the trunk's
//! up/down mark. Must not touch: sockets (the transaction layer retransmits and times the
//! pings out after timer F, 64*T1), the calls (a down trunk refuses channels:
//! [`Trunk::seize`] fails with `Unavailable::Down`).
//!
//! The first ping goes out at start, then one per interval (a ping that is still waiting
//! for its answer when the next is due delays it: one in flight at a time). Any final
//! response is "up", even 404, 405 or 501 (RFC 3261 11: something at that address speaks
//! SIP and answered); a timeout, a transport error or a name that does not resolve is
//! "down". Each change is logged once (a warning down, info up again).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Trunk;
use crate::sip::{Method, Uri};
use crate::transaction::{ClientEvent, TransactionLayer};
use crate::transport::LocalAddrs;

/// Sends one OPTIONS to the trunk: Ok(status) when answered, else why not.
async fn ping(trunk: &Trunk, layer: &TransactionLayer, local: &LocalAddrs) -> Result<u16, String> {
    let target = crate::transport::resolve(trunk.next_hop(), local)
        .await
        .map_err(|e| e.to_string())?;
    let mut from = trunk.aor();
    if from.user.is_none() {
        from.user = Some("strowger".into());
    }
    let to: Uri = trunk.uri().clone();
    let mut req = trunk.new_request(Method::Options, from, to, local, &target);
    req.headers.push("Accept", "application/sdp");
    let mut tx = layer.send_request(req, target).map_err(|e| e.to_string())?;
    loop {
        match tx.next_event().await {
            Some(ClientEvent::Provisional(_)) => continue,
            Some(ClientEvent::Final(r)) => return Ok(r.status),
            Some(ClientEvent::Timeout) | None => return Err("no answer (timeout)".into()),
            Some(ClientEvent::TransportError(e)) => return Err(e),
        }
    }
}

/// Applies one ping's outcome to the trunk's mark; logs a change.
fn outcome(trunk: &Trunk, result: Result<u16, String>) {
    match result {
        Ok(status) => {
            if trunk.set_up(true) {
                tracing::info!(trunk = %trunk.name(), status, "trunk answers OPTIONS pings again; up");
            }
        }
        Err(why) => {
            if trunk.set_up(false) {
                tracing::warn!(trunk = %trunk.name(), why, "trunk stopped answering OPTIONS pings; down (calls to it are refused)");
            }
        }
    }
}

/// Pings `trunk` every `interval` until `stop` changes.
pub(super) async fn run(
    trunk: Arc<Trunk>,
    interval: Duration,
    layer: TransactionLayer,
    local: LocalAddrs,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let interval = interval.max(Duration::from_millis(10));
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => return,
        }
        next += interval;
        let result = tokio::select! {
            r = ping(&trunk, &layer, &local) => r,
            _ = stop.changed() => return,
        };
        outcome(&trunk, result);
        let now = Instant::now();
        if next < now {
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{TrunkConfig, Trunks};
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn any_answer_is_up_silence_is_down() {
        let trunks = Trunks::new(&BTreeMap::from([(
            "c".to_string(),
            TrunkConfig {
                uri: "sip:192.0.2.10".into(),
                ping_interval_s: 30,
                ..TrunkConfig::default()
            },
        )]));
        let t = trunks.get("c").unwrap();
        assert!(t.is_up());
        outcome(t, Err("no answer (timeout)".into()));
        assert!(!t.is_up());
        outcome(t, Err("again".into()));
        assert!(!t.is_up());
        outcome(t, Ok(405));
        assert!(t.is_up());
    }
}
