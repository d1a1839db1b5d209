//! Counters persisted in sled.
//!
//! Decisions only touch [`MemoryCounters`]. A background writer drains the
//! changed counters and writes them to the sled tree `counters` in one batch,
//! then flushes (fsync):
//! - [`Durability::Interval`]: every interval (default 100 ms). A crash loses
//!   at most the hits of the last interval.
//! - [`Durability::Sync`]: an `add` returns only once a flush that covers it
//!   has completed. Group commit: one flush serves every request that arrived
//!   while the previous flush ran.
//!
//! Expired counters are removed from memory and from sled once a second.
//! On open, unexpired counters are restored; anything that does not decode
//! is reported as corruption (never silently reset).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::memory::MemoryCounters;
use super::{keys, unix_now, CounterOp, CounterStore, Error};
use crate::telemetry::OncePerMinute;

const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"sluice-counters/1";

/// How durable an acknowledged hit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Flush changed counters every interval; a crash loses at most one interval.
    Interval(Duration),
    /// Every acknowledged hit is on disk (group commit).
    Sync,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Interval(Duration::from_millis(100))
    }
}

#[derive(Debug)]
struct Shared {
    mem: MemoryCounters,
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
    durability: Durability,
    /// Epoch of the next flush; see [`SledCounters::wait_durable`].
    epoch: AtomicU64,
    /// (last completed epoch, whether it succeeded).
    flushed: watch::Sender<(u64, bool)>,
    wake: Notify,
    stop: Notify,
    stopped: AtomicBool,
    /// Set while a write to disk runs (see [`super::bounded`]).
    busy: Arc<AtomicBool>,
    /// Whether the last write to disk succeeded.
    writes_ok: watch::Sender<bool>,
    /// Failed writes are logged at first, then once a minute.
    write_failed: OncePerMinute,
    /// When the database file was last seen in the data dir (Unix seconds).
    seen_at: AtomicU64,
    /// Failed purges are logged at first, then once a minute.
    purge_failed: OncePerMinute,
}

/// Counters in memory, persisted to sled. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SledCounters {
    shared: Arc<Shared>,
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    /// Purges running on a blocking thread that still hold a handle on the
    /// database: counted before one is spawned, uncounted once it dropped
    /// the handle, so `close` can wait for them (aborting the purge loop
    /// does not stop a blocking task).
    purging: Arc<AtomicUsize>,
}

/// Statistics of a store, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Counters in memory.
    pub in_memory: usize,
    /// Counters on disk.
    pub on_disk: usize,
}

/// Warns when `dir`, not yet holding sluice's database, holds other files
/// (e.g. a config dir given as `--data-dir`): sluice then starts empty
/// beside them, which is rarely what was meant. Not an error: a mounted
/// volume may hold other things (`lost+found` is never reported).
fn warn_if_foreign(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut foreign: Vec<String> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "sled" {
            return; // sluice's database is there: not a fresh start
        }
        if name != "admin-token" && name != "lost+found" {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        tracing::warn!(
            dir = %dir.display(),
            "the data dir holds files that are not sluice's ({}); starting a new database beside them: check --data-dir",
            crate::telemetry::first_five(foreign)
        );
    }
}

