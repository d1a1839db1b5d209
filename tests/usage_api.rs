//! End-to-end tests of the usage API for custom gateways
//! (`sluice.usage.v1.UsageService`: ReportUsage, Reserve, Settle, served on
//! the RLS port) and of usage-plan limits through `ShouldRateLimit`, over
//! real ports with the generated tonic clients.
//!
//! Nothing here depends on timing: every limit is a CALENDAR_DAY (or
//! CALENDAR_MONTH) limit in UTC, and each server starts only when midnight
//! UTC is more than `EDGE_MARGIN` seconds away (a month starts at a midnight
//! too), so no window rolls over during a test.
//!
//! To read a limit's exact state without changing it, a test reports zero
//! tokens (`peek`): a report of nothing counts nothing and returns every
//! limit's state. A plan may carry a wide "ledger" limit that never binds:
//! its `remaining` tells the exact amount counted, even past a smaller limit
//! whose `remaining` stops at 0.

mod common;

use std::fmt::Debug;

use common::*;
use prost_types::Duration;
use sluice::proto::admin::*;
use sluice::proto::rls::RateLimitResponse;
use sluice::proto::usage::usage_service_client::UsageServiceClient;
use sluice::proto::usage::{
    LimitStatus, ReportUsageRequest, ReportUsageResponse, ReserveRequest, ReserveResponse,
    SettleRequest, SettleResponse, Settled,
};
use sluice::storage::unix_now;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The domain the plans govern.
const DOMAIN: &str = "llm";

/// A config rule in the same domain (descriptors without a key use it).
const CONFIG: &str = r#"
domain: llm
descriptors:
  - key: remote_address
    rate_limit: {unit: day, requests_per_unit: 2, name: per-ip}
"#;

const DAY_SECS: u64 = 86_400;
/// Seconds before midnight UTC within which a test waits for the next day.
const EDGE_MARGIN: u64 = 180;

type UsageClient = UsageServiceClient<Channel>;

// ------------------------------------------------------------------ helpers

/// A server whose calendar-day limits cannot roll over during the test.
async fn server() -> TestServer {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    TestServer::start(CONFIG).await
}

/// A usage client on its own connection to the RLS port.
async fn usage_client(s: &TestServer) -> UsageClient {
    UsageServiceClient::connect(format!("http://{}", s.addr))
        .await
        .expect("connect the usage client")
}

fn stage(domain: &str) -> ApiStage {
    ApiStage {
        domain: domain.to_owned(),
        ..Default::default()
    }
}

/// A TOTAL-tokens, requests or spend limit of `n` per `window`, per key.
fn limit(name: &str, metric: Metric, n: i64, window: LimitWindow) -> UsageLimit {
    UsageLimit {
        name: name.to_owned(),
        metric: metric as i32,
        count: TokenCount::Total as i32,
        limit: n,
        window: window as i32,
        ..Default::default()
    }
}

/// `n` total tokens per UTC calendar day, per key.
fn tokens_per_day(name: &str, n: i64) -> UsageLimit {
    limit(name, Metric::Tokens, n, LimitWindow::CalendarDay)
}

fn usage_plan(name: &str, domain: &str, limits: Vec<UsageLimit>) -> UsagePlan {
    UsagePlan {
        name: name.to_owned(),
        stages: vec![stage(domain)],
        limits,
        ..Default::default()
    }
}

/// Unwraps a response, panicking with the status.
#[track_caller]
fn ok<T>(what: &str, r: Result<tonic::Response<T>, Status>) -> T {
    match r {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("{what}: unexpected {:?}: {}", s.code(), s.message()),
    }
}

/// Expects an error with `code`; returns its message.
#[track_caller]
fn err<T: Debug>(what: &str, r: Result<tonic::Response<T>, Status>, code: Code) -> String {
    match r {
        Ok(r) => panic!("{what}: expected {code:?}, got {:?}", r.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            s.message().to_owned()
        }
    }
}

/// Expects INVALID_ARGUMENT whose message names `field`.
#[track_caller]
fn invalid<T: Debug>(what: &str, r: Result<tonic::Response<T>, Status>, field: &str) {
    let m = err(what, r, Code::InvalidArgument);
    assert!(
        m.contains(field),
        "{what}: message {m:?} must name {field:?}"
    );
}

async fn create_plan(admin: &mut AdminClient, p: UsagePlan) -> UsagePlan {
    let name = p.name.clone();
    ok(
        &format!("CreateUsagePlan {name}"),
        admin
            .create_usage_plan(CreateUsagePlanRequest {
                usage_plan: Some(p),
            })
            .await,
    )
}

/// Creates a key `name` of `customer` bound to `plan`; returns its value.
async fn key_for(admin: &mut AdminClient, plan: &str, name: &str, customer: &str) -> String {
    let r = ok(
        &format!("CreateApiKey {name}"),
        admin
            .create_api_key(CreateApiKeyRequest {
                api_key: Some(ApiKey {
                    name: name.to_owned(),
                    customer_id: customer.to_owned(),
                    ..Default::default()
                }),
                value: String::new(),
                disabled: false,
            })
            .await,
    );
    ok(
        &format!("CreateUsagePlanKey {plan}/{name}"),
        admin
            .create_usage_plan_key(CreateUsagePlanKeyRequest {
                plan: plan.to_owned(),
                key: name.to_owned(),
            })
            .await,
    );
    r.value
}

/// Creates `p` and a key `key` bound to it; returns the key's value.
async fn plan_with_key(admin: &mut AdminClient, p: UsagePlan, key: &str) -> String {
    let p = create_plan(admin, p).await;
    key_for(admin, &p.name, key, "").await
}

fn report_req(key: &str, model: &str, input: i64, output: i64, id: &str) -> ReportUsageRequest {
    ReportUsageRequest {
        domain: DOMAIN.to_owned(),
        stage: String::new(),
        api_key: key.to_owned(),
        model: model.to_owned(),
        input_tokens: input,
        output_tokens: output,
        request_id: id.to_owned(),
    }
}

async fn report(
    u: &mut UsageClient,
    key: &str,
    model: &str,
    input: i64,
    output: i64,
    id: &str,
) -> ReportUsageResponse {
    ok(
        &format!("ReportUsage {model} {input}+{output} id {id:?}"),
        u.report_usage(report_req(key, model, input, output, id))
            .await,
    )
}

fn reserve_req(key: &str, model: &str, input: i64, output: i64) -> ReserveRequest {
    ReserveRequest {
        domain: DOMAIN.to_owned(),
        stage: String::new(),
        api_key: key.to_owned(),
        model: model.to_owned(),
        input_tokens: input,
        output_tokens: output,
        ttl: None,
    }
}

async fn reserve(
    u: &mut UsageClient,
    key: &str,
    model: &str,
    input: i64,
    output: i64,
) -> ReserveResponse {
    ok(
        &format!("Reserve {model} {input}+{output}"),
        u.reserve(reserve_req(key, model, input, output)).await,
    )
}

async fn try_settle(
    u: &mut UsageClient,
    id: &str,
    input: i64,
    output: i64,
) -> Result<tonic::Response<SettleResponse>, Status> {
    u.settle(SettleRequest {
        reservation_id: id.to_owned(),
        input_tokens: input,
        output_tokens: output,
    })
    .await
}

async fn settle(u: &mut UsageClient, id: &str, input: i64, output: i64) -> SettleResponse {
    ok(
        &format!("Settle {id} {input}+{output}"),
        try_settle(u, id, input, output).await,
    )
}

/// The status of the limit named `name` ("plan/limit").
#[track_caller]
fn lim<'a>(limits: &'a [LimitStatus], name: &str) -> &'a LimitStatus {
    limits
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no limit {name:?} in {limits:?}"))
}

