//! Which available agents a hunt rings next: the seven strategies as one pure function of
//! the candidates, the group's round-robin cursor and a random source, so that each can be
//! unit-tested deterministically (seeded RNG).

use rand::Rng;

/// A hunt group's strategy (`huntgroups.<name>.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every available agent at once; the first to answer wins, the others are CANCELled.
    RingAll,
    /// The first available agent in the configured order.
    Linear,
    /// The next available agent after the one tried last.
    RoundRobin,
    /// The available agent idle longest (oldest end of its last group call).
    LeastRecent,
    /// The available agent with the fewest answered calls since the last reset.
    FewestCalls,
    /// Any available agent, uniformly.
    Random,
    /// Any available agent, with probability proportional to its weight.
    Weighted,
}

impl Strategy {
    /// Every configuration name, in documentation order.
    pub const NAMES: [&'static str; 7] = [
        "ring-all",
        "linear",
        "round-robin",
        "least-recent",
        "fewest-calls",
        "random",
        "weighted",
    ];

    pub fn parse(name: &str) -> Option<Strategy> {
        Some(match name {
            "ring-all" => Strategy::RingAll,
            "linear" => Strategy::Linear,
            "round-robin" => Strategy::RoundRobin,
            "least-recent" => Strategy::LeastRecent,
            "fewest-calls" => Strategy::FewestCalls,
            "random" => Strategy::Random,
            "weighted" => Strategy::Weighted,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::RingAll => "ring-all",
            Strategy::Linear => "linear",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastRecent => "least-recent",
            Strategy::FewestCalls => "fewest-calls",
            Strategy::Random => "random",
            Strategy::Weighted => "weighted",
        }
    }
}

/// One available agent as the strategy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Position in the group's `members` list.
    pub index: usize,
    /// Unix seconds when its last call ended (0 = never had one).
    pub last_end: f64,
    /// Answered calls since the last reset.
    pub answered: u64,
    /// Its weight (`weights`, 1 when not configured).
    pub weight: u32,
}

