//! The `sluice` binary: parses the command line and runs the server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use sluice::declarative;
use sluice::limiter::{watch_config, ConfigSource, RateLimiter};
use sluice::plans::registry::Registry;
use sluice::server::admin::AuthInterceptor;
use sluice::server::{self, RequestLimits};
use sluice::storage::sled_store::{Durability, SledCounters};
use sluice::telemetry::{self, LogFormat};

/// jemalloc instead of glibc malloc: a gRPC call allocates ~50 times (h2,
/// tonic, the decision), and glibc's malloc/free cost ~12% of a pinned
/// server's cycles; and freed memory goes back to the OS (jemalloc's
/// background thread purges it even while every other thread idles), where
/// glibc kept nearly all of a 1M-key burst and mimalloc kept growing while
/// sled compacted after the purge (BENCHMARKS.md, memory). The do-nothing
/// baseline uses it too.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Create or update usage plans, API keys and bindings from a YAML file,
    /// by name, through the admin API (idempotent).
    Apply {
        /// The plans file (see examples/plans.yaml).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete plans and keys that the file does not list.
        #[arg(long)]
        prune: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the current plans, keys and bindings in the `apply` format.
    Export {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Validate a config directory and exit (0 = valid).
    CheckConfig {
        /// Directory of envoyproxy/ratelimit YAML files, one domain per file
        /// (must exist).
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
    /// Directory of envoyproxy/ratelimit YAML files, one domain per file
    /// [default: config]. A directory named here (or in SLUICE_CONFIG_DIR)
    /// must exist; without either, a missing ./config serves an embedded
    /// example config.
    #[arg(long, env = "SLUICE_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Directory for persisted counters (created if missing).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Address for gRPC (RLS, health, reflection).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8081", value_parser = listen_addr)]
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
    #[arg(long, env = "SLUICE_MAX_DESCRIPTORS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_descriptors: u32,
    /// Most entries in one descriptor.
    #[arg(long, env = "SLUICE_MAX_ENTRIES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_entries: u32,
    /// Longest domain or descriptor entry key, in bytes. Entry values have
    /// no bound of their own: values over 1024 bytes are counted by their
    /// SHA-256 digest.
    #[arg(long, env = "SLUICE_MAX_KEY_VALUE_LEN", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=(4 << 20)))]
    max_key_value_len: u32,
    /// Most connections open at once, per port; past it new ones are closed
    /// at once (keep it below the process's open-file limit).
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Close a connection nothing was read from for this long, in seconds.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout_secs: u64,
    /// Most calls in flight on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_streams: u32,
    /// Address of the admin API (usage plans and API keys), with its own
    /// health and reflection.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "127.0.0.1:8082", value_parser = listen_addr)]
    admin_listen: SocketAddr,
    /// Address for envoyproxy/ratelimit's HTTP endpoints (GET /healthcheck,
    /// POST /json; upstream's port 8080). Off unless given.
    #[arg(long, env = "SLUICE_HTTP_LISTEN", value_parser = listen_addr)]
    http_listen: Option<SocketAddr>,
    #[command(flatten)]
    token: TokenArgs,
    /// A second token that may only read (Get, List, GetUsage); writes with
    /// it get PERMISSION_DENIED.
    #[arg(long, env = "SLUICE_ADMIN_READ_TOKEN", hide_env_values = true)]
    admin_read_token: Option<String>,
    /// On SIGTERM/SIGINT, how long in-flight calls and open connections may
    /// take to finish before they are dropped.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    drain_timeout_ms: u64,
    /// Days of daily usage history kept per key.
    #[arg(long, env = "SLUICE_USAGE_RETENTION_DAYS", default_value_t = sluice::limiter::DEFAULT_USAGE_RETENTION_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=3660))]
    usage_retention_days: u32,
}

/// How `apply` and `export` reach the admin API.
#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// Admin API address.
    #[arg(long, env = "SLUICE_ADMIN_ADDR", default_value = "127.0.0.1:8082")]
    admin_addr: String,
    /// The server's data directory, where the default token file is.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    #[command(flatten)]
    token: TokenArgs,
}

impl ClientArgs {
    async fn connect(&self) -> anyhow::Result<declarative::Client> {
        let token = self.token.read(&self.data_dir)?;
        Ok(declarative::Client::connect(&self.admin_addr, &token).await?)
    }
}

/// Where the admin token comes from.
#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The admin bearer token. Without it, the token file is used; `serve`
    /// generates one there on first start.
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    admin_token: Option<String>,
    /// File holding the admin token [default: <data-dir>/admin-token].
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

impl TokenArgs {
    fn file(&self, data_dir: &Path) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| data_dir.join(ADMIN_TOKEN_FILE))
    }

    /// The token for a client: the flag, else the token file.
    fn read(&self, data_dir: &Path) -> anyhow::Result<String> {
        if let Some(t) = &self.admin_token {
            return check_token(t.trim().to_owned(), "--admin-token (or SLUICE_ADMIN_TOKEN)");
        }
        let path = self.file(data_dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no admin token: pass --admin-token (or SLUICE_ADMIN_TOKEN) or --admin-token-file; cannot read {}",
                path.display()
            )
        })?;
        check_token(text.trim().to_owned(), &path.display().to_string())
    }

    /// The token for the server: the flag, else the token file, generated
    /// (mode 0600) when it does not exist.
    fn read_or_generate(&self, data_dir: &Path) -> anyhow::Result<String> {
        if self.admin_token.is_some() {
            return self.read(data_dir);
        }
        let path = self.file(data_dir);
        if path.exists() {
            let token = self.read(data_dir)?;
            tracing::info!(file = %path.display(), "admin token read from file");
            return Ok(token);
        }
        let token = sluice::plans::registry::new_key_value()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .replacen("slk_", "sla_", 1);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(&path)
            .with_context(|| format!("writing the admin token to {}", path.display()))?;
        std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing the admin token to {}", path.display()))?;
        tracing::info!(file = %path.display(), "generated an admin token and stored it in the file (mode 0600); send it as `authorization: Bearer <token>`");
        Ok(token)
    }
}

