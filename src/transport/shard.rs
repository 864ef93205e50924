//! A small sharded hash map: the TCP connection table and the memory network's endpoint
//! table are read on every send, so they are split into shards with a lock each instead of
//! one lock for everything (no global lock on the hot path).
//!
//! Owns: nothing but its own entries. Must not touch: sockets or tasks (callers hold
//! handles in the values and act on them after the shard lock is released).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

const SHARDS: usize = 16;

pub(crate) struct ShardMap<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: RandomState,
}

impl<K: Hash + Eq, V> ShardMap<K, V> {
    pub(crate) fn new() -> Self {
        ShardMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, V>> {
        // The modulo keeps the index in range whatever the hash is.
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[i]
    }

    pub(crate) fn insert(&self, key: K, value: V) -> Option<V> {
        self.shard(&key).lock().insert(key, value)
    }

    pub(crate) fn remove(&self, key: &K) -> Option<V> {
        self.shard(key).lock().remove(key)
    }

    /// Removes the entry only when `keep` says it should go (checked under the shard lock).
    pub(crate) fn remove_if(&self, key: &K, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut shard = self.shard(key).lock();
        if shard.get(key).is_some_and(pred) {
            shard.remove(key)
        } else {
            None
        }
    }

    /// Runs `f` on the entry, if any, under its shard lock (keep `f` short).
    pub(crate) fn with<R>(&self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key).lock().get_mut(key).map(f)
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.shard(key).lock().contains_key(key)
    }

    /// Takes every entry out (shutdown).
    pub(crate) fn drain(&self) -> Vec<(K, V)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.lock().drain());
        }
        out
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ShardMap<K, V> {
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        self.shard(key).lock().get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