/// The remaining amount of limit `name` for `key` (and `model`), read by a
/// report of zero tokens (which counts nothing).
async fn peek(u: &mut UsageClient, key: &str, model: &str, name: &str) -> i64 {
    let r = report(u, key, model, 0, 0, "").await;
    assert!(!r.duplicate);
    lim(&r.limits, name).remaining
}

/// A ShouldRateLimit request call (no `usage` entry) for `key`, with extra
/// entries (e.g. the model).
async fn call(s: &TestServer, key: &str, extra: &[(&str, &str)]) -> RateLimitResponse {
    let mut pairs = vec![("api_key", key)];
    pairs.extend_from_slice(extra);
    s.hit(DOMAIN, &pairs).await
}

/// A response header's value.
fn header<'a>(r: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

fn has_header(r: &RateLimitResponse, prefix: &str) -> bool {
    r.response_headers_to_add
        .iter()
        .any(|h| h.key.starts_with(prefix))
}

#[track_caller]
fn assert_allowed(r: &RateLimitResponse, what: &str) {
    assert_eq!(r.overall_code, OK, "{what}: {r:?}");
    assert!(r.statuses.iter().all(|s| s.code == OK), "{what}: {r:?}");
    assert_eq!(header(r, "x-sluice-reason"), None, "{what}: {r:?}");
    assert_eq!(header(r, "retry-after"), None, "{what}: {r:?}");
}

#[track_caller]
fn assert_refused(r: &RateLimitResponse, reason: &str, scope: Option<&str>, what: &str) {
    assert_eq!(r.overall_code, OVER_LIMIT, "{what}: {r:?}");
    assert_eq!(r.statuses[0].code, OVER_LIMIT, "{what}: {r:?}");
    assert_eq!(
        header(r, "x-sluice-reason"),
        Some(reason),
        "{what}: x-sluice-reason: {r:?}"
    );
    assert_eq!(
        header(r, "x-sluice-scope"),
        scope,
        "{what}: x-sluice-scope: {r:?}"
    );
}

/// `x-ratelimit-remaining-tokens`, parsed.
#[track_caller]
fn remaining_tokens(r: &RateLimitResponse) -> i64 {
    header(r, "x-ratelimit-remaining-tokens")
        .unwrap_or_else(|| panic!("x-ratelimit-remaining-tokens: {r:?}"))
        .parse()
        .expect("a number")
}

/// Seconds left in the current UTC day (an upper bound for resets).
fn day_left() -> i64 {
    i64::try_from(DAY_SECS - unix_now() % DAY_SECS).expect("fits")
}

#[track_caller]
fn assert_reset_in_day(d: Option<&Duration>, what: &str) {
    let d = d.unwrap_or_else(|| panic!("{what}: a duration must be set"));
    // day_left() is read after the server computed d: the day can only have
    // shortened since, so allow the seconds the call took.
    assert!(
        d.seconds >= 1 && d.seconds <= day_left() + 60,
        "{what}: {d:?} not within today (left {}s)",
        day_left()
    );
}

// ------------------------------------------------------- 1. ReportUsage

#[tokio::test(flavor = "multi_thread")]
async fn report_usage_counts_a_request_id_once_and_spends_the_token_limit() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("idem", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;

    let r = call(&s, &key, &[]).await;
    assert_allowed(&r, "before any report");
    assert_eq!(remaining_tokens(&r), 1000);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("1000"));

    // (request id, input, output, duplicate?, remaining after)
    let steps: [(&str, i64, i64, bool, i64); 5] = [
        ("r1", 100, 50, false, 850),
        ("r1", 100, 50, true, 850),
        ("r2", 100, 50, false, 700),
        ("", 100, 50, false, 550),
        ("", 100, 50, false, 400),
    ];
    for (i, (id, input, output, dup, left)) in steps.into_iter().enumerate() {
        let what = format!("report {i} (id {id:?})");
        let rep = report(&mut u, &key, "", input, output, id).await;
        assert_eq!(rep.duplicate, dup, "{what}: {rep:?}");
        let st = lim(&rep.limits, "idem/tpd");
        assert!(st.tokens, "{what}: {st:?}");
        assert_eq!((st.limit, st.remaining), (1000, left), "{what}: {st:?}");
        assert_reset_in_day(st.reset_after.as_ref(), &what);
        // The OpenAI header of the next request call agrees.
        let r = call(&s, &key, &[]).await;
        assert_allowed(&r, &what);
        assert_eq!(remaining_tokens(&r), left, "{what}: {r:?}");
    }

    // Retries racing each other over several connections still count once.
    let mut set = JoinSet::new();
    for _ in 0..8 {
        let mut c = usage_client(&s).await;
        let key = key.clone();
        set.spawn(async move {
            ok(
                "concurrent retry",
                c.report_usage(report_req(&key, "", 10, 0, "r-conc")).await,
            )
            .duplicate
        });
    }
    let mut firsts = 0;
    while let Some(dup) = set.join_next().await {
        if !dup.expect("task") {
            firsts += 1;
        }
    }
    assert_eq!(firsts, 1, "exactly one of 8 racing retries counts");
    assert_eq!(peek(&mut u, &key, "", "idem/tpd").await, 390);

    // Spend the rest: the next request call is refused for tokens.
    let rep = report(&mut u, &key, "", 300, 90, "").await;
    assert_eq!(lim(&rep.limits, "idem/tpd").remaining, 0);
    let r = call(&s, &key, &[]).await;
    assert_refused(&r, "token-limit", Some("key"), "tokens spent");
    assert_eq!(remaining_tokens(&r), 0);
    let retry: i64 = header(&r, "retry-after")
        .expect("retry-after on a refusal")
        .parse()
        .expect("seconds");
    assert!(
        retry >= 1 && retry <= day_left() + 60,
        "retry-after {retry}"
    );

    // A report over the limit still counts (the tokens were spent) and is
    // not an error; a duplicate of an old id still counts nothing.
    let rep = report(&mut u, &key, "", 5, 5, "").await;
    assert_eq!(lim(&rep.limits, "idem/tpd").remaining, 0);
    assert!(report(&mut u, &key, "", 100, 50, "r2").await.duplicate);

    // Ids are per key: another key of the plan reporting "r1" is counted
    // (it was taken for a duplicate of alice's, its tokens lost).
    let bob = key_for(&mut admin, "idem", "bob", "").await;
    let rep = report(&mut u, &bob, "", 100, 50, "r1").await;
    assert!(!rep.duplicate, "{rep:?}");
    assert_eq!(lim(&rep.limits, "idem/tpd").remaining, 850);
    assert!(report(&mut u, &bob, "", 100, 50, "r1").await.duplicate);
    s.shutdown().await;
}

// ------------------------------------------------------- 2. validation

