//! The presence core's figures, from its own counters ([`super::PresenceStats`]).
//!
//! Metrics: `strowger_presence_subscriptions{package}` (gauge),
//! `strowger_presence_notifies_total{result="sent"|"failed"}`,
//! `strowger_presence_publish_total{result="created"|"refreshed"|"modified"|"removed"|
//! "unknown_etag"|"rejected"}`, `strowger_messages_total{result="routed"|"failed"}`.

use super::{Package, Presence};
use crate::metrics::{self, load, Label, Telemetry};

impl Label for Package {
    const NAME: &'static str = "package";
    const ALL: &'static [Self] = &Package::ALL;
    fn as_str(self) -> &'static str {
        Package::as_str(self)
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// What became of a PUBLISH (RFC 3903).
#[derive(Clone, Copy, Debug)]
pub enum PublishResult {
    Created,
    Refreshed,
    Modified,
    Removed,
    /// 412: the SIP-If-Match entity tag is not known.
    UnknownEtag,
    /// Any other error.
    Rejected,
}
crate::label!(
    PublishResult,
    "result",
    Created = "created",
    Refreshed = "refreshed",
    Modified = "modified",
    Removed = "removed",
    UnknownEtag = "unknown_etag",
    Rejected = "rejected",
);

/// NOTIFYs by result.
#[derive(Clone, Copy, Debug)]
enum NotifyResult {
    Sent,
    Failed,
}
crate::label!(NotifyResult, "result", Sent = "sent", Failed = "failed");

/// MESSAGEs by result.
#[derive(Clone, Copy, Debug)]
enum MessageResult {
    Routed,
    Failed,
}
crate::label!(
    MessageResult,
    "result",
    Routed = "routed",
    Failed = "failed"
);

impl Presence {
    /// Registers the presence families on `telemetry`, filled at each scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let subscriptions = telemetry.gauge_vec(
            "strowger_presence_subscriptions",
            "Active subscriptions by event package",
            &[<Package as Label>::NAME],
        )?;
        let subscriptions: Vec<_> = <Package as Label>::ALL
            .iter()
            .map(|p| subscriptions.with_label_values(&[Label::as_str(*p)]))
            .collect();
        let notifies = telemetry.counters::<NotifyResult>(
            "strowger_presence_notifies_total",
            "NOTIFYs sent, and those answered with an error or not at all",
        )?;
        let publish = telemetry.counters::<PublishResult>(
            "strowger_presence_publish_total",
            "PUBLISH requests by outcome",
        )?;
        let messages = telemetry.counters::<MessageResult>(
            "strowger_messages_total",
            "MESSAGE requests delivered (a 2xx came back) or failed",
        )?;
        let presence = self.clone();
        telemetry.on_scrape(move || {
            let s = presence.stats();
            for (gauge, n) in subscriptions.iter().zip(&s.subscriptions) {
                gauge.set(load(n) as i64);
            }
            notifies.catch_up(NotifyResult::Sent, load(&s.notifies_sent));
            notifies.catch_up(NotifyResult::Failed, load(&s.notifies_failed));
            for r in PublishResult::ALL {
                publish.catch_up(*r, load(&s.publish[r.index()]));
            }
            messages.catch_up(MessageResult::Routed, load(&s.messages_routed));
            messages.catch_up(MessageResult::Failed, load(&s.messages_failed));
        });
        Ok(())
    }
}
