//! The server's one sharded hash map: tables read on the hot path (TCP connections and
//! memory endpoints on every send, transactions on every message, the B2BUA's dialog index
//! on every in-dialog request) are split into shards with a lock each instead of one lock
//! for everything (no global lock on the hot path).
//!
//! Owns: nothing but its own entries. Must not touch: sockets or tasks (callers hold
//! handles in the values and act on them after the shard lock is released).

use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use parking_lot::Mutex;
use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};
use std::sync::LazyLock;

const SHARDS: usize = 16;

/// The keys come from the network (Call-IDs, branches), so the hash is seeded at random
/// per process (and per map): foldhash rather than std's SipHash, which was 5% of the
/// instructions of a call (two hashes per lookup: the shard, then the map). foldhash is
/// "minimally DoS-resistant" given a random seed; its own default seed comes from
/// address-space layout, so the seed here is drawn from the OS generator instead.
static SEED: LazyLock<SharedSeed> = LazyLock::new(|| SharedSeed::from_u64(rand::random()));

/// A randomly seeded hasher (each map its own per-hasher seed).
fn random_state() -> SeedableRandomState {
    SeedableRandomState::with_seed(rand::random(), &SEED)
}

type HashMap<K, V> = std::collections::HashMap<K, V, SeedableRandomState>;

/// The key of [`keyed_id`], drawn once per process from the OS generator.
static ID_KEY: LazyLock<(u64, u64)> = LazyLock::new(|| (rand::random(), rand::random()));

/// A 128-bit keyed hash (SipHash-1-3 with its 128-bit output, a random key) of `parts`,
/// for tables that would otherwise keep copies of network strings (Call-IDs, tags) as their
/// keys (issue 14: such strings were ~100 bytes of every held call per index). The key is
/// random per process, so a peer cannot aim for a collision, and two ids colliding by
/// chance is a 2^-128 event per pair. One 128-bit pass (the `siphasher` crate; std offers
/// only 64-bit SipHash) instead of two 64-bit ones with different keys: half the work,
/// ~7,000 instructions of a call (one id per message for its ladder).
pub(crate) fn keyed_id(parts: &[&str]) -> u128 {
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;
    let (k0, k1) = *ID_KEY;
    let mut h = SipHasher13::new_with_keys(k0, k1);
    for p in parts {
        h.write(p.as_bytes());
        // Each part ends with 0xff, which no UTF-8 text holds (as `str`'s Hash does): a
        // sequence of parts is hashed unambiguously.
        h.write_u8(0xff);
    }
    h.finish128().as_u128()
}

pub(crate) struct ShardMap<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    /// Picks the shard; seeded apart from the shards' own maps, or every key of a shard
    /// would share the low bits the map indexes by.
    hasher: SeedableRandomState,
}

/// Smallest shard capacity worth giving back.
const SHRINK_ABOVE: usize = 64;

/// A shard that a burst grew and that is now under a quarter full gives the room back
/// (to twice what it holds): a hash map keeps its largest capacity otherwise, and the
/// transaction tables, grown by the set-up of many calls, held ~700 bytes per call that
/// was up once the set-ups were over (issue 14, heap profile of held calls). Halving at
/// a quarter keeps the cost amortized: the next shrink needs the count to halve again.
fn give_back<K: Hash + Eq, V>(shard: &mut HashMap<K, V>) {
    let cap = shard.capacity();
    if cap > SHRINK_ABOVE && shard.len() * 4 < cap {
        shard.shrink_to(shard.len() * 2);
    }
}

impl<K: Hash + Eq, V> ShardMap<K, V> {
    pub(crate) fn new() -> Self {
        Self::with_shards(SHARDS)
    }

    /// For tables that both cores hit on every message (transactions): more shards.
    pub(crate) fn with_shards(n: usize) -> Self {
        ShardMap {
            shards: (0..n.max(1))
                .map(|_| Mutex::new(HashMap::with_hasher(random_state())))
                .collect(),
            hasher: random_state(),
        }
    }