fn check_token(token: String, from: &str) -> anyhow::Result<String> {
    if token.is_empty() {
        anyhow::bail!("the admin token from {from} is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!("the admin token from {from} must be printable ASCII without spaces");
    }
    // Clients send it in a header, and HTTP/2 header lists are capped
    // (16 KiB by default): a longer token could never be sent.
    if token.len() > MAX_TOKEN_LEN {
        anyhow::bail!(
            "the admin token from {from} is {} bytes long; at most {MAX_TOKEN_LEN} (clients send it in a header)",
            token.len()
        );
    }
    Ok(token)
}

const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The longest admin token accepted.
const MAX_TOKEN_LEN: usize = 4096;

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
            // Warnings about what loads but is not implemented go to stderr.
            telemetry::init(telemetry::LogFormat::Text);
            if !config_dir.exists() {
                anyhow::bail!(
                    "{}: config dir not found (give the directory of config files with --config-dir or SLUICE_CONFIG_DIR)",
                    config_dir.display()
                );
            }
            let cfg = ConfigSource::new(&config_dir)
                .load_initial()
                .context("invalid config")?;
            for (domain, file) in &cfg.sources {
                println!("ok: domain {domain} ({})", file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply {
            file,
            dry_run,
            prune,
            client,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let spec = declarative::parse_spec(&file, &text)?;
            let lines = declarative::Lines::of(&file, &text);
            client_runtime()?.block_on(async {
                let mut c = client.connect().await?;
                let changes = declarative::plan_changes(&mut c, &spec, prune)
                    .await
                    .map_err(|e| lines.place(e))?;
                if dry_run {
                    print!("{changes}");
                    return Ok(ExitCode::SUCCESS);
                }
                let mut out = std::io::stdout().lock();
                declarative::apply_changes(&mut c, &changes, &mut out).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Export { client } => client_runtime()?.block_on(async {
            let mut c = client.connect().await?;
            print!("{}", declarative::export(&mut c).await?);
            Ok(ExitCode::SUCCESS)
        }),
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

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let mut source = match &args.config_dir {
        Some(dir) => ConfigSource::new(dir),
        None => ConfigSource::with_default("config"),
    };
    let config = source.load_initial().context("invalid config")?;
    let source_dir = source.dir().to_path_buf();
    let durability = match args.durability {
        DurabilityArg::Interval => {
            Durability::Interval(Duration::from_millis(args.flush_interval_ms))
        }
        DurabilityArg::Sync => Durability::Sync,
    };
    let store = SledCounters::open(&args.data_dir, durability)?;
    let registry = Arc::new(
        Registry::open(store.db(), args.data_dir.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("cannot load plans and keys")?,
    );
    let token = args.token.read_or_generate(&args.data_dir)?;
    let mut auth = AuthInterceptor::new(&token);
    if let Some(read) = &args.admin_read_token {
        let read = check_token(
            read.trim().to_owned(),
            "--admin-read-token (or SLUICE_ADMIN_READ_TOKEN)",
        )?;
        if read == token {
            anyhow::bail!("--admin-read-token must differ from the admin token");
        }
        auth = auth.with_read_only(&read);
    }
    let limiter = Arc::new(
        RateLimiter::new(config, store.clone())
            .with_plans(registry.handle())
            .with_usage_retention(args.usage_retention_days),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    let http_listener = match args.http_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (HTTP)"))?,
        ),
        None => None,
    };
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), config_dir = %source_dir.display(), ?durability, "sluice listening on {addr}");
    tracing::info!(%admin_addr, "sluice admin API listening on {admin_addr}");
    let watcher = tokio::spawn(watch_config(
        limiter.clone(),
        source,
        Duration::from_millis(args.reload_interval_ms),
    ));
    let purger = tokio::spawn({
        let limiter = limiter.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let now_us = sluice::storage::unix_now_us();
                limiter.purge_buckets(now_us);
                limiter.purge_reservations(now_us.div_euclid(1_000_000));
            }
        }
    });
    let limits = RequestLimits {
        max_descriptors: args.max_descriptors as usize,
        max_entries: args.max_entries as usize,
        max_key_value_len: args.max_key_value_len as usize,
    };
    let conn = server::io::ConnLimits {
        max_connections: args.max_connections as usize,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        max_streams: args.max_concurrent_streams,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http = match http_listener {
        Some(l) => {
            let http_addr = l.local_addr()?;
            tracing::info!(%http_addr, "sluice HTTP (/healthcheck, /json) listening on {http_addr}");
            Some(tokio::spawn(server::http_port::serve_http(
                l,
                limiter.clone(),
                limits,
                conn,
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let stop_tx = Arc::new(stop_tx);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            signal.await;
            stop_tx.send_replace(true);
        }
    });
    // Either server ending (a signal, or a transport error) stops both. A
    // client that never closes its connection must not stall the stop: after
    // --drain-timeout-ms the remaining connections are dropped.
    let drain_timeout = Duration::from_millis(args.drain_timeout_ms);
    let deadline = {
        let rx = stop_rx.clone();
        async move {
            stopped(rx).await;
            tokio::time::sleep(drain_timeout).await;
        }
    };
    let mut http = http;
    let both = async {
        let (rls, admin, ()) = tokio::join!(
            async {
                let r = server::serve(
                    listener,
                    limiter.clone(),
                    limits,
                    conn,
                    stopped(stop_rx.clone()),
                )
                .await;
                stop_tx.send_replace(true);
                r
            },
            async {
                let r = server::serve_admin(
                    admin_listener,
                    registry,
                    limiter.clone(),
                    auth.clone(),
                    args.usage_retention_days,
                    conn,
                    stopped(stop_rx.clone()),
                )
                .await;
                stop_tx.send_replace(true);
                r
            },
            async {
                // It stops accepting with the others; its open calls get
                // the same drain deadline, not one of their own after it.
                if let Some(h) = http.as_mut() {
                    let _ = h.await;
                }
            },
        );
        (rls, admin)
    };
    let (result, admin_result) = tokio::select! {
        r = both => r,
        () = deadline => {
            tracing::warn!(timeout_ms = args.drain_timeout_ms, "drain timeout: closing the connections still open");
            (Ok(()), Ok(()))
        }
    };
    watcher.abort();
    purger.abort();
    if let Some(h) = http {
        h.abort();
    }
    let closed = store.close().await;
    if let Err(e) = &closed {
        // A stalled disk (sled never completes a flush after a failed
        // write) would also hang the database's own flush on drop: exit
        // now, without destructors, rather than never.
        tracing::error!(
            error = %e,
            "final flush of counters failed: the counts changed since the last good write to disk are lost"
        );
        if let Err(e) = &result {
            tracing::error!(error = %e, "gRPC server failed");
        }
        if let Err(e) = &admin_result {
            tracing::error!(error = %e, "admin gRPC server failed");
        }
        std::process::exit(1);
    }
    result.context("gRPC server failed")?;
    admin_result.context("admin gRPC server failed")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name that
/// resolves (`localhost:8081`; its IPv4 address when it has one).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not IP:PORT or HOST:PORT ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Installs the SIGINT and SIGTERM handlers now (so a signal that arrives
/// right after the "listening" lines is never missed) and returns a future
/// that completes on the first of them. SIGHUP is logged and ignored.
///
/// # Errors
/// If a handler cannot be installed.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        // SIGHUP's default ends the process without the final flush; many
        // operators send it to reload. Config is re-read on its own.
        let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        Ok(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {
                        tracing::info!("received SIGINT");
                        break;
                    }
                    _ = term.recv() => {
                        tracing::info!("received SIGTERM");
                        break;
                    }
                    _ = hup.recv() => tracing::info!(
                        "received SIGHUP: ignored (the config dir is re-read every --reload-interval-ms on its own; SIGTERM stops)"
                    ),
                }
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("received Ctrl-C");
        })
    }
}
