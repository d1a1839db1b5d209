//! Token bucket states, sharded in memory like the counters.
//!
//! Buckets are not persisted: after a restart every bucket starts full, so a
//! restart can let through at most one extra burst per key. The arithmetic is
//! in `plans::bucket`; this module only keeps states and applies a pure
//! function to one of them under its shard lock.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use crate::plans::bucket::BucketState;

const SHARDS: usize = 64;

type Shard = HashMap<Vec<u8>, BucketState, foldhash::fast::RandomState>;

/// Bucket states by opaque key.
#[derive(Debug)]
pub struct Buckets {
    shards: Box<[Mutex<Shard>]>,
    hasher: foldhash::fast::FixedState,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::FixedState::default(),
        }
    }
}

impl Buckets {
    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) & (SHARDS - 1);
        // A panic cannot leave a state half-written (one assignment).
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the state of `key` (`None` if it has none) atomically
    /// and stores the state it returns.
    pub fn update<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<BucketState>) -> (BucketState, R),
    ) -> R {
        let mut shard = self.shard(key);
        // One lookup for a known key (the hot path); a new key is inserted.
        if let Some(s) = shard.get_mut(key) {
            let (state, r) = f(Some(*s));
            *s = state;
            return r;
        }
        let (state, r) = f(None);
        shard.insert(key.to_vec(), state);
        r
    }

    /// The state of `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<BucketState> {
        self.shard(key).get(key).copied()
    }

    /// Drops buckets that are full again at `now` (a full bucket is the same
    /// as none); returns how many were dropped.
    pub fn purge_full(&self, now: i64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            shard.retain(|_, s| s.full_at > now);
            removed += before - shard.len();
        }
        removed
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::bucket::take;
    use crate::plans::model::Throttle;

    #[test]
    fn updates_are_atomic_and_full_buckets_are_purged() {
        let b = std::sync::Arc::new(Buckets::default());
        let t = Throttle {
            rate_limit: 1.0,
            burst_limit: 1000,
        };
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    (0..400)
                        .filter(|_| {
                            b.update(b"k", |s| {
                                let (s, o) = take(s, &t, 1, 0, 0);
                                (s, o.allowed)
                            })
                        })
                        .count()
                })
            })
            .collect();
        let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(allowed, 1000, "exactly the burst");
        assert_eq!(b.purge_full(999_999_999), 0);
        assert_eq!(b.purge_full(1_000_000_000), 1);
        assert!(b.is_empty());
    }
}
