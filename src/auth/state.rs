//! The little state digest authentication keeps: the highest nonce count accepted per
//! nonce (replay protection, RFC 7616 3.3 / 5.12) and failed attempts per source address
//! (brute-force throttle). Both are sharded maps: verification runs on every core at
//! thousands of requests a second, and one global lock would serialize it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where time comes from. Nonces carry a timestamp of this clock, so the default is wall
/// time (milliseconds since the Unix epoch): with a shared secret, nonces stay valid
/// across a restart or another node. Tests inject a `ManualClock`.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// Wall-clock milliseconds since the Unix epoch.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock(start_ms.into())
    }
    pub fn advance(&self, d: std::time::Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

const SHARDS: usize = 64;

/// Passes a u64 key through as its hash. The nonce-count keys are 64 random bits that we
/// generated and that an HMAC authenticates, so an attacker cannot choose them (no hash
/// flooding) and SipHash would only cost time.
#[derive(Default)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What the nonce-count table says about a use of a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NcCheck {
    /// Higher than any count accepted before: recorded.
    Fresh,
    /// Not higher than an accepted count: a replay (or a confused client).
    Replay,
    /// The table is full and the nonce could not be tracked: refuse it, since accepting an
    /// untracked nonce would let it be replayed.
    Full,
}

struct NcShard {
    /// nonce key -> (highest accepted nc, expiry in seconds of the clock).
    map: HashMap<u64, (u32, u32), BuildHasherDefault<IdentityHasher>>,
    next_sweep_s: u32,
}

/// Highest accepted nonce count per nonce. Entries are made only once a request with the
/// nonce has been verified, so only valid credentials can fill the table.
pub(crate) struct NcTable {
    shards: Box<[Mutex<NcShard>]>,
    cap_per_shard: usize,
}

