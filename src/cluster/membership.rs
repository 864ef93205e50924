//! The decisions of membership and of the call-record writer, without Redis or clocks
//! (sans-IO): what a scan of the node set means, and how queued record changes collapse
//! into one batch. The tasks in `node.rs` feed them what Redis answered and run what they
//! decide.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// What one scan of `<prefix>:nodes` and their lease keys means for this node.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Judgement {
    /// Members whose lease key exists (this node included when its own lease is there).
    pub alive: usize,
    /// Other members whose lease has run out: their calls are to be taken over.
    pub dead: Vec<String>,
    /// Our own lease key is missing (it lapsed: Redis unreachable for longer than the
    /// lease, or someone deleted it); the next renewal writes it again.
    pub own_lease_missing: bool,
}

/// Judges a scan: `members` are the names in the node set, `leases[i]` whether member
/// `i`'s lease key exists. A node is dead exactly when its lease key is gone, i.e. its
/// last renewal is older than its lease: Redis expired the key, so every survivor agrees
/// on the moment whatever its own clock says.
pub(crate) fn judge(me: &str, members: &[String], leases: &[bool]) -> Judgement {
    let mut j = Judgement::default();
    for (name, alive) in members.iter().zip(leases.iter().copied()) {
        if alive {
            j.alive += 1;
        } else if name == me {
            j.own_lease_missing = true;
        } else {
            j.dead.push(name.clone());
        }
    }
    // A scan answered with fewer lease values than members (it cannot happen with MGET)
    // judges the rest as unknown rather than dead: a takeover must never be a guess.
    j
}

/// The interval between lease renewals: a third of the lease, so that two renewals in a
/// row may fail (or be late) before the lease runs out.
pub(crate) fn renewal_interval(lease: Duration) -> Duration {
    lease / 3
}

/// Whether this node may take over dead nodes now. A node that itself lost Redis (a
/// failed renewal or look, or its own lease found lapsed) takes over nobody until `wait`
/// after Redis answered it again: the others may have been cut off too (their leases
/// lapsed without them being dead), and given time every live node reconnects and renews.
#[derive(Debug)]
pub(crate) struct Gate {
    wait: Duration,
    /// Redis failed us, and has not answered since.
    troubled: bool,
    closed_until: Option<Instant>,
}

impl Gate {
    pub fn new(wait: Duration) -> Gate {
        Gate {
            wait,
            troubled: false,
            closed_until: None,
        }
    }

    /// Redis failed us.
    pub fn trouble(&mut self) {
        self.troubled = true;
    }

    /// Redis answered at `now`: after trouble, the gate opens `wait` later.
    pub fn answered(&mut self, now: Instant) {
        if self.troubled {
            self.troubled = false;
            self.closed_until = Some(now + self.wait);
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        !self.troubled && self.closed_until.is_none_or(|t| now >= t)
    }
}

/// One queued change of this node's call records: a record written (or replaced), or
/// removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordOp {
    pub call_id: Box<str>,
    pub record: Option<Vec<u8>>,
}

/// The changes waiting to be written, at most one per call: a later change replaces an
/// earlier one (a record written then removed before the batch went out is one HDEL; the
/// HDEL of a record that never reached Redis costs nothing and keeps the rule simple).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    ops: HashMap<Box<str>, Option<Vec<u8>>>,
}

/// What a batch turns into: one HSET and one HDEL of the node's hash (each only when not
/// empty), sent in one pipeline.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Writes {
    pub puts: Vec<(Box<str>, Vec<u8>)>,
    pub removes: Vec<Box<str>>,
}

impl Writes {
    pub fn len(&self) -> usize {
        self.puts.len() + self.removes.len()
    }
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Queues a change; the newest change of a call wins.
    pub fn add(&mut self, op: RecordOp) {
        self.ops.insert(op.call_id, op.record);
    }

    /// Whether a change of `call_id` is waiting.
    pub fn has(&self, call_id: &str) -> bool {
        self.ops.contains_key(call_id)
    }

