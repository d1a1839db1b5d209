//! `envoy.service.ratelimit.v3.RateLimitService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{request_from_proto, RequestLimits};
use super::status::from_storage;
use super::wire::{WireRequest, WireResponse};
use crate::engine::Code;
use crate::limiter::RateLimiter;
use crate::storage::{unix_now_us, CounterStore};

pub use generated::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};

/// `envoy.service.ratelimit.v3.RateLimitService`'s server as tonic generates
/// it (build.rs), answering with a [`WireResponse`] instead of the generated
/// `RateLimitResponse`: the same bytes on the wire.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    include!(concat!(
        env!("OUT_DIR"),
        "/rls_direct/envoy.service.ratelimit.v3.RateLimitService.rs"
    ));
}

/// The RLS gRPC service.
#[derive(Debug)]
pub struct RlsService<S> {
    limiter: Arc<RateLimiter<S>>,
    limits: RequestLimits,
}

impl<S> RlsService<S> {
    /// A service over `limiter` with request bounds `limits`.
    pub fn new(limiter: Arc<RateLimiter<S>>, limits: RequestLimits) -> Self {
        RlsService { limiter, limits }
    }
}

#[tonic::async_trait]
impl<S: CounterStore> RateLimitService for RlsService<S> {
    // No span per call: at the default INFO level even a disabled span's
    // bookkeeping shows in the profile. One DEBUG event carries the fields.
    async fn should_rate_limit(
        &self,
        request: Request<WireRequest>,
    ) -> Result<Response<WireResponse>, Status> {
        let req = request_from_proto(request.into_inner(), &self.limits).inspect_err(|e| {
            tracing::debug!(error = %e, "invalid request");
        })?;
        let decision = self
            .limiter
            .decide(&req, unix_now_us())
            .await
            .map_err(from_storage)?;
        tracing::debug!(
            domain = req.domain,
            descriptors = req.descriptors.len(),
            code = match decision.overall {
                Code::Ok => "OK",
                Code::OverLimit => "OVER_LIMIT",
            },
            "decided"
        );
        Ok(Response::new(WireResponse::new(decision)))
    }
}