impl SledCounters {
    /// Opens (or creates) the store in `dir`, restores unexpired counters and
    /// starts the writer and purge tasks. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Open`] if the directory cannot be opened or is locked by another
    /// process; [`Error::Corrupt`] if its contents are not sluice's.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, Error> {
        let path = dir.to_owned();
        let open_err = |detail: String| Error::Open {
            path: path.clone(),
            detail,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(open_err("not a directory".into()));
        }
        warn_if_foreign(dir);
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        // sled may read a garbage file as an empty log; remember whether a
        // database was there, so an existing one without our marker is refused.
        let existed = ["db", "conf"]
            .iter()
            .any(|f| dir.join("sled").join(f).exists());
        let config = sled::Config::new().path(dir.join("sled"));
        // sled 0.34 may panic on some corrupt files instead of returning an error.
        let try_open = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())).map_err(|_| {
                Error::Corrupt {
                    path: path.clone(),
                    detail: "sled panicked while opening the database".into(),
                }
            })
        };
        // sled releases its file lock when the last internal reference to a
        // closed database is dropped, which may be a moment after `close`
        // returns (a restart in the same process, or a previous process still
        // exiting). Retry a lock conflict for up to 2 s before reporting it.
        let mut opened = try_open()?;
        for _ in 0..40 {
            match &opened {
                // sled reports it as an Other error with this text.
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(Duration::from_millis(50));
                    opened = try_open()?;
                }
                _ => break,
            }
        }
        let db = opened.map_err(|e| match e {
            sled::Error::Corruption { .. } => Error::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            },
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => open_err(
                "locked by another process (is another sluice serving this data dir?)".into(),
            ),
            other => open_err(other.to_string()),
        })?;
        let meta = db.open_tree("meta").map_err(|e| open_err(e.to_string()))?;
        let tree = db
            .open_tree("counters")
            .map_err(|e| open_err(e.to_string()))?;
        match meta.get(FORMAT_KEY).map_err(|e| open_err(e.to_string()))? {
            Some(v) if v.as_ref() == FORMAT => {}
            Some(v) => {
                return Err(Error::Corrupt {
                    path,
                    detail: format!(
                        "unknown format {:?} (this sluice writes {:?})",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(FORMAT)
                    ),
                })
            }
            None if !tree.is_empty() || existed => {
                return Err(Error::Corrupt {
                    path,
                    detail: "an existing database has no sluice format marker (damaged, or not written by sluice); refusing to start empty over it".into(),
                })
            }
            None => {
                meta.insert(FORMAT_KEY, FORMAT)
                    .map_err(|e| open_err(e.to_string()))?;
                db.flush().map_err(|e| open_err(e.to_string()))?;
            }
        }

        let mem = MemoryCounters::new(true);
        let (restored, expired) = restore(&tree, &mem, &path, unix_now())?;
        tracing::info!(path = %path.display(), restored, expired, "counter store opened");

        let (flushed, _) = watch::channel((0, true));
        let shared = Arc::new(Shared {
            mem,
            db,
            tree,
            path,
            durability,
            epoch: AtomicU64::new(1),
            flushed,
            wake: Notify::new(),
            stop: Notify::new(),
            stopped: AtomicBool::new(false),
            busy: Arc::new(AtomicBool::new(false)),
            writes_ok: watch::channel(true).0,
            write_failed: OncePerMinute::new(),
            seen_at: AtomicU64::new(0),
            purge_failed: OncePerMinute::new(),
        });
        let writer = tokio::spawn(writer_loop(shared.clone()));
        let purging = Arc::new(AtomicUsize::new(0));
        let purger = tokio::spawn(purge_loop(shared.clone(), purging.clone()));
        Ok(SledCounters {
            shared,
            tasks: Arc::new(std::sync::Mutex::new(vec![writer, purger])),
            purging,
        })
    }

    /// The sled database, shared with the plan registry (its own trees).
    pub fn db(&self) -> sled::Db {
        self.shared.db.clone()
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The in-memory counters (read access for tests and the admin path).
    pub fn memory(&self) -> &MemoryCounters {
        &self.shared.mem
    }

    /// Counts in memory and on disk.
    pub fn stats(&self) -> Stats {
        Stats {
            in_memory: self.shared.mem.len(),
            on_disk: self.shared.tree.len(),
        }
    }

    /// The value of a counter as written to disk (not what is in memory).
    ///
    /// # Errors
    /// [`Error::Io`] if sled fails; [`Error::Corrupt`] if the value does not decode.
    pub fn read_disk(&self, key: &[u8], expires_at: u64) -> Result<Option<u64>, Error> {
        let raw = self
            .shared
            .tree
            .get(keys::encode(expires_at, key))
            .map_err(|e| Error::Io(e.to_string()))?;
        raw.map(|v| {
            keys::decode_value(&v).ok_or_else(|| Error::Corrupt {
                path: self.shared.path.clone(),
                detail: "undecodable counter value".into(),
            })
        })
        .transpose()
    }

    /// Writes every changed counter and flushes to disk now.
    ///
    /// # Errors
    /// [`Error::Io`] if sled fails.
    pub async fn flush(&self) -> Result<(), Error> {
        flush_once(&self.shared).await
    }

    /// Removes expired counters from memory and disk as of `now`.
    ///
    /// # Errors
    /// [`Error::Io`] if sled fails.
    pub fn purge(&self, now: u64) -> Result<usize, Error> {
        purge_once(&self.shared, now)
    }

    /// Stops the background tasks and performs a final flush. Idempotent.
    ///
    /// # Errors
    /// [`Error::Io`] if the final flush fails.
    pub async fn close(&self) -> Result<(), Error> {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.stop.notify_waiters();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        // A purge in flight stops after its current chunk (it checks
        // `stopped`); wait for it (bounded), so the database is released on
        // return. The loop is stopped, so no new purge starts.
        for _ in 0..10_000 {
            if self.purging.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        flush_once(&self.shared).await
    }

    /// Waits until a flush that started after this call's caller updated its
    /// counters has completed.
    async fn wait_durable(&self) -> Result<(), Error> {
        let shared = &self.shared;
        // Read after our increments: the flush numbered `target` bumps the
        // epoch before draining, so it sees every change made before this read.
        let target = shared.epoch.load(Ordering::SeqCst);
        let mut rx = shared.flushed.subscribe();
        shared.wake.notify_one();
        let state = rx
            .wait_for(|(e, _)| *e >= target)
            .await
            .map_err(|_| Error::Closed)?;
        if state.1 {
            Ok(())
        } else {
            Err(Error::Io("flush to disk failed".into()))
        }
    }
}

impl CounterStore for SledCounters {
    fn apply(&self, ops: &[CounterOp<'_>]) -> Result<super::Values, Error> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(self.shared.mem.add_now(ops))
    }

    async fn commit(&self) -> Result<(), Error> {
        if self.shared.durability == Durability::Sync {
            self.wait_durable().await
        } else {
            Ok(())
        }
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, u64)> {
        self.shared.mem.scan(prefix)
    }

    fn writes_ok(&self) -> Option<watch::Receiver<bool>> {
        Some(self.shared.writes_ok.subscribe())
    }
}

/// Records handed at once from the reader of the tree to the thread that
/// loads them into memory.
const RESTORE_CHUNK: usize = 4096;

/// Expired records removed per sled batch on open. sled keeps a whole batch,
/// and the garbage of its removals, in memory until it is applied: opening
/// a store of 1M expired counters in one batch peaked at 3.3 GB RSS and took
/// 17 s; in chunks of 1000, 0.13 GB and 5 s (2 cores).
const REMOVE_CHUNK: usize = 1000;

/// Loads the unexpired counters of `tree` into `mem` and removes the expired
/// ones from disk, as of `now`; returns how many of each.
///
/// Reading the tree and inserting into memory each take a large share of
/// the time (for 1M counters, ~0.4 s and ~0.8 s of CPU on 2 cores), so this
/// thread reads and a second one inserts, handed chunks of records through
/// a bounded channel.
///
/// # Errors
/// [`Error::Corrupt`] for a record that does not decode; [`Error::Open`] if
/// sled fails.
fn restore(
    tree: &sled::Tree,
    mem: &MemoryCounters,
    path: &Path,
    now: u64,
) -> Result<(usize, usize), Error> {
    let open_err = |e: sled::Error| Error::Open {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(sled::IVec, u64)>>(4);
        let loader = scope.spawn(move || {
            for chunk in rx {
                for (k, value) in chunk {
                    // Decoded once already by the reader.
                    if let Some((exp, key)) = keys::decode(&k) {
                        mem.restore(key, value, exp);
                    }
                }
            }
        });
        let read = (|| {
            let (mut restored, mut removed) = (0, 0);
            let mut chunk = Vec::with_capacity(RESTORE_CHUNK);
            let mut expired = sled::Batch::default();
            let mut pending = 0;
            for item in tree.iter() {
                let (k, v) = item.map_err(open_err)?;
                let corrupt = || Error::Corrupt {
                    path: path.to_owned(),
                    detail: format!("undecodable counter record ({} byte key)", k.len()),
                };
                let (exp, _) = keys::decode(&k).ok_or_else(corrupt)?;
                let value = keys::decode_value(&v).ok_or_else(corrupt)?;
                if exp > now {
                    chunk.push((k, value));
                    restored += 1;
                    if chunk.len() == RESTORE_CHUNK {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(RESTORE_CHUNK));
                        // Fails only if the loader panicked; join reports it.
                        if tx.send(full).is_err() {
                            break;
                        }
                    }
                } else {
                    // Expired records sort first (the key starts with the
                    // expiry); removing those already read is safe.
                    expired.remove(k);
                    pending += 1;
                    if pending == REMOVE_CHUNK {
                        tree.apply_batch(std::mem::take(&mut expired))
                            .map_err(open_err)?;
                        removed += pending;
                        pending = 0;
                    }
                }
            }
            let _ = tx.send(chunk);
            tree.apply_batch(expired).map_err(open_err)?;
            Ok((restored, removed + pending))
        })();
        drop(tx);
        if let Err(panic) = loader.join() {
            std::panic::resume_unwind(panic);
        }
        read
    })
}

