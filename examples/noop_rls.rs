//! A do-nothing RateLimitService: answers every ShouldRateLimit with OK and
//! one OK status per descriptor, doing no other work. It is the ceiling for a
//! tonic unary call on a machine, the baseline `benches/load/run.sh` compares
//! sluice against. Same protos, same tonic server settings as sluice (its
//! connections from `sluice::server::io::incoming` with sluice's default
//! bounds: TCP nodelay, writes not vectored, idle connections closed, at most
//! 4096 connections and 1024 streams per connection; default HTTP/2 settings, a multi-threaded runtime, jemalloc).
//!
//! `cargo run --release --example noop_rls -- 127.0.0.1:0` prints
//! "noop listening on ADDR".
//!
//! `noop_rls ADDR --answer FILE` answers every call with the bytes of FILE
//! instead (an encoded `RateLimitResponse`, e.g. one sluice gave, saved by
//! `rls_check --save-answer`), through sluice's own answer type: still no
//! work per call beyond copying those bytes. `benches/load/floor.sh` uses it
//! to measure what a larger request and answer alone cost.

use sluice::proto::rls::rate_limit_response::{Code, DescriptorStatus};
use sluice::proto::rls::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use sluice::server::wire::{WireRequest, WireResponse};
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

/// Answers every call with the same encoded answer.
struct Canned(Vec<u8>);

#[tonic::async_trait]
impl sluice::server::rls::RateLimitService for Canned {
    async fn should_rate_limit(
        &self,
        _request: Request<WireRequest>,
    ) -> Result<Response<WireResponse>, Status> {
        Ok(Response::new(WireResponse::Encoded(self.0.clone())))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: noop_rls [ADDR] [--answer FILE]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, answer) = match args.as_slice() {
        [] => ("127.0.0.1:0", None),
        [addr] => (addr.as_str(), None),
        [addr, flag, file] if flag == "--answer" => (addr.as_str(), Some(file)),
        _ => return Err(usage.into()),
    };
    let answer = match answer {
        Some(file) => {
            let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            // Refuse what a client could not decode.
            <RateLimitResponse as prost::Message>::decode(bytes.as_slice())
                .map_err(|e| format!("{file}: not a RateLimitResponse: {e}"))?;
            Some(bytes)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("noop listening on {}", listener.local_addr()?);
    // The same connection bounds and stream cap as sluice's defaults.
    let conn = sluice::server::io::ConnLimits::default();
    let mut builder = tonic::transport::Server::builder().max_concurrent_streams(conn.max_streams);
    let router = match answer {
        Some(bytes) => builder.add_service(sluice::server::rls::RateLimitServiceServer::new(
            Canned(bytes),
        )),
        None => builder.add_service(RateLimitServiceServer::new(Noop)),
    };
    router
        .serve_with_incoming_shutdown(sluice::server::io::incoming(listener, conn), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
