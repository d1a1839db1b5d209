//! Sends one ShouldRateLimit with a real gRPC client and checks the answer is
//! a gRPC OK with overall code OK: h2load counts HTTP 200 even when the gRPC
//! status is an error, so the load script checks a sample this way.
//!
//! `cargo run --example rls_check -- [--save-answer FILE] ADDR DOMAIN key=value [key=value ...]`
//!
//! With `--save-answer`, the answer's encoded bytes are written to FILE (for
//! `noop_rls --answer`).

use sluice::proto::common::rate_limit_descriptor::Entry;
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::RateLimitRequest;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    let usage = "usage: rls_check [--save-answer FILE] ADDR DOMAIN key=value [key=value ...]";
    let save = if args.peek().map(String::as_str) == Some("--save-answer") {
        args.next();
        Some(args.next().ok_or(usage)?)
    } else {
        None
    };
    let addr = args.next().ok_or(usage)?;
    let domain = args.next().ok_or(usage)?;
    let entries = args
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| Entry {
                    key: k.into(),
                    value: v.into(),
                })
                .ok_or_else(|| format!("{a:?}: expected key=value"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut client = RateLimitServiceClient::connect(format!("http://{addr}")).await?;
    let resp = client
        .should_rate_limit(RateLimitRequest {
            domain,
            descriptors: vec![RateLimitDescriptor {
                entries,
                ..Default::default()
            }],
            hits_addend: 1,
        })
        .await?
        .into_inner();
    if resp.overall_code != Code::Ok as i32 {
        return Err(format!("expected overall OK, got {resp:?}").into());
    }
    if let Some(file) = save {
        std::fs::write(&file, prost::Message::encode_to_vec(&resp))
            .map_err(|e| format!("{file}: {e}"))?;
    }
    println!("ok: {resp:?}");
    Ok(())
}