/// Whether sled's database file is still in the data dir, looked at once
/// a second: removed while running (a cleanup script, a volume swapped),
/// every write goes to a file nothing will read again.
fn db_file_gone(shared: &Shared) -> bool {
    let now = unix_now();
    if shared.seen_at.load(Ordering::Relaxed) == now {
        return false;
    }
    let here = shared.path.join("sled").join("db").exists();
    if here {
        shared.seen_at.store(now, Ordering::Relaxed);
    }
    !here
}

async fn flush_once(shared: &Shared) -> Result<(), Error> {
    let epoch = shared.epoch.fetch_add(1, Ordering::SeqCst);
    let changed = shared.mem.drain_changed();
    let result = if db_file_gone(shared) {
        Err(Error::Io(format!(
            "the database file {} was removed while sluice runs: nothing written now survives a restart; stop sluice, move {} aside (what is left of it is refused as a damaged database) and start it again (it starts empty)",
            shared.path.join("sled").join("db").display(),
            shared.path.join("sled").display()
        )))
    } else if changed.is_empty() {
        Ok(())
    } else {
        let mut batch = sled::Batch::default();
        for c in &changed {
            batch.insert(keys::encode(c.expires_at, &c.key), &c.value.to_be_bytes());
        }
        let (tree, db) = (shared.tree.clone(), shared.db.clone());
        super::bounded(&shared.busy, "writing counters to disk", move || {
            let io = |e: sled::Error| Error::Io(e.to_string());
            tree.apply_batch(batch).map_err(io)?;
            db.flush().map(|_| ()).map_err(io)
        })
        .await
    };
    let ok = result.is_ok();
    if !ok {
        shared.mem.mark_changed(changed.into_iter().map(|c| c.key));
    }
    shared.flushed.send_replace((epoch, ok));
    // Subscribers (gRPC health) hear of changes only: a value sent again
    // on every flush made Health/Watch repeat SERVING ten times a second.
    let mut was_ok = ok;
    shared.writes_ok.send_if_modified(|v| {
        was_ok = std::mem::replace(v, ok);
        was_ok != ok
    });
    match &result {
        Ok(()) if !was_ok => {
            shared.write_failed.reset();
            tracing::info!(path = %shared.path.display(), "writing counters to disk works again");
        }
        Ok(()) => {}
        Err(e) => {
            // One line per interval would flood the log.
            if shared.write_failed.due() {
                tracing::error!(
                    path = %shared.path.display(),
                    error = %e,
                    "writing counters to disk failed: counters are kept in memory and retried; gRPC health and /healthcheck say NOT_SERVING until a write succeeds (after a failed write sled takes none: restart once the disk is fixed)"
                );
            }
        }
    }
    result
}