#[tokio::test(flavor = "multi_thread")]
async fn usage_calls_are_validated_with_canonical_codes() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("val", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;

    let base = || report_req(&key, "", 10, 10, "");
    invalid(
        "ReportUsage without domain",
        u.report_usage(ReportUsageRequest {
            domain: String::new(),
            ..base()
        })
        .await,
        "domain",
    );
    invalid(
        "ReportUsage without api_key",
        u.report_usage(ReportUsageRequest {
            api_key: String::new(),
            ..base()
        })
        .await,
        "api_key",
    );
    invalid(
        "ReportUsage negative input",
        u.report_usage(ReportUsageRequest {
            input_tokens: -1,
            ..base()
        })
        .await,
        "input_tokens",
    );
    // A figure no model produces would exhaust every limit at once.
    invalid(
        "ReportUsage of i64::MAX input tokens",
        u.report_usage(ReportUsageRequest {
            input_tokens: i64::MAX,
            ..base()
        })
        .await,
        "input_tokens: at most 1000000000 per call",
    );
    invalid(
        "ReportUsage negative output",
        u.report_usage(ReportUsageRequest {
            output_tokens: -5,
            ..base()
        })
        .await,
        "output_tokens",
    );
    invalid(
        "ReportUsage model of 257 bytes",
        u.report_usage(ReportUsageRequest {
            model: "m".repeat(257),
            ..base()
        })
        .await,
        "model: at most 256 bytes",
    );
    invalid(
        "ReportUsage request_id of 257 bytes",
        u.report_usage(ReportUsageRequest {
            request_id: "x".repeat(257),
            ..base()
        })
        .await,
        "request_id",
    );
    // 256 bytes is the most allowed.
    let rep = ok(
        "ReportUsage request_id of 256 bytes",
        u.report_usage(ReportUsageRequest {
            request_id: "x".repeat(256),
            ..base()
        })
        .await,
    );
    assert!(!rep.duplicate);
    assert_eq!(lim(&rep.limits, "val/tpd").remaining, 980);
    let m = err(
        "ReportUsage unknown key",
        u.report_usage(ReportUsageRequest {
            api_key: "no-such-key-value-0123456789".into(),
            ..base()
        })
        .await,
        Code::PermissionDenied,
    );
    assert_eq!(m, "invalid API key: no key has this value");
    err(
        "ReportUsage ungoverned domain",
        u.report_usage(ReportUsageRequest {
            domain: "nobody".into(),
            ..base()
        })
        .await,
        Code::FailedPrecondition,
    );
    // None of the refused reports counted anything.
    assert_eq!(peek(&mut u, &key, "", "val/tpd").await, 980);

    let rbase = || reserve_req(&key, "", 10, 10);
    invalid(
        "Reserve without domain",
        u.reserve(ReserveRequest {
            domain: String::new(),
            ..rbase()
        })
        .await,
        "domain",
    );
    invalid(
        "Reserve without api_key",
        u.reserve(ReserveRequest {
            api_key: String::new(),
            ..rbase()
        })
        .await,
        "api_key",
    );
    invalid(
        "Reserve negative input",
        u.reserve(ReserveRequest {
            input_tokens: -1,
            ..rbase()
        })
        .await,
        "input_tokens",
    );
    invalid(
        "Reserve of 1000000001 output tokens",
        u.reserve(ReserveRequest {
            output_tokens: 1_000_000_001,
            ..rbase()
        })
        .await,
        "output_tokens: at most 1000000000 per call",
    );
    invalid(
        "Reserve model of 3 MB",
        u.reserve(ReserveRequest {
            model: "m".repeat(3 << 20),
            ..rbase()
        })
        .await,
        "model: at most 256 bytes",
    );
    invalid(
        "Reserve ttl 0",
        u.reserve(ReserveRequest {
            ttl: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..rbase()
        })
        .await,
        "ttl",
    );
    invalid(
        "Reserve ttl 3601 s",
        u.reserve(ReserveRequest {
            ttl: Some(Duration {
                seconds: 3601,
                nanos: 0,
            }),
            ..rbase()
        })
        .await,
        "ttl",
    );
    invalid(
        "Reserve ttl 3600.5 s",
        u.reserve(ReserveRequest {
            ttl: Some(Duration {
                seconds: 3600,
                nanos: 500_000_000,
            }),
            ..rbase()
        })
        .await,
        "ttl",
    );
    err(
        "Reserve ungoverned domain",
        u.reserve(ReserveRequest {
            domain: "nobody".into(),
            ..rbase()
        })
        .await,
        Code::FailedPrecondition,
    );
    // An invalid key is a decision for Reserve, as in ShouldRateLimit.
    let r = ok(
        "Reserve unknown key",
        u.reserve(ReserveRequest {
            api_key: "no-such-key-value-0123456789".into(),
            ..rbase()
        })
        .await,
    );
    assert!(!r.allowed, "{r:?}");
    assert_eq!(r.reason, "invalid-key");
    assert!(r.reservation_id.is_empty());
    // Nothing was held by the refused reservations.
    assert_eq!(peek(&mut u, &key, "", "val/tpd").await, 980);

    // 3600 s is the longest TTL allowed.
    let r = ok(
        "Reserve ttl 3600 s",
        u.reserve(ReserveRequest {
            ttl: Some(Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..rbase()
        })
        .await,
    );
    assert!(r.allowed, "{r:?}");
    assert_eq!(lim(&r.limits, "val/tpd").remaining, 960);

    err(
        "Settle unknown id",
        try_settle(&mut u, "0123456789abcdef0123456789abcdef", 1, 1).await,
        Code::NotFound,
    );
    invalid(
        "Settle without id",
        try_settle(&mut u, "", 1, 1).await,
        "reservation_id",
    );
    invalid(
        "Settle negative output",
        try_settle(&mut u, &r.reservation_id, 1, -1).await,
        "output_tokens",
    );
    // The invalid settle left the reservation in place.
    let done = settle(&mut u, &r.reservation_id, 5, 5).await;
    assert_eq!(
        done.limits,
        vec![Settled {
            limit: "tpd".into(),
            held: 20,
            charged: 10
        }]
    );
    // A retried Settle is told it was settled (not that the id is
    // unknown), and counts nothing.
    let m = err(
        "Settle twice",
        try_settle(&mut u, &r.reservation_id, 5, 5).await,
        Code::AlreadyExists,
    );
    assert!(m.contains("already settled"), "{m}");
    assert_eq!(peek(&mut u, &key, "", "val/tpd").await, 970);
    s.shutdown().await;
}

// ------------------------------------------------------- 3. Reserve / Settle

#[tokio::test(flavor = "multi_thread")]
async fn reserve_holds_the_estimate_and_settle_refunds_or_charges_the_difference() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("res", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;

    let first = reserve(&mut u, &key, "", 300, 500).await;
    assert!(first.allowed, "{first:?}");
    assert!(!first.reservation_id.is_empty());
    assert!(first.reason.is_empty() && first.scope.is_empty());
    assert_eq!(first.retry_after, None);
    let st = lim(&first.limits, "res/tpd");
    assert!(st.tokens);
    assert_eq!((st.limit, st.remaining), (1000, 200));
    assert!(first
        .headers
        .iter()
        .any(|h| h.key == "x-ratelimit-remaining-tokens" && h.value == "200"));
    assert!(!first.headers.iter().any(|h| h.key == "retry-after"));

    // The same estimate no longer fits: refused, nothing held.
    let second = reserve(&mut u, &key, "", 300, 500).await;
    assert!(!second.allowed, "{second:?}");
    assert!(second.reservation_id.is_empty());
    assert_eq!(second.reason, "token-limit");
    assert_eq!(second.scope, "key");
    assert_reset_in_day(second.retry_after.as_ref(), "retry_after");
    assert_eq!(lim(&second.limits, "res/tpd").remaining, 200);
    assert!(second.headers.iter().any(|h| h.key == "retry-after"));
    // A request call is still allowed (200 left) ...
    assert_allowed(&call(&s, &key, &[]).await, "200 tokens left");
    assert_eq!(peek(&mut u, &key, "", "res/tpd").await, 200);

    // ... and the actual usage was less: the difference is refunded.
    let done = settle(&mut u, &first.reservation_id, 300, 100).await;
    assert_eq!(
        done.limits,
        vec![Settled {
            limit: "tpd".into(),
            held: 800,
            charged: 400
        }]
    );
    assert_eq!(peek(&mut u, &key, "", "res/tpd").await, 600);

    // Now 500 fits.
    let third = reserve(&mut u, &key, "", 300, 200).await;
    assert!(third.allowed, "{third:?}");
    assert_eq!(lim(&third.limits, "res/tpd").remaining, 100);

    // The response used more than estimated: the extra is charged.
    let done = settle(&mut u, &third.reservation_id, 300, 250).await;
    assert_eq!(
        done.limits,
        vec![Settled {
            limit: "tpd".into(),
            held: 500,
            charged: 550
        }]
    );
    assert_eq!(peek(&mut u, &key, "", "res/tpd").await, 50);

    // Held amounts count for request calls too: 50 left, a hold of 50 empties it.
    let fourth = reserve(&mut u, &key, "", 50, 0).await;
    assert!(fourth.allowed, "{fourth:?}");
    let r = call(&s, &key, &[]).await;
    assert_refused(&r, "token-limit", Some("key"), "all held");
    // Settling at 0 gives it all back.
    let done = settle(&mut u, &fourth.reservation_id, 0, 0).await;
    assert_eq!(done.limits[0].charged, 0);
    assert_allowed(&call(&s, &key, &[]).await, "refunded");
    assert_eq!(peek(&mut u, &key, "", "res/tpd").await, 50);
    s.shutdown().await;
}

// ------------------------------------------------------- 4. concurrency

/// One reservation's estimate: 50_000 input + 50_000 output tokens at 1.00
/// per million each = 100_000 micro-units.
const EST_IN: i64 = 50_000;
const EST_OUT: i64 = 50_000;
const EST_MICROS: i64 = 100_000;
const BUDGET: i64 = 1_000_000;
/// A spend limit that never binds: its `remaining` reads the exact spend.
const LEDGER: i64 = 1_000_000_000;

/// `n` concurrent Reserve calls of the estimate for `key`, spread over
/// `clients`; returns the ids of the allowed ones. Every refusal must be
/// budget-exceeded.
async fn reserve_concurrently(clients: &[UsageClient], key: &str, n: usize) -> Vec<String> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let mut c = clients[i % clients.len()].clone();
        let key = key.to_owned();
        set.spawn(async move {
            ok(
                "concurrent Reserve",
                c.reserve(reserve_req(&key, "gpt-4o", EST_IN, EST_OUT))
                    .await,
            )
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        let r = r.expect("task");
        if r.allowed {
            ids.push(r.reservation_id);
        } else {
            assert_eq!(r.reason, "budget-exceeded", "{r:?}");
            assert_eq!(r.scope, "key", "{r:?}");
            assert!(r.reservation_id.is_empty());
        }
    }
    ids
}

/// Settles `ids` concurrently at (input, output); returns the total charged
/// to the budget.
async fn settle_concurrently(
    clients: &[UsageClient],
    ids: &[String],
    input: i64,
    output: i64,
) -> i64 {
    let mut set = JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        let id = id.clone();
        set.spawn(async move { settle(&mut c, &id, input, output).await });
    }
    let mut charged = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("task");
        let b = r
            .limits
            .iter()
            .find(|l| l.limit == "budget")
            .unwrap_or_else(|| panic!("budget held: {r:?}"));
        assert_eq!(b.held, EST_MICROS, "{r:?}");
        charged += b.charged;
    }
    charged
}