/// Picks the member indexes to ring from `candidates` (available agents, in member order).
/// `cursor` is the group's round-robin position (the member index to start looking at);
/// it is moved past the agent picked. Empty only when `candidates` is.
pub fn select(
    strategy: Strategy,
    candidates: &[Candidate],
    cursor: &mut usize,
    rng: &mut impl Rng,
) -> Vec<usize> {
    if candidates.is_empty() {
        return Vec::new();
    }
    let one = match strategy {
        Strategy::RingAll => return candidates.iter().map(|c| c.index).collect(),
        Strategy::Linear => candidates[0].index,
        Strategy::RoundRobin => {
            // "Resuming after the last agent tried": the first candidate at or after the
            // cursor, wrapping around.
            let pick = candidates
                .iter()
                .find(|c| c.index >= *cursor)
                .unwrap_or(&candidates[0])
                .index;
            *cursor = pick + 1;
            pick
        }
        Strategy::LeastRecent => {
            // Ties (e.g. nobody has had a call yet) go to the member listed first.
            candidates
                .iter()
                .min_by(|a, b| a.last_end.total_cmp(&b.last_end))
                .map_or(candidates[0].index, |c| c.index)
        }
        Strategy::FewestCalls => candidates
            .iter()
            .min_by_key(|c| c.answered)
            .map_or(candidates[0].index, |c| c.index),
        Strategy::Random => candidates[rng.random_range(0..candidates.len())].index,
        Strategy::Weighted => {
            let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
            if total == 0 {
                candidates[rng.random_range(0..candidates.len())].index
            } else {
                let mut roll = rng.random_range(0..total);
                let mut pick = candidates[0].index;
                for c in candidates {
                    let w = u64::from(c.weight);
                    if roll < w {
                        pick = c.index;
                        break;
                    }
                    roll -= w;
                }
                pick
            }
        }
    };
    vec![one]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cands(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|index| Candidate {
                index,
                last_end: 0.0,
                answered: 0,
                weight: 1,
            })
            .collect()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn names_round_trip() {
        for name in Strategy::NAMES {
            assert_eq!(Strategy::parse(name).unwrap().name(), name);
        }
        assert_eq!(Strategy::parse("ringall"), None);
    }

    #[test]
    fn ring_all_rings_every_candidate() {
        let mut cursor = 0;
        let c = cands(3);
        assert_eq!(
            select(Strategy::RingAll, &c, &mut cursor, &mut rng()),
            vec![0, 1, 2]
        );
        assert!(select(Strategy::RingAll, &[], &mut cursor, &mut rng()).is_empty());
    }

    #[test]
    fn linear_takes_the_first_free() {
        let mut cursor = 0;
        let c = cands(3);
        for _ in 0..5 {
            assert_eq!(
                select(Strategy::Linear, &c, &mut cursor, &mut rng()),
                vec![0]
            );
        }
        // Agent 0 not available: agent 1.
        assert_eq!(
            select(Strategy::Linear, &c[1..], &mut cursor, &mut rng()),
            vec![1]
        );
    }

    #[test]
    fn round_robin_resumes_after_the_last_tried() {
        let mut cursor = 0;
        let c = cands(3);
        let picks: Vec<usize> = (0..7)
            .map(|_| select(Strategy::RoundRobin, &c, &mut cursor, &mut rng())[0])
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0]);
        // Cursor at 1 and agent 1 busy: agent 2, then wrap to 0.
        let mut cursor = 1;
        let without_1 = vec![c[0].clone(), c[2].clone()];
        assert_eq!(
            select(Strategy::RoundRobin, &without_1, &mut cursor, &mut rng()),
            vec![2]
        );
        assert_eq!(
            select(Strategy::RoundRobin, &without_1, &mut cursor, &mut rng()),
            vec![0]
        );
    }

    #[test]
    fn least_recent_takes_the_longest_idle() {
        let mut cursor = 0;
        let mut c = cands(3);
        c[0].last_end = 300.0;
        c[1].last_end = 100.0;
        c[2].last_end = 200.0;
        assert_eq!(
            select(Strategy::LeastRecent, &c, &mut cursor, &mut rng()),
            vec![1]
        );
        // Never had a call (0) beats everyone; ties go to the first listed.
        c[2].last_end = 0.0;
        c[0].last_end = 0.0;
        assert_eq!(
            select(Strategy::LeastRecent, &c, &mut cursor, &mut rng()),
            vec![0]
        );
    }

    #[test]
    fn fewest_calls_takes_the_least_loaded() {
        let mut cursor = 0;
        let mut c = cands(3);
        c[0].answered = 5;
        c[1].answered = 2;
        c[2].answered = 2;
        assert_eq!(
            select(Strategy::FewestCalls, &c, &mut cursor, &mut rng()),
            vec![1]
        );
    }

    #[test]
    fn random_is_roughly_uniform() {
        let mut cursor = 0;
        let c = cands(4);
        let mut r = rng();
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            counts[select(Strategy::Random, &c, &mut cursor, &mut r)[0]] += 1;
        }
        for n in counts {
            assert!((850..1150).contains(&n), "{counts:?}");
        }
    }

    #[test]
    fn weighted_follows_the_weights() {
        let mut cursor = 0;
        let mut c = cands(3);
        c[0].weight = 6;
        c[1].weight = 3;
        c[2].weight = 1;
        let mut r = rng();
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            counts[select(Strategy::Weighted, &c, &mut cursor, &mut r)[0]] += 1;
        }
        // Expected 6000 / 3000 / 1000; within 5 %.
        assert!((5700..6300).contains(&counts[0]), "{counts:?}");
        assert!((2850..3150).contains(&counts[1]), "{counts:?}");
        assert!((950..1050 + 50).contains(&counts[2]), "{counts:?}");
        // A zero weight is never picked while others have weight.
        c[2].weight = 0;
        for _ in 0..1000 {
            assert_ne!(select(Strategy::Weighted, &c, &mut cursor, &mut r)[0], 2);
        }
    }
}
