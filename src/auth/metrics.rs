//! Digest authentication's figure, from its own counters ([`super::DigestStats`]).
//!
//! Metrics: `strowger_auth_failures_total` (wrong credentials or throttled),
//! `strowger_auth_table_full_total` (a table bound reached).

use super::DigestAuth;
use crate::metrics::{self, load, Telemetry};

impl DigestAuth {
    /// Registers the authentication family on `telemetry`, filled at each scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let failures = telemetry.counter(
            "strowger_auth_failures_total",
            "Digest authentication failures (wrong credentials or throttled)",
        )?;
        let full = telemetry.counter(
            "strowger_auth_table_full_total",
            "Nonce uses or failures not tracked because auth.max_tracked_nonces or auth.max_failure_sources was reached",
        )?;
        let digest = self.clone();
        telemetry.on_scrape(move || {
            let s = digest.stats();
            metrics::catch_up(&failures, load(&s.failures) + load(&s.throttled));
            metrics::catch_up(&full, digest.table_full_events());
        });
        Ok(())
    }
}
