//! The `sluice` binary: parses the command line and runs the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use sluice::limiter::{watch_config, ConfigSource, RateLimiter};
use sluice::server::{self, RequestLimits};
use sluice::storage::sled_store::{Durability, SledCounters};
use sluice::telemetry::{self, LogFormat};

/// sluice: an Envoy RLS v3 compatible rate limiter for LLM gateways.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the RateLimitService (plus health and reflection) over gRPC.
    Serve(ServeArgs),
    /// Validate a config directory and exit (0 = valid).
    CheckConfig {
        /// Directory of envoyproxy/ratelimit YAML files, one domain per file.
        #[arg(long, env = "SLUICE_CONFIG_DIR", default_value = "config")]
        config_dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DurabilityArg {
    /// Changed counters are flushed every --flush-interval-ms; a crash loses at most that.
    Interval,
    /// Every acknowledged hit is on disk before the answer (group commit).
    Sync,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Directory of envoyproxy/ratelimit YAML files, one domain per file.
    /// If it does not exist, an embedded default config is served.
    #[arg(long, env = "SLUICE_CONFIG_DIR", default_value = "config")]
    config_dir: PathBuf,
    /// Directory for persisted counters (created if missing).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Address for gRPC (RLS, health, reflection).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormatArg,
    /// How durable an acknowledged hit is.
    #[arg(
        long,
        env = "SLUICE_DURABILITY",
        value_enum,
        default_value = "interval"
    )]
    durability: DurabilityArg,
    /// With --durability interval: how often changed counters are written and flushed.
    #[arg(long, env = "SLUICE_FLUSH_INTERVAL_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    flush_interval_ms: u64,
    /// How often the config dir is checked for changes.
    #[arg(long, env = "SLUICE_RELOAD_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    reload_interval_ms: u64,
    /// Most descriptors in one request.
    #[arg(long, env = "SLUICE_MAX_DESCRIPTORS", default_value_t = 64)]
    max_descriptors: usize,
    /// Most entries in one descriptor.
    #[arg(long, env = "SLUICE_MAX_ENTRIES", default_value_t = 32)]
    max_entries: usize,
    /// Longest descriptor key or value (and domain), in bytes.
    #[arg(long, env = "SLUICE_MAX_KEY_VALUE_LEN", default_value_t = 1024)]
    max_key_value_len: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config_dir } => {
            let cfg = ConfigSource::new(&config_dir).load_initial()?;
            for (domain, file) in &cfg.sources {
                println!("ok: domain {domain} ({})", file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            telemetry::init(match args.log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            });
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut source = ConfigSource::new(&args.config_dir);
    let config = source.load_initial().context("invalid config")?;
    let durability = match args.durability {
        DurabilityArg::Interval => {
            Durability::Interval(Duration::from_millis(args.flush_interval_ms))
        }
        DurabilityArg::Sync => Durability::Sync,
    };
    let store = SledCounters::open(&args.data_dir, durability)?;
    let limiter = Arc::new(RateLimiter::new(config, store.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), config_dir = %args.config_dir.display(), ?durability, "sluice listening on {addr}");
    let watcher = tokio::spawn(watch_config(
        limiter.clone(),
        source,
        Duration::from_millis(args.reload_interval_ms),
    ));
    let limits = RequestLimits {
        max_descriptors: args.max_descriptors,
        max_entries: args.max_entries,
        max_key_value_len: args.max_key_value_len,
    };
    let result = server::serve(listener, limiter, limits, shutdown_signal()).await;
    watcher.abort();
    let closed = store.close().await;
    result.context("gRPC server failed")?;
    closed.context("final flush of counters failed")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term => tracing::info!("received SIGTERM"),
    }
}
