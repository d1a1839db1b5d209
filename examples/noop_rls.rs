//! A do-nothing RateLimitService: answers every ShouldRateLimit with OK and
//! one OK status per descriptor, doing no other work. It is the ceiling for a
//! tonic unary call on a machine, the baseline `benches/load/run.sh` compares
//! sluice against. Same protos, same tonic server settings as sluice (its
//! connections from `sluice::server::io::incoming`: TCP nodelay, writes not
//! vectored; default HTTP/2 settings, a multi-threaded runtime, jemalloc).
//!
//! `cargo run --release --example noop_rls -- 127.0.0.1:0` prints
//! "noop listening on ADDR".

use sluice::proto::rls::rate_limit_response::{Code, DescriptorStatus};
use sluice::proto::rls::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

/// The same allocator as the sluice binary, so the ratio stays honest.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Noop;

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let n = request.get_ref().descriptors.len();
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                };
                n
            ],
            ..Default::default()
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("noop listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(Noop))
        .serve_with_incoming_shutdown(sluice::server::io::incoming(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