/// (budget remaining, exact spend) of `key`.
async fn spend(u: &mut UsageClient, key: &str) -> (i64, i64) {
    let r = report(u, key, "gpt-4o", 0, 0, "").await;
    (
        lim(&r.limits, "conc/budget").remaining,
        LEDGER - lim(&r.limits, "conc/ledger").remaining,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reservations_never_overspend_the_budget() {
    let s = server().await;
    let mut admin = s.admin().await;
    let mut p = usage_plan(
        "conc",
        DOMAIN,
        vec![
            limit("budget", Metric::Spend, BUDGET, LimitWindow::CalendarDay),
            limit("ledger", Metric::Spend, LEDGER, LimitWindow::CalendarMonth),
        ],
    );
    p.prices.insert(
        "gpt-4o*".into(),
        ModelPrice {
            input_per_million: 1_000_000,
            output_per_million: 1_000_000,
        },
    );
    create_plan(&mut admin, p).await;
    let a = key_for(&mut admin, "conc", "a", "").await;
    let b = key_for(&mut admin, "conc", "b", "").await;
    let c = key_for(&mut admin, "conc", "c", "").await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(usage_client(&s).await);
    }
    let mut u = usage_client(&s).await;

    // Key a: 50 racing reservations of 100_000 against 1_000_000: exactly 10.
    let ids = reserve_concurrently(&clients, &a, 50).await;
    assert_eq!(ids.len(), 10, "exactly budget / estimate reservations fit");
    assert_eq!(spend(&mut u, &a).await, (0, BUDGET), "all of it held");
    let charged = settle_concurrently(&clients, &ids, EST_IN, EST_OUT).await;
    assert_eq!(charged, BUDGET);
    assert_eq!(
        spend(&mut u, &a).await,
        (0, BUDGET),
        "spend is the budget, never more"
    );

    // Key b: actual usage under the estimate (30_000 + 30_000 = 60_000).
    let ids = reserve_concurrently(&clients, &b, 50).await;
    assert_eq!(ids.len(), 10);
    let charged = settle_concurrently(&clients, &ids, 30_000, 30_000).await;
    assert_eq!(charged, 600_000);
    assert_eq!(spend(&mut u, &b).await, (400_000, 600_000));
    // The refund makes room for exactly 4 more estimates.
    let ids = reserve_concurrently(&clients, &b, 50).await;
    assert_eq!(ids.len(), 4, "400_000 left holds 4 estimates");
    let charged = settle_concurrently(&clients, &ids, 30_000, 30_000).await;
    assert_eq!(charged, 240_000);
    let (left, spent) = spend(&mut u, &b).await;
    assert_eq!((left, spent), (160_000, 840_000));
    assert!(spent <= BUDGET);

    // The contrast: a request call only *checks* token and spend limits
    // (the cost is unknown until the response), so 50 racing request calls
    // all pass before any is charged; charging their responses afterwards
    // (ShouldRateLimit usage descriptors or ReportUsage) then overspends the
    // budget 5x. Reserve holds the estimate at decision time instead, which
    // is what bounds concurrent spend above.
    let mut set = JoinSet::new();
    for i in 0..50 {
        let mut rls = if i % 5 == 0 {
            s.new_client().await
        } else {
            s.client()
        };
        let c = c.clone();
        set.spawn(async move {
            rls.should_rate_limit(request(
                DOMAIN,
                vec![desc(&[("api_key", c.as_str()), ("model", "gpt-4o")])],
            ))
            .await
            .expect("ShouldRateLimit")
            .into_inner()
            .overall_code
        });
    }
    let mut passed = 0;
    while let Some(code) = set.join_next().await {
        if code.expect("task") == OK {
            passed += 1;
        }
    }
    assert_eq!(passed, 50, "check-only request calls all pass");
    for _ in 0..50 {
        report(&mut u, &c, "gpt-4o", EST_IN, EST_OUT, "").await;
    }
    assert_eq!(spend(&mut u, &c).await, (0, 50 * EST_MICROS));
    s.shutdown().await;
}

// ------------------------------------------------------- 5. per-model limits

#[tokio::test(flavor = "multi_thread")]
async fn per_model_limits_are_shared_by_a_pattern_through_both_apis() {
    let s = server().await;
    let mut admin = s.admin().await;
    let mut l = tokens_per_day("tpd", 1000);
    l.model_limits.insert("gpt-4o*".into(), 100);
    let key = plan_with_key(&mut admin, usage_plan("pm", DOMAIN, vec![l]), "alice").await;
    let mut u = usage_client(&s).await;
    const GPT: &str = "pm/tpd[gpt-4o*]";
    const DEFAULT: &str = "pm/tpd";

    let rep = report(&mut u, &key, "gpt-4o-mini", 30, 30, "").await;
    let st = lim(&rep.limits, GPT);
    assert_eq!((st.limit, st.remaining), (100, 40));
    let rep = report(&mut u, &key, "gpt-4o", 20, 10, "").await;
    assert_eq!(lim(&rep.limits, GPT).remaining, 10, "gpt-4o shares it");

    let r = call(&s, &key, &[("model", "gpt-4o")]).await;
    assert_allowed(&r, "gpt-4o with 10 left");
    assert_eq!(remaining_tokens(&r), 10);

    let rep = report(&mut u, &key, "claude-3", 150, 50, "").await;
    let st = lim(&rep.limits, DEFAULT);
    assert_eq!((st.limit, st.remaining), (1000, 800), "claude: the default");

    let rep = report(&mut u, &key, "gpt-4o", 10, 0, "").await;
    assert_eq!(lim(&rep.limits, GPT).remaining, 0);

    let r = call(&s, &key, &[("model", "gpt-4o")]).await;
    assert_refused(&r, "token-limit", Some("key"), "gpt-4o spent");
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.name.as_str()),
        Some(GPT),
        "{r:?}"
    );
    assert_refused(
        &call(&s, &key, &[("model", "gpt-4o-mini")]).await,
        "token-limit",
        Some("key"),
        "gpt-4o-mini shares it",
    );
    let r = call(&s, &key, &[("model", "claude-3")]).await;
    assert_allowed(&r, "claude still has its own");
    assert_eq!(remaining_tokens(&r), 800);
    let r = call(&s, &key, &[]).await;
    assert_allowed(&r, "no model: the default");
    assert_eq!(remaining_tokens(&r), 800);
    // Reserve sees the same counters.
    let r = reserve(&mut u, &key, "gpt-4o", 1, 0).await;
    assert!(!r.allowed, "{r:?}");
    assert_eq!(r.reason, "token-limit");
    let r = reserve(&mut u, &key, "claude-3", 800, 0).await;
    assert!(r.allowed, "{r:?}");
    s.shutdown().await;
}

