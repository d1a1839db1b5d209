//! The one place where library errors become `tonic::Status`.

use tonic::Status;

use super::convert::InvalidRequest;
use crate::{plans, storage};

impl From<plans::Error> for Status {
    fn from(e: plans::Error) -> Self {
        match e {
            plans::Error::Invalid { .. } => Status::invalid_argument(e.to_string()),
            plans::Error::NotFound { .. } => Status::not_found(e.to_string()),
            plans::Error::AlreadyExists(m) => Status::already_exists(m),
            plans::Error::FailedPrecondition(m) => Status::failed_precondition(m),
            // An admin call: say so (the decision path's message would
            // point at the rate limit store).
            plans::Error::Storage(e) => storage_status(
                e,
                "admin write failed",
                "the change could not be stored (storage unavailable, e.g. a full disk: see the server log); it was not made",
            ),
        }
    }
}

impl From<InvalidRequest> for Status {
    fn from(e: InvalidRequest) -> Self {
        Status::invalid_argument(e.0)
    }
}

/// Maps a storage failure. Transient errors become UNAVAILABLE: Envoy treats
/// an error (not UNKNOWN-then-allow) per its `failure_mode_deny`, so the
/// operator's choice applies. Details are logged here, never sent.
pub fn from_storage(e: storage::Error) -> Status {
    storage_status(e, "decision failed", "rate limit storage unavailable")
}

/// A storage failure of `what`: UNAVAILABLE with `unavailable` when it is
/// transient, else INTERNAL; logged with its details either way, at most
/// once a minute (with how many more there were): a failing disk under a
/// sync-durability store fails every call, and one line each would flood
/// the log.
fn storage_status(e: storage::Error, what: &str, unavailable: &str) -> Status {
    use std::sync::atomic::{AtomicU64, Ordering};
    static GATE: crate::telemetry::OncePerMinute = crate::telemetry::OncePerMinute::new();
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    let log = GATE.due();
    let more = if log {
        UNLOGGED.swap(0, Ordering::Relaxed)
    } else {
        UNLOGGED.fetch_add(1, Ordering::Relaxed);
        0
    };
    if e.is_transient() {
        if log {
            tracing::warn!(error = %e, unlogged_since_last = more, "{what}: storage unavailable");
        }
        Status::unavailable(unavailable)
    } else {
        if log {
            tracing::error!(error = %e, unlogged_since_last = more, "{what}");
        }
        Status::internal("internal error")
    }
}
