//! proto <-> engine conversion at the API boundary, with request bounds.
//! Only this module, `wire.rs` (answers encoded directly) and `rls.rs` see
//! prost types.

use prost_types::Duration;

use crate::engine::{self, Code, Decision, Descriptor, Entry, LimitOverride, Reason, Unit};
use crate::proto::rls::rate_limit_response::{self as resp, DescriptorStatus};
use crate::proto::rls::RateLimitResponse;
use crate::server::wire::{WireDescriptor, WireRequest};

/// Bounds on request size; a request past any of them is INVALID_ARGUMENT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most descriptors in one request (default 64).
    pub max_descriptors: usize,
    /// Most entries in one descriptor (default 32).
    pub max_entries: usize,
    /// Longest domain or entry key, in bytes (default 1024). Entry values
    /// have no bound of their own (long ones are counted by their digest).
    pub max_key_value_len: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_descriptors: 64,
            max_entries: 32,
            max_key_value_len: 1024,
        }
    }
}

/// Why a request was rejected; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// Bytes off the wire as a string: as they are when they are UTF-8 (no
/// copy), else with each invalid sequence replaced by U+FFFD.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Validates a wire request into an engine request (consuming it, so a
/// UTF-8 string is not copied).
///
/// # Errors
/// [`InvalidRequest`] naming the offending field.
pub fn request_from_proto(
    req: WireRequest,
    limits: &RequestLimits,
) -> Result<engine::Request, InvalidRequest> {
    let bad = |m: String| Err(InvalidRequest(m));
    if req.domain.is_empty() {
        return bad("rate limit domain must not be empty".into());
    }
    if req.descriptors.is_empty() {
        return bad("rate limit descriptor list must not be empty".into());
    }
    if req.domain.len() > limits.max_key_value_len {
        return bad(format!(
            "domain is {} bytes long (max {})",
            req.domain.len(),
            limits.max_key_value_len
        ));
    }
    if req.descriptors.len() > limits.max_descriptors {
        return bad(format!(
            "too many descriptors: {} (max {})",
            req.descriptors.len(),
            limits.max_descriptors
        ));
    }
    // A new vector, not collected in place: a wire descriptor is larger
    // than ours, so an in-place collect shrinks the allocation with a
    // realloc, which costs more than a fresh allocation and a free
    // (callgrind: 432 instructions per call for the realloc alone).
    let mut descriptors = Vec::with_capacity(req.descriptors.len());
    for (i, d) in req.descriptors.into_iter().enumerate() {
        descriptors.push(descriptor_from_proto(i, d, limits)?);
    }
    Ok(engine::Request {
        domain: text(req.domain),
        descriptors,
        hits_addend: req.hits_addend,
    })
}

fn descriptor_from_proto(
    i: usize,
    d: WireDescriptor,
    limits: &RequestLimits,
) -> Result<Descriptor, InvalidRequest> {
    if d.entries.len() > limits.max_entries {
        return Err(InvalidRequest(format!(
            "descriptors[{i}]: too many entries: {} (max {})",
            d.entries.len(),
            limits.max_entries
        )));
    }
    for (j, e) in d.entries.iter().enumerate() {
        if e.key.is_empty() {
            return Err(InvalidRequest(format!(
                "descriptors[{i}].entries[{j}].key must not be empty"
            )));
        }
        // Values have no bound of their own (long ones are counted by their
        // digest, engine::LONG_VALUE): refusing one would let the request
        // through unlimited behind an Envoy that fails open.
        if e.key.len() > limits.max_key_value_len {
            return Err(InvalidRequest(format!(
                "descriptors[{i}].entries[{j}].key is {} bytes long (max {})",
                e.key.len(),
                limits.max_key_value_len
            )));
        }
    }
    // Same layout: collected in place, no new allocation.
    let entries = d
        .entries
        .into_iter()
        .map(|e| Entry {
            key: text(e.key),
            value: text(e.value),
        })
        .collect();
    let limit = match d.limit {
        None => None,
        Some(o) => {
            let Some(unit) = Unit::from_wire(o.unit) else {
                return Err(InvalidRequest(format!(
                    "descriptors[{i}].limit.unit: unknown rate limit unit {} (expected SECOND=1, MINUTE=2, HOUR=3, DAY=4, MONTH=5, YEAR=6 or WEEK=7)",
                    o.unit
                )));
            };
            Some(LimitOverride {
                requests_per_unit: o.requests_per_unit,
                unit,
            })
        }
    };
    Ok(Descriptor {
        entries,
        limit,
        hits_addend: d.hits_addend,
    })
}

