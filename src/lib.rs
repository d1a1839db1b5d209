//! sluice: an Envoy RateLimitService v3 compatible rate limiter for API
//! gateways in front of large language models.
//!
//! # Layout
//! - [`engine`]: the pure decision engine (rules, matching, windows,
//!   decisions). No I/O; the clock is an argument.
//! - [`config`]: envoyproxy/ratelimit YAML files -> [`engine::RuleSet`].
//! - [`storage`]: counter stores behind the [`storage::CounterStore`] trait:
//!   in-memory shards, persisted to sled by a background writer.
//! - [`plans`]: usage plans and API keys: model and validation, calendar
//!   periods, token buckets, the decision snapshot ([`plans::catalog`]) and
//!   the sled-backed registry the admin API writes through.
//! - [`limiter`]: the application service gluing engine, config snapshot and
//!   storage; async, no tonic types. Tests and benches drive it.
//! - [`server`]: tonic wiring: the RLS service, health, reflection, request
//!   bounds, the one error -> `tonic::Status` mapping, shutdown.
//! - [`declarative`]: `sluice apply` / `export`: a YAML file of plans and
//!   keys diffed against the admin API.
//! - [`proto`]: generated code only.
//! - `main.rs`: CLI parsing and process lifecycle.

pub mod config;
pub mod declarative;
pub mod engine;
pub mod limiter;
pub mod plans;

pub mod proto;
pub mod server;
pub mod storage;
pub mod telemetry;