    /// Entries in all shards.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    fn shard<Q: ?Sized + Hash>(&self, key: &Q) -> &Mutex<HashMap<K, V>> {
        // The modulo keeps the index in range whatever the hash is.
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[i]
    }

    pub(crate) fn insert(&self, key: K, value: V) -> Option<V> {
        self.shard(&key).lock().insert(key, value)
    }

    pub(crate) fn remove<Q: ?Sized + Hash + Eq>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let mut shard = self.shard(key).lock();
        let removed = shard.remove(key);
        give_back(&mut shard);
        removed
    }

    /// Removes the entry only when `keep` says it should go (checked under the shard lock).
    pub(crate) fn remove_if(&self, key: &K, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut shard = self.shard(key).lock();
        if shard.get(key).is_some_and(pred) {
            let removed = shard.remove(key);
            give_back(&mut shard);
            removed
        } else {
            None
        }
    }

    /// Runs `f` on the entry, if any, under its shard lock (keep `f` short).
    pub(crate) fn with<Q: ?Sized + Hash + Eq, R>(
        &self,
        key: &Q,
        f: impl FnOnce(&mut V) -> R,
    ) -> Option<R>
    where
        K: Borrow<Q>,
    {
        self.shard(key).lock().get_mut(key).map(f)
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.shard(key).lock().contains_key(key)
    }

    /// Takes every entry out (shutdown).
    /// `f` of every entry, one shard at a time (rare whole-table questions: admin), for
    /// values that are not to be cloned whole.
    pub(crate) fn map_entries<R>(&self, mut f: impl FnMut(&K, &V) -> R) -> Vec<R> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.lock().iter().map(|(k, v)| f(k, v)));
        }
        out
    }

    pub(crate) fn drain(&self) -> Vec<(K, V)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.lock().drain());
        }
        out
    }
}

impl<K: Hash + Eq, V: Clone> ShardMap<K, V> {
    pub(crate) fn get<Q: ?Sized + Hash + Eq>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.shard(key).lock().get(key).cloned()
    }

    /// Inserts unless the key is present; returns the present value in that case.
    pub(crate) fn insert_new(&self, key: K, value: V) -> Result<(), V> {
        match self.shard(&key).lock().entry(key) {
            Entry::Occupied(o) => Err(o.get().clone()),
            Entry::Vacant(e) => {
                e.insert(value);
                Ok(())
            }
        }
    }

    /// Every value, one shard at a time (rare whole-table questions: shutdown, admin).
    pub(crate) fn values(&self) -> Vec<V> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_tell_apart_how_parts_are_split_and_are_stable_in_a_process() {
        let id = keyed_id(&["abc@host", "tag1"]);
        assert_eq!(id, keyed_id(&["abc@host", "tag1"]));
        assert_ne!(id, keyed_id(&["abc@hos", "ttag1"]));
        assert_ne!(id, keyed_id(&["abc@hosttag1"]));
        assert_ne!(keyed_id(&["a"]), keyed_id(&["a", ""]));
        // Both halves carry key material (a 64-bit hash widened would leave one zero).
        assert_ne!(id >> 64, 0);
        assert_ne!(id as u64, 0);
    }

    #[test]
    fn insert_new_keeps_the_first_and_remove_if_checks_the_value() {
        let m: ShardMap<u32, u32> = ShardMap::with_shards(4);
        assert!(m.insert_new(1, 10).is_ok());
        assert_eq!(m.insert_new(1, 11), Err(10));
        assert_eq!(m.remove_if(&1, |v| *v == 11), None);
        assert_eq!(m.len(), 1);
        assert_eq!(m.values(), vec![10]);
        assert_eq!(m.remove_if(&1, |v| *v == 10), Some(10));
        assert_eq!(m.get(&1), None);
    }

    #[test]
    fn insert_get_remove() {
        let m: ShardMap<u32, &str> = ShardMap::new();
        for i in 0..100 {
            m.insert(i, "x");
        }
        assert_eq!(m.get(&7), Some("x"));
        assert!(m.remove_if(&7, |v| *v == "y").is_none());
        assert!(m.remove_if(&7, |v| *v == "x").is_some());
        assert!(!m.contains(&7));
        assert_eq!(m.with(&8, |v| *v = "z"), Some(()));
        assert_eq!(m.remove(&8), Some("z"));
        assert_eq!(m.drain().len(), 98);
        assert!(m.get(&1).is_none());
    }

    #[test]
    fn a_table_that_emptied_gives_its_room_back() {
        let m: ShardMap<u32, [u8; 64]> = ShardMap::with_shards(2);
        let capacity = |m: &ShardMap<u32, [u8; 64]>| -> usize {
            m.shards.iter().map(|s| s.lock().capacity()).sum()
        };
        for i in 0..10_000 {
            m.insert(i, [0; 64]);
        }
        assert!(capacity(&m) >= 10_000);
        for i in 0..9_990 {
            assert!(m.remove(&i).is_some());
        }
        assert!(capacity(&m) <= 2 * SHRINK_ABOVE + 64, "{}", capacity(&m));
        assert_eq!(m.len(), 10);
        assert!((9_990..10_000).all(|i| m.contains(&i)));
    }
}
