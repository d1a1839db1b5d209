//! Test harness for end-to-end tests: the real sluice gRPC server, started
//! in-process on `127.0.0.1:0` over a sled counter store in a temp dir, plus
//! small request builders and wire-value assertions.
//!
//! The listener is bound before the server task is spawned, so clients
//! connect at once (the kernel queues the connection until the server
//! accepts it): no sleeps, no retries.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use sluice::config;
use sluice::engine::{self, Slot};
use sluice::limiter::RateLimiter;
use sluice::plans::registry::Registry;
use sluice::proto::admin::admin_service_client::AdminServiceClient;
use sluice::proto::common::rate_limit_descriptor::{Entry, RateLimitOverride};
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::rate_limit_response::DescriptorStatus;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use sluice::server::{self, RequestLimits};
use sluice::storage::sled_store::{Durability, SledCounters};
use sluice::storage::unix_now;

/// `RateLimitResponse.Code` numbers, as on the wire.
pub const UNKNOWN: i32 = 0;
/// OK.
pub const OK: i32 = 1;
/// OVER_LIMIT.
pub const OVER_LIMIT: i32 = 2;

/// `RateLimitResponse.RateLimit.Unit` numbers, as on the wire.
pub const SECOND: i32 = 1;
/// MINUTE.
pub const MINUTE: i32 = 2;
/// HOUR.
pub const HOUR: i32 = 3;
/// DAY.
pub const DAY: i32 = 4;
/// MONTH (30 days).
pub const MONTH: i32 = 5;
/// YEAR (365 days).
pub const YEAR: i32 = 6;
/// WEEK.
pub const WEEK: i32 = 7;

/// Window length in seconds of a wire unit number.
pub fn unit_seconds(unit: i32) -> i64 {
    match unit {
        SECOND => 1,
        MINUTE => 60,
        HOUR => 3_600,
        DAY => 86_400,
        WEEK => 7 * 86_400,
        MONTH => 30 * 86_400,
        YEAR => 365 * 86_400,
        other => panic!("no window length for unit {other}"),
    }
}

/// The connected client type.
pub type Client = RateLimitServiceClient<Channel>;

/// Configures and starts a [`TestServer`].
#[derive(Debug)]
pub struct ServerBuilder {
    files: Vec<(PathBuf, String)>,
    durability: Durability,
    limits: RequestLimits,
    dir: Option<TempDir>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            files: Vec::new(),
            durability: Durability::Interval(Duration::from_millis(100)),
            limits: RequestLimits::default(),
            dir: None,
        }
    }
}

impl ServerBuilder {
    /// A builder with no config files, `Durability::Interval(100ms)`, default
    /// request limits and a fresh temp data dir.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a config file (YAML text) under a generated name.
    pub fn config(self, yaml: &str) -> Self {
        let name = format!("config{}.yaml", self.files.len());
        self.file(&name, yaml)
    }

    /// Adds a config file (YAML text) named `name`.
    pub fn file(mut self, name: &str, yaml: &str) -> Self {
        self.files.push((PathBuf::from(name), yaml.to_owned()));
        self
    }

    /// Sets the store's durability.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Uses `Durability::Sync` (group commit).
    pub fn sync(self) -> Self {
        self.durability(Durability::Sync)
    }