// ------------------------------------------------------- 6. customer scope

#[tokio::test(flavor = "multi_thread")]
async fn customer_limits_are_shared_by_the_customer_keys() {
    let s = server().await;
    let mut admin = s.admin().await;
    let mut l = tokens_per_day("ctpd", 1000);
    l.scope = Scope::Customer as i32;
    create_plan(&mut admin, usage_plan("cust", DOMAIN, vec![l])).await;
    let a = key_for(&mut admin, "cust", "acme-a", "acme").await;
    let b = key_for(&mut admin, "cust", "acme-b", "acme").await;
    let other = key_for(&mut admin, "cust", "globex", "globex").await;
    let mut u = usage_client(&s).await;
    const NAME: &str = "cust/customer/ctpd";

    let rep = report(&mut u, &a, "", 400, 200, "").await;
    assert_eq!(lim(&rep.limits, NAME).remaining, 400);
    let r = call(&s, &b, &[]).await;
    assert_allowed(&r, "b sees acme's 400 left");
    assert_eq!(remaining_tokens(&r), 400);

    let rep = report(&mut u, &a, "", 400, 0, "").await;
    assert_eq!(lim(&rep.limits, NAME).remaining, 0);
    let r = call(&s, &b, &[]).await;
    assert_refused(&r, "token-limit", Some("customer"), "key b, acme spent");
    assert_refused(
        &call(&s, &a, &[]).await,
        "token-limit",
        Some("customer"),
        "key a",
    );
    let r = reserve(&mut u, &b, "", 1, 0).await;
    assert!(!r.allowed, "{r:?}");
    assert_eq!(
        (r.reason.as_str(), r.scope.as_str()),
        ("token-limit", "customer")
    );

    let r = call(&s, &other, &[]).await;
    assert_allowed(&r, "another customer");
    assert_eq!(remaining_tokens(&r), 1000);
    assert_eq!(peek(&mut u, &other, "", NAME).await, 1000);
    s.shutdown().await;
}

// ------------------------------------------------------- 7. charge descriptors

#[tokio::test(flavor = "multi_thread")]
async fn usage_descriptors_charge_tokens_and_request_descriptors_check_them() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan(
            "chg",
            DOMAIN,
            vec![
                tokens_per_day("tpd", 1000),
                limit(
                    "ledger",
                    Metric::Tokens,
                    1_000_000,
                    LimitWindow::CalendarMonth,
                ),
            ],
        ),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;
    let k = key.as_str();
    let check = || request(DOMAIN, vec![desc_hits(&[("api_key", k)], 0)]);
    let charge = |kind: &'static str, n: u64| {
        request(
            DOMAIN,
            vec![desc_hits(&[("api_key", k), ("usage", kind)], n)],
        )
    };

    assert_allowed(&s.check(check()).await, "check before any charge");
    let r = s.check(charge("total_tokens", 700)).await;
    assert_allowed(&r, "700 of 1000");
    assert_eq!(peek(&mut u, k, "", "chg/tpd").await, 300);
    assert_eq!(peek(&mut u, k, "", "chg/ledger").await, 1_000_000 - 700);
    assert_allowed(&s.check(check()).await, "check with 300 left");

    // Counted in full even over the limit: the tokens were spent.
    let r = s.check(charge("total_tokens", 700)).await;
    assert_eq!(r.overall_code, OVER_LIMIT, "now over the limit: {r:?}");
    assert_eq!(peek(&mut u, k, "", "chg/tpd").await, 0);
    assert_eq!(peek(&mut u, k, "", "chg/ledger").await, 1_000_000 - 1400);
    let r = s.check(check()).await;
    assert_refused(&r, "token-limit", Some("key"), "check once spent");

    // Input and output kinds count in a TOTAL limit too.
    s.check(charge("input_tokens", 30)).await;
    s.check(charge("output_tokens", 20)).await;
    assert_eq!(peek(&mut u, k, "", "chg/ledger").await, 1_000_000 - 1450);

    // An unknown kind is an invalid request and counts nothing.
    let r = s.check(charge("foo", 5)).await;
    assert_refused(&r, "invalid-request", None, "usage=foo");
    assert_eq!(peek(&mut u, k, "", "chg/ledger").await, 1_000_000 - 1450);
    s.shutdown().await;
}

// ------------------------------------------------------- 8. header styles

