//! The sled-backed counter store: restore, expiry on memory and disk,
//! durability modes and refusal of foreign data.

use std::time::Duration;

use sluice::storage::sled_store::{Durability, SledCounters, Stats};
use sluice::storage::{unix_now, CounterOp, CounterStore, Error};

fn op(key: &[u8], hits: u64, expires_at: u64) -> CounterOp<'_> {
    CounterOp::new(key, hits, expires_at)
}

const SLOW: Durability = Durability::Interval(Duration::from_secs(3600));

#[tokio::test]
async fn counters_survive_close_and_reopen_but_expired_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let now = unix_now();
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    store
        .add(&[op(b"live", 7, now + 3600), op(b"soon", 2, now + 2)])
        .await
        .unwrap();
    store.add(&[op(b"live", 1, now + 3600)]).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    assert_eq!(store.memory().get(b"live"), 8);
    assert_eq!(store.memory().get(b"soon"), 2);
    // Purge as if 10 s later: "soon" is gone from memory and from disk.
    assert_eq!(store.purge(now + 10).unwrap(), 1);
    assert_eq!(
        store.stats(),
        Stats {
            in_memory: 1,
            on_disk: 1
        }
    );
    store.close().await.unwrap();
    drop(store);
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    assert_eq!(store.memory().get(b"soon"), 0);
    assert_eq!(store.memory().get(b"live"), 8);
    store.close().await.unwrap();
}

#[tokio::test]
async fn ever_new_keys_do_not_grow_memory_or_disk_once_expired() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    let base = unix_now();
    for i in 0..2_000u64 {
        let key = i.to_be_bytes();
        // Each key expires at base + 100 + i/100: far enough ahead that the
        // background purge (which runs on the real clock) cannot reach any
        // of them while the test runs; the explicit purges below move time.
        store
            .add(&[op(&key, 1, base + 100 + i / 100)])
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
    assert_eq!(store.stats().in_memory, 2_000);
    assert_eq!(store.stats().on_disk, 2_000);
    store.purge(base + 109).unwrap();
    let half = store.stats();
    assert_eq!(half.in_memory, 1_000);
    assert_eq!(half.on_disk, 1_000);
    store.purge(base + 120).unwrap();
    assert_eq!(
        store.stats(),
        Stats {
            in_memory: 0,
            on_disk: 0
        }
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn interval_mode_writes_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SledCounters::open(dir.path(), Durability::Interval(Duration::from_millis(10))).unwrap();
    let exp = unix_now() + 3600;
    store.add(&[op(b"k", 3, exp)]).await.unwrap();
    // The writer runs every 10 ms; wait (bounded) until it has written.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.read_disk(b"k", exp).unwrap() != Some(3) {
        assert!(std::time::Instant::now() < deadline, "writer never wrote");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_acknowledges_only_durable_hits() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledCounters::open(dir.path(), Durability::Sync).unwrap();
    let exp = unix_now() + 3600;
    let mut tasks = Vec::new();
    for t in 0..16u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 1..=25u64 {
                store.add(&[op(&[t], 1, exp)]).await.unwrap();
                // Every acknowledged hit is already on disk (each task is the
                // only writer of its key, so the disk holds at least n).
                let on_disk = store.read_disk(&[t], exp).unwrap().unwrap_or(0);
                assert!(on_disk >= n, "key {t}: acknowledged {n}, on disk {on_disk}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Read the tree directly after dropping the in-memory state: reopen.
    store.close().await.unwrap();
    drop(store);
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    for t in 0..16u8 {
        assert_eq!(store.memory().get(&[t]), 25);
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn slow_interval_mode_writes_nothing_until_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    let exp = unix_now() + 3600;
    store.add(&[op(b"k", 3, exp)]).await.unwrap();
    assert_eq!(
        store.read_disk(b"k", exp).unwrap(),
        None,
        "writer has not run"
    );
    store.flush().await.unwrap();
    assert_eq!(store.read_disk(b"k", exp).unwrap(), Some(3));
    store.close().await.unwrap();
}

#[tokio::test]
async fn add_after_close_is_a_transient_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    store.close().await.unwrap();
    let err = store
        .add(&[op(b"k", 1, unix_now() + 60)])
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn refuses_a_data_dir_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = SledCounters::open(&file, SLOW).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[tokio::test]
async fn refuses_foreign_format_rather_than_resetting() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("sled")).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", "someone-else/9")
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledCounters::open(dir.path(), SLOW).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("someone-else/9"), "{msg}");
}

#[tokio::test]
async fn refuses_undecodable_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledCounters::open(dir.path(), SLOW).unwrap();
    store.close().await.unwrap();
    drop(store);
    {
        let db = sled::open(dir.path().join("sled")).unwrap();
        db.open_tree("counters")
            .unwrap()
            .insert([9u8, 9, 9], &[1u8][..])
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledCounters::open(dir.path(), SLOW).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
}

/// A data dir in use by a live store is refused with a clear error (after
/// the short retry that covers a store still shutting down), and opens as
/// soon as the first store is closed and dropped.
#[tokio::test]
async fn a_data_dir_in_use_is_refused_then_opens_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let first = SledCounters::open(dir.path(), SLOW).unwrap();
    let err = SledCounters::open(dir.path(), SLOW).expect_err("the dir is in use");
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(text.contains("lock"), "{text}");
    first.close().await.unwrap();
    drop(first);
    let again = SledCounters::open(dir.path(), SLOW).expect("released");
    again.close().await.unwrap();
}