    /// Sets the request bounds.
    pub fn limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Reuses a data dir (e.g. the one returned by [`TestServer::shutdown`]).
    pub fn data_dir(mut self, dir: TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Starts the server and connects a client.
    pub async fn start(self) -> TestServer {
        let cfg = config::from_files(&self.files).expect("test config is valid");
        let dir = match self.dir {
            Some(d) => d,
            None => tempfile::tempdir().expect("create temp data dir"),
        };
        let store = SledCounters::open(&dir.path().join("data"), self.durability)
            .expect("open sled counter store");
        let registry = Arc::new(
            Registry::open(store.db(), dir.path().join("data")).expect("open plan registry"),
        );
        let limiter = Arc::new(RateLimiter::new(cfg, store.clone()).with_plans(registry.handle()));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener address");
        let admin_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let admin_addr = admin_listener.local_addr().expect("listener address");
        let (admin_shutdown_tx, admin_shutdown_rx) = oneshot::channel::<()>();
        let admin_task = tokio::spawn({
            let (registry, limiter) = (registry.clone(), limiter.clone());
            async move {
                server::serve_admin(
                    admin_listener,
                    registry,
                    limiter,
                    sluice::server::admin::AuthInterceptor::new(ADMIN_TOKEN)
                        .with_read_only(READ_ONLY_TOKEN),
                    90,
                    sluice::server::io::ConnLimits::default(),
                    async move {
                        let _ = admin_shutdown_rx.await;
                    },
                )
                .await
            }
        });
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        // Dropping the sender (e.g. a test panicking) also shuts the server down.
        let task = tokio::spawn(server::serve(
            listener,
            limiter.clone(),
            self.limits,
            sluice::server::io::ConnLimits::default(),
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        let client = connect(addr).await;
        TestServer {
            addr,
            admin_addr,
            client,
            store,
            limiter,
            registry,
            dir,
            shutdown_tx,
            task,
            admin_shutdown_tx,
            admin_task,
        }
    }
}

/// Connects a new client (its own channel / HTTP/2 connection) to `addr`.
pub async fn connect(addr: SocketAddr) -> Client {
    RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the test server")
}

/// A running in-process server.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A connected client.
    pub client: Client,
    /// The counter store (shared with the server's limiter).
    pub store: SledCounters,
    /// The limiter the server uses.
    pub limiter: Arc<RateLimiter<SledCounters>>,
    /// Where the admin API listens (token [`ADMIN_TOKEN`]).
    pub admin_addr: SocketAddr,
    /// The plan registry behind the admin API.
    pub registry: Arc<Registry>,
    dir: TempDir,
    shutdown_tx: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    admin_shutdown_tx: oneshot::Sender<()>,
    admin_task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The admin token of in-process test servers.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The read-only admin token of in-process test servers.
pub const READ_ONLY_TOKEN: &str = "test-read-only-token";

/// The admin client type.
pub type AdminClient = AdminServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn add_test_token(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}")
            .parse()
            .expect("ascii token"),
    );
    Ok(req)
}

impl TestServer {
    /// Starts a server with one config file.
    pub async fn start(yaml: &str) -> TestServer {
        ServerBuilder::new().config(yaml).start().await
    }

    /// A builder.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// An admin client sending the test token.
    pub async fn admin(&self) -> AdminClient {
        let channel = Channel::from_shared(format!("http://{}", self.admin_addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("connect to the admin API");
        AdminServiceClient::with_interceptor(channel, add_test_token as fn(_) -> _)
    }

    /// An admin client sending no token.
    pub async fn admin_without_token(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(format!("http://{}", self.admin_addr))
            .await
            .expect("connect to the admin API")
    }

    /// A clone of the connected client (shares its channel).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client over a new channel (a separate connection).
    pub async fn new_client(&self) -> Client {
        connect(self.addr).await
    }

    /// Sends `req`; the gRPC status on error.
    pub async fn call(&self, req: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        self.client()
            .should_rate_limit(req)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends `req`, panicking on a gRPC error.
    pub async fn check(&self, req: RateLimitRequest) -> RateLimitResponse {
        match self.call(req).await {
            Ok(r) => r,
            Err(s) => panic!("unexpected gRPC error: {:?} {}", s.code(), s.message()),
        }
    }

    /// Sends `req`, expecting a gRPC error.
    pub async fn check_err(&self, req: RateLimitRequest) -> tonic::Status {
        match self.call(req).await {
            Ok(r) => panic!("expected a gRPC error, got {r:?}"),
            Err(s) => s,
        }
    }

    /// One descriptor with request-level hits 0 (= 1); returns the response,
    /// after checking there is exactly one status.
    pub async fn hit(&self, domain: &str, pairs: &[(&str, &str)]) -> RateLimitResponse {
        let r = self.check(request(domain, vec![desc(pairs)])).await;
        assert_eq!(r.statuses.len(), 1, "one status per descriptor: {r:?}");
        r
    }

    /// The stored counter value, read from the store's memory, for the
    /// counter the config rule (or the descriptor's override) selects now.
    /// `None` when the descriptor is not counted.
    pub fn stored_count(&self, domain: &str, d: &RateLimitDescriptor) -> Option<u64> {
        let req = engine::Request {
            domain: domain.to_owned(),
            descriptors: vec![engine::Descriptor {
                entries: d
                    .entries
                    .iter()
                    .map(|e| engine::Entry::new(e.key.clone(), e.value.clone()))
                    .collect(),
                limit: d.limit.map(|o| engine::LimitOverride {
                    requests_per_unit: o.requests_per_unit,
                    unit: engine::Unit::from_wire(o.unit).expect("valid unit"),
                }),
                hits_addend: Some(0),
            }],
            hits_addend: 0,
        };
        match self.limiter.config().rules.plan(&req, unix_now()).pop() {
            Some(Slot::Counted(c)) => Some(self.store.memory().get(&c.key.0)),
            _ => None,
        }
    }

    /// Shuts down: triggers the shutdown future, awaits the server task
    /// (asserting it ended without error), closes the store (final flush)
    /// and returns the data dir so a new server can reopen it.
    pub async fn shutdown(self) -> TempDir {
        let TestServer {
            client,
            store,
            limiter,
            registry,
            dir,
            shutdown_tx,
            task,
            admin_shutdown_tx,
            admin_task,
            ..
        } = self;
        drop(client);
        let _ = shutdown_tx.send(());
        let _ = admin_shutdown_tx.send(());
        task.await
            .expect("server task did not panic")
            .expect("server ended without a transport error");
        admin_task
            .await
            .expect("admin task did not panic")
            .expect("admin server ended without a transport error");
        drop(registry);
        store.close().await.expect("store closed and flushed");
        drop(limiter);
        drop(store);
        dir
    }
}

/// Descriptor entries from (key, value) pairs.
pub fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
    pairs
        .iter()
        .map(|(k, v)| Entry {
            key: (*k).to_owned(),
            value: (*v).to_owned(),
        })
        .collect()
}

/// A descriptor with no hits_addend and no override.
pub fn desc(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries(pairs),
        limit: None,
        hits_addend: None,
    }
}

/// A descriptor with a per-descriptor `hits_addend` (0 = peek).
pub fn desc_hits(pairs: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(hits),
        ..desc(pairs)
    }
}

/// A descriptor with a request-supplied limit (`descriptor.limit`).
pub fn desc_override(
    pairs: &[(&str, &str)],
    requests_per_unit: u32,
    unit: i32,
) -> RateLimitDescriptor {
    RateLimitDescriptor {
        limit: Some(RateLimitOverride {
            requests_per_unit,
            unit,
        }),
        ..desc(pairs)
    }
}

/// A request with request-level `hits_addend` 0 (= 1).
pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    request_hits(domain, descriptors, 0)
}