#[tokio::test(flavor = "multi_thread")]
async fn header_styles_choose_the_rate_limit_headers() {
    let s = server().await;
    let mut admin = s.admin().await;
    let limits = || {
        vec![
            limit("rpd", Metric::Requests, 100, LimitWindow::CalendarDay),
            tokens_per_day("tpd", 1000),
        ]
    };
    let mut ietf = usage_plan("ietf", DOMAIN, limits());
    ietf.header_style = HeaderStyle::Ietf as i32;
    create_plan(&mut admin, ietf).await;
    let mut none = usage_plan("quiet", "quiet", limits());
    none.header_style = HeaderStyle::None as i32;
    create_plan(&mut admin, none).await;
    create_plan(&mut admin, usage_plan("oai", "oai", limits())).await;
    let ki = key_for(&mut admin, "ietf", "i", "").await;
    let kn = key_for(&mut admin, "quiet", "n", "").await;
    let ko = key_for(&mut admin, "oai", "o", "").await;
    let mut u = usage_client(&s).await;

    // IETF: RateLimit-Policy and RateLimit, no OpenAI headers.
    let r = call(&s, &ki, &[]).await;
    assert_allowed(&r, "ietf");
    let policy = header(&r, "ratelimit-policy").expect("ratelimit-policy");
    assert!(
        policy.contains("\"ietf/rpd\";q=100;w=86400"),
        "policy {policy:?}"
    );
    assert!(
        policy.contains("\"ietf/tpd\";q=1000;w=86400;sluice-unit=\"tokens\""),
        "policy {policy:?}"
    );
    let current = header(&r, "ratelimit").expect("ratelimit");
    assert!(current.contains("\"ietf/rpd\";r=99;t="), "{current:?}");
    assert!(current.contains("\"ietf/tpd\";r=1000;t="), "{current:?}");
    assert!(!has_header(&r, "x-ratelimit-"), "{r:?}");
    let rep = ok(
        "spend ietf",
        u.report_usage(ReportUsageRequest {
            input_tokens: 1000,
            ..report_req(&ki, "", 0, 0, "")
        })
        .await,
    );
    assert_eq!(lim(&rep.limits, "ietf/tpd").remaining, 0);
    let r = call(&s, &ki, &[]).await;
    assert_refused(&r, "token-limit", Some("key"), "ietf spent");
    let current = header(&r, "ratelimit").expect("ratelimit");
    assert!(current.contains("\"ietf/tpd\";r=0;t="), "{current:?}");
    assert!(header(&r, "retry-after").is_some(), "{r:?}");

    // NONE: no rate-limit headers at all, even on a refusal.
    let r = s.hit("quiet", &[("api_key", kn.as_str())]).await;
    assert_allowed(&r, "none");
    assert!(!has_header(&r, "x-ratelimit-"), "{r:?}");
    assert!(!has_header(&r, "ratelimit"), "{r:?}");
    let rep = ok(
        "spend none",
        u.report_usage(ReportUsageRequest {
            domain: "quiet".into(),
            ..report_req(&kn, "", 1000, 0, "")
        })
        .await,
    );
    assert_eq!(lim(&rep.limits, "quiet/tpd").remaining, 0);
    let r = s.hit("quiet", &[("api_key", kn.as_str())]).await;
    assert_refused(&r, "token-limit", Some("key"), "none spent");
    assert!(!has_header(&r, "x-ratelimit-"), "{r:?}");
    assert!(!has_header(&r, "ratelimit"), "{r:?}");
    assert_eq!(header(&r, "retry-after"), None, "{r:?}");
    let rr = ok(
        "Reserve none",
        u.reserve(ReserveRequest {
            domain: "quiet".into(),
            ..reserve_req(&kn, "", 1, 0)
        })
        .await,
    );
    assert!(!rr.allowed);
    assert!(rr.headers.is_empty(), "{rr:?}");

    // OPENAI (the default): x-ratelimit-*, retry-after only when refused.
    let r = s.hit("oai", &[("api_key", ko.as_str())]).await;
    assert_allowed(&r, "openai");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("99"));
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("1000"));
    assert!(!has_header(&r, "ratelimit"), "{r:?}");
    ok(
        "spend oai",
        u.report_usage(ReportUsageRequest {
            domain: "oai".into(),
            ..report_req(&ko, "", 0, 1000, "")
        })
        .await,
    );
    let r = s.hit("oai", &[("api_key", ko.as_str())]).await;
    assert_refused(&r, "token-limit", Some("key"), "openai spent");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests"),
        Some("99"),
        "the refused call's request is given back"
    );
    let retry: i64 = header(&r, "retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!(retry >= 1 && retry <= day_left() + 60, "{retry}");
    s.shutdown().await;
}

// ------------------------------------------------------- 9. persistence