async fn writer_loop(shared: Arc<Shared>) {
    loop {
        match shared.durability {
            Durability::Interval(every) => {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shared.stop.notified() => return,
                }
            }
            Durability::Sync => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = shared.stop.notified() => return,
                }
            }
        }
        // Errors are logged in flush_once and the keys retried next time.
        let _ = flush_once(&shared).await;
    }
}

fn purge_once(shared: &Shared, now: u64) -> Result<usize, Error> {
    let removed = shared.mem.purge_expired(now);
    // In chunks: sled holds a whole batch (and the garbage of its removals)
    // in memory until it is applied. Purging 1M expired counters in one
    // batch took 16 s and left RSS at 3.3 GB; in chunks of 1000, 5 s and
    // 0.12 GB (2 cores; BENCHMARKS.md, memory).
    let bound = keys::expiry_bound(now.saturating_add(1));
    let mut on_disk = 0usize;
    while !shared.stopped.load(Ordering::SeqCst) {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in shared.tree.range(..bound.clone()).keys().take(REMOVE_CHUNK) {
            batch.remove(k.map_err(|e| Error::Io(e.to_string()))?);
            n += 1;
        }
        if n == 0 {
            break;
        }
        shared
            .tree
            .apply_batch(batch)
            .map_err(|e| Error::Io(e.to_string()))?;
        on_disk += n;
        if n < REMOVE_CHUNK {
            break;
        }
    }
    tracing::trace!(removed, on_disk, "purged expired counters");
    Ok(removed)
}

