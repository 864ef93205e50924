//! The driver of the pure state machines: one mutex per transaction around its machine and
//! timers, and one timer queue for the whole layer.
//!
//! Owns: each transaction's running timers and the queue of deadlines; the one task that
//! sleeps until the earliest deadline and fires what is due. Must not touch: what a
//! transaction sends or reports (its [`Driven::execute`] does that).
//!
//! Why one queue (issue 14): a task per transaction cost a task allocation (~400 bytes,
//! for up to 64*T1 = 32 s), a runtime timer registration and a wake-up of that task every
//! time its timers changed, two to four transactions per call. The queue is a binary heap
//! of (deadline, transaction); the task wakes only for the earliest deadline, and cleanup
//! timers (on a 50 ms grid, see `timers::deadline`) of many transactions end in one wake-up.
//! A transaction remembers the deadline it is queued for, so that it is queued again only
//! when a timer moves earlier. When that deadline goes stale (the state machine stopped the
//! timer: Timer A once a response came, E once a final came...), the task is poked and drops
//! the entry at once instead of waking up for it; the transaction's next deadline is queued
//! then.

use super::timers::{self, Timer};
use super::{Action, Actions, Shared, TransactionError};
use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Inputs common to every machine, so one timer queue drives them all.
pub(super) trait Machine: Send + 'static {
    fn timer(&mut self, t: Timer) -> Actions;
    fn transport_error(&mut self, err: String) -> Actions;
}

struct Cell<M> {
    machine: M,
    /// Running timers and their deadlines (at most a handful).
    timers: Vec<(Timer, Instant)>,
    /// Terminated: no more inputs are processed.
    done: bool,
    /// The deadline this transaction is queued for, if any.
    queued: Option<Instant>,
}

impl<M> Cell<M> {
    /// The deadline to queue, when the earliest running timer is earlier than the one the
    /// transaction is queued for (or it is not queued); records it as queued.
    fn next_to_queue(&mut self) -> Option<Instant> {
        if self.done {
            return None;
        }
        let next = self.timers.iter().map(|&(_, at)| at).min()?;
        if self.queued.is_some_and(|q| q <= next) {
            return None;
        }
        self.queued = Some(next);
        Some(next)
    }

    /// The deadline the transaction is queued for, when no running timer needs it any more
    /// (stopped, or moved later): the queue can drop that entry now rather than wake up for
    /// it.
    fn stale_queued(&self) -> Option<Instant> {
        let q = self.queued?;
        let next = self.timers.iter().map(|&(_, at)| at).min();
        (self.done || next.is_none_or(|n| n > q)).then_some(q)
    }
}

pub(super) struct Core<M> {
    cell: Mutex<Cell<M>>,
    /// The layer's start: origin of the grid cleanup timers fire on ([`timers::deadline`]).
    epoch: Instant,
}

impl<M: Machine> Core<M> {
    pub(super) fn new(machine: M, epoch: Instant) -> Self {
        Core {
            epoch,
            cell: Mutex::new(Cell {
                machine,
                timers: Vec::new(),
                done: false,
                queued: None,
            }),
        }
    }

