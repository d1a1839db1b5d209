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
            plans::Error::Storage(e) => {
                // An admin call: say so (the decision path's message would
                // point at the rate limit store).
                if e.is_transient() {
                    tracing::warn!(error = %e, "admin write failed: storage unavailable");
                    Status::unavailable(
                        "the change could not be stored (storage unavailable, e.g. a full disk: see the server log); it was not made",
                    )
                } else {
                    tracing::error!(error = %e, "admin call failed");
                    Status::internal("internal error (see the server log)")
                }
            }
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
    if e.is_transient() {
        tracing::warn!(error = %e, "decision failed: storage unavailable");
        Status::unavailable("rate limit storage unavailable")
    } else {
        tracing::error!(error = %e, "decision failed");
        Status::internal("internal error")
    }
}
