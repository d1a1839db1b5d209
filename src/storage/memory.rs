//! Sharded in-memory counters: the hot path of every decision.
//!
//! A key hashes to one of [`SHARDS`] shards, each behind its own
//! `std::sync::Mutex` (never held across an `.await`, so a std mutex is the
//! right tool, as mini-redis explains). Each shard also keeps an expiry index,
//! so [`MemoryCounters::purge_expired`] touches only expired keys, and, when
//! persistence is on, a list of keys changed since the last drain.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::fast::FixedState;
use hashbrown::HashTable;

use super::{Cond, CounterOp, CounterStore, Error};

/// Number of shards; a power of two well above the core count.
pub const SHARDS: usize = 64;

type Key = Arc<[u8]>;

#[derive(Debug)]
struct Counter {
    value: u64,
    expires_at: u64,
    dirty: bool,
}

#[derive(Debug)]
struct Entry {
    key: Key,
    counter: Counter,
}

/// How every key is hashed: to choose its shard, to look it up in the
/// shard's table and when the table rehashes. One definition, so the three
/// always agree.
fn key_hash(hasher: &FixedState, key: &[u8]) -> u64 {
    hasher.hash_one(key)
}

/// The table entry holding `key`.
fn holds(key: &[u8]) -> impl Fn(&Entry) -> bool + '_ {
    move |e| *e.key == *key
}

/// One shard: its map holds each key with its counter and is looked up with
/// the hash that also chose the shard, so a key is hashed once per op.
#[derive(Debug, Default)]
struct Shard {
    map: HashTable<Entry>,
    expiry: BTreeMap<u64, Vec<Key>>,
    dirty: Vec<Key>,
}

impl Shard {
    fn find_mut(&mut self, hash: u64, key: &[u8]) -> Option<&mut Entry> {
        self.map.find_mut(hash, holds(key))
    }

    fn insert_new(
        &mut self,
        hasher: &FixedState,
        hash: u64,
        key: &[u8],
        value: u64,
        expires_at: u64,
        dirty: bool,
    ) -> &mut Counter {
        let key: Key = Arc::from(key);
        self.expiry.entry(expires_at).or_default().push(key.clone());
        if dirty {
            self.dirty.push(key.clone());
        }
        let entry = Entry {
            key,
            counter: Counter {
                value,
                expires_at,
                dirty,
            },
        };
        &mut self
            .map
            .insert_unique(hash, entry, |e| key_hash(hasher, &e.key))
            .into_mut()
            .counter
    }
}

/// Below this capacity a shard map is never shrunk: too small to matter.
const SHRINK_MIN_CAPACITY: usize = 256;

impl Shard {
    /// After a purge: a map left at most a quarter full of what it could
    /// hold before the purge (`capacity_before`; read before the removals,
    /// as a removal may leave a tombstone that lowers `capacity()` without
    /// freeing anything) is shrunk to room for twice its length. hashbrown
    /// never shrinks on remove, so without this the tables of a burst of 1M
    /// keys (~85 MB over the shards) stay allocated once their windows end;
    /// measured on 1M counters alone, RSS after the purge stayed at 281 MiB
    /// without the shrink and fell to 20 MiB with it. Between the
    /// quarter-full trigger and hashbrown's 7/8 growth point, a steady load
    /// neither shrinks nor regrows its table.
    fn shrink_if_sparse(&mut self, hasher: &FixedState, capacity_before: usize) {
        let len = self.map.len();
        if capacity_before >= SHRINK_MIN_CAPACITY && len <= capacity_before / 4 {
            self.map
                .shrink_to(len.saturating_mul(2), |e| key_hash(hasher, &e.key));
        }
    }
}

/// A counter changed since the last drain, to be persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Counter key.
    pub key: Arc<[u8]>,
    /// Value at drain time.
    pub value: u64,
    /// Expiry (Unix seconds).
    pub expires_at: u64,
}

/// Sharded in-memory counters.
#[derive(Debug)]
pub struct MemoryCounters {
    shards: Box<[Mutex<Shard>]>,
    hasher: FixedState,
    track_dirty: bool,
}

impl Default for MemoryCounters {
    fn default() -> Self {
        Self::new(false)
    }
}

impl MemoryCounters {
    /// Empty counters. With `track_dirty`, changed keys are remembered for
    /// [`MemoryCounters::drain_changed`].
    pub fn new(track_dirty: bool) -> Self {
        MemoryCounters {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: FixedState::default(),
            track_dirty,
        }
    }

