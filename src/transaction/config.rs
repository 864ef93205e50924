//! `[sip.timers]`: the RFC 3261 timers T1, T2 and T4, in milliseconds.
//!
//! Owns: their defaults (RFC 3261 17.1.1.1 and table 4) and bounds; [`TimerConfig`] is
//! built from them, so the layer and the file share one set of defaults.

use super::TimerConfig;
use crate::config_section::{check_range, InvalidValue, MAX_TIMER_MS};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[sip.timers]`, milliseconds.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TimersConfig {
    pub t1_ms: u64,
    pub t2_ms: u64,
    pub t4_ms: u64,
}

impl Default for TimersConfig {
    fn default() -> Self {
        // RFC 3261 17.1.1.1 / table 4 values.
        TimersConfig {
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
        }
    }
}

impl TimersConfig {
    /// Each timer at least 1 ms and at most an hour (T1 is multiplied by 64 for timers B,
    /// F, H and J), and T2 not below T1 (17.1.2.2: T2 caps the doubling of T1).
    pub fn check(&self) -> Result<(), InvalidValue> {
        check_range("t1_ms", self.t1_ms, 1, MAX_TIMER_MS)?;
        if self.t2_ms < self.t1_ms {
            return Err(InvalidValue::new(
                "t2_ms",
                format!(
                    "must be at least t1_ms ({}) (got {})",
                    self.t1_ms, self.t2_ms
                ),
            ));
        }
        check_range("t2_ms", self.t2_ms, 1, MAX_TIMER_MS)?;
        check_range("t4_ms", self.t4_ms, 1, MAX_TIMER_MS)
    }

    /// The timers as the transaction layer takes them.
    pub fn to_timers(&self) -> TimerConfig {
        TimerConfig {
            t1: Duration::from_millis(self.t1_ms),
            t2: Duration::from_millis(self.t2_ms),
            t4: Duration::from_millis(self.t4_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_rfc_values() {
        let t = TimersConfig::default().to_timers();
        assert_eq!(t, TimerConfig::default());
        assert_eq!(
            (t.t1, t.t2, t.t4),
            (
                Duration::from_millis(500),
                Duration::from_millis(4000),
                Duration::from_millis(5000)
            )
        );
        assert!(TimersConfig::default().check().is_ok());
    }

    #[test]
    fn bad_timers_name_the_key() {
        let bad = |t1_ms, t2_ms, t4_ms| {
            TimersConfig {
                t1_ms,
                t2_ms,
                t4_ms,
            }
            .check()
            .unwrap_err()
            .to_string()
        };
        assert_eq!(bad(0, 4000, 5000), "t1_ms: must be at least 1 (got 0)");
        assert_eq!(
            bad(1000, 999, 5000),
            "t2_ms: must be at least t1_ms (1000) (got 999)"
        );
        assert_eq!(bad(500, 4000, 0), "t4_ms: must be at least 1 (got 0)");
        assert_eq!(
            bad(500, 4000, 3_600_001),
            "t4_ms: must be at most 3600000 (got 3600001)"
        );
    }
}
