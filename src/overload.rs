//! Overload detection (issue 15, RFC 7339's motivation; the way Kamailio and OpenSIPS
//! answer 503 with Retry-After instead of falling over): from *measured* queue delays, a
//! fraction of new calls to refuse at the door, before they cost a script run, a B leg
//! and a place in every queue.
//!
//! Owns: the delay windows and the refusal fraction. Must not touch: messages or sockets
//! (callers feed it delays and ask it whether to admit; sans-IO, tested on the paused
//! clock).
//!
//! The controller, in the spirit of CoDel: what matters is the *smallest* delay seen in
//! a window (a standing queue, not a burst). Each window (`window`) whose smallest delay
//! is above `target` raises the fraction of new calls refused by `STEP`; each window
//! below it lowers it by `STEP`. A window with no sample at all keeps the fraction (when
//! everything is refused, nothing reaches the queue that would say it drained). The
//! samples come from where a new call waits: the UDP socket's kernel queue (receive
//! timestamps), the SIP thread's own lateness (`server.rs` probes both) and the script
//! VMs' job queues.

use parking_lot::Mutex;
use std::hash::BuildHasher;
use std::time::Duration;
use tokio::time::Instant;

/// How much the refused fraction moves per window.
const STEP: f64 = 0.1;
/// Never refuse everything: a few calls keep sampling the queues (and get through when
/// the overload is over).
const MAX_REFUSED: f64 = 0.95;

/// Where a delay was measured. Each queue keeps its own smallest delay per window: an
/// idle SIP thread says nothing about a script queue that stands (with
/// `script.vm_threads = true` Lua runs on threads of its own), so one overloaded queue is
/// enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// The SIP thread's lateness.
    Sip,
    /// The wait of a new call for its script.
    Script,
    /// The wait of datagrams in the UDP socket's kernel queue before they are read.
    Socket,
}

struct Window {
    start: Instant,
    min: [Option<Duration>; 3],
}

struct State {
    window: Window,
    /// The smallest delays of the last full window, by queue (for the metrics).
    last: [Option<Duration>; 3],
    refused: f64,
}

/// Share of a Lua VM's memory limit above which every new call is refused (the running
/// calls keep their room: past the limit a hook fails with 500, which the operator's
/// alerts would blame on the script).
const MEMORY_HIGH: f64 = 0.75;
/// Share below which new calls are taken again (a gap, so that the gate does not flap
/// with every garbage collection).
const MEMORY_LOW: f64 = 0.6;

/// The overload detector of the server; cheap to share (`Arc`).
pub struct Overload {
    target: Duration,
    window: Duration,
    state: Mutex<State>,
    refused: std::sync::atomic::AtomicU64,
    /// The script VMs are near their memory limit: refuse every new call.
    memory_full: std::sync::atomic::AtomicBool,
    /// Some share of new calls is refused now (`State::refused > 0`), readable without
    /// the lock: a look at a datagram asks it before anything else.
    refusing: std::sync::atomic::AtomicBool,
    /// Salted (per process) hashing of the keys the admission draws are made from.
    draws: std::hash::RandomState,
}

impl Overload {
    /// `target`: the queue delay above which new calls are refused (a fraction of them);
    /// `window`: how often the fraction moves.
    pub fn new(target: Duration, window: Duration, now: Instant) -> Overload {
        Overload {
            target,
            window: window.max(Duration::from_millis(1)),
            state: Mutex::new(State {
                window: Window {
                    start: now,
                    min: [None; 3],
                },
                last: [None; 3],
                refused: 0.0,
            }),
            refused: std::sync::atomic::AtomicU64::new(0),
            memory_full: std::sync::atomic::AtomicBool::new(false),
            refusing: std::sync::atomic::AtomicBool::new(false),
            draws: std::hash::RandomState::new(),
        }
    }

    /// The fullest script VM holds `share` of its memory limit (0 to 1; 0 without a
    /// limit). From `MEMORY_HIGH` until it is back under `MEMORY_LOW`, every new call
    /// is refused: calls waiting in their hook (on a dial) hold Lua memory, and a flood of
    /// them would otherwise fill the VM and fail every call on it.
    pub fn note_script_memory(&self, share: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        if share >= MEMORY_HIGH {
            self.memory_full.store(true, Relaxed);
        } else if share < MEMORY_LOW {
            self.memory_full.store(false, Relaxed);
        }
    }

    fn roll(&self, st: &mut State, now: Instant) {
        while now.duration_since(st.window.start) >= self.window {
            let mins = std::mem::take(&mut st.window.min);
            st.last = mins;
            if mins.iter().flatten().any(|m| *m > self.target) {
                st.refused = (st.refused + STEP).min(MAX_REFUSED);
            } else if mins.iter().any(Option::is_some) {
                st.refused = (st.refused - STEP).max(0.0);
            }
            self.refusing
                .store(st.refused > 0.0, std::sync::atomic::Ordering::Relaxed);
            st.window.start += self.window;
            // Long idle: jump to the current window instead of replaying empty ones.
            if now.duration_since(st.window.start) >= self.window * 4 {
                st.window.start = now;
            }
        }
    }

    /// A request waited `delay` in `queue`.
    pub fn observe(&self, queue: Queue, delay: Duration, now: Instant) {
        let mut st = self.state.lock();
        self.roll(&mut st, now);
        let min = &mut st.window.min[queue as usize];
        *min = Some(min.map_or(delay, |m| m.min(delay)));
    }

    /// Whether new calls may be refused now (a share of them, or all while the script VMs
    /// are near their memory limit); cheap, no lock. When false, [`Overload::admit`] takes
    /// every call until the next window.
    pub fn is_refusing(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.memory_full.load(Relaxed) || self.refusing.load(Relaxed)
    }

