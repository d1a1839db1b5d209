//! `sluice.usage.v1.UsageService`: ReportUsage, Reserve and Settle for
//! custom gateways, on the RLS port.

use std::sync::Arc;

use prost_types::Duration;
use tonic::{Request, Response, Status};

use crate::engine::Code;
use crate::limiter::{LimitState, RateLimiter, UsageError};
use crate::plans::model::Metric;
use crate::plans::usage::{Usage, MAX_TOKENS_PER_CALL};
use crate::proto::usage as pb;
use crate::proto::usage::usage_service_server::UsageService;
use crate::storage::{unix_now_us, CounterStore};

/// The usage service name, as reflection and health know it.
pub const USAGE_SERVICE: &str = "sluice.usage.v1.UsageService";
/// Default and longest reservation TTL, in seconds.
pub const DEFAULT_TTL_SECS: i64 = 300;
/// Longest reservation TTL, in seconds.
pub const MAX_TTL_SECS: i64 = 3600;
/// Longest request id, in bytes.
pub const MAX_REQUEST_ID: usize = 256;

/// The longest model name ReportUsage and Reserve take
/// ([`crate::plans::usage::MAX_MODEL_NAME`]).
pub const MAX_MODEL: usize = crate::plans::usage::MAX_MODEL_NAME;

fn model(v: &str) -> Result<(), Status> {
    if v.len() > MAX_MODEL {
        return Err(Status::invalid_argument(format!(
            "model: at most {MAX_MODEL} bytes, got {}",
            v.len()
        )));
    }
    Ok(())
}

/// The usage gRPC service.
#[derive(Debug)]
pub struct UsageServer<S> {
    limiter: Arc<RateLimiter<S>>,
}

impl<S> UsageServer<S> {
    /// A service over `limiter`.
    pub fn new(limiter: Arc<RateLimiter<S>>) -> Self {
        UsageServer { limiter }
    }
}

fn tokens(field: &str, v: i64) -> Result<u64, Status> {
    if u64::try_from(v).is_ok_and(|v| v > MAX_TOKENS_PER_CALL) {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {MAX_TOKENS_PER_CALL} per call, got {v}"
        )));
    }
    u64::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("{field}: must be >= 0, got {v}")))
}

fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field}: is required")))
    } else {
        Ok(())
    }
}

fn secs(s: u64) -> Duration {
    Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

fn limits(states: &[LimitState<'_>]) -> Vec<pb::LimitStatus> {
    states
        .iter()
        .map(|s| pb::LimitStatus {
            name: s.name.to_string(),
            tokens: s.metric != Metric::Requests,
            limit: i64::try_from(s.limit).unwrap_or(i64::MAX),
            remaining: i64::try_from(s.remaining).unwrap_or(i64::MAX),
            reset_after: s.reset_in.map(secs),
        })
        .collect()
}

/// The one mapping of usage errors to gRPC status codes.
fn status(e: UsageError) -> Status {
    match e {
        UsageError::NotGoverned { .. } => Status::failed_precondition(e.to_string()),
        UsageError::InvalidKey(_) => Status::permission_denied(e.to_string()),
        UsageError::UnknownReservation(_) => Status::not_found(e.to_string()),
        UsageError::AlreadySettled(_) => Status::already_exists(e.to_string()),
        UsageError::Storage(e) => super::status::from_storage(e),
    }
}

#[tonic::async_trait]
impl<S: CounterStore> UsageService for UsageServer<S> {
    async fn report_usage(
        &self,
        req: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        let r = req.into_inner();
        required("domain", &r.domain)?;
        required("api_key", &r.api_key)?;
        model(&r.model)?;
        if r.request_id.len() > MAX_REQUEST_ID {
            return Err(Status::invalid_argument(format!(
                "request_id: at most {MAX_REQUEST_ID} bytes"
            )));
        }
        let usage = Usage {
            input: tokens("input_tokens", r.input_tokens)?,
            output: tokens("output_tokens", r.output_tokens)?,
            ..Usage::default()
        };
        let id = (!r.request_id.is_empty()).then_some(r.request_id.as_str());
        let out = self
            .limiter
            .report_usage(
                &r.domain,
                &r.stage,
                &r.api_key,
                &r.model,
                usage,
                id,
                unix_now_us(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReportUsageResponse {
            duplicate: out.duplicate,
            limits: limits(&out.states),
        }))
    }

    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let r = req.into_inner();
        required("domain", &r.domain)?;
        required("api_key", &r.api_key)?;
        model(&r.model)?;
        let estimate = Usage {
            input: tokens("input_tokens", r.input_tokens)?,
            output: tokens("output_tokens", r.output_tokens)?,
            ..Usage::default()
        };
        let ttl = match r.ttl {
            None => DEFAULT_TTL_SECS,
            Some(d) if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) => {
                return Err(Status::invalid_argument(
                    "ttl: must be positive (seconds and nanos >= 0, not both 0)",
                ))
            }
            Some(d) if d.seconds > MAX_TTL_SECS || (d.seconds == MAX_TTL_SECS && d.nanos > 0) => {
                return Err(Status::invalid_argument(format!(
                    "ttl: at most {MAX_TTL_SECS} s"
                )))
            }
            Some(d) => d.seconds + i64::from(d.nanos > 0),
        };
        let out = self
            .limiter
            .reserve(
                &r.domain,
                &r.stage,
                &r.api_key,
                &r.model,
                estimate,
                ttl,
                unix_now_us(),
            )
            .await;
        let out = match out {
            Ok(o) => o,
            // An invalid key is a decision here, as in ShouldRateLimit.
            Err(UsageError::InvalidKey(_)) => {
                return Ok(Response::new(pb::ReserveResponse {
                    allowed: false,
                    reason: "invalid-key".into(),
                    ..Default::default()
                }))
            }
            Err(e) => return Err(status(e)),
        };
        let allowed = out.status.code == Code::Ok;
        let reason = out.status.reason;
        Ok(Response::new(pb::ReserveResponse {
            allowed,
            reservation_id: out.id.unwrap_or_default(),
            reason: reason.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            scope: reason
                .filter(|_| !allowed)
                .map(|r| r.level().to_owned())
                .unwrap_or_default(),
            limits: limits(&out.states),
            retry_after: if allowed {
                None
            } else {
                out.status.reset_in.map(|s| secs(s.max(1)))
            },
            headers: out
                .headers
                .iter()
                .map(|(key, value)| pb::Header {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
                .collect(),
        }))
    }

    async fn settle(
        &self,
        req: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let r = req.into_inner();
        required("reservation_id", &r.reservation_id)?;
        let actual = Usage {
            input: tokens("input_tokens", r.input_tokens)?,
            output: tokens("output_tokens", r.output_tokens)?,
            ..Usage::default()
        };
        let settled = self
            .limiter
            .settle(&r.reservation_id, actual, unix_now_us())
            .await
            .map_err(status)?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(Response::new(pb::SettleResponse {
            limits: settled
                .into_iter()
                .map(|(limit, held, charged)| pb::Settled {
                    limit,
                    held: n(held),
                    charged: n(charged),
                })
                .collect(),
        }))
    }
}