/// A request with a request-level `hits_addend`.
pub fn request_hits(
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors,
        hits_addend,
    }
}

/// Asserts a status with a limit: code, `current_limit` (name,
/// requests_per_unit, unit number), `limit_remaining`, and
/// `duration_until_reset` whole seconds in `1..=window`.
#[track_caller]
pub fn assert_limited(
    s: &DescriptorStatus,
    code: i32,
    name: &str,
    requests_per_unit: u32,
    unit: i32,
    remaining: u32,
) {
    assert_eq!(s.code, code, "code: {s:?}");
    let l = s
        .current_limit
        .as_ref()
        .unwrap_or_else(|| panic!("current_limit must be set: {s:?}"));
    assert_eq!(l.name, name, "current_limit.name: {s:?}");
    assert_eq!(
        l.requests_per_unit, requests_per_unit,
        "current_limit.requests_per_unit: {s:?}"
    );
    assert_eq!(l.unit, unit, "current_limit.unit: {s:?}");
    assert_eq!(s.limit_remaining, remaining, "limit_remaining: {s:?}");
    assert_reset_within(s, unit);
}

/// Asserts `duration_until_reset` is set, whole seconds, in `1..=window`.
#[track_caller]
pub fn assert_reset_within(s: &DescriptorStatus, unit: i32) {
    let d = s
        .duration_until_reset
        .as_ref()
        .unwrap_or_else(|| panic!("duration_until_reset must be set: {s:?}"));
    assert_eq!(d.nanos, 0, "whole seconds: {s:?}");
    let window = unit_seconds(unit);
    assert!(
        (1..=window).contains(&d.seconds),
        "duration_until_reset {}s not in 1..={window}: {s:?}",
        d.seconds
    );
}

/// Asserts OK with no limit: `current_limit` unset, remaining 0, no reset.
#[track_caller]
pub fn assert_no_limit(s: &DescriptorStatus) {
    assert_eq!(s.code, OK, "code: {s:?}");
    assert_eq!(s.current_limit, None, "current_limit: {s:?}");
    assert_eq!(s.limit_remaining, 0, "limit_remaining: {s:?}");
    assert_eq!(s.duration_until_reset, None, "duration_until_reset: {s:?}");
}

/// Asserts the `unlimited` answer: OK, no limit, remaining u32::MAX, no reset.
#[track_caller]
pub fn assert_unlimited(s: &DescriptorStatus) {
    assert_eq!(s.code, OK, "code: {s:?}");
    assert_eq!(s.current_limit, None, "current_limit: {s:?}");
    assert_eq!(s.limit_remaining, 4_294_967_295, "limit_remaining: {s:?}");
    assert_eq!(s.duration_until_reset, None, "duration_until_reset: {s:?}");
}

/// If fewer than `margin` seconds are left in the current epoch-aligned
/// window of `window_secs`, waits until the next window starts, so a
/// counting test does not straddle a window boundary. This is not a timing
/// assertion: it only avoids a known, rare source of flakiness.
pub async fn avoid_window_edge(window_secs: u64, margin: u64) {
    let now = unix_now();
    let left = window_secs - now % window_secs;
    if left <= margin {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}
