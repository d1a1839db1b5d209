//! Setup shared by the decision benches (`benches/decision.rs`) and the
//! callgrind driver (`examples/decision_count.rs`, which includes this file
//! with `#[path]`), so both measure the same limiters and requests.
//!
//! Not a bench target itself: cargo only discovers `benches/*.rs` and
//! `benches/*/main.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice::config::{self, Config};
use sluice::engine::{Descriptor, Entry, Request};
use sluice::plans::model::{
    LimitWindow, Metric, PeriodKind, Plan, Price, Quota, Scope, Stage, Throttle, TokenCount,
    UsageLimit,
};
use sluice::plans::registry::{parse_import_csv, Registry};
use sluice::storage::sled_store::{Durability, SledCounters};

/// Config rules of domain `bench`: a per-key rule with per-model children,
/// and a per-address rule; limits that never refuse during a bench.
pub const YAML: &str = r#"
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

/// The clock of every bench decision (Unix seconds): 22:13:20 UTC, far from
/// a minute, day or month boundary.
pub const NOW_S: i64 = 1_700_000_000;

/// API keys imported for the plan benches (`bench-key-value-00000000`..).
pub const KEYS: usize = 10_000;

/// The key most plan benches decide for (bound to both plans).
pub const HOT_KEY: &str = "bench-key-value-00000001";

/// The sled store's durability in the benches: the server's default
/// (`--durability interval --flush-interval-ms 100`, as `main.rs` builds it).
pub const SLED_DURABILITY: Durability = Durability::Interval(Duration::from_millis(100));

/// The config of [`YAML`].
pub fn config() -> Config {
    let files = vec![(PathBuf::from("bench.yaml"), YAML.to_string())];
    config::from_files(&files).expect("bench config is valid")
}

/// A request to domain `bench`, one descriptor per entry list.
pub fn request(descriptors: Vec<Vec<(&str, &str)>>) -> Request {
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

/// The config-rule request with one descriptor (`api_key=key-123`).
pub fn rule_request() -> Request {
    request(vec![vec![("api_key", "key-123")]])
}

/// A plan governing domain `bench-plans`: a throttle and a quota that never
/// refuse during the bench, and a per-method throttle for one path.
pub fn bench_plan() -> Plan {
    let mut method_throttles = BTreeMap::new();
    method_throttles.insert(
        "/v1/chat/completions/POST".to_owned(),
        Throttle {
            rate_limit: 1e9,
            burst_limit: u32::MAX,
        },
    );
    Plan {
        name: "bench".into(),
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
            method_throttles,
            ..Stage::default()
        }],
        ..Plan::default()
    }
}

/// A plan governing domain `bench-tokens`: [`bench_plan`]'s throttle and
/// quota plus token limits (a sliding TPM and a calendar TPD with a
/// per-model limit, and a monthly budget).
pub fn token_plan() -> Plan {
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
    p
}

/// Creates [`bench_plan`] and imports [`KEYS`] keys bound to it.
pub async fn add_plan_and_keys(registry: &Registry) {
    let csv: String = std::iter::once("Name,Key,UsagePlanIds\n".to_owned())
        .chain((0..KEYS).map(|i| format!("k{i},bench-key-value-{i:08},bench\n")))
        .collect();
    registry
        .create_plan(bench_plan(), NOW_S)
        .await
        .expect("plan");
    let (rows, warnings) = parse_import_csv(&csv).expect("csv");
    let (ids, warnings) = registry
        .import_keys(rows, warnings, true, NOW_S)
        .await
        .expect("import");
    assert_eq!((ids.len(), warnings.len()), (KEYS, 0));
}

/// Creates [`token_plan`] and binds key `k1` ([`HOT_KEY`]) to it.
pub async fn add_token_plan(registry: &Registry) {
    registry
        .create_plan(token_plan(), NOW_S)
        .await
        .expect("token plan");
    registry
        .bind("bench-tokens", "k1", NOW_S)
        .await
        .expect("bind");
}

/// Both plans and the keys, as the plan benches set them up.
pub async fn add_all_plans(registry: &Registry) {
    add_plan_and_keys(registry).await;
    add_token_plan(registry).await;
}

/// A registry in a temporary sled database (the plan benches' setup with the
/// in-memory counter store).
pub fn temporary_registry() -> Registry {
    let db = sled::Config::new()
        .temporary(true)
        .open()
        .expect("temporary sled");
    Registry::open(db, PathBuf::from("bench")).expect("registry")
}

/// The counter store persisted to sled in `dir`, with the server's default
/// durability, and the plan registry in the same database (as `main.rs`
/// opens them). Must be called inside a tokio runtime: the store's writer
/// and purge tasks are spawned on it.
pub fn open_sled(dir: &Path) -> (SledCounters, Registry) {
    let store = SledCounters::open(dir, SLED_DURABILITY).expect("sled counter store");
    let registry = Registry::open(store.db(), dir.to_owned()).expect("registry");
    (store, registry)
}

/// A request to the plan domain `bench-plans` for `key`, with extra entries.
pub fn plan_req(key: &str, extra: &[(&str, &str)]) -> Request {
    Request {
        domain: "bench-plans".into(),
        descriptors: vec![Descriptor {
            entries: std::iter::once(Entry::new("api_key", key))
                .chain(extra.iter().map(|(k, v)| Entry::new(*k, *v)))
                .collect(),
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

/// A request to the token plan domain `bench-tokens` for [`HOT_KEY`] and
/// model `gpt-4o`: a request check (`usage: None`), or a charge of 100 units
/// of `usage` (e.g. `total_tokens`).
pub fn token_req(usage: Option<&str>) -> Request {
    Request {
        domain: "bench-tokens".into(),
        descriptors: vec![Descriptor {
            entries: [("api_key", HOT_KEY), ("model", "gpt-4o")]
                .into_iter()
                .chain(usage.map(|u| ("usage", u)))
                .map(|(k, v)| Entry::new(k, v))
                .collect(),
            hits_addend: usage.map(|_| 100),
            ..Default::default()
        }],
        hits_addend: 1,
    }
}