impl NcTable {
    pub(crate) fn new(capacity: usize) -> NcTable {
        NcTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(NcShard {
                        map: HashMap::default(),
                        next_sweep_s: 0,
                    })
                })
                .collect(),
            cap_per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// Records `nc` for nonce `key` unless it is not above the last accepted count.
    /// `expires_s` is when the nonce stops being accepted; `sweep_every_s` how often a
    /// shard drops expired entries.
    pub(crate) fn check(
        &self,
        key: u64,
        nc: u32,
        expires_s: u32,
        now_s: u32,
        sweep_every_s: u32,
    ) -> NcCheck {
        // Middle bits pick the shard: the map uses the low bits for the bucket and the top
        // seven as tag, and those must stay random within a shard.
        let mut shard = self.shards[((key >> 32) as usize) % SHARDS].lock();
        if now_s >= shard.next_sweep_s {
            shard.map.retain(|_, &mut (_, exp)| exp > now_s);
            shard.next_sweep_s = now_s.saturating_add(sweep_every_s.max(1));
        }
        let full = shard.map.len() >= self.cap_per_shard;
        match shard.map.get_mut(&key) {
            Some((last, _)) if nc <= *last => NcCheck::Replay,
            Some((last, _)) => {
                *last = nc;
                NcCheck::Fresh
            }
            None if full => NcCheck::Full,
            None => {
                shard.map.insert(key, (nc, expires_s));
                NcCheck::Fresh
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }
}

#[derive(Clone, Copy)]
struct FailEntry {
    count: u32,
    window_start_ms: u64,
    blocked_until_ms: u64,
}

struct FailShard {
    map: HashMap<IpAddr, FailEntry>,
    next_sweep_ms: u64,
}

/// Failed attempts per source address. Keys are chosen by the peer (any IPv6 address), so
/// the maps keep the default keyed hasher, and each shard has a cap: past it new sources
/// go untracked (an attacker with that many addresses escapes a per-address limit anyway).
pub(crate) struct FailureTable {
    shards: Box<[Mutex<FailShard>]>,
    pick: std::collections::hash_map::RandomState,
    /// Entries over all shards: when zero (the usual case) the hot path takes no lock.
    tracked: AtomicUsize,
    cap_per_shard: usize,
    /// Failures not counted because the source's shard was full.
    pub(crate) untracked: std::sync::atomic::AtomicU64,
}

impl FailureTable {
    pub(crate) fn new(capacity: usize) -> FailureTable {
        FailureTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(FailShard {
                        map: HashMap::new(),
                        next_sweep_ms: 0,
                    })
                })
                .collect(),
            pick: Default::default(),
            tracked: AtomicUsize::new(0),
            cap_per_shard: capacity.div_ceil(SHARDS).max(1),
            untracked: Default::default(),
        }
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<FailShard> {
        &self.shards[(self.pick.hash_one(ip) as usize) % SHARDS]
    }

    /// Is `ip` blocked at `now_ms`?
    pub(crate) fn is_blocked(&self, ip: IpAddr, now_ms: u64) -> bool {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.shard(ip)
            .lock()
            .map
            .get(&ip)
            .is_some_and(|e| e.blocked_until_ms > now_ms)
    }

    /// Counts a failure from `ip`; returns true when it reaches `max` within `window_ms`,
    /// which blocks the source for `window_ms` from now.
    pub(crate) fn record(&self, ip: IpAddr, now_ms: u64, max: u32, window_ms: u64) -> bool {
        let mut shard = self.shard(ip).lock();
        if now_ms >= shard.next_sweep_ms {
            let before = shard.map.len();
            shard.map.retain(|_, e| {
                e.blocked_until_ms > now_ms || e.window_start_ms + window_ms > now_ms
            });
            let removed = before - shard.map.len();
            self.tracked.fetch_sub(removed, Ordering::Relaxed);
            shard.next_sweep_ms = now_ms + window_ms.max(1000);
        }
        let full = shard.map.len() >= self.cap_per_shard;
        let e = match shard.map.get_mut(&ip) {
            Some(e) => e,
            None if full => {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            None => {
                self.tracked.fetch_add(1, Ordering::Relaxed);
                shard.map.entry(ip).or_insert(FailEntry {
                    count: 0,
                    window_start_ms: now_ms,
                    blocked_until_ms: 0,
                })
            }
        };
        // A fixed window from the first failure: simple, and enough to bound guesses to
        // `max` per window per address.
        if now_ms >= e.window_start_ms + window_ms {
            e.count = 0;
            e.window_start_ms = now_ms;
        }
        e.count += 1;
        if e.count >= max {
            e.blocked_until_ms = now_ms + window_ms;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nc_table_refuses_replays_and_expires_entries() {
        let t = NcTable::new(1000);
        assert_eq!(t.check(7, 1, 100, 10, 30), NcCheck::Fresh);
        assert_eq!(t.check(7, 1, 100, 10, 30), NcCheck::Replay);
        assert_eq!(t.check(7, 2, 100, 10, 30), NcCheck::Fresh);
        assert_eq!(t.check(7, 1, 100, 10, 30), NcCheck::Replay);
        // Past the sweep time and the expiry, the entry is gone.
        assert_eq!(t.check(8 << 32, 1, 300, 200, 30), NcCheck::Fresh);
        assert_eq!(t.len(), 2, "sweeps are per shard");
        assert_eq!(t.check(7, 1, 300, 200, 30), NcCheck::Fresh);
    }

    #[test]
    fn nc_table_full_refuses_new_nonces() {
        let t = NcTable::new(SHARDS); // one per shard
        assert_eq!(t.check(1, 1, 100, 0, 30), NcCheck::Fresh);
        assert_eq!(t.check(2, 1, 100, 0, 30), NcCheck::Full);
        assert_eq!(t.check(1, 2, 100, 0, 30), NcCheck::Fresh);
    }

    #[test]
    fn failure_table_blocks_then_forgets() {
        let t = FailureTable::new(1000);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!t.is_blocked(a, 0));
        assert!(!t.record(a, 0, 3, 1000));
        assert!(!t.record(a, 10, 3, 1000));
        assert!(t.record(a, 20, 3, 1000));
        assert!(t.is_blocked(a, 500));
        assert!(!t.is_blocked(b, 500));
        assert!(!t.is_blocked(a, 1020));
        // A new window starts from scratch.
        assert!(!t.record(a, 3000, 3, 1000));
    }

    /// Issue 15: a flood from many addresses cannot grow the table past its bound, the
    /// sources already tracked stay (a blocked one cannot be flushed out), and what went
    /// uncounted is counted for the metric.
    #[test]
    fn failure_table_is_bounded_and_keeps_the_sources_it_has() {
        let t = FailureTable::new(SHARDS); // one source per shard
        let first: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            t.record(first, 0, 3, 60_000);
        }
        assert!(t.is_blocked(first, 10));
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            t.record(ip, 10, 3, 60_000);
        }
        assert!(t.tracked.load(Ordering::Relaxed) <= SHARDS);
        assert!(t.untracked.load(Ordering::Relaxed) >= 10_000 - SHARDS as u64);
        assert!(t.is_blocked(first, 20));
    }
}