    /// The key's hash and its shard, locked. The shard comes from bits 48
    /// to 53 of the hash: the shard's table uses the low bits (bucket) and
    /// the top seven (control byte), so keys of one shard still spread over
    /// its whole table.
    fn shard(&self, key: &[u8]) -> (u64, MutexGuard<'_, Shard>) {
        let hash = key_hash(&self.hasher, key);
        let i = ((hash >> 48) as usize) & (SHARDS - 1);
        // A poisoned shard means a panic while holding it; the counters in
        // it are still consistent (every update is a single assignment).
        (
            hash,
            self.shards[i].lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Adds hits to each counter, returning the values after the add.
    pub fn add_now(&self, ops: &[CounterOp<'_>]) -> super::Values {
        let mut prev_applied = true;
        ops.iter()
            .map(|op| {
                let (value, applied) = self.add_one(op, prev_applied);
                prev_applied = applied;
                value
            })
            .collect()
    }

    /// One op; returns (value, whether the add was applied). One hash and
    /// one lookup.
    fn add_one(&self, op: &CounterOp<'_>, prev_applied: bool) -> (u64, bool) {
        let (hash, mut guard) = self.shard(op.key);
        let shard = &mut *guard;
        let Some(entry) = shard.map.find_mut(hash, holds(op.key)) else {
            // Absent: the counter reads as 0.
            return match op.cond {
                Cond::Cap(cap) if op.hits > cap => (op.hits, false),
                Cond::IfPrevApplied if !prev_applied => (0, false),
                Cond::IfExists => (0, false),
                Cond::Sub => (0, true),
                _ if op.hits == 0 => (0, true),
                _ => {
                    let c = shard.insert_new(
                        &self.hasher,
                        hash,
                        op.key,
                        op.hits,
                        op.expires_at,
                        self.track_dirty,
                    );
                    (c.value, true)
                }
            };
        };
        let c = &mut entry.counter;
        match op.cond {
            Cond::Always => {}
            Cond::Cap(cap) => {
                let after = c.value.saturating_add(op.hits);
                if after > cap {
                    return (after, false);
                }
            }
            Cond::IfPrevApplied if !prev_applied => return (c.value, false),
            Cond::IfPrevApplied | Cond::IfExists | Cond::Sub => {}
        }
        if op.hits == 0 {
            return (c.value, true);
        }
        c.value = if op.cond == Cond::Sub {
            c.value.saturating_sub(op.hits)
        } else {
            c.value.saturating_add(op.hits)
        };
        let value = c.value;
        if self.track_dirty && !c.dirty {
            c.dirty = true;
            shard.dirty.push(entry.key.clone());
        }
        (value, true)
    }

    /// The current value of a counter (0 if absent).
    pub fn get(&self, key: &[u8]) -> u64 {
        let (hash, shard) = self.shard(key);
        shard
            .map
            .find(hash, holds(key))
            .map_or(0, |e| e.counter.value)
    }

    /// Number of live counters.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }

    /// True when there are no counters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every counter whose key starts with `prefix` (a full scan).
    pub fn scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                shard
                    .map
                    .iter()
                    .filter(|e| e.key.starts_with(prefix))
                    .map(|e| (e.key.to_vec(), e.counter.value)),
            );
        }
        out
    }

    /// Loads a counter read back from disk (not marked changed).
    pub fn restore(&self, key: &[u8], value: u64, expires_at: u64) {
        let (hash, mut shard) = self.shard(key);
        if shard.map.find(hash, holds(key)).is_none() {
            shard.insert_new(&self.hasher, hash, key, value, expires_at, false);
        }
    }