    /// Reads the machine under the lock.
    pub(super) fn with_machine<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.cell.lock().machine)
    }

    /// Books the timer actions and the termination under the lock; the side effects (sends,
    /// reports, terminate) go to `effects`, to be run after the lock is released.
    fn absorb(&self, cell: &mut Cell<M>, actions: Actions, effects: &mut Actions) {
        for a in actions {
            match a {
                Action::Start(t, d) => {
                    let at = timers::deadline(t, d, Instant::now(), self.epoch);
                    match cell.timers.iter_mut().find(|(k, _)| *k == t) {
                        Some(slot) => slot.1 = at,
                        None => cell.timers.push((t, at)),
                    }
                }
                Action::Stop(t) => cell.timers.retain(|(k, _)| *k != t),
                Action::Terminate => {
                    if !cell.done {
                        cell.done = true;
                        cell.timers.clear();
                        effects.push(Action::Terminate);
                    }
                }
                other => effects.push(other),
            }
        }
    }

    /// Runs `f` on the machine under the lock: its effects, the deadline to queue the
    /// transaction for, and a queued deadline that went stale.
    #[allow(clippy::type_complexity)]
    fn step<R>(
        &self,
        f: impl FnOnce(&mut M) -> Result<(Actions, R), TransactionError>,
    ) -> Result<(Actions, Option<Instant>, Option<Instant>, R), TransactionError> {
        let mut cell = self.cell.lock();
        if cell.done {
            return Err(TransactionError::Gone);
        }
        let (actions, r) = f(&mut cell.machine)?;
        let mut effects = Vec::with_capacity(actions.len());
        self.absorb(&mut cell, actions, &mut effects);
        let queue = cell.next_to_queue();
        let stale = cell.stale_queued();
        Ok((effects, queue, stale, r))
    }

    /// Whether the queue's entry for `entry` no longer matters to this transaction.
    fn is_stale(&self, entry: Instant) -> bool {
        let cell = self.cell.lock();
        cell.queued != Some(entry) || cell.stale_queued() == Some(entry)
    }

    /// The queue's entry for `entry` came due: fires every timer that is due; returns the
    /// effects and the deadline to queue the transaction for next.
    fn fire_due(&self, entry: Instant, retransmitted: &AtomicU64) -> (Actions, Option<Instant>) {
        let mut cell = self.cell.lock();
        if cell.queued == Some(entry) {
            cell.queued = None;
        }
        let now = Instant::now();
        let mut due: Vec<(Timer, Instant)> = Vec::new();
        cell.timers.retain(|&(t, at)| {
            if at <= now {
                due.push((t, at));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|&(_, at)| at);
        let mut effects = Vec::new();
        for (t, _) in due {
            if cell.done {
                break;
            }
            let actions = cell.machine.timer(t);
            if matches!(t, Timer::A | Timer::E | Timer::G) {
                // What these timers send is a retransmission (RFC 3261 17.1.1.2, 17.1.2.2,
                // 17.2.1).
                let resent = actions
                    .iter()
                    .filter(|a| matches!(a, Action::Send(..)))
                    .count();
                retransmitted.fetch_add(resent as u64, Ordering::Relaxed);
            }
            self.absorb(&mut cell, actions, &mut effects);
        }
        let queue = cell.next_to_queue();
        (effects, queue)
    }
}

/// A transaction the timer queue can drive.
pub(super) trait Driven: Send + Sync + Sized + 'static {
    type M: Machine;
    fn core(&self) -> &Core<Self::M>;
    fn shared(&self) -> &Arc<Shared>;
    /// Runs side effects outside the transaction's lock; returns the first send error.
    fn execute(
        self: &Arc<Self>,
        effects: Actions,
        ack: Option<super::Request>,
    ) -> Option<super::TransportError>;
    /// How the timer queue refers to this transaction (weakly: a queued deadline does not
    /// keep a terminated transaction's state alive).
    fn queue_ref(self: &Arc<Self>) -> Queued;

    /// Runs `f` on the machine, then its effects.
    fn drive<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Self::M) -> Result<(Actions, R), TransactionError>,
        ack: Option<super::Request>,
    ) -> Result<(R, Option<super::TransportError>), TransactionError> {
        // The machine's state (its timers, what it keeps to send again) lives as long as
        // the transaction: on its heap (issue 14; see `allocator::short_lived`).
        let (effects, queue, stale, r) = crate::allocator::short_lived(|| self.core().step(f))?;
        let shared = self.shared();
        if let Some(at) = queue {
            shared.timers.push(at, self.queue_ref());
        }
        if let Some(at) = stale {
            shared.timers.poke(at);
        }
        Ok((r, self.execute(effects, ack)))
    }

    /// The queue's entry for deadline `entry` came due.
    fn on_due(self: &Arc<Self>, entry: Instant) {
        let shared = self.shared();
        let (effects, queue) = crate::allocator::short_lived(|| {
            self.core()
                .fire_due(entry, &shared.stats.retransmissions_sent)
        });
        if let Some(at) = queue {
            shared.timers.push(at, self.queue_ref());
        }
        self.execute(effects, None);
    }

    /// A send failed: feed it to the machine (RFC 3261 17.1.1.2, 17.1.2.2, 17.2.4).
    fn send_failed(&self, err: &super::TransportError, effects: &mut Actions) {
        super::bump(&self.shared().stats.transport_errors);
        let core = self.core();
        let mut cell = core.cell.lock();
        if !cell.done {
            let actions = cell.machine.transport_error(err.to_string());
            core.absorb(&mut cell, actions, effects);
            // A transport error ends the transaction or changes nothing that is timed;
            // should a machine start a timer here, it is queued with its next event.
        }
    }
}

/// A queued transaction.
pub(super) enum Queued {
    Server(Weak<super::ServerInner>),
    Client(Weak<super::ClientInner>),
}

impl Queued {
    /// Whether the entry for `entry` can be dropped without waiting for it (its transaction
    /// is gone, or no running timer of it is due then).
    fn is_stale(&self, entry: Instant) -> bool {
        match self {
            Queued::Server(w) => w.upgrade().is_none_or(|tx| tx.core().is_stale(entry)),
            Queued::Client(w) => w.upgrade().is_none_or(|tx| tx.core().is_stale(entry)),
        }
    }

    fn fire(&self, entry: Instant) {
        match self {
            Queued::Server(w) => {
                if let Some(tx) = w.upgrade() {
                    tx.on_due(entry);
                }
            }
            Queued::Client(w) => {
                if let Some(tx) = w.upgrade() {
                    tx.on_due(entry);
                }
            }
        }
    }
}

