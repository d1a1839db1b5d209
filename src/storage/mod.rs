//! Counter storage behind the [`CounterStore`] trait.
//!
//! - [`memory::MemoryCounters`]: sharded in-memory counters, the hot path.
//!   No global lock: a key hashes to one of [`memory::SHARDS`] mutexes.
//! - [`sled_store::SledCounters`]: the memory counters, persisted to sled by
//!   a background writer that batches changed counters, with a group-commit
//!   mode that makes every acknowledged hit durable.
//! - [`keys`]: the on-disk key encoding (a compatibility contract).
//!
//! Storage knows nothing about rules or the wire; it adds hits to opaque keys.

pub mod buckets;
pub mod keys;
pub mod memory;
pub mod sled_store;

use std::future::Future;
use std::path::PathBuf;

/// One counter update: add `hits` to `key`, which expires at `expires_at`.
#[derive(Clone, Copy, Debug)]
pub struct CounterOp<'a> {
    /// The opaque counter key.
    pub key: &'a [u8],
    /// Hits to add; 0 reads the counter without creating it.
    pub hits: u64,
    /// Unix second at which the counter's window ends and it may be dropped.
    pub expires_at: u64,
    /// When the add applies.
    pub cond: Cond,
}

impl<'a> CounterOp<'a> {
    /// An unconditional add.
    pub fn new(key: &'a [u8], hits: u64, expires_at: u64) -> Self {
        CounterOp {
            key,
            hits,
            expires_at,
            cond: Cond::Always,
        }
    }

    /// The same op with condition `cond`.
    pub fn when(self, cond: Cond) -> Self {
        CounterOp { cond, ..self }
    }
}

/// When a [`CounterOp`] is applied. The check and the add are one atomic
/// step per counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Always add (upstream semantics: hits over the limit still count).
    Always,
    /// Add only if the value after the add is at most this cap; otherwise
    /// add nothing and report the value the add would have produced.
    Cap(u64),
    /// Add only if the previous op of the same call was applied; otherwise
    /// add nothing and report the current value.
    IfPrevApplied,
    /// Subtract `hits` instead (saturating at 0): a refund or a rollback.
    /// An absent counter stays absent.
    Sub,
    /// Add only to a counter that exists (one at 0 does); an absent one
    /// stays absent and reports 0.
    IfExists,
}

/// Counter values returned by [`CounterStore::apply`], in op order. Inline
/// for up to eight ops (a plan with a quota and three usage limits makes
/// six), so the hot path does not allocate for them.
pub type Values = smallvec::SmallVec<[u64; 8]>;

/// A store of windowed counters.
///
/// Updates are applied in memory at once ([`apply`](Self::apply)) and made
/// durable, as far as the store's durability setting promises, by
/// [`commit`](Self::commit). A decision applies all its ops (counts,
/// refusals' rollbacks) without awaiting and commits once before it answers,
/// so deciding needs no large future and a durable store waits once per
/// decision, not once per update.
pub trait CounterStore: Send + Sync + 'static {
    /// Adds each op's hits (saturating at `u64::MAX`) where its [`Cond`]
    /// allows, and returns the values after the add, in op order (for a
    /// refused [`Cond::Cap`] op, the value the add would have produced). Each
    /// counter is updated atomically; the ops of one call are not one
    /// transaction (nor are they upstream). Not yet durable: see
    /// [`commit`](Self::commit).
    ///
    /// # Errors
    /// [`Error::Closed`] once the store is shutting down.
    fn apply(&self, ops: &[CounterOp<'_>]) -> Result<Values, Error>;

    /// Waits until every op applied before this call is as durable as the
    /// store promises before an answer: on disk in a sync-durability store;
    /// at once for the others (their writes reach disk in the background).
    ///
    /// # Errors
    /// [`Error`] when the store could not make the updates durable.
    fn commit(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// [`apply`](Self::apply), then [`commit`](Self::commit) if any op
    /// changes a counter.
    ///
    /// # Errors
    /// As for `apply` and `commit`.
    fn add(&self, ops: &[CounterOp<'_>]) -> impl Future<Output = Result<Values, Error>> + Send {
        async move {
            let values = self.apply(ops)?;
            if ops.iter().any(|o| o.hits > 0) {
                self.commit().await?;
            }
            Ok(values)
        }
    }

    /// Every live counter whose key starts with `prefix`, with its value.
    /// A full scan: for the admin path (usage reports), never for decisions.
    fn scan_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, u64)>;

    /// Whether the store's writes to disk work, as it changes (`true`:
    /// the last write succeeded); `None` for a store that writes nothing.
    /// The server reports it through gRPC health.
    fn writes_ok(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// A storage error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data directory could not be opened.
    #[error("cannot open data dir {}: {detail}", path.display())]
    Open {
        /// The data directory.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The stored data is not what sluice wrote: refuse it rather than reset.
    #[error("data dir {} is corrupt or not a sluice data dir: {detail}", path.display())]
    Corrupt {
        /// The data directory.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A read or write failed; retrying may work.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The store is shutting down.
    #[error("storage is shutting down")]
    Closed,
}

impl Error {
    /// Whether retrying may succeed. The server maps transient errors to
    /// UNAVAILABLE so Envoy's `failure_mode_deny` applies.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Io(_) | Error::Closed)
    }
}

/// How long a write to disk may take before it counts as stalled. sled
/// 0.34 never completes a flush once a write to its log failed (a full
/// disk, a file size limit): without a bound, the writer, every decision of
/// a sync-durability store, admin writes and the shutdown's final flush
/// would wait forever.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs blocking disk work `f` off the async workers, waiting at most
/// [`STALL_TIMEOUT`]. `busy` is set while such work runs: a call that finds
/// it set fails at once instead of queueing behind a write that may never
/// complete (the stalled thread is left to finish, or not).
///
/// # Errors
/// `f`'s error; [`Error::Io`] naming `what` when the disk does not answer in
/// time, when earlier work is still stuck, or when `f` panicked.
pub async fn bounded<T: Send + 'static>(
    busy: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    what: &str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    use std::sync::atomic::Ordering;
    if busy.swap(true, Ordering::SeqCst) {
        return Err(Error::Io(format!(
            "{what}: an earlier write to disk has not completed (storage stalled; restart once the disk is fixed)"
        )));
    }
    let flag = busy.clone();
    let task = tokio::task::spawn_blocking(move || {
        let r = f();
        flag.store(false, Ordering::SeqCst);
        r
    });
    match tokio::time::timeout(STALL_TIMEOUT, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            busy.store(false, Ordering::SeqCst);
            Err(Error::Io(format!("{what}: {e}")))
        }
        Err(_) => Err(Error::Io(format!(
            "{what}: the disk did not answer within {} s (storage stalled; restart once the disk is fixed)",
            STALL_TIMEOUT.as_secs()
        ))),
    }
}

/// The current Unix time in seconds, from the system clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current Unix time in microseconds, from the system clock.
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
