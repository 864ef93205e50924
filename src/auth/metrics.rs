//! Digest authentication's figure, from its own counters ([`super::DigestStats`]).
//!
//! Metrics: `strowger_auth_failures_total` (wrong credentials or throttled).

use super::DigestAuth;
use crate::metrics::{self, load, Telemetry};

impl DigestAuth {
    /// Registers the authentication family on `telemetry`, filled at each scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let failures = telemetry.counter(
            "strowger_auth_failures_total",
            "Digest authentication failures (wrong credentials or throttled)",
        )?;
        let digest = self.clone();
        telemetry.on_scrape(move || {
            let s = digest.stats();
            metrics::catch_up(&failures, load(&s.failures) + load(&s.throttled));
        });
        Ok(())
    }
}