#[tokio::test(flavor = "multi_thread")]
async fn reported_and_settled_usage_survive_a_restart_but_reservations_do_not() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("keep", DOMAIN, vec![tokens_per_day("tpd", 10_000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;
    const NAME: &str = "keep/tpd";

    let rep = report(&mut u, &key, "", 100, 50, "p1").await;
    assert_eq!(lim(&rep.limits, NAME).remaining, 9_850);
    let settled = reserve(&mut u, &key, "", 300, 500).await;
    assert!(settled.allowed);
    settle(&mut u, &settled.reservation_id, 300, 100).await;
    assert_eq!(peek(&mut u, &key, "", NAME).await, 9_450);
    let open = reserve(&mut u, &key, "", 1_000, 0).await;
    assert!(open.allowed);
    assert_eq!(lim(&open.limits, NAME).remaining, 8_450);
    drop(u);
    drop(admin);

    let dir = s.shutdown().await;
    let s = TestServer::builder()
        .config(CONFIG)
        .data_dir(dir)
        .start()
        .await;
    let mut u = usage_client(&s).await;
    assert_eq!(
        peek(&mut u, &key, "", NAME).await,
        8_450,
        "reported, settled and held tokens survive the restart"
    );
    let r = call(&s, &key, &[]).await;
    assert_allowed(&r, "after restart");
    assert_eq!(remaining_tokens(&r), 8_450);
    assert!(
        report(&mut u, &key, "", 100, 50, "p1").await.duplicate,
        "a request id reported before the restart is still known"
    );

    // Reservations live in memory: after a restart the id is unknown, and
    // (as for a reservation whose TTL ran out) its estimate stays charged.
    err(
        "Settle a reservation from before the restart",
        try_settle(&mut u, &open.reservation_id, 0, 0).await,
        Code::NotFound,
    );
    assert_eq!(peek(&mut u, &key, "", NAME).await, 8_450);
    s.shutdown().await;
}

// ------------------------------------------------------- edges of Settle / TTL

#[tokio::test(flavor = "multi_thread")]
async fn settle_charges_limits_the_estimate_held_nothing_in() {
    let s = server().await;
    let mut admin = s.admin().await;
    let mut output = tokens_per_day("otpd", 1000);
    output.count = TokenCount::Output as i32;
    let key = plan_with_key(
        &mut admin,
        usage_plan("zero", DOMAIN, vec![tokens_per_day("tpd", 1000), output]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;

    // An estimate of prompt tokens only (no max_tokens known): the OUTPUT
    // limit holds 0. Settle replaces the estimate by the actual usage, so
    // the 500 output tokens must be charged there too.
    let r = reserve(&mut u, &key, "", 300, 0).await;
    assert!(r.allowed, "{r:?}");
    let done = settle(&mut u, &r.reservation_id, 300, 500).await;
    assert_eq!(peek(&mut u, &key, "", "zero/tpd").await, 200, "{done:?}");
    assert_eq!(
        peek(&mut u, &key, "", "zero/otpd").await,
        500,
        "output tokens of a settled reservation are charged: {done:?}"
    );

    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn settle_of_a_zero_estimate_charges_the_actual_usage() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("nil", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;
    // No estimate at all (allowed: a check while tokens are left); Settle
    // replaces the estimate 0 by the actual usage: an extra charge of 200.
    let r = reserve(&mut u, &key, "", 0, 0).await;
    assert!(r.allowed, "{r:?}");
    let done = settle(&mut u, &r.reservation_id, 100, 100).await;
    assert_eq!(
        peek(&mut u, &key, "", "nil/tpd").await,
        800,
        "actual usage of a zero estimate is charged: {done:?}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ttl_with_mixed_signs_is_invalid() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("ttl", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;
    // google.protobuf.Duration needs seconds and nanos of the same sign;
    // -5 s + 1 ns is not a duration (and as -4 s it would expire at once).
    invalid(
        "Reserve ttl -5 s + 1 ns",
        u.reserve(ReserveRequest {
            ttl: Some(Duration {
                seconds: -5,
                nanos: 1,
            }),
            ..reserve_req(&key, "", 10, 10)
        })
        .await,
        "ttl",
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_reservation_stays_charged_at_its_estimate() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("exp", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;
    let r = ok(
        "Reserve ttl 1 s",
        u.reserve(ReserveRequest {
            ttl: Some(Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..reserve_req(&key, "gpt-4o", 300, 500)
        })
        .await,
    );
    assert!(r.allowed, "{r:?}");
    // A settled one next to it: its row shows what it settled at.
    let settled = reserve(&mut u, &key, "gpt-4o-mini", 50, 50).await;
    settle(&mut u, &settled.reservation_id, 20, 10).await;
    // Not a timing assertion: after 2+ s the 1 s TTL has ended for sure.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    err(
        "Settle after the TTL",
        try_settle(&mut u, &r.reservation_id, 0, 0).await,
        Code::NotFound,
    );
    assert_eq!(peek(&mut u, &key, "", "exp/tpd").await, 1000 - 800 - 30);
    // The per-model rows agree with the limit: the expired estimate is
    // there too (it was in the limit only, so the rows billed less).
    let usage = ok(
        "GetUsage",
        admin
            .get_usage(GetUsageRequest {
                plan: "exp".into(),
                start_date: utc_day(-1),
                end_date: utc_day(1),
                ..Default::default()
            })
            .await,
    );
    let models = &usage.items[0].models;
    let row = |name: &str| {
        models
            .iter()
            .find(|m| m.model == name)
            .map(|m| (m.input_tokens, m.output_tokens))
    };
    assert_eq!(row("gpt-4o"), Some((300, 500)), "{models:?}");
    assert_eq!(row("gpt-4o-mini"), Some((20, 10)), "{models:?}");
    s.shutdown().await;
}

// ------------------------------------------- GetUsage: per model, live --

/// A refused request counts nothing, so it leaves no per-model row (its
/// counters were rolled back to 0; GetUsage lists days with usage only).
#[tokio::test]
async fn get_usage_has_no_rows_for_refused_requests() {
    let s = server().await;
    let mut admin = s.admin().await;
    let p = usage_plan(
        "one-a-day",
        DOMAIN,
        vec![limit("rpd", Metric::Requests, 1, LimitWindow::CalendarDay)],
    );
    let key = plan_with_key(&mut admin, p, "alice").await;
    assert_allowed(&call(&s, &key, &[("model", "a")]).await, "first");
    assert_refused(
        &call(&s, &key, &[("model", "b")]).await,
        "request-limit",
        Some("key"),
        "second",
    );
    // Yesterday to tomorrow (UTC: the plan has no quota calendar), so a
    // run across midnight still sees the day of the calls.
    let usage = ok(
        "GetUsage",
        admin
            .get_usage(GetUsageRequest {
                plan: "one-a-day".into(),
                start_date: utc_day(-1),
                end_date: utc_day(1),
                ..Default::default()
            })
            .await,
    );
    let models: Vec<(&str, i64)> = usage.items[0]
        .models
        .iter()
        .map(|m| (m.model.as_str(), m.requests))
        .collect();
    assert_eq!(models, [("a", 1)]);
    drop(admin);
    s.shutdown().await;
}

/// GetUsage reports, per day and model, the requests, input and output
/// tokens and spend of a key, and the live state of every usage limit.
#[tokio::test]
async fn get_usage_reports_per_model_usage_and_every_limit() {
    let s = server().await;
    let mut admin = s.admin().await;
    let mut p = usage_plan(
        "metered",
        DOMAIN,
        vec![
            tokens_per_day("tpd", 100_000),
            limit(
                "budget",
                Metric::Spend,
                10_000_000,
                LimitWindow::CalendarMonth,
            ),
        ],
    );
    p.limits[0].model_limits = [("gpt-4o*".to_owned(), 50_000)].into();
    p.prices = [(
        "gpt-4o*".to_owned(),
        ModelPrice {
            input_per_million: 2_500_000,
            output_per_million: 10_000_000,
        },
    )]
    .into();
    let key = plan_with_key(&mut admin, p, "alice").await;
    let mut u = usage_client(&s).await;

    // Two requests for gpt-4o and one without a model, through ShouldRateLimit.
    assert_allowed(&call(&s, &key, &[("model", "gpt-4o")]).await, "gpt-4o 1");
    assert_allowed(&call(&s, &key, &[("model", "gpt-4o")]).await, "gpt-4o 2");
    assert_allowed(&call(&s, &key, &[]).await, "no model");
    // Usage: gpt-4o 1000 in + 500 out (twice, one a retried id), claude 300 in.
    report(&mut u, &key, "gpt-4o", 1000, 500, "r1").await;
    report(&mut u, &key, "gpt-4o", 1000, 500, "r1").await;
    report(&mut u, &key, "gpt-4o", 1000, 500, "r2").await;
    report(&mut u, &key, "claude-3", 300, 0, "r3").await;

    let today = utc_day(0);
    let usage = ok(
        "GetUsage",
        admin
            .get_usage(GetUsageRequest {
                plan: "metered".into(),
                start_date: today.clone(),
                end_date: today.clone(),
                ..Default::default()
            })
            .await,
    );
    let k = &usage.items[0];
    let row = |model: &str| {
        k.models
            .iter()
            .find(|m| m.model == model)
            .unwrap_or_else(|| panic!("no row for {model:?}: {:?}", k.models))
    };
    let g = row("gpt-4o");
    assert_eq!(g.date, today);
    assert_eq!(
        (g.requests, g.input_tokens, g.output_tokens),
        (2, 2000, 1000)
    );
    // 2000 in at 2.50/M = 5000; 1000 out at 10.00/M = 10000 micro-units.
    assert_eq!(g.spend, 15_000);
    let c = row("claude-3");
    assert_eq!(
        (c.requests, c.input_tokens, c.spend),
        (0, 300, 0),
        "unpriced"
    );
    assert_eq!(row("").requests, 1, "requests without a model");

    let live = k.live.clone().expect("live");
    let state = |name: &str| {
        live.limits
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no live state for {name}: {:?}", live.limits))
    };
    // The default tpd counter holds claude's 300; the gpt-4o* one 3000.
    assert_eq!(
        (state("metered/tpd").used, state("metered/tpd").remaining),
        (300, 99_700)
    );
    let g = state("metered/tpd[gpt-4o*]");
    assert_eq!((g.limit, g.used, g.remaining), (50_000, 3000, 47_000));
    assert_eq!(state("metered/budget").used, 15_000);
    assert_eq!(state("metered/budget").metric, Metric::Spend as i32);
    drop(admin);
    drop(u);
    s.shutdown().await;
}

/// A limit's counter is found by its name: an update that keeps the name
/// but changes what it counts (tokens to money, say) is refused, since the
/// counts so far would be read in the new unit; a new name starts afresh.
#[tokio::test]
async fn changing_what_a_named_limit_counts_is_refused() {
    let s = server().await;
    let mut admin = s.admin().await;
    let p = usage_plan("units", DOMAIN, vec![tokens_per_day("tpd", 1000)]);
    let key = plan_with_key(&mut admin, p.clone(), "alice").await;
    let mut u = usage_client(&s).await;
    report(&mut u, &key, "m", 23, 0, "r1").await;

    let update = |limits: Vec<UsageLimit>| UpdateUsagePlanRequest {
        usage_plan: Some(UsagePlan {
            id: "units".into(),
            limits,
            prices: [(
                "*".to_owned(),
                ModelPrice {
                    input_per_million: 1,
                    output_per_million: 1,
                },
            )]
            .into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["limits".into(), "prices".into()],
        }),
        validate_only: false,
    };
    let spend = |name: &str| limit(name, Metric::Spend, 1000, LimitWindow::CalendarDay);
    let err = admin
        .update_usage_plan(update(vec![spend("tpd")]))
        .await
        .expect_err("tokens to spend under one name");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("\"tpd\"")
            && err.message().contains("total tokens")
            && err.message().contains("new name"),
        "{err:?}"
    );
    let mut input = tokens_per_day("tpd", 1000);
    input.count = TokenCount::Input as i32;
    let err = admin
        .update_usage_plan(update(vec![input]))
        .await
        .expect_err("total to input tokens");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // A new name is a new counter; the limit of the same unit keeps its count.
    ok(
        "rename",
        admin
            .update_usage_plan(update(vec![
                tokens_per_day("tpd", 2000),
                spend("daily-spend"),
            ]))
            .await,
    );
    assert_eq!(peek(&mut u, &key, "", "units/tpd").await, 2000 - 23);
    // Removed, then added back in another unit: its counters still hold
    // the 23 tokens, so that is refused too; in its own unit it is fine.
    ok(
        "remove",
        admin
            .update_usage_plan(update(vec![spend("daily-spend")]))
            .await,
    );
    let err = admin
        .update_usage_plan(update(vec![spend("daily-spend"), spend("tpd")]))
        .await
        .expect_err("tpd back as spend");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("a removed limit of that name"),
        "{err:?}"
    );
    ok(
        "back as tokens",
        admin
            .update_usage_plan(update(vec![
                spend("daily-spend"),
                tokens_per_day("tpd", 2000),
            ]))
            .await,
    );
    assert_eq!(peek(&mut u, &key, "", "units/tpd").await, 2000 - 23);
    drop(admin);
    drop(u);
    s.shutdown().await;
}

/// A stage's modelEntry goes through the admin API, and the usage API puts
/// its model there: per-model limits apply to reported usage.
#[tokio::test]
async fn a_stage_model_entry_applies_to_reported_usage() {
    let s = server().await;
    let mut admin = s.admin().await;
    let mut p = usage_plan("mp", DOMAIN, vec![tokens_per_day("tpd", 1000)]);
    p.stages[0].model_entry = "x-ai-model".into();
    p.limits[0].model_limits = [("gpt*".to_owned(), 500)].into();
    let key = plan_with_key(&mut admin, p, "alice").await;
    let got = ok(
        "GetUsagePlan",
        admin
            .get_usage_plan(GetUsagePlanRequest { plan: "mp".into() })
            .await,
    );
    assert_eq!(got.stages[0].model_entry, "x-ai-model");
    let mut u = usage_client(&s).await;
    report(&mut u, &key, "gpt-4o", 100, 0, "r1").await;
    assert_eq!(peek(&mut u, &key, "gpt-4o", "mp/tpd[gpt*]").await, 400);
    assert_eq!(peek(&mut u, &key, "", "mp/tpd").await, 1000);
    // Through ShouldRateLimit, the model comes in the stage's entry.
    let r = call(&s, &key, &[("x-ai-model", "gpt-4o")]).await;
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "mp/tpd[gpt*]"
    );
    drop(admin);
    drop(u);
    s.shutdown().await;
}

/// Charges and settled reservations create per-model counters under the
/// same daily cap as requests (1000 counters a key a day): past it, a new
/// model's tokens are counted under "(other models)", and the limits still
/// count them.
#[tokio::test]
async fn charges_and_settles_past_the_model_cap_count_as_other_models() {
    let s = server().await;
    let mut admin = s.admin().await;
    let p = usage_plan("cap", DOMAIN, vec![tokens_per_day("tpd", 1_000_000)]);
    let key = plan_with_key(&mut admin, p, "alice").await;
    let mut u = usage_client(&s).await;
    // 1000 models, one input-token counter each: the cap.
    for i in 0..1000 {
        report(&mut u, &key, &format!("m-{i:04}"), 1, 0, "").await;
    }
    report(&mut u, &key, "late-report", 7, 0, "").await;
    let r = reserve(&mut u, &key, "late-reserve", 100, 0).await;
    assert!(r.allowed, "{r:?}");
    settle(&mut u, &r.reservation_id, 5, 0).await;
    // Every token counted in the limit: 1000 + 7 + 5.
    assert_eq!(peek(&mut u, &key, "", "cap/tpd").await, 1_000_000 - 1012);
    let usage = ok(
        "GetUsage",
        admin
            .get_usage(GetUsageRequest {
                plan: "cap".into(),
                start_date: utc_day(-1),
                end_date: utc_day(1),
                ..Default::default()
            })
            .await,
    );
    let models = &usage.items[0].models;
    let row = |name: &str| models.iter().find(|m| m.model == name);
    let other = row("(other models)").expect("an other-models row");
    // The late report's 7 and the settled 5 input tokens; the reservation's
    // request counted there too.
    assert_eq!((other.input_tokens, other.requests), (12, 1), "{other:?}");
    assert!(row("late-report").is_none() && row("late-reserve").is_none());
    // 1001 rows: GetUsage leaves out one of the least used.
    assert_eq!(usage.items[0].models_omitted, 1);
    assert_eq!(row("m-0000").map(|m| m.input_tokens), Some(1));
    drop(admin);
    drop(u);
    s.shutdown().await;
}

/// The UTC date `offset` days from today, as GetUsage takes it.
fn utc_day(offset: i64) -> String {
    let days = i64::try_from(unix_now() / DAY_SECS).unwrap() + offset;
    jiff::civil::Date::new(1970, 1, 1)
        .unwrap()
        .checked_add(jiff::Span::new().days(days))
        .unwrap()
        .to_string()
}

/// A model name longer than 256 bytes in a ShouldRateLimit descriptor is
/// decided (not refused), and its usage is reported as "(other models)".
#[tokio::test]
async fn an_overlong_model_name_counts_as_other_models() {
    let s = server().await;
    let mut admin = s.admin().await;
    let p = usage_plan("long", DOMAIN, vec![tokens_per_day("tpd", 1000)]);
    let key = plan_with_key(&mut admin, p, "alice").await;
    let model = "m".repeat(300);
    assert_allowed(&call(&s, &key, &[("model", &model)]).await, "long model");
    let usage = ok(
        "GetUsage",
        admin
            .get_usage(GetUsageRequest {
                plan: "long".into(),
                start_date: utc_day(-1),
                end_date: utc_day(1),
                ..Default::default()
            })
            .await,
    );
    let rows: Vec<(&str, i64)> = usage.items[0]
        .models
        .iter()
        .map(|m| (m.model.as_str(), m.requests))
        .collect();
    assert_eq!(rows, [("(other models)", 1)]);
    drop(admin);
    s.shutdown().await;
}

/// Usage of a request allowed before its key was disabled still counts,
/// through a charge descriptor (Envoy's apply_on_stream_done) and
/// ReportUsage: the tokens were spent (it used to be refused as an invalid
/// key and dropped). New requests and reservations of the key are refused.
#[tokio::test(flavor = "multi_thread")]
async fn usage_spent_before_a_key_was_disabled_still_counts() {
    let s = server().await;
    let mut admin = s.admin().await;
    let key = plan_with_key(
        &mut admin,
        usage_plan("lapse", DOMAIN, vec![tokens_per_day("tpd", 1000)]),
        "alice",
    )
    .await;
    let mut u = usage_client(&s).await;
    assert_allowed(&call(&s, &key, &[]).await, "while enabled");
    ok(
        "disable",
        admin
            .update_api_key(UpdateApiKeyRequest {
                api_key: Some(ApiKey {
                    id: "alice".into(),
                    enabled: false,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            })
            .await,
    );
    let charge = request(
        DOMAIN,
        vec![desc_hits(
            &[("api_key", &key), ("usage", "total_tokens")],
            300,
        )],
    );
    assert_allowed(&s.check(charge).await, "a charge of the disabled key");
    let rep = report(&mut u, &key, "", 100, 100, "").await;
    assert_eq!(lim(&rep.limits, "lapse/tpd").remaining, 500, "{rep:?}");

    assert_refused(
        &call(&s, &key, &[]).await,
        "invalid-key",
        None,
        "a new request",
    );
    let r = ok(
        "a reservation",
        u.reserve(reserve_req(&key, "", 10, 10)).await,
    );
    assert!(!r.allowed && r.reason == "invalid-key", "{r:?}");
    s.shutdown().await;
}
