//! The RFC 3261 17 timers (A to K, table 4) and RFC 6026's L and M, derived from the
//! configured T1, T2 and T4.
//!
//! Owns: every timer duration and the retransmission back-off rule.
//! Must not touch: scheduling (the driver in `mod.rs` owns the clock) or state machines.

use super::TimerConfig;
use std::time::Duration;

/// Every timer a transaction can run (RFC 3261 table 4, RFC 6026 section 8.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Timer {
    /// INVITE request retransmission (UDP only).
    A,
    /// INVITE transaction timeout.
    B,
    /// Wait time for response retransmissions (INVITE client, Completed).
    D,
    /// Non-INVITE request retransmission (UDP only).
    E,
    /// Non-INVITE transaction timeout.
    F,
    /// INVITE final response retransmission (UDP only).
    G,
    /// Wait time for ACK receipt.
    H,
    /// Wait time for ACK retransmissions.
    I,
    /// Wait time for non-INVITE request retransmissions.
    J,
    /// Wait time for response retransmissions (non-INVITE client, Completed).
    K,
    /// RFC 6026: wait time for INVITE retransmissions in Accepted (server).
    L,
    /// RFC 6026: wait time for 2xx retransmissions in Accepted (client).
    M,
}

impl TimerConfig {
    /// Timer A and E initial interval, Timer G initial interval: T1.
    pub(crate) fn first_retransmit(&self) -> Duration {
        self.t1
    }

    /// Timer D (RFC 3261 17.1.1.2): at least 32 s on unreliable transports, 0 on reliable.
    /// 64*T1 is used when it is longer, so that a large configured T1 still covers the
    /// peer's Timer G/H retransmission window.
    pub(crate) fn timer_d(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            Duration::from_secs(32).max(self.timeout_64t1())
        }
    }

    /// Timer I (RFC 3261 17.2.1): T4 on unreliable transports, 0 on reliable.
    pub(crate) fn timer_i(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }

    /// Timer J (RFC 3261 17.2.2): 64*T1 on unreliable transports, 0 on reliable.
    pub(crate) fn timer_j(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.timeout_64t1()
        }
    }

    /// Timer K (RFC 3261 17.1.2.2): T4 on unreliable transports, 0 on reliable.
    pub(crate) fn timer_k(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }

    /// Timer L and M (RFC 6026 8.11): 64*T1.
    pub(crate) fn timer_lm(&self) -> Duration {
        self.timeout_64t1()
    }

    /// The next Timer E or G interval: doubled, capped at T2 (RFC 3261 17.1.2.2, 17.2.1).
    pub(crate) fn backoff_capped(&self, previous: Duration) -> Duration {
        (previous * 2).min(self.t2)
    }
}

/// The next Timer A interval: doubled without a cap (RFC 3261 17.1.1.2).
pub(crate) fn backoff(previous: Duration) -> Duration {
    previous * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_from_defaults() {
        let c = TimerConfig::default();
        assert_eq!(c.timeout_64t1(), Duration::from_secs(32));
        assert_eq!(c.timer_d(false), Duration::from_secs(32));
        assert_eq!(c.timer_d(true), Duration::ZERO);
        assert_eq!(c.timer_i(false), Duration::from_secs(5));
        assert_eq!(c.timer_j(false), Duration::from_secs(32));
        assert_eq!(c.timer_k(true), Duration::ZERO);
        assert_eq!(c.timer_lm(), Duration::from_secs(32));
        assert_eq!(
            c.backoff_capped(Duration::from_secs(2)),
            Duration::from_secs(4)
        );
        assert_eq!(
            c.backoff_capped(Duration::from_secs(4)),
            Duration::from_secs(4)
        );
        assert_eq!(backoff(Duration::from_secs(4)), Duration::from_secs(8));
    }
}
