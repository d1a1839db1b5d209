//! The decision path without I/O: engine matching + in-memory counters, for
//! config rules and for usage plans (key lookup, token bucket, quota).
//!
//! `cargo bench --bench decision`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::config;
use sluice::engine::{self, Descriptor, Entry, Request};
use sluice::limiter::{counter_ops, RateLimiter};
use sluice::plans::model::{
    LimitWindow, Metric, PeriodKind, Plan, Price, Quota, Scope, Stage, Throttle, TokenCount,
    UsageLimit,
};
use sluice::plans::registry::{parse_import_csv, Registry};
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

/// A plan governing domain `bench-plans`: a throttle and a quota that never
/// refuse during the bench, and a per-method throttle for one path.
fn bench_plan() -> Plan {
    let mut method_throttles = BTreeMap::new();
    method_throttles.insert(
        "/v1/chat/completions/POST".to_owned(),
        Throttle {
            rate_limit: 1e9,
            burst_limit: u32::MAX,
        },
    );
    Plan {
        id: String::new(),
        name: "bench".into(),
        description: String::new(),
        throttle: Some(Throttle {
            rate_limit: 1e9,
            burst_limit: u32::MAX,
        }),
        quota: Some(Quota {
            limit: u64::MAX / 2,
            period: PeriodKind::Day,
            anchor_day: 0,
            time_zone: "UTC".into(),
        }),
        stages: vec![Stage {
            domain: "bench-plans".into(),
            stage: String::new(),
            method_throttles,
            key_entry: "api_key".into(),
            method_entry: "method".into(),
            path_entry: "path".into(),
            default_usage: String::new(),
        }],
        tags: BTreeMap::new(),
        create_time: 0,
        update_time: 0,
        limits: Vec::new(),
        prices: BTreeMap::new(),
        header_style: Default::default(),
    }
}

/// Plan-based decisions against the config-rule path above.
fn bench_plans(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let db = sled::Config::new()
        .temporary(true)
        .open()
        .expect("temporary sled");
    let registry = Registry::open(db, PathBuf::from("bench")).expect("registry");
    let now_s = 1_700_000_000;
    let keys = 10_000;
    let csv: String = std::iter::once("Name,Key,UsagePlanIds\n".to_owned())
        .chain((0..keys).map(|i| format!("k{i},bench-key-value-{i:08},bench\n")))
        .collect();
    rt.block_on(async {
        registry
            .create_plan(bench_plan(), now_s)
            .await
            .expect("plan");
        let (rows, warnings) = parse_import_csv(&csv).expect("csv");
        let (ids, warnings) = registry
            .import_keys(rows, warnings, true, now_s)
            .await
            .expect("import");
        assert_eq!((ids.len(), warnings.len()), (keys, 0));
    });
    let limiter = RateLimiter::new(
        config::embedded_default().expect("default config"),
        MemoryCounters::default(),
    )
    .with_plans(registry.handle());
    let plan_req = |key: &str, extra: &[(&str, &str)]| Request {
        domain: "bench-plans".into(),
        descriptors: vec![Descriptor {
            entries: std::iter::once(Entry::new("api_key", key))
                .chain(extra.iter().map(|(k, v)| Entry::new(*k, *v)))
                .collect(),
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let now_us = now_s * 1_000_000;
    let one = plan_req("bench-key-value-00000001", &[]);
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
        "bench-key-value-00000001",
        &[("method", "POST"), ("path", "/v1/chat/completions")],
    );
    c.bench_function("limiter/plan decision, per-method throttle", |b| {
        b.iter(|| {
            rt.block_on(limiter.decide(black_box(&method), now_us))
                .expect("memory store never fails")
        })
    });
    let keyed: Vec<Request> = (0..keys)
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
    rt.block_on(async {
        let mut p = bench_plan();
        p.name = "bench-tokens".into();
        p.stages[0].domain = "bench-tokens".into();
        let tokens = |name: &str, window| UsageLimit {
            name: name.into(),
            metric: Metric::Tokens,
            count: TokenCount::Total,
            limit: u64::MAX / 4,
            window,
            anchor_day: 0,
            time_zone: "UTC".into(),
            model_limits: BTreeMap::from([("gpt-4o*".to_owned(), u64::MAX / 4)]),
            scope: Scope::Key,
        };
        p.limits = vec![
            tokens("tpm", LimitWindow::Minute),
            tokens("tpd", LimitWindow::Day),
            UsageLimit {
                metric: Metric::Spend,
                window: LimitWindow::Month,
                anchor_day: 1,
                ..tokens("budget", LimitWindow::Month)
            },
        ];
        p.prices = BTreeMap::from([(
            "gpt-4o*".to_owned(),
            Price {
                input_per_million: 2_500_000,
                output_per_million: 10_000_000,
            },
        )]);
        registry.create_plan(p, now_s).await.expect("token plan");
        registry
            .bind("bench-tokens", "k1", now_s)
            .await
            .expect("bind");
    });
    let token_req = |usage: Option<&str>| Request {
        domain: "bench-tokens".into(),
        descriptors: vec![Descriptor {
            entries: [("api_key", "bench-key-value-00000001"), ("model", "gpt-4o")]
                .into_iter()
                .chain(usage.map(|u| ("usage", u)))
                .map(|(k, v)| Entry::new(k, v))
                .collect(),
            hits_addend: usage.map(|_| 100),
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let check = token_req(None);
    c.bench_function("limiter/plan decision with 3 token limits, request", |b| {
        b.iter(|| {
            rt.block_on(limiter.decide(black_box(&check), now_us))
                .expect("memory store never fails")
        })
    });
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

criterion_group!(benches, bench, bench_plans);
criterion_main!(benches);
