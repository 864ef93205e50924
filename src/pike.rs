//! Per-source flood limits (issue 15 item 2; Kamailio's `pike` module): a source address
//! that sends more than `limit` requests outside any dialog (INVITE, REGISTER, OPTIONS,
//! SUBSCRIBE, MESSAGE...) within one second is blocked for `block`: its new requests are
//! dropped unanswered (a scanner learns nothing and costs one parse), requests inside
//! dialogs still pass.
//!
//! Owns: the per-source counters, bounded to `max_sources` (when full, entries whose
//! window and block are over go first, then the oldest window). Must not touch: messages
//! or sockets (sans-IO; the transaction layer asks, tested on the paused clock).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const WINDOW: Duration = Duration::from_secs(1);

struct Entry {
    window_start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// The flood detector; cheap to share (`Arc`).
pub struct Pike {
    limit: u32,
    block: Duration,
    max_sources: usize,
    sources: Mutex<HashMap<IpAddr, Entry>>,
    dropped: AtomicU64,
    blocks: AtomicU64,
}

impl Pike {
    pub fn new(limit: u32, block: Duration, max_sources: usize) -> Pike {
        Pike {
            limit: limit.max(1),
            block,
            max_sources: max_sources.max(1),
            sources: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
        }
    }

    /// Whether a new request from `ip` may go on (false: drop it).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut sources = self.sources.lock();
        if !sources.contains_key(&ip) && sources.len() >= self.max_sources {
            self.make_room(&mut sources, now);
        }
        let e = sources.entry(ip).or_insert(Entry {
            window_start: now,
            count: 0,
            blocked_until: None,
        });
        if let Some(until) = e.blocked_until {
            if now < until {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            e.blocked_until = None;
            e.window_start = now;
            e.count = 0;
        }
        if now.duration_since(e.window_start) >= WINDOW {
            e.window_start = now;
            e.count = 0;
        }
        e.count += 1;
        if e.count > self.limit {
            e.blocked_until = Some(now + self.block);
            self.blocks.fetch_add(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %ip, limit = self.limit, block_s = self.block.as_secs(), "source blocked: too many requests outside dialogs");
            return false;
        }
        true
    }

    /// Full: forget sources that are quiet and not blocked; if none is, the unblocked one
    /// with the oldest window (a blocked source is dropped only when all are blocked).
    fn make_room(&self, sources: &mut HashMap<IpAddr, Entry>, now: Instant) {
        sources.retain(|_, e| {
            e.blocked_until.is_some_and(|u| now < u) || now.duration_since(e.window_start) < WINDOW
        });
        if sources.len() >= self.max_sources {
            if let Some(oldest) = sources
                .iter()
                .min_by_key(|(_, e)| (e.blocked_until.is_some_and(|u| now < u), e.window_start))
                .map(|(ip, _)| *ip)
            {
                sources.remove(&oldest);
            }
        }
    }

    /// Requests dropped so far (blocked sources).
    pub fn dropped_total(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Times a source was blocked.
    pub fn blocks_total(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.sources.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooding_source_is_blocked_then_forgiven_others_pass() {
        let p = Pike::new(5, Duration::from_secs(10), 100);
        let allowed = |n: u8, k: usize| (0..k).filter(|_| p.allow(ip(n), Instant::now())).count();
        assert_eq!(allowed(1, 8), 5, "five in a second, then blocked");
        assert_eq!(allowed(2, 5), 5, "another source is not affected");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(allowed(1, 3), 0, "still blocked after the window");
        assert_eq!(allowed(2, 5), 5, "a new second for the other one");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(allowed(1, 5), 5, "the block is over");
        assert_eq!(p.blocks_total(), 1);
        assert_eq!(p.dropped_total(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_keeps_blocked_sources() {
        let p = Pike::new(1, Duration::from_secs(60), 10);
        assert!(p.allow(ip(0), Instant::now()));
        assert!(!p.allow(ip(0), Instant::now()), "ip 0 blocked");
        tokio::time::advance(Duration::from_secs(2)).await;
        for n in 1..=200u8 {
            p.allow(ip(n), Instant::now());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(p.sources() <= 10, "{}", p.sources());
        assert!(
            !p.allow(ip(0), Instant::now()),
            "the blocked source is kept"
        );
    }
}