    /// Removes every counter whose window ended at or before `now`; returns
    /// how many were removed. A shard map left at most a quarter full is
    /// shrunk to twice its length, so a burst of distinct keys does not keep
    /// its peak table after its windows end.
    pub fn purge_expired(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let shard = &mut *shard;
            if shard.expiry.first_key_value().is_none_or(|(&t, _)| t > now) {
                continue;
            }
            let capacity = shard.map.capacity();
            let live = shard.expiry.split_off(&now.saturating_add(1));
            let expired = std::mem::replace(&mut shard.expiry, live);
            for key in expired.into_values().flatten() {
                let hash = key_hash(&self.hasher, &key);
                if let Ok(entry) = shard.map.find_entry(hash, holds(&key)) {
                    entry.remove();
                    removed += 1;
                }
            }
            shard.shrink_if_sparse(&self.hasher, capacity);
        }
        removed
    }

    /// Takes every counter changed since the last drain, with its current
    /// value, and marks it clean.
    pub fn drain_changed(&self) -> Vec<Changed> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let shard = &mut *shard;
            for key in std::mem::take(&mut shard.dirty) {
                let hash = key_hash(&self.hasher, &key);
                if let Some(e) = shard.find_mut(hash, &key) {
                    let c = &mut e.counter;
                    c.dirty = false;
                    out.push(Changed {
                        value: c.value,
                        expires_at: c.expires_at,
                        key,
                    });
                }
            }
        }
        out
    }

    /// Marks counters changed again (after a failed write).
    pub fn mark_changed(&self, keys: impl IntoIterator<Item = Arc<[u8]>>) {
        for key in keys {
            let (hash, mut shard) = self.shard(&key);
            let shard = &mut *shard;
            if let Some(e) = shard.find_mut(hash, &key) {
                let c = &mut e.counter;
                if !c.dirty {
                    c.dirty = true;
                    shard.dirty.push(key);
                }
            }
        }
    }
}

