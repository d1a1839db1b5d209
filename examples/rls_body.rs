//! Writes one gRPC request body for a load generator: the 5-byte gRPC
//! message prefix (no compression, big-endian length) and a serialized
//! `RateLimitRequest` with one descriptor of `key=value` entries.
//!
//! `cargo run --example rls_body -- DOMAIN key=value [key=value ...] > body.bin`
//! (h2load: `-d body.bin -H 'content-type: application/grpc' -H 'te: trailers'`).

use std::io::Write;

use prost::Message;
use sluice::proto::common::rate_limit_descriptor::Entry;
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::RateLimitRequest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let domain = args
        .next()
        .ok_or("usage: rls_body DOMAIN key=value [key=value ...]")?;
    let mut entries = Vec::new();
    for a in args {
        let (key, value) = a
            .split_once('=')
            .ok_or_else(|| format!("{a:?}: expected key=value"))?;
        entries.push(Entry {
            key: key.into(),
            value: value.into(),
        });
    }
    let req = RateLimitRequest {
        domain,
        descriptors: vec![RateLimitDescriptor {
            entries,
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let msg = req.encode_to_vec();
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
    out.extend_from_slice(&msg);
    std::io::stdout().write_all(&out)?;
    Ok(())
}
