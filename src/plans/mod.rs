//! Usage plans and API keys, in the spirit of Amazon API Gateway's usage
//! plans: a throttle (token bucket), a calendar quota, stages (the RLS
//! domains a plan governs, with per-method throttles) and keys bound to plans.
//!
//! - [`model`]: plans, keys and their validation (pure); the records are the
//!   on-disk format of the sled trees, so they are a compatibility contract.
//! - [`period`]: calendar periods (DAY/WEEK/MONTH, anchor day, time zone).
//! - [`bucket`]: the token bucket arithmetic (pure, time passed in).
//! - [`catalog`]: the immutable snapshot decisions read: key hash -> key ->
//!   plan for a domain/stage. Swapped atomically after each admin write, so
//!   decisions never wait on the admin path.
//! - [`decide`]: how a plan-governed descriptor is decided (pure parts).
//! - [`usage`]: request, token and spend limits (pure): amounts, per-model
//!   limits, prices, sliding and calendar windows, counter keys.
//! - [`headers`]: OpenAI-style and IETF rate-limit headers for clients.
//! - [`registry`]: the sled-backed store of plans, keys, bindings and quota
//!   grants, and the admin operations on them.

pub mod bucket;
pub mod catalog;
pub mod decide;
pub mod headers;
pub mod model;
pub mod period;
pub mod registry;
pub mod usage;

/// Why an admin operation failed. Each variant maps to one gRPC code in
/// `server::status`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field is invalid; `field` is its path in the request (e.g. `throttle.burst_limit`).
    #[error("{field}: {message}")]
    Invalid {
        /// The field path.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No such plan or key.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// "usage plan", "API key" or "usage plan key".
        kind: &'static str,
        /// The id or name asked for.
        id: String,
    },
    /// A unique name or value is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation is valid but the current state forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
}

impl Error {
    /// An [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Unix seconds to microseconds, saturating.
pub fn micros(secs: i64) -> i64 {
    secs.saturating_mul(1_000_000)
}