impl CounterStore for MemoryCounters {
    fn apply(&self, ops: &[CounterOp<'_>]) -> Result<super::Values, Error> {
        Ok(self.add_now(ops))
    }

    fn commit(&self) -> impl std::future::Future<Output = Result<(), Error>> + Send {
        std::future::ready(Ok(()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, u64)> {
        self.scan(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &[u8], hits: u64, exp: u64) -> CounterOp<'_> {
        CounterOp::new(key, hits, exp)
    }

    /// The shard comes from hash bits the shard's table does not use for
    /// its buckets: with 6400 keys every shard holds some, and every key is
    /// found again.
    #[test]
    fn keys_spread_over_every_shard_and_are_found_again() {
        let m = MemoryCounters::new(false);
        let keys: Vec<Vec<u8>> = (0..6400).map(|i| format!("key-{i}").into_bytes()).collect();
        for (i, k) in keys.iter().enumerate() {
            m.add_now(&[op(k, i as u64 + 1, 100)]);
        }
        for s in m.shards.iter() {
            let n = s.lock().unwrap().map.len();
            assert!((40..=160).contains(&n), "a shard holds {n} of 6400 keys");
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(m.get(k), i as u64 + 1);
        }
        assert_eq!(m.len(), 6400);
    }
    #[test]
    fn capped_adds_apply_only_within_the_cap_and_links_follow() {
        let m = MemoryCounters::new(true);
        let capped = |hits| op(b"q", hits, 10).when(Cond::Cap(5));
        let linked = |hits| op(b"d", hits, 10).when(Cond::IfPrevApplied);
        assert_eq!(m.add_now(&[capped(3), linked(3)]).to_vec(), vec![3, 3]);
        assert_eq!(
            m.add_now(&[capped(3), linked(3)]).to_vec(),
            vec![6, 3],
            "refused: 6 > 5"
        );
        assert_eq!((m.get(b"q"), m.get(b"d")), (3, 3));
        assert_eq!(m.add_now(&[capped(2), linked(2)]).to_vec(), vec![5, 5]);
        assert_eq!(
            m.add_now(&[capped(0)]).to_vec(),
            vec![5],
            "a check at the cap passes"
        );
        assert_eq!(m.add_now(&[capped(1), linked(1)]).to_vec(), vec![6, 5]);
        assert_eq!((m.get(b"q"), m.get(b"d")), (5, 5));
        let sub = |hits| op(b"q", hits, 10).when(Cond::Sub);
        assert_eq!(m.add_now(&[sub(2)]).to_vec(), vec![3]);
        assert_eq!(m.add_now(&[sub(9)]).to_vec(), vec![0], "saturates at 0");
        assert_eq!(
            m.add_now(&[op(b"none", 4, 10).when(Cond::Sub)]).to_vec(),
            vec![0]
        );
        assert_eq!(m.get(b"none"), 0);
        assert!(m
            .drain_changed()
            .iter()
            .any(|c| &*c.key == b"q" && c.value == 0));
        // IfExists adds to a counter that exists (at 0 too), and creates none.
        let if_exists = |key: &'static [u8]| op(key, 3, 10).when(Cond::IfExists);
        assert_eq!(m.add_now(&[if_exists(b"q")]).to_vec(), vec![3]);
        assert_eq!(m.add_now(&[if_exists(b"absent")]).to_vec(), vec![0]);
        assert_eq!(m.len(), 2, "q and d only");
        // Not applied, so an IfPrevApplied op after it adds nothing.
        assert_eq!(
            m.add_now(&[if_exists(b"absent"), linked(1)]).to_vec(),
            vec![0, 5]
        );
    }

    #[test]
    fn adds_saturate_and_peeks_do_not_create() {
        let m = MemoryCounters::new(true);
        assert_eq!(m.add_now(&[op(b"a", 0, 10)]).to_vec(), vec![0]);
        assert!(m.is_empty());
        assert_eq!(
            m.add_now(&[op(b"a", 2, 10), op(b"a", 3, 10)]).to_vec(),
            vec![2, 5]
        );
        assert_eq!(
            m.add_now(&[op(b"a", u64::MAX, 10)]).to_vec(),
            vec![u64::MAX]
        );
        assert_eq!(m.add_now(&[op(b"a", 0, 10)]).to_vec(), vec![u64::MAX]);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn purge_removes_only_expired() {
        let m = MemoryCounters::new(false);
        m.add_now(&[op(b"a", 1, 10), op(b"b", 1, 20), op(b"c", 1, 11)]);
        assert_eq!(m.purge_expired(9), 0);
        assert_eq!(m.purge_expired(11), 2);
        assert_eq!((m.get(b"a"), m.get(b"b"), m.get(b"c")), (0, 1, 0));
        assert_eq!(m.purge_expired(100), 1);
        assert!(m.is_empty());
    }

    fn map_capacity(m: &MemoryCounters) -> usize {
        m.shards
            .iter()
            .map(|s| s.lock().unwrap().map.capacity())
            .sum()
    }

    #[test]
    fn purge_shrinks_maps_left_mostly_empty_and_keeps_live_counters() {
        let m = MemoryCounters::new(true);
        for i in 0..50_000u32 {
            m.add_now(&[op(&i.to_be_bytes(), 1, 10)]);
        }
        let live: Vec<[u8; 5]> = (0..500u32)
            .map(|i| {
                let [a, b, c, d] = i.to_be_bytes();
                [b'L', a, b, c, d]
            })
            .collect();
        for k in &live {
            m.add_now(&[op(k, 2, 20)]);
        }
        let full = map_capacity(&m);
        assert!(full >= 50_500, "{full}");
        assert_eq!(m.purge_expired(10), 50_000);
        let after = map_capacity(&m);
        assert!(
            after <= full / 16,
            "capacity {after} after purging 99% (was {full})"
        );
        assert_eq!(m.len(), 500);
        assert!(live.iter().all(|k| m.get(k) == 2));
        assert_eq!(
            m.drain_changed().len(),
            500,
            "dirty keys of live counters survive"
        );
        assert_eq!(m.purge_expired(20), 500);
        assert!(m.is_empty());
    }

    #[test]
    fn purge_keeps_the_table_of_a_steady_load() {
        let m = MemoryCounters::new(false);
        for i in 0..20_000u32 {
            m.add_now(&[op(&i.to_be_bytes(), 1, 10 + u64::from(i % 10))]);
        }
        let full = map_capacity(&m);
        // A tenth expires each second: far from a quarter full, no shrink
        // (capacity drops at most by the tombstones of the removed keys;
        // a shrink would halve it at least).
        assert_eq!(m.purge_expired(10), 2_000);
        assert!(
            map_capacity(&m) >= full - 2_000,
            "{} < {full} - 2000",
            map_capacity(&m)
        );
        assert_eq!(m.len(), 18_000);
    }

    #[test]
    fn drain_returns_each_changed_key_once_with_latest_value() {
        let m = MemoryCounters::new(true);
        m.add_now(&[op(b"a", 1, 10), op(b"a", 1, 10), op(b"b", 1, 10)])
            .to_vec();
        let mut d = m.drain_changed();
        d.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(d.len(), 2);
        assert_eq!((&*d[0].key, d[0].value), (&b"a"[..], 2));
        assert!(m.drain_changed().is_empty());
        m.add_now(&[op(b"a", 0, 10)]).to_vec();
        assert!(m.drain_changed().is_empty(), "a peek changes nothing");
        m.add_now(&[op(b"b", 4, 10)]).to_vec();
        assert_eq!(m.drain_changed()[0].value, 5);
    }

    #[test]
    fn concurrent_adds_are_exact() {
        let m = Arc::new(MemoryCounters::new(true));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.add_now(&[op(b"k", 1, 10)]).to_vec();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.get(b"k"), 8000);
    }
}