    /// Everything waiting, as the writes to send.
    pub fn take(&mut self) -> Writes {
        let mut w = Writes::default();
        for (id, op) in self.ops.drain() {
            match op {
                Some(record) => w.puts.push((id, record)),
                None => w.removes.push(id),
            }
        }
        w
    }

    /// Puts back writes that failed, under any newer change queued meanwhile (which is
    /// what Redis must end up with).
    pub fn restore(&mut self, w: Writes) {
        for (id, record) in w.puts {
            self.ops.entry(id).or_insert(Some(record));
        }
        for id in w.removes {
            self.ops.entry(id).or_insert(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_member_without_lease_is_dead_unless_it_is_us() {
        let j = judge("a", &names(&["a", "b", "c"]), &[true, false, true]);
        assert_eq!(
            j,
            Judgement {
                alive: 2,
                dead: vec!["b".into()],
                own_lease_missing: false
            }
        );
        // Our own missing lease is not a takeover of ourselves: it is renewed.
        let j = judge("a", &names(&["a", "b"]), &[false, true]);
        assert_eq!(j.dead, Vec::<String>::new());
        assert!(j.own_lease_missing);
        assert_eq!(j.alive, 1);
    }

    #[test]
    fn an_incomplete_scan_declares_nobody_dead() {
        let j = judge("a", &names(&["a", "b", "c"]), &[true]);
        assert_eq!(j.alive, 1);
        assert!(j.dead.is_empty());
    }

    #[test]
    fn renewal_leaves_room_for_two_failures() {
        assert_eq!(
            renewal_interval(Duration::from_secs(9)),
            Duration::from_secs(3)
        );
        let ten = Duration::from_secs(10);
        let every = renewal_interval(ten);
        assert!(every * 3 <= ten && every * 3 > ten - Duration::from_micros(1));
    }

    /// On tokio's paused clock: closed from the trouble until `wait` after Redis answers
    /// again, however long the trouble lasted.
    #[tokio::test(start_paused = true)]
    async fn after_trouble_no_takeover_until_a_lease_after_recovery() {
        let mut g = Gate::new(Duration::from_secs(10));
        g.answered(Instant::now());
        assert!(
            g.is_open(Instant::now()),
            "answers without trouble change nothing"
        );
        g.trouble();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!g.is_open(Instant::now()), "closed while Redis fails");
        g.answered(Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        g.answered(Instant::now());
        assert!(!g.is_open(Instant::now()), "counted from the first answer");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(g.is_open(Instant::now()));
    }

    fn put(id: &str, v: &str) -> RecordOp {
        RecordOp {
            call_id: id.into(),
            record: Some(v.as_bytes().to_vec()),
        }
    }

    fn remove(id: &str) -> RecordOp {
        RecordOp {
            call_id: id.into(),
            record: None,
        }
    }

    fn sorted(mut w: Writes) -> Writes {
        w.puts.sort();
        w.removes.sort();
        w
    }

    #[test]
    fn the_newest_change_of_a_call_wins() {
        let mut b = Batch::default();
        b.add(put("c1", "v1"));
        b.add(put("c1", "v2"));
        b.add(put("c2", "x"));
        b.add(remove("c2"));
        b.add(remove("c3"));
        assert_eq!(b.len(), 3);
        let w = sorted(b.take());
        assert_eq!(w.puts, vec![("c1".into(), b"v2".to_vec())]);
        assert_eq!(w.removes, vec![Box::<str>::from("c2"), "c3".into()]);
        assert_eq!(w.len(), 3);
        assert!(b.is_empty());
    }

    #[test]
    fn failed_writes_go_back_under_newer_changes() {
        let mut b = Batch::default();
        b.add(put("c1", "old"));
        b.add(put("c2", "kept"));
        let failed = b.take();
        // Meanwhile c1 ended.
        b.add(remove("c1"));
        b.restore(failed);
        let w = sorted(b.take());
        assert_eq!(w.puts, vec![("c2".into(), b"kept".to_vec())]);
        assert_eq!(w.removes, vec![Box::<str>::from("c1")]);
    }
}
