//! Sends ShouldRateLimit for N distinct keys with a real gRPC client, for the
//! memory and restart measurements (benches/load/memory.sh).
//!
//! ```text
//! rls_keys ADDR DOMAIN KEY N [options]   one request per value PREFIX0..PREFIX(N-1)
//! rls_keys ADDR DOMAIN KEY --one VALUE   one request; prints what remains
//! ```
//!
//! Each request carries one descriptor with the single entry `KEY=value` and
//! one hit. Every answer must be a gRPC OK with overall code OK; the first
//! error (or an OVER_LIMIT, unless `--allow-over-limit`) stops the run with a
//! non-zero exit. The run is bounded in count (N) and time (`--timeout`).
//!
//! Options: `--concurrency C` requests in flight (default 64), `--connections K`
//! HTTP/2 connections they are spread over (default 4), `--prefix P` (default
//! `key-`), `--start S` first index (default 0), `--timeout SECS` (default
//! 300), `--allow-over-limit`.
//!
//! Prints `sent N ok N over_limit N elapsed_s S rate_per_s R` (or, with
//! `--one`, `VALUE code CODE limit L remaining R`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::proto::common::rate_limit_descriptor::Entry;
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use tonic::transport::{Channel, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Answers received so far (OK, OVER_LIMIT), readable after a timeout.
static OK: AtomicU64 = AtomicU64::new(0);
static OVER: AtomicU64 = AtomicU64::new(0);

const USAGE: &str = "usage: rls_keys ADDR DOMAIN KEY N [--concurrency C] [--connections K] \
[--prefix P] [--start S] [--timeout SECS] [--allow-over-limit]\n       rls_keys ADDR DOMAIN KEY --one VALUE [--timeout SECS]";

#[derive(Debug)]
struct Args {
    addr: String,
    domain: String,
    key: String,
    mode: Mode,
    concurrency: u64,
    connections: usize,
    prefix: String,
    start: u64,
    timeout: Duration,
    allow_over_limit: bool,
}

#[derive(Debug)]
enum Mode {
    Many(u64),
    One(String),
}

fn parse_args() -> Result<Args, BoxError> {
    let mut pos = Vec::new();
    let mut one = None;
    let mut concurrency = 64;
    let mut connections = 4;
    let mut prefix = "key-".to_owned();
    let mut start = 0;
    let mut timeout = 300;
    let mut allow_over_limit = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--one" => one = Some(val("--one")?),
            "--concurrency" => concurrency = val("--concurrency")?.parse()?,
            "--connections" => connections = val("--connections")?.parse()?,
            "--prefix" => prefix = val("--prefix")?,
            "--start" => start = val("--start")?.parse()?,
            "--timeout" => timeout = val("--timeout")?.parse()?,
            "--allow-over-limit" => allow_over_limit = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}").into()),
            _ => pos.push(a),
        }
    }
    let mode = match (one, pos.len()) {
        (Some(v), 3) => Mode::One(v),
        (None, 4) => Mode::Many(pos[3].parse()?),
        _ => return Err(USAGE.into()),
    };
    if concurrency == 0 || connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    let mut pos = pos.into_iter();
    Ok(Args {
        addr: pos.next().ok_or(USAGE)?,
        domain: pos.next().ok_or(USAGE)?,
        key: pos.next().ok_or(USAGE)?,
        mode,
        concurrency,
        connections,
        prefix,
        start,
        timeout: Duration::from_secs(timeout),
        allow_over_limit,
    })
}

fn request(domain: &str, key: &str, value: String) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: key.to_owned(),
                value,
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("?", |c| c.as_str_name())
}

/// Sends `value` once; checks the gRPC status; returns the answer.
async fn send(
    client: &mut RateLimitServiceClient<Channel>,
    args: &Args,
    value: String,
) -> Result<RateLimitResponse, BoxError> {
    let resp = client
        .should_rate_limit(request(&args.domain, &args.key, value.clone()))
        .await
        .map_err(|s| format!("{value}: gRPC error {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if resp.statuses.len() != 1 {
        return Err(format!("{value}: expected 1 status, got {resp:?}").into());
    }
    Ok(resp)
}

async fn run(args: Arc<Args>) -> Result<(), BoxError> {
    let endpoint = Endpoint::from_shared(format!("http://{}", args.addr))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let connections = match args.mode {
        Mode::One(_) => 1,
        Mode::Many(_) => args.connections,
    };
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(endpoint.connect().await?);
    }
    let n = match &args.mode {
        Mode::One(value) => {
            let mut client = RateLimitServiceClient::new(channels.swap_remove(0));
            let resp = send(&mut client, &args, value.clone()).await?;
            let s = &resp.statuses[0];
            let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
            println!(
                "{value} code {} limit {limit} remaining {}",
                code_name(s.code),
                s.limit_remaining
            );
            if resp.overall_code != Code::Ok as i32 && !args.allow_over_limit {
                return Err(format!("{value}: expected overall OK, got {resp:?}").into());
            }
            return Ok(());
        }
        Mode::Many(n) => *n,
    };
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency.min(n.max(1)) {
        let mut client = RateLimitServiceClient::new(channels[w as usize % channels.len()].clone());
        let (args, next) = (args.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), BoxError>(());
                }
                let value = format!("{}{}", args.prefix, args.start + i);
                let resp = send(&mut client, &args, value.clone()).await?;
                if resp.overall_code == Code::Ok as i32 {
                    OK.fetch_add(1, Ordering::Relaxed);
                } else if args.allow_over_limit {
                    OVER.fetch_add(1, Ordering::Relaxed);
                } else {
                    return Err(format!("{value}: expected overall OK, got {resp:?}").into());
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r? {
            workers.abort_all();
            return Err(e);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (ok, over) = (OK.load(Ordering::Relaxed), OVER.load(Ordering::Relaxed));
    println!(
        "sent {n} ok {ok} over_limit {over} elapsed_s {elapsed:.2} rate_per_s {:.0}",
        n as f64 / elapsed.max(1e-9)
    );
    if ok + over != n {
        return Err(format!("only {} of {n} answered", ok + over).into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("rls_keys: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rls_keys: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let timeout = args.timeout;
    let result = runtime.block_on(async { tokio::time::timeout(timeout, run(args)).await });
    // Do not wait for in-flight calls (after a timeout) when the runtime drops.
    runtime.shutdown_background();
    match result {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("rls_keys: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "rls_keys: timed out after {} s with {} ok and {} over-limit answers",
                timeout.as_secs(),
                OK.load(Ordering::Relaxed),
                OVER.load(Ordering::Relaxed)
            );
            std::process::ExitCode::FAILURE
        }
    }
}