fn code(c: Code) -> i32 {
    match c {
        Code::Ok => resp::Code::Ok as i32,
        Code::OverLimit => resp::Code::OverLimit as i32,
    }
}

/// Response header naming why a plan refused a call.
pub const REASON_HEADER: &str = "x-sluice-reason";
/// Response header naming the level (`key` or `customer`) whose limit refused.
pub const SCOPE_HEADER: &str = "x-sluice-scope";

/// The body Envoy sends with a plan refusal (`raw_body`), in the shape of
/// OpenAI's error objects so LLM clients show it.
pub fn reason_body(r: Reason) -> String {
    let message = match r {
        Reason::InvalidKey => {
            "Invalid, disabled or expired API key, or no usage plan for this API."
        }
        Reason::Throttled => "Too many requests: the API key's rate limit is exceeded.",
        Reason::QuotaExceeded => "The API key's quota for this period is used up.",
        Reason::RequestLimit { .. } => "Too many requests: a request limit of the plan is reached.",
        Reason::TokenLimit { .. } => "A token limit of the plan is used up.",
        Reason::BudgetExceeded { .. } => "The spend budget of the plan is used up.",
        Reason::InvalidRequest => "The request's usage descriptor is not valid for a usage plan.",
    };
    format!(
        "{{\"error\":{{\"message\":\"{message}\",\"type\":\"{}\",\"code\":\"{}\"}}}}\n",
        r.as_str(),
        r.as_str()
    )
}

/// Why a plan refused the decision: the reason of the first refused
/// descriptor that has one (a config rule's refusal has none).
pub fn refusal_reason(d: &Decision) -> Option<Reason> {
    // The first refusal that has a reason: a config rule's (or a soft
    // quota-mode) OVER_LIMIT before it has none, and must not hide it.
    d.statuses
        .iter()
        .filter(|s| s.code == Code::OverLimit)
        .find_map(|s| s.reason)
}

/// Builds the wire response for a decision. When a plan refused a
/// descriptor, `x-sluice-reason` (the first refusal's reason) is added to
/// the response headers, so a gateway can map invalid keys to 403.
pub fn response_to_proto(d: Decision) -> RateLimitResponse {
    let reason = refusal_reason(&d);
    let mut response_headers_to_add: Vec<crate::proto::core::HeaderValue> = d
        .headers
        .iter()
        .map(|(k, v)| crate::proto::core::HeaderValue {
            key: k.to_owned(),
            value: v.to_owned(),
            ..Default::default()
        })
        .collect();
    let mut raw_body = Vec::new();
    let mut dynamic_metadata = None;
    if let Some(r) = reason {
        let header = |key: &str, value: &str| crate::proto::core::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        response_headers_to_add.push(header(REASON_HEADER, r.as_str()));
        if matches!(
            r,
            Reason::RequestLimit { .. } | Reason::TokenLimit { .. } | Reason::BudgetExceeded { .. }
        ) {
            response_headers_to_add.push(header(SCOPE_HEADER, r.level()));
        }
        response_headers_to_add.push(header("content-type", "application/json"));
        raw_body = reason_body(r).into_bytes();
        // Envoy emits this under the filter's namespace
        // (envoy.filters.http.ratelimit), where local_reply_config can match
        // it, e.g. to answer invalid-key with 403 (see examples/envoy.yaml).
        dynamic_metadata = Some(prost_types::Struct {
            fields: [(
                "sluice_reason".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(r.as_str().into())),
                },
            )]
            .into(),
        });
    }
    RateLimitResponse {
        response_headers_to_add,
        raw_body,
        dynamic_metadata,
        overall_code: code(d.overall),
        statuses: d
            .statuses
            .into_iter()
            .map(|s| DescriptorStatus {
                code: code(s.code),
                current_limit: s.limit.map(|l| resp::RateLimit {
                    name: l.name.as_deref().unwrap_or_default().to_owned(),
                    requests_per_unit: l.requests_per_unit,
                    unit: l.unit.wire(),
                }),
                limit_remaining: s.remaining,
                duration_until_reset: s.reset_in.map(|secs| Duration {
                    seconds: i64::try_from(secs).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                quota: None,
            })
            .collect(),
        ..Default::default()
    }
}
