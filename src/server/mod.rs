//! gRPC wiring: the RLS service, health, reflection and graceful shutdown.
//!
//! **API boundary:** only `server` (and the generated `proto`) know tonic and
//! prost types; everything inward speaks engine types.

pub mod admin;
pub mod convert;
pub mod http_port;
pub mod io;
pub mod rls;
pub mod status;
pub mod usage;
pub mod wire;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::codegen::http;
use tonic::service::Routes;
use tonic_health::ServingStatus;

pub use convert::RequestLimits;

use crate::limiter::RateLimiter;
use crate::plans::registry::Registry;
use crate::proto::admin::admin_service_server::AdminServiceServer;
use crate::storage::CounterStore;

/// The full RLS service name, as health checks and reflection know it.
pub const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// Health service names reported SERVING while up: "" (the whole server),
/// "ratelimit" (what envoyproxy/ratelimit deployments probe) and the RLS name.
pub const HEALTH_NAMES: [&str; 3] = ["", "ratelimit", RLS_SERVICE];

/// Serves RLS, the usage API, health and reflection on `listener` (its
/// connections within `conn`) until `shutdown` completes, then reports
/// NOT_SERVING, stops accepting and waits for in-flight calls to finish.
/// The caller closes the store afterwards.
///
/// # Errors
/// A transport error from tonic.
pub async fn serve<S: CounterStore>(
    listener: TcpListener,
    limiter: Arc<RateLimiter<S>>,
    limits: RequestLimits,
    conn: io::ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let follower = follow_storage(health.clone(), &HEALTH_NAMES, limiter.store()).await;
    let own = [RLS_SERVICE, usage::USAGE_SERVICE];
    let (reflection_v1, reflection_v1alpha) = reflection(&own);
    let usage = crate::proto::usage::usage_service_server::UsageServiceServer::new(
        usage::UsageServer::new(limiter.clone()),
    );
    let rls = rls::RateLimitServiceServer::new(rls::RlsService::new(limiter, limits));

    let drain = async move {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight calls");
        follower.abort();
        for name in HEALTH_NAMES {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(conn.max_streams)
        // Per-call spans are DEBUG: at the default INFO level they cost
        // nothing, while an INFO span per call cost ~10% of throughput
        // (BENCHMARKS.md, profile).
        .trace_fn(|req| tracing::debug_span!("grpc", path = %req.uri().path()))
        .add_routes(unknown_methods_explained(
            Routes::new(rls)
                .add_service(usage)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha),
            &own,
            &format!(
                "the admin API ({}) is on the admin port (--admin-listen, default 127.0.0.1:8082; `sluice apply` and `export` take it as --admin-addr)",
                admin::ADMIN_SERVICE
            ),
        ))
        .serve_with_incoming_shutdown(io::incoming(listener, conn), drain)
        .await
}

/// `routes`, with a call to a method they do not serve answered
/// UNIMPLEMENTED with a message that names the method, the port's own
/// services (`own`, as reflection lists them) and where the rest is
/// (`elsewhere`), instead of tonic's empty message: the usual cause is a
/// client pointed at the other port.
fn unknown_methods_explained(mut routes: Routes, own: &[&str], elsewhere: &str) -> Routes {
    let here: Arc<str> = format!("{}, health and reflection; {elsewhere}", own.join(", ")).into();
    let router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = router.fallback(move |uri: http::Uri| async move {
        let status = tonic::Status::unimplemented(format!(
            "{} is not served on this port, which serves {here}",
            uri.path()
        ));
        let (parts, ()) = status.into_http::<()>().into_parts();
        http::Response::from_parts(parts, tonic::body::Body::empty())
    });
    routes
}

/// Services served on both ports: health and the two reflection versions.
const COMMON_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reflection v1 and v1alpha that know every proto sluice has (so any
/// message type can be described) but list only `services`, the ones served
/// on that port (with [`COMMON_SERVICES`]): `grpcurl list` on the RLS port does
/// not offer the admin API, which only the admin port answers.
fn reflection(
    services: &[&str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        services.iter().chain(&COMMON_SERVICES).fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // Both reflection versions' own descriptors in both: each
                // lists both services, and a client asking one version
                // (grpcurl asks v1alpha) must be able to describe the other.
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                ),
            |b, name| b.with_service_name(*name),
        )
    };
    let v1 = builder()
        .build_v1()
        .expect("embedded descriptor sets are valid (checked by tests)");
    let v1alpha = builder()
        .build_v1alpha()
        .expect("embedded descriptor sets are valid (checked by tests)");
    (v1, v1alpha)
}

/// Sets `names` SERVING, then keeps them NOT_SERVING while `store`'s
/// writes to disk fail (a full or failing disk): the node cannot keep what
/// its durability setting promises, so orchestrators and health-checking
/// proxies should route elsewhere. The returned task is aborted when the
/// server drains (which sets NOT_SERVING for good).
async fn follow_storage<S: CounterStore>(
    health: tonic_health::server::HealthReporter,
    names: &'static [&'static str],
    store: &S,
) -> tokio::task::JoinHandle<()> {
    for name in names {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let mut writes_ok = store.writes_ok();
    tokio::spawn(async move {
        let Some(rx) = writes_ok.as_mut() else {
            return;
        };
        while rx.changed().await.is_ok() {
            let status = if *rx.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in names {
                health.set_service_status(*name, status).await;
            }
        }
    })
}

/// Health names of the admin server: "" and the admin service.
pub const ADMIN_HEALTH_NAMES: [&str; 2] = ["", admin::ADMIN_SERVICE];

/// Serves the admin API (plus health and reflection, which need no token)
/// on `listener` (its connections within `conn`) until `shutdown` completes. Every admin call must carry
/// `authorization: Bearer <token>`, checked by `auth`.
///
/// # Errors
/// A transport error from tonic.
pub async fn serve_admin<S: CounterStore>(
    listener: TcpListener,
    registry: Arc<Registry>,
    limiter: Arc<RateLimiter<S>>,
    auth: admin::AuthInterceptor,
    retention_days: u32,
    conn: io::ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let follower = follow_storage(health.clone(), &ADMIN_HEALTH_NAMES, limiter.store()).await;
    let own = [admin::ADMIN_SERVICE];
    let (reflection_v1, reflection_v1alpha) = reflection(&own);
    let admin = AdminServiceServer::with_interceptor(
        admin::AdminServer::new(registry, limiter, retention_days),
        auth,
    );
    let drain = async move {
        shutdown.await;
        follower.abort();
        for name in ADMIN_HEALTH_NAMES {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(conn.max_streams)
        .trace_fn(|req| tracing::info_span!("admin", path = %req.uri().path()))
        .add_routes(unknown_methods_explained(
            Routes::new(admin)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha),
            &own,
            &format!(
                "{RLS_SERVICE} and {} are on the RLS port (--listen, default 127.0.0.1:8081)",
                usage::USAGE_SERVICE
            ),
        ))
        .serve_with_incoming_shutdown(io::incoming(listener, conn), drain)
        .await
}
