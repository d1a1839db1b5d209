//! The decision path without I/O: engine matching + in-memory counters, for
//! config rules and for usage plans (key lookup, token bucket, quota); and
//! the same cases with the sled-persisted counter store (`sled/...`).
//!
//! `cargo bench --bench decision` (`-- "sled"` for the sled cases only).
//!
//! The setup (config, plans, keys, requests) is in `benches/common/mod.rs`,
//! shared with the callgrind driver `examples/decision_count.rs`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use prost::bytes::BytesMut;
use prost::Message;
use sluice::config;
use sluice::engine::{self, Request};
use sluice::limiter::{counter_ops, RateLimiter};
use sluice::server::wire::WireResponse;
use sluice::storage::memory::MemoryCounters;

mod common;
use common::{plan_req, request, token_req, HOT_KEY, KEYS, NOW_S};

fn bench(c: &mut Criterion) {
    let cfg = common::config();
    let one = common::rule_request();
    let three = request(vec![
        vec![("api_key", "key-123")],
        vec![("api_key", "key-123"), ("model", "gpt-4o-mini")],
        vec![("remote_address", "10.1.2.3")],
    ]);
    let now = NOW_S as u64;

    c.bench_function("engine/plan+decide, 1 descriptor", |b| {
        let store = MemoryCounters::default();
        b.iter(|| {
            let slots = cfg.rules.plan(black_box(&one), now);
            let ops = counter_ops(&slots);
            let values = store.add_now(&ops);
            black_box(engine::decide(&slots, &values, now))
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (name, req) in [("1 descriptor", &one), ("3 descriptors", &three)] {
        let limiter = RateLimiter::new(cfg.clone(), MemoryCounters::default());
        c.bench_function(&format!("limiter/should_rate_limit, {name}"), |b| {
            b.iter(|| {
                rt.block_on(limiter.should_rate_limit(black_box(req), now))
                    .expect("memory store never fails")
            })
        });
    }

    let rule_limiter = RateLimiter::new(cfg.clone(), MemoryCounters::default());
    let answer = rt
        .block_on(rule_limiter.should_rate_limit(&one, now))
        .expect("memory store never fails");
    bench_answer(c, "config rule, 1 descriptor", &answer);

    // Many distinct keys: hashing, shard locks and counter creation.
    let limiter = RateLimiter::new(cfg.clone(), MemoryCounters::default());
    let keyed: Vec<Request> = (0..10_000)
        .map(|i| {
            let mut r = one.clone();
            r.descriptors[0].entries[0].value = format!("key-{i}");
            r
        })
        .collect();
    c.bench_function("limiter/should_rate_limit, 10k distinct keys", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % keyed.len();
            rt.block_on(limiter.should_rate_limit(&keyed[i], now))
                .expect("memory store never fails")
        })
    });
}

/// Plan-based decisions against the config-rule path above.
/// `server/answer encoding, {name}`: `d` as the `ShouldRateLimit` handler
/// answers it, encoded into a gRPC frame buffer.
fn bench_answer(c: &mut Criterion, name: &str, d: &engine::Decision) {
    let mut buf = BytesMut::with_capacity(8192);
    c.bench_function(&format!("server/answer encoding, {name}"), |b| {
        b.iter_batched(
            || d.clone(),
            |d| {
                buf.clear();
                WireResponse::new(d)
                    .encode(&mut buf)
                    .expect("the buffer has room");
                black_box(buf.len())
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_plans(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let registry = common::temporary_registry();
    rt.block_on(common::add_plan_and_keys(&registry));
    let limiter = RateLimiter::new(
        config::embedded_default().expect("default config"),
        MemoryCounters::default(),
    )
    .with_plans(registry.handle());
    let now_us = NOW_S * 1_000_000;
    let one = plan_req(HOT_KEY, &[]);
    c.bench_function(
        "limiter/plan decision (throttle + quota), 1 descriptor",
        |b| {
            b.iter(|| {
                rt.block_on(limiter.decide(black_box(&one), now_us))
                    .expect("memory store never fails")
            })
        },
    );
    let method = plan_req(
        HOT_KEY,
        &[("method", "POST"), ("path", "/v1/chat/completions")],
    );
    c.bench_function("limiter/plan decision, per-method throttle", |b| {
        b.iter(|| {
            rt.block_on(limiter.decide(black_box(&method), now_us))
                .expect("memory store never fails")
        })
    });
    let keyed: Vec<Request> = (0..KEYS)
        .map(|i| plan_req(&format!("bench-key-value-{i:08}"), &[]))
        .collect();
    c.bench_function("limiter/plan decision, 10k distinct keys", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % keyed.len();
            rt.block_on(limiter.decide(&keyed[i], now_us))
                .expect("memory store never fails")
        })
    });
    // A plan with a throttle, a quota and token limits (a sliding TPM and a
    // calendar TPD with a per-model limit, and a monthly budget).
    rt.block_on(common::add_token_plan(&registry));
    let check = token_req(None);
    c.bench_function("limiter/plan decision with 3 token limits, request", |b| {
        b.iter(|| {
            rt.block_on(limiter.decide(black_box(&check), now_us))
                .expect("memory store never fails")
        })
    });
    // The answer for it, encoded as the RLS handler hands it to tonic: one
    // status with a named limit and six x-ratelimit-* headers (the decision
    // is cloned outside the timing; its drop is inside).
    let answer = rt
        .block_on(limiter.decide(&check, now_us))
        .expect("memory store never fails");
    bench_answer(c, "plan with 3 token limits (6 headers)", &answer);
    let charge = token_req(Some("total_tokens"));
    c.bench_function("limiter/plan decision with 3 token limits, charge", |b| {
        b.iter(|| {
            rt.block_on(limiter.decide(black_box(&charge), now_us))
                .expect("memory store never fails")
        })
    });
    let unknown = plan_req("not-a-key-not-a-key-not-a-key", &[]);
    c.bench_function("limiter/plan decision, unknown key", |b| {
        b.iter(|| {
            rt.block_on(limiter.decide(black_box(&unknown), now_us))
                .expect("memory store never fails")
        })
    });
}

/// The config-rule and plan cases with the counters persisted to sled
/// (`SledCounters` in a tempdir, the server's default interval durability,
/// plans and keys in the same database), as the server runs them.
///
/// Decisions run on a current-thread runtime, like the in-memory cases, so
/// the two compare the store and nothing else. The store's background writer
/// (a batch write and flush of the changed counters every 100 ms) and its
/// purger run on their own one-worker runtime, as they run on a worker of
/// the server's runtime: their cost shows only as contention (shard locks
/// while draining, the second core).
fn bench_sled(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("background runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, registry) = background.block_on(async { common::open_sled(dir.path()) });
    background.block_on(common::add_all_plans(&registry));

    let now = NOW_S as u64;
    let one = common::rule_request();
    let limiter = RateLimiter::new(common::config(), store.clone());
    c.bench_function("sled/should_rate_limit, 1 descriptor", |b| {
        b.iter(|| {
            rt.block_on(limiter.should_rate_limit(black_box(&one), now))
                .expect("interval durability never fails")
        })
    });

    let limiter = RateLimiter::new(
        config::embedded_default().expect("default config"),
        store.clone(),
    )
    .with_plans(registry.handle());
    let now_us = NOW_S * 1_000_000;
    let cases = [
        (
            "plan decision (throttle + quota), 1 descriptor",
            plan_req(HOT_KEY, &[]),
        ),
        (
            "plan decision with 3 token limits, request",
            token_req(None),
        ),
        (
            "plan decision with 3 token limits, charge",
            token_req(Some("total_tokens")),
        ),
    ];
    for (name, req) in &cases {
        c.bench_function(&format!("sled/{name}"), |b| {
            b.iter(|| {
                rt.block_on(limiter.decide(black_box(req), now_us))
                    .expect("interval durability never fails")
            })
        });
    }

    drop(limiter);
    background
        .block_on(store.close())
        .expect("final flush of the bench store");
}

criterion_group!(benches, bench, bench_plans, bench_sled);
criterion_main!(benches);
