//! The decision path without I/O: engine matching + in-memory counters.
//!
//! `cargo bench --bench decision`

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::config;
use sluice::engine::{self, Descriptor, Entry, Request};
use sluice::limiter::{counter_ops, RateLimiter};
use sluice::storage::memory::MemoryCounters;

const YAML: &str = r#"
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 1000000000}
    descriptors:
      - key: model
        value: "gpt-4o*"
        rate_limit: {unit: minute, requests_per_unit: 1000000000}
      - key: model
        rate_limit: {unit: minute, requests_per_unit: 1000000000}
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 1000000000}
"#;

fn request(descriptors: Vec<Vec<(&str, &str)>>) -> Request {
    Request {
        domain: "bench".into(),
        descriptors: descriptors
            .into_iter()
            .map(|entries| Descriptor {
                entries: entries.into_iter().map(|(k, v)| Entry::new(k, v)).collect(),
                ..Default::default()
            })
            .collect(),
        hits_addend: 1,
    }
}

fn bench(c: &mut Criterion) {
    let files = vec![(PathBuf::from("bench.yaml"), YAML.to_string())];
    let cfg = config::from_files(&files).expect("bench config is valid");
    let one = request(vec![vec![("api_key", "key-123")]]);
    let three = request(vec![
        vec![("api_key", "key-123")],
        vec![("api_key", "key-123"), ("model", "gpt-4o-mini")],
        vec![("remote_address", "10.1.2.3")],
    ]);
    let now = 1_700_000_000;

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

criterion_group!(benches, bench);
criterion_main!(benches);
