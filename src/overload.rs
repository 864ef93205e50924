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
    /// Until when a new call whose INVITE waited past the target is refused.
    stale_until: Option<Instant>,
    /// By queue: since when every sample was above the target (`None`: the last one was
    /// not), and when the last sample came.
    above_since: [Option<Instant>; 3],
    last_sample: [Option<Instant>; 3],
}

/// How long after the last sign of overload (a window over the target, or one queue
/// over it in every sample for [`STALE_AFTER`]) a new call whose INVITE itself
/// waited past the target is refused: ten windows (one second with the server's 100 ms).
/// Only then: a single stall of the server (a slow write of the log, a scheduling hiccup
/// of the host) gives one late sample, and must not cost the calls that arrived during
/// it.
const STALE_HOLD_WINDOWS: u32 = 10;
/// How long one queue must stay above the target, in every sample, to start the refusal
/// of stale INVITEs before a whole window has passed (three of the server's 10 ms
/// probes): in the first window of a flood the backlog grows by the flood's rate. A
/// time, not a count of samples (CoDel's `first_above_time`): the script queue is also
/// sampled once per call, and the calls that one stall of the server held up come in a
/// burst, three of them in a row within microseconds.
const STALE_AFTER: Duration = Duration::from_millis(20);

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
    /// A sign of overload was seen within the last [`STALE_HOLD_WINDOWS`]: new calls
    /// whose INVITE waited past the target are refused (see [`Overload::admit_queued`]).
    shedding_stale: std::sync::atomic::AtomicBool,
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
                stale_until: None,
                above_since: [None; 3],
                last_sample: [None; 3],
            }),
            refused: std::sync::atomic::AtomicU64::new(0),
            memory_full: std::sync::atomic::AtomicBool::new(false),
            refusing: std::sync::atomic::AtomicBool::new(false),
            shedding_stale: std::sync::atomic::AtomicBool::new(false),
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
                st.stale_until = Some(st.window.start + self.window * (STALE_HOLD_WINDOWS + 1));
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
        let q = queue as usize;
        // A gap in the samples longer than STALE_AFTER says nothing of the time between.
        let gap = st.last_sample[q].is_none_or(|t| now.duration_since(t) > STALE_AFTER);
        st.last_sample[q] = Some(now);
        if delay <= self.target {
            st.above_since[q] = None;
        } else {
            let since = match st.above_since[q] {
                Some(t) if !gap => t,
                _ => now,
            };
            st.above_since[q] = Some(since);
            if now.duration_since(since) >= STALE_AFTER {
                st.stale_until = Some(now + self.window * STALE_HOLD_WINDOWS);
            }
        }
        self.shedding_stale.store(
            st.stale_until.is_some_and(|t| now < t),
            std::sync::atomic::Ordering::Relaxed,
        );
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

    /// A datagram that stood `queued` in the socket's queue before it was read waited
    /// longer than the target during an overload (a sign of it within the last ten
    /// windows): a new call it starts is refused (see
    /// [`Overload::admit_queued`]).
    pub fn is_stale(&self, queued: Duration) -> bool {
        queued > self.target
            && self
                .shedding_stale
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Overload::admit`] for a new call whose INVITE stood `queued` in the socket's
    /// queue: during an overload, refused at once when that is longer than the target,
    /// whatever the refused fraction. In the spirit of CoDel's drops at the head of a
    /// standing queue: the fraction moves a step per window, so a sudden flood builds a
    /// backlog for a few windows before the fraction catches up. Calls admitted from such
    /// a backlog would wait for it on every message (their INVITE, its responses, the
    /// ACK) past the peers' and our own T1 (RFC 3261 17.1.1.2), and the retransmissions
    /// of both legs would cost more than the calls. Refused instead, the backlog drains
    /// at the cost of a look and a 503 each.
    pub fn admit_queued(&self, now: Instant, key: &str, queued: Option<Duration>) -> bool {
        if queued.is_some_and(|q| self.is_stale(q)) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        self.admit(now, key)
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
    async fn a_call_whose_invite_waited_past_the_target_is_refused_during_an_overload() {
        let o = Overload::new(50 * MS, 100 * MS, Instant::now());
        // No overload seen: a stall of the server costs no call.
        assert!(!o.is_stale(500 * MS));
        assert!(o.admit_queued(Instant::now(), "a@h", Some(500 * MS)));
        // One window over the target, then one under it: the fraction is back at 0, but
        // for STALE_HOLD_WINDOWS a new call whose INVITE waited past the target is refused.
        o.observe(Queue::Socket, 80 * MS, Instant::now());
        tokio::time::advance(100 * MS).await;
        o.observe(Queue::Socket, MS, Instant::now());
        tokio::time::advance(100 * MS).await;
        o.observe(Queue::Socket, MS, Instant::now());
        assert_eq!(o.refused_fraction(), 0.0);
        assert!(o.admit_queued(Instant::now(), "a@h", None));
        assert!(o.admit_queued(Instant::now(), "a@h", Some(50 * MS)));
        assert!(!o.is_stale(50 * MS));
        assert!(o.is_stale(51 * MS));
        assert!(!o.admit_queued(Instant::now(), "a@h", Some(51 * MS)));
        assert_eq!(o.refused_total(), 1);
        // Ten windows under the target: over.
        for _ in 0..STALE_HOLD_WINDOWS {
            tokio::time::advance(100 * MS).await;
            o.observe(Queue::Socket, MS, Instant::now());
        }
        assert!(!o.is_stale(500 * MS));
        assert!(o.admit_queued(Instant::now(), "a@h", Some(500 * MS)));
    }

    #[tokio::test(start_paused = true)]
    async fn samples_over_the_target_in_a_row_start_it_before_the_window_ends() {
        let o = Overload::new(50 * MS, 100 * MS, Instant::now());
        // A single late sample (a stall of the server) is no overload.
        o.observe(Queue::Socket, 500 * MS, Instant::now());
        tokio::time::advance(10 * MS).await;
        o.observe(Queue::Socket, MS, Instant::now());
        assert!(!o.is_stale(500 * MS));
        // A burst of late samples at one instant (the calls one stall held up) is none
        // either.
        for _ in 0..10 {
            o.observe(Queue::Script, 500 * MS, Instant::now());
        }
        o.observe(Queue::Script, MS, Instant::now());
        assert!(!o.is_stale(500 * MS));
        // Nor are late samples with gaps longer than STALE_AFTER between them.
        for _ in 0..2 {
            tokio::time::advance(STALE_AFTER + MS).await;
            o.observe(Queue::Sip, 80 * MS, Instant::now());
        }
        o.observe(Queue::Sip, MS, Instant::now());
        assert!(!o.is_stale(500 * MS));
        // Over the target in every sample for STALE_AFTER, 30 ms into a window: stale
        // INVITEs are refused at once.
        o.observe(Queue::Socket, MS, Instant::now());
        for _ in 0..3 {
            tokio::time::advance(10 * MS).await;
            o.observe(Queue::Socket, 80 * MS, Instant::now());
        }
        assert!(!o.is_refusing(), "the fraction waits for the window");
        assert!(o.is_stale(51 * MS));
        // The hold runs out STALE_HOLD_WINDOWS windows after the last streak.
        tokio::time::advance(100 * MS * STALE_HOLD_WINDOWS - MS).await;
        o.observe(Queue::Socket, MS, Instant::now());
        assert!(o.is_stale(51 * MS));
        tokio::time::advance(MS).await;
        o.observe(Queue::Socket, MS, Instant::now());
        assert!(!o.is_stale(51 * MS));
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