async fn purge_loop(shared: Arc<Shared>, purging: Arc<AtomicUsize>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.notified() => return,
        }
        // Off the async workers: a purge of many counters takes seconds.
        purging.fetch_add(1, Ordering::SeqCst);
        let (s, count) = (shared.clone(), purging.clone());
        let purge = move || {
            let result = purge_once(&s, unix_now());
            drop(s);
            count.fetch_sub(1, Ordering::SeqCst);
            result
        };
        match tokio::task::spawn_blocking(purge).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // A failing disk fails every purge, once a second.
                if shared.purge_failed.due() {
                    tracing::error!(error = %e, "purging expired counters failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "the purge task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) -> sled::Tree {
        sled::Config::new()
            .path(dir.join("sled"))
            .open()
            .unwrap()
            .open_tree("counters")
            .unwrap()
    }

    #[test]
    fn restore_loads_live_counters_and_removes_expired_ones_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        // More of each than one chunk, so chunk edges are crossed.
        let (live, dead) = (3 * RESTORE_CHUNK + 7, 2 * REMOVE_CHUNK + 3);
        for i in 0..live {
            let key = format!("live-{i}");
            tree.insert(
                keys::encode(1_000 + i as u64 % 5, key.as_bytes()),
                &(i as u64).to_be_bytes(),
            )
            .unwrap();
        }
        for i in 0..dead {
            let key = format!("dead-{i}");
            tree.insert(
                keys::encode(100 + i as u64 % 5, key.as_bytes()),
                &1u64.to_be_bytes(),
            )
            .unwrap();
        }
        let mem = MemoryCounters::new(true);
        assert_eq!(restore(&tree, &mem, dir.path(), 999).unwrap(), (live, dead));
        assert_eq!(mem.len(), live);
        assert!((0..live).all(|i| mem.get(format!("live-{i}").as_bytes()) == i as u64));
        assert_eq!(mem.get(b"dead-0"), 0);
        assert_eq!(tree.len(), live, "expired records are gone from disk");
        assert!(
            mem.drain_changed().is_empty(),
            "restored counters are not changes"
        );
    }

    #[test]
    fn restore_refuses_an_undecodable_record_after_many_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        for i in 0..2 * RESTORE_CHUNK {
            tree.insert(
                keys::encode(1_000, format!("k{i}").as_bytes()),
                &1u64.to_be_bytes(),
            )
            .unwrap();
        }
        tree.insert(keys::encode(2_000, b"bad"), &[1u8, 2, 3][..])
            .unwrap();
        let err = restore(&tree, &MemoryCounters::new(true), dir.path(), 999).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    }
}
