//! Logging setup: `tracing` to stderr, level from `RUST_LOG` (default
//! `info`), as text or JSON. Called once, from `main`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Calling it twice is harmless (the second
/// call does nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (the reader of stderr went
        // away: a log shipper restarting, `| head`) is dropped. By default
        // the subscriber reports it with `eprintln!`, which panics on the
        // same broken pipe, in whatever task was logging: the signal
        // handler's, and SIGTERM was then never acted on.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A log line's gate for a condition that repeats (a failing disk, a full
/// connection table): the first time, then at most once a minute, so the
/// log says it without flooding. Shared across threads; the first caller
/// past the mark logs.
#[derive(Debug, Default)]
pub struct OncePerMinute {
    /// Unix second of the last line let through (0: none yet).
    last: std::sync::atomic::AtomicU64,
}

impl OncePerMinute {
    /// A gate that lets the first line through.
    pub const fn new() -> Self {
        OncePerMinute {
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now (and if so, the minute starts).
    pub fn due(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::storage::unix_now();
        let last = self.last.load(Ordering::Relaxed);
        now >= last.saturating_add(60)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Lets the next line through (the condition ended; its return is news).
    pub fn reset(&self) {
        self.last.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The first five of `names` (in their order), then how many more: how a
/// log line lists files without growing with them (`a, b, c, d, e and 7
/// more`).
pub fn first_five<I: IntoIterator<Item = String>>(names: I) -> String {
    let names: Vec<String> = names.into_iter().collect();
    let more = names.len().saturating_sub(5);
    let shown = names[..names.len().min(5)].join(", ");
    if more > 0 {
        format!("{shown} and {more} more")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn once_per_minute_lets_the_first_through_then_waits() {
        let g = super::OncePerMinute::new();
        assert!(g.due());
        assert!(!g.due());
        g.reset();
        assert!(g.due());
    }

    #[test]
    fn first_five_names_five_then_counts_the_rest() {
        let names = |n: usize| (0..n).map(|i| format!("f{i}"));
        assert_eq!(super::first_five(names(2)), "f0, f1");
        assert_eq!(super::first_five(names(5)), "f0, f1, f2, f3, f4");
        assert_eq!(super::first_five(names(7)), "f0, f1, f2, f3, f4 and 2 more");
    }
}
