//! The RFC 3261 17 timers (A to K, table 4) and RFC 6026's L and M, derived from the
//! configured T1, T2 and T4.
//!
//! Owns: every timer duration, the retransmission back-off rule and how late a cleanup
//! timer may fire.
//! Must not touch: scheduling (the driver in `mod.rs` owns the clock) or state machines.

use super::TimerConfig;
use std::time::Duration;
use tokio::time::Instant;

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

impl Timer {
    /// Timers whose only job is to keep a finished transaction around to absorb
    /// retransmissions (RFC 3261 D, I, J, K; RFC 6026 L, M): their expiry sends nothing and
    /// tells nobody, it only ends the transaction.
    pub(crate) fn is_cleanup(self) -> bool {
        matches!(
            self,
            Timer::D | Timer::I | Timer::J | Timer::K | Timer::L | Timer::M
        )
    }
}

/// The grid that cleanup timers are rounded up to (see [`deadline`]).
pub(crate) const CLEANUP_GRID: Duration = Duration::from_millis(50);

/// When a timer started now for `d` fires. Cleanup timers ([`Timer::is_cleanup`]) fire up
/// to [`CLEANUP_GRID`] late (at most d/64: a 32 s Timer J ends within 32.05 s), on a grid
/// counted from `epoch` and shared by every transaction of the layer, so that at a steady
/// call rate the endings of many transactions take one wake-up of the thread instead of one
/// each (issue 14: they were ~1.6 of the ~4 voluntary context switches per call). The
/// others (retransmissions, B, F, H) fire on time.
pub(crate) fn deadline(t: Timer, d: Duration, now: Instant, epoch: Instant) -> Instant {
    let at = now + d;
    let grid = CLEANUP_GRID.min(d / 64);
    if !t.is_cleanup() || grid.is_zero() {
        return at;
    }
    let grid_ns = grid.as_nanos();
    match at.saturating_duration_since(epoch).as_nanos() % grid_ns {
        0 => at,
        // The remainder is below `grid_ns`, so the difference fits in u64 nanoseconds.
        rem => at + Duration::from_nanos(u64::try_from(grid_ns - rem).unwrap_or(0)),
    }
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

    #[test]
    fn cleanup_timers_share_a_grid_and_others_fire_on_time() {
        let epoch = Instant::now();
        let ms = Duration::from_millis;
        let now = epoch + ms(7);
        // J at 32.007 s moves to 32.050 s; so does an L started 30 ms later.
        assert_eq!(
            deadline(Timer::J, ms(32_000), now, epoch),
            epoch + ms(32_050)
        );
        assert_eq!(
            deadline(Timer::L, ms(32_000), now + ms(30), epoch),
            epoch + ms(32_050)
        );
        // On the grid already: unchanged.
        assert_eq!(
            deadline(Timer::K, ms(5_000), epoch, epoch),
            epoch + ms(5_000)
        );
        // Retransmission and timeout timers are exact.
        for t in [Timer::A, Timer::B, Timer::E, Timer::F, Timer::G, Timer::H] {
            assert_eq!(
                deadline(t, ms(32_000), now, epoch),
                now + ms(32_000),
                "{t:?}"
            );
        }
        // Short timers (a small T1 or T4) are late by at most 1/64 of their duration.
        assert_eq!(deadline(Timer::K, ms(640), now, epoch), epoch + ms(650));
        assert_eq!(deadline(Timer::I, Duration::ZERO, now, epoch), now);
    }
}