/// One deadline of the queue; ordered by deadline, then by when it was queued.
struct Entry {
    at: Instant,
    seq: u64,
    tx: Queued,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Heap {
    entries: BinaryHeap<Reverse<Entry>>,
    seq: u64,
    /// The deadline the task sleeps until (None: it waits for a first entry, or has not
    /// been started).
    sleeping_until: Option<Instant>,
}

/// Every transaction timer deadline of the layer, and the task that fires them.
pub(super) struct TimerQueue {
    heap: Mutex<Heap>,
    wake: Notify,
    closed: AtomicBool,
}

impl TimerQueue {
    /// The queue, its task started on `rt`.
    pub(super) fn start(rt: &tokio::runtime::Handle) -> Arc<TimerQueue> {
        let queue = Arc::new(TimerQueue {
            heap: Mutex::new(Heap {
                entries: BinaryHeap::new(),
                seq: 0,
                sleeping_until: None,
            }),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        rt.spawn(run(queue.clone()));
        queue
    }

    /// Queues `tx` for deadline `at`.
    fn push(&self, at: Instant, tx: Queued) {
        let wake = {
            let mut h = self.heap.lock();
            h.seq += 1;
            let seq = h.seq;
            // The heap grows with the transactions in flight: on their heap (see
            // `ServerInner::terminated`).
            crate::allocator::short_lived(|| h.entries.push(Reverse(Entry { at, seq, tx })));
            // Only a deadline earlier than the one slept until needs the task.
            h.sleeping_until.is_none_or(|s| at < s)
        };
        if wake {
            self.wake.notify_one();
        }
    }

    /// A transaction's entry for `at` went stale: if the task sleeps until it, it looks
    /// again (it drops stale entries at the top before sleeping).
    fn poke(&self, at: Instant) {
        if self.heap.lock().sleeping_until == Some(at) {
            self.wake.notify_one();
        }
    }

    /// Takes the entry at the top when it is stale; puts it back otherwise. Returns the
    /// stale entry.
    fn take_stale_top(&self) -> Option<Entry> {
        let top = self.heap.lock().entries.pop()?.0;
        // Checked without the queue's lock: a transaction's lock is never taken under it.
        if top.tx.is_stale(top.at) {
            return Some(top);
        }
        self.heap.lock().entries.push(Reverse(top));
        None
    }

    /// The layer is gone: the task ends.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Takes the entries due at `now`; else records and returns the deadline to sleep until.
    fn take_due(&self, now: Instant, due: &mut Vec<Entry>) -> Option<Instant> {
        let mut h = self.heap.lock();
        while h.entries.peek().is_some_and(|e| e.0.at <= now) {
            if let Some(Reverse(e)) = h.entries.pop() {
                due.push(e);
            }
        }
        // Room a burst of transactions grew is given back once they are over (as
        // `shard::give_back` does for the tables).
        let cap = h.entries.capacity();
        if cap > 1024 && h.entries.len() * 4 < cap {
            let keep = h.entries.len() * 2;
            crate::allocator::short_lived(|| h.entries.shrink_to(keep));
        }
        h.sleeping_until = h.entries.peek().map(|e| e.0.at);
        h.sleeping_until
    }
}

/// The queue's task: fires what is due, sleeps until the next deadline or an earlier one is
/// queued, ends when the layer is dropped.
async fn run(queue: Arc<TimerQueue>) {
    let mut due = Vec::new();
    while !queue.closed.load(Ordering::Acquire) {
        let next = queue.take_due(Instant::now(), &mut due);
        if !due.is_empty() {
            for e in due.drain(..) {
                e.tx.fire(e.at);
            }
            // Firing may have queued deadlines that are due already (a zero-length timer).
            continue;
        }
        // An entry whose timer was stopped or moved later is not waited for: firing it now
        // fires nothing and queues its transaction's next deadline.
        if next.is_some() {
            if let Some(e) = queue.take_stale_top() {
                e.tx.fire(e.at);
                continue;
            }
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = queue.wake.notified() => {}
                }
            }
            None => queue.wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cell() -> Cell<()> {
        Cell {
            machine: (),
            timers: Vec::new(),
            done: false,
            queued: None,
        }
    }

    #[test]
    fn a_transaction_is_queued_again_only_for_an_earlier_deadline() {
        let t0 = Instant::now();
        let mut c = cell();
        assert_eq!(c.next_to_queue(), None, "no timer, nothing to queue");
        c.timers.push((Timer::B, t0 + Duration::from_secs(32)));
        assert_eq!(c.next_to_queue(), Some(t0 + Duration::from_secs(32)));
        // Timer A starts: earlier than the queued B, so it is queued too.
        c.timers.push((Timer::A, t0 + Duration::from_millis(500)));
        assert_eq!(c.next_to_queue(), Some(t0 + Duration::from_millis(500)));
        // A moves later (back-off): the entry for 500 ms stays and finds nothing due then.
        c.timers[1].1 = t0 + Duration::from_secs(1);
        assert_eq!(c.next_to_queue(), None);
        // That entry came due (fire_due clears `queued`): the next deadline is queued.
        c.queued = None;
        assert_eq!(c.next_to_queue(), Some(t0 + Duration::from_secs(1)));
        c.done = true;
        c.queued = None;
        assert_eq!(
            c.next_to_queue(),
            None,
            "a terminated transaction is not queued"
        );
    }
}