    /// Whether to take the new call `key` names now (false: refuse it with 503 and
    /// Retry-After). The draw is a salted hash of `key` (the Call-ID), not a fresh random
    /// number: asked twice about the same call (a look at the datagram, then the parsed
    /// request; or a retransmission) it answers the same while the fraction holds.
    pub fn admit(&self, now: Instant, key: &str) -> bool {
        if self.memory_full.load(std::sync::atomic::Ordering::Relaxed) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        let mut st = self.state.lock();
        self.roll(&mut st, now);
        if st.refused <= 0.0 {
            return true;
        }
        let draw = (self.draws.hash_one(key) >> 11) as f64 / (1u64 << 53) as f64;
        let admit = draw >= st.refused;
        drop(st);
        if !admit {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admit
    }

    /// The smallest delay each queue showed in the last window (`None`: no sample), in
    /// [`Queue`] order: why calls are being refused, for the metrics.
    pub fn last_delays(&self) -> [(Queue, Option<Duration>); 3] {
        let st = self.state.lock();
        [Queue::Sip, Queue::Script, Queue::Socket].map(|q| (q, st.last[q as usize]))
    }

    /// New calls refused so far.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fraction of new calls refused now (0 to 0.95; 1 while the script VMs are near
    /// their memory limit), for the metrics.
    pub fn refused_fraction(&self) -> f64 {
        if self.memory_full.load(std::sync::atomic::Ordering::Relaxed) {
            return 1.0;
        }
        self.state.lock().refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Offers `n` new calls, each with a Call-ID of its own.
    fn admitted(o: &Overload, n: usize) -> usize {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        (0..n)
            .filter(|_| {
                let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                o.admit(Instant::now(), &format!("call-{i}@example.com"))
            })
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_refuses_more_and_more_then_recovers() {
        let o = Overload::new(50 * MS, 100 * MS, Instant::now());
        assert_eq!(admitted(&o, 100), 100, "no samples: everything is taken");
        // Bursts are fine: the smallest delay of the window is what counts.
        for _ in 0..5 {
            o.observe(Queue::Script, 400 * MS, Instant::now());
            o.observe(Queue::Script, 5 * MS, Instant::now());
            tokio::time::advance(100 * MS).await;
        }
        assert_eq!(o.refused_fraction(), 0.0);
        // A standing queue: every sample above the target, for five windows.
        for _ in 0..5 {
            o.observe(Queue::Script, 80 * MS, Instant::now());
            o.observe(Queue::Sip, MS, Instant::now());
            tokio::time::advance(100 * MS).await;
        }
        o.observe(Queue::Script, 80 * MS, Instant::now());
        o.observe(Queue::Sip, MS, Instant::now());
        assert!((o.refused_fraction() - 0.5).abs() < 1e-9);
        let taken = admitted(&o, 1000);
        assert!((400..600).contains(&taken), "about half taken: {taken}");
        // Windows without samples keep the fraction; it never reaches everything.
        tokio::time::advance(300 * MS).await;
        assert!((o.refused_fraction() - 0.5).abs() < 1e-9);
        for _ in 0..20 {
            o.observe(Queue::Script, 80 * MS, Instant::now());
            o.observe(Queue::Sip, MS, Instant::now());
            tokio::time::advance(100 * MS).await;
        }
        o.observe(Queue::Script, 80 * MS, Instant::now());
        o.observe(Queue::Sip, MS, Instant::now());
        assert!((o.refused_fraction() - MAX_REFUSED).abs() < 1e-9);
        assert!(admitted(&o, 1000) > 0, "a few calls keep getting through");
        // The queue drains: ten windows below the target take everything again.
        for _ in 0..11 {
            o.observe(Queue::Script, 2 * MS, Instant::now());
            tokio::time::advance(100 * MS).await;
        }
        o.observe(Queue::Script, 2 * MS, Instant::now());
        assert_eq!(o.refused_fraction(), 0.0);
        assert_eq!(admitted(&o, 100), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_call_gets_the_same_answer_while_the_fraction_holds() {
        let o = Overload::new(50 * MS, 100 * MS, Instant::now());
        assert!(!o.is_refusing());
        for _ in 0..6 {
            o.observe(Queue::Sip, 80 * MS, Instant::now());
            tokio::time::advance(100 * MS).await;
        }
        o.observe(Queue::Sip, 80 * MS, Instant::now());
        assert!(o.is_refusing());
        let keys: Vec<String> = (0..200).map(|i| format!("c{i}@h")).collect();
        let first: Vec<bool> = keys.iter().map(|k| o.admit(Instant::now(), k)).collect();
        let again: Vec<bool> = keys.iter().map(|k| o.admit(Instant::now(), k)).collect();
        assert_eq!(first, again);
        let taken = first.iter().filter(|a| **a).count();
        assert!((40..160).contains(&taken), "{taken}");
    }

    #[tokio::test(start_paused = true)]
    async fn script_memory_near_the_limit_refuses_every_new_call_until_it_falls() {
        let o = Overload::new(50 * MS, 100 * MS, Instant::now());
        o.note_script_memory(0.5);
        assert_eq!(admitted(&o, 100), 100);
        o.note_script_memory(0.8);
        assert_eq!(admitted(&o, 100), 0);
        assert_eq!(o.refused_total(), 100);
        assert_eq!(o.refused_fraction(), 1.0);
        // Between the marks: still refusing (no flapping with each collection).
        o.note_script_memory(0.7);
        assert_eq!(admitted(&o, 10), 0);
        o.note_script_memory(0.5);
        assert_eq!(admitted(&o, 100), 100);
        assert_eq!(o.refused_fraction(), 0.0);
    }
}
