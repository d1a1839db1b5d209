//! The application service: one config snapshot, one counter store, and the
//! engine between them. Async, but knows nothing about tonic or prost; the
//! server, tests and benches all drive it.
//!
//! ```
//! use sluice::{config, engine::{Code, Descriptor, Entry, Request}, limiter::RateLimiter,
//!              storage::memory::MemoryCounters};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let limiter = RateLimiter::new(config::embedded_default().unwrap(), MemoryCounters::default());
//! let req = Request {
//!     domain: "llm-gateway".into(),
//!     descriptors: vec![Descriptor { entries: vec![Entry::new("remote_address", "10.0.0.1")], ..Default::default() }],
//!     hits_addend: 0,
//! };
//! let decision = limiter.should_rate_limit(&req, 1_000).await.unwrap();
//! assert_eq!(decision.overall, Code::Ok);
//! assert_eq!(decision.statuses[0].remaining, 9); // 10 per second
//! # });
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{self, Config};
use crate::engine::{self, Decision, Request, Slot};
use crate::storage::{self, CounterOp, CounterStore};

/// Decides requests against the current config and a counter store.
#[derive(Debug)]
pub struct RateLimiter<S> {
    config: ArcSwap<Config>,
    store: S,
}

impl<S: CounterStore> RateLimiter<S> {
    /// A limiter over `config` and `store`.
    pub fn new(config: Config, store: S) -> Self {
        RateLimiter {
            config: ArcSwap::from_pointee(config),
            store,
        }
    }

    /// Replaces the config; the next decision uses it.
    pub fn set_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The counter store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Decides a validated request at `now` (Unix seconds).
    ///
    /// # Errors
    /// The store's error, if it could not count (durable mode only).
    pub async fn should_rate_limit(
        &self,
        req: &Request,
        now: u64,
    ) -> Result<Decision, storage::Error> {
        let slots = self.config.load().rules.plan(req, now);
        let ops = counter_ops(&slots);
        let values = if ops.is_empty() {
            Vec::new()
        } else {
            self.store.add(&ops).await?
        };
        Ok(engine::decide(&slots, &values, now))
    }
}

/// The counter updates of a plan: one per [`Slot::Counted`], in slot order,
/// as [`engine::decide`] expects their values back.
pub fn counter_ops(slots: &[Slot]) -> Vec<CounterOp<'_>> {
    slots
        .iter()
        .filter_map(|s| match s {
            Slot::Counted(c) => Some(CounterOp::new(&c.key.0, c.hits, c.window.end)),
            _ => None,
        })
        .collect()
}

/// Where the config comes from: a directory watched for changes, or the
/// embedded default while that directory does not exist.
#[derive(Debug)]
pub struct ConfigSource {
    dir: PathBuf,
    last: Option<Vec<(PathBuf, String)>>,
}

impl ConfigSource {
    /// A source for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ConfigSource {
            dir: dir.into(),
            last: None,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The initial config: the directory's files, or the embedded default when
    /// the directory does not exist.
    ///
    /// # Errors
    /// A config error naming file, line and field.
    pub fn load_initial(&mut self) -> Result<Config, config::Error> {
        if !self.dir.exists() {
            tracing::info!(
                dir = %self.dir.display(),
                "config dir not found: serving the embedded default config (domain llm-gateway)"
            );
            return config::embedded_default();
        }
        let files = config::read_dir(&self.dir)?;
        let cfg = config::from_files(&files)?;
        self.last = Some(files);
        Ok(cfg)
    }

    /// Re-reads the directory; `Ok(Some(config))` when its files changed and
    /// are valid, `Ok(None)` when nothing changed (or the directory is gone,
    /// in which case the last config keeps serving).
    ///
    /// # Errors
    /// A config error; the caller keeps the last good config.
    pub fn poll(&mut self) -> Result<Option<Config>, config::Error> {
        if !self.dir.exists() {
            return Ok(None);
        }
        let files = config::read_dir(&self.dir)?;
        if self.last.as_ref() == Some(&files) {
            return Ok(None);
        }
        let result = config::from_files(&files);
        // Remember the files even when invalid, so one bad edit is logged once.
        self.last = Some(files);
        result.map(Some)
    }
}

/// Polls `source` every `every` and swaps valid changes into `limiter`;
/// an invalid change is logged and the last good config keeps serving.
/// Runs until the task is dropped or aborted.
pub async fn watch_config<S: CounterStore>(
    limiter: Arc<RateLimiter<S>>,
    mut source: ConfigSource,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let dir = source.dir().to_owned();
        match tokio::task::spawn_blocking(move || {
            let r = source.poll();
            (source, r)
        })
        .await
        {
            Ok((s, result)) => {
                source = s;
                match result {
                    Ok(Some(cfg)) => {
                        let domains: Vec<&String> = cfg.sources.keys().collect();
                        tracing::info!(dir = %dir.display(), ?domains, "config reloaded");
                        limiter.set_config(cfg);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "config reload rejected; the last good config keeps serving");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload task failed");
                return;
            }
        }
    }
}
