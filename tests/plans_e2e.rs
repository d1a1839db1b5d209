//! End-to-end tests of usage plans and API keys: the admin API
//! (`sluice.admin.v1.AdminService`) and its effect on `ShouldRateLimit`,
//! over real ports with the generated tonic clients.
//!
//! Nothing here depends on timing: throttles use rates that cannot refill a
//! token during a test (0.001/s = one token per 1000 s) or hits larger than
//! the burst, and quota tests use the UTC DAY period and step over midnight
//! if it is imminent. An admin write is visible to the next decision, so no
//! test waits for anything.

mod common;

use std::collections::HashMap;

use common::*;
use prost::Message as _;
use prost_types::{FieldMask, Timestamp};
use sluice::proto::admin::*;
use sluice::proto::rls::RateLimitResponse;
use sluice::storage::unix_now;
use tonic::{Code, Status};

/// The domain plans govern in most tests; CONFIG also has a rule in it.
const DOMAIN: &str = "llm";
/// A second governed domain.
const OTHER: &str = "other";

const CONFIG: &str = r#"
domain: llm
descriptors:
  - key: remote_address
    rate_limit: {unit: day, requests_per_unit: 2, name: per-ip}
"#;

const DAY_SECS: u64 = 86_400;
/// Seconds before midnight UTC within which a quota test waits for the next day.
const EDGE_MARGIN: u64 = 60;

// ------------------------------------------------------------------ helpers

/// A server whose quota tests cannot straddle midnight UTC.
async fn server() -> TestServer {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    TestServer::start(CONFIG).await
}

fn now_secs() -> i64 {
    i64::try_from(unix_now()).expect("now fits i64")
}

/// The UTC date of a Unix second, as YYYY-MM-DD.
fn utc_date(secs: i64) -> String {
    let d = jiff::Timestamp::from_second(secs)
        .expect("valid timestamp")
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
}

fn today() -> String {
    utc_date(now_secs())
}

fn stage(domain: &str) -> ApiStage {
    ApiStage {
        domain: domain.to_owned(),
        ..Default::default()
    }
}

fn throttle(rate_limit: f64, burst_limit: i32) -> Option<Throttle> {
    Some(Throttle {
        rate_limit,
        burst_limit,
    })
}

fn daily(limit: i64) -> Option<Quota> {
    Some(Quota {
        limit,
        period: Period::Day as i32,
        ..Default::default()
    })
}

fn plan(name: &str, domain: &str, throttle: Option<Throttle>, quota: Option<Quota>) -> UsagePlan {
    UsagePlan {
        name: name.to_owned(),
        throttle,
        quota,
        stages: vec![stage(domain)],
        ..Default::default()
    }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// Unwraps an admin response, panicking with the status.
fn ok<T>(what: &str, r: Result<tonic::Response<T>, Status>) -> T {
    match r {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("{what}: unexpected {:?}: {}", s.code(), s.message()),
    }
}

/// Expects an admin error with `code`; returns its message.
#[track_caller]
fn err<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, Status>,
    code: Code,
) -> String {
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
fn invalid<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, Status>, field: &str) {
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

async fn try_create_plan(
    admin: &mut AdminClient,
    p: UsagePlan,
) -> Result<tonic::Response<UsagePlan>, Status> {
    admin
        .create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(p),
        })
        .await
}

async fn get_plan(
    admin: &mut AdminClient,
    plan: &str,
) -> Result<tonic::Response<UsagePlan>, Status> {
    admin
        .get_usage_plan(GetUsagePlanRequest {
            plan: plan.to_owned(),
        })
        .await
}

async fn list_plan_names(admin: &mut AdminClient) -> Vec<String> {
    let r = ok(
        "ListUsagePlans",
        admin
            .list_usage_plans(ListUsagePlansRequest::default())
            .await,
    );
    assert!(r.next_page_token.is_empty(), "one page: {r:?}");
    r.usage_plans.into_iter().map(|p| p.name).collect()
}

async fn try_create_key(
    admin: &mut AdminClient,
    name: &str,
    value: &str,
) -> Result<tonic::Response<CreateApiKeyResponse>, Status> {
    admin
        .create_api_key(CreateApiKeyRequest {
            api_key: Some(ApiKey {
                name: name.to_owned(),
                customer_id: "acme".to_owned(),
                ..Default::default()
            }),
            value: value.to_owned(),
            disabled: false,
        })
        .await
}

/// Creates a key with a generated value; returns the key and its value.
async fn create_key(admin: &mut AdminClient, name: &str) -> (ApiKey, String) {
    let r = ok(
        &format!("CreateApiKey {name}"),
        try_create_key(admin, name, "").await,
    );
    (r.api_key.expect("api_key in the response"), r.value)
}

async fn get_key(admin: &mut AdminClient, key: &str) -> Result<tonic::Response<ApiKey>, Status> {
    admin
        .get_api_key(GetApiKeyRequest {
            key: key.to_owned(),
        })
        .await
}

async fn try_bind(
    admin: &mut AdminClient,
    plan: &str,
    key: &str,
) -> Result<tonic::Response<UsagePlanKey>, Status> {
    admin
        .create_usage_plan_key(CreateUsagePlanKeyRequest {
            plan: plan.to_owned(),
            key: key.to_owned(),
        })
        .await
}

async fn bind(admin: &mut AdminClient, plan: &str, key: &str) -> UsagePlanKey {
    ok(
        &format!("CreateUsagePlanKey {plan}/{key}"),
        try_bind(admin, plan, key).await,
    )
}

/// Creates `p`, a key named `key` and binds it; returns the plan and the value.
async fn plan_with_key(admin: &mut AdminClient, p: UsagePlan, key: &str) -> (UsagePlan, String) {
    let p = create_plan(admin, p).await;
    let (_, value) = create_key(admin, key).await;
    bind(admin, &p.name, key).await;
    (p, value)
}

async fn update_key(
    admin: &mut AdminClient,
    key: ApiKey,
    paths: &[&str],
) -> Result<tonic::Response<ApiKey>, Status> {
    admin
        .update_api_key(UpdateApiKeyRequest {
            api_key: Some(key),
            update_mask: mask(paths),
        })
        .await
}

async fn rotate(
    admin: &mut AdminClient,
    key: &str,
    grace_secs: i64,
) -> Result<tonic::Response<CreateApiKeyResponse>, Status> {
    admin
        .rotate_api_key(RotateApiKeyRequest {
            key: key.to_owned(),
            grace_period: Some(prost_types::Duration {
                seconds: grace_secs,
                nanos: 0,
            }),
            value: String::new(),
        })
        .await
}

async fn try_usage(
    admin: &mut AdminClient,
    plan: &str,
    key: &str,
    start: &str,
    end: &str,
) -> Result<tonic::Response<Usage>, Status> {
    admin
        .get_usage(GetUsageRequest {
            plan: plan.to_owned(),
            key: key.to_owned(),
            start_date: start.to_owned(),
            end_date: end.to_owned(),
            ..Default::default()
        })
        .await
}

/// Today's usage of one key: its only KeyUsage item.
async fn key_usage_today(admin: &mut AdminClient, plan: &str, key: &str) -> KeyUsage {
    let d = today();
    let mut u = ok("GetUsage", try_usage(admin, plan, key, &d, &d).await);
    assert_eq!(u.items.len(), 1, "one key: {u:?}");
    u.items.remove(0)
}

async fn try_update_usage(
    admin: &mut AdminClient,
    plan: &str,
    key: &str,
    remaining: i64,
) -> Result<tonic::Response<KeyUsage>, Status> {
    admin
        .update_usage(UpdateUsageRequest {
            plan: plan.to_owned(),
            key: key.to_owned(),
            remaining,
        })
        .await
}

/// One ShouldRateLimit call with one descriptor `api_key = value` in `domain`.
async fn call_key(s: &TestServer, domain: &str, value: &str) -> RateLimitResponse {
    s.hit(domain, &[("api_key", value)]).await
}

/// The `x-sluice-reason` response header, if any.
fn reason(r: &RateLimitResponse) -> Option<&str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == "x-sluice-reason")
        .map(|h| h.value.as_str())
}

/// The first status's `current_limit.name` ("" when there is no limit).
fn limit_name(r: &RateLimitResponse) -> &str {
    r.statuses[0]
        .current_limit
        .as_ref()
        .map_or("", |l| l.name.as_str())
}

#[track_caller]
fn assert_allowed(r: &RateLimitResponse, what: &str) {
    assert_eq!(r.overall_code, OK, "{what}: {r:?}");
    assert!(r.statuses.iter().all(|s| s.code == OK), "{what}: {r:?}");
    assert_eq!(
        reason(r),
        None,
        "{what}: no reason header when allowed: {r:?}"
    );
}

#[track_caller]
fn assert_refused(r: &RateLimitResponse, why: &str, what: &str) {
    assert_eq!(r.overall_code, OVER_LIMIT, "{what}: {r:?}");
    assert_eq!(r.statuses[0].code, OVER_LIMIT, "{what}: {r:?}");
    assert_eq!(reason(r), Some(why), "{what}: x-sluice-reason: {r:?}");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ------------------------------------------------------------ plans: CRUD

#[tokio::test(flavor = "multi_thread")]
async fn create_plan_fills_id_times_and_defaults_and_get_finds_it_by_id_and_name() {
    let s = server().await;
    let mut admin = s.admin().await;
    let before = now_secs();
    let created = create_plan(
        &mut admin,
        UsagePlan {
            description: "the gold tier".into(),
            tags: HashMap::from([("team".to_owned(), "ml".to_owned())]),
            ..plan("gold", DOMAIN, throttle(10.0, 20), daily(1000))
        },
    )
    .await;
    let after = now_secs();

    assert_eq!(created.id.len(), 12, "generated id: {created:?}");
    assert!(
        created
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{created:?}"
    );
    let ct = created.create_time.expect("create_time set");
    assert!((before..=after).contains(&ct.seconds), "{created:?}");
    assert_eq!(created.update_time, created.create_time, "{created:?}");
    assert_eq!(created.name, "gold");
    assert_eq!(created.description, "the gold tier");
    assert_eq!(created.throttle, throttle(10.0, 20));
    let q = created.quota.as_ref().expect("quota kept");
    assert_eq!(
        (q.limit, q.period, q.anchor_day),
        (1000, Period::Day as i32, 0)
    );
    assert_eq!(q.time_zone, "UTC", "time zone defaults to UTC");
    assert_eq!(created.stages.len(), 1);
    let st = &created.stages[0];
    assert_eq!(st.domain, DOMAIN);
    assert_eq!(st.stage, "");
    assert_eq!(st.key_entry, "api_key", "key entry default");
    assert_eq!(st.method_entry, "method", "method entry default");
    assert_eq!(st.path_entry, "path", "path entry default");
    assert_eq!(created.tags.get("team").map(String::as_str), Some("ml"));

    let by_id = ok("get by id", get_plan(&mut admin, &created.id).await);
    assert_eq!(by_id, created);
    let by_name = ok("get by name", get_plan(&mut admin, "gold").await);
    assert_eq!(by_name, created);
    err(
        "get unknown",
        get_plan(&mut admin, "silver").await,
        Code::NotFound,
    );
    // No plan or key named at all: INVALID_ARGUMENT naming the field, not
    // a plan "" not found.
    let m = err(
        "get nothing",
        get_plan(&mut admin, "").await,
        Code::InvalidArgument,
    );
    assert!(m.contains("plan: is required"), "{m}");
    let m = err(
        "get no key",
        admin
            .get_api_key(GetApiKeyRequest { key: String::new() })
            .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("key: is required"), "{m}");
    let m = err(
        "usage of no plan",
        admin
            .get_usage(GetUsageRequest {
                start_date: "2026-01-01".into(),
                end_date: "2026-01-01".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("plan: is required"), "{m}");
    let m = err(
        "bind nothing",
        admin
            .create_usage_plan_key(CreateUsagePlanKeyRequest {
                plan: created.id.clone(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("key: is required"), "{m}");

    // A second plan gets another id.
    let other = create_plan(&mut admin, plan("silver", OTHER, None, daily(5))).await;
    assert_ne!(other.id, created.id);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_plans_pages_by_name_and_rejects_a_garbage_token() {
    let s = server().await;
    let mut admin = s.admin().await;
    // Created out of order: lists are ordered by name.
    for name in ["plan-c", "plan-a", "plan-b"] {
        create_plan(&mut admin, plan(name, name, None, daily(10))).await;
    }
    let p1 = ok(
        "page 1",
        admin
            .list_usage_plans(ListUsagePlansRequest {
                page_size: 2,
                page_token: String::new(),
            })
            .await,
    );
    let names: Vec<&str> = p1.usage_plans.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["plan-a", "plan-b"]);
    assert!(!p1.next_page_token.is_empty(), "more to come: {p1:?}");

    let p2 = ok(
        "page 2",
        admin
            .list_usage_plans(ListUsagePlansRequest {
                page_size: 2,
                page_token: p1.next_page_token.clone(),
            })
            .await,
    );
    let names: Vec<&str> = p2.usage_plans.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["plan-c"]);
    assert!(p2.next_page_token.is_empty(), "last page: {p2:?}");

    // Default page size: everything on one page.
    assert_eq!(
        list_plan_names(&mut admin).await,
        ["plan-a", "plan-b", "plan-c"]
    );

    invalid(
        "garbage page token",
        admin
            .list_usage_plans(ListUsagePlansRequest {
                page_size: 2,
                page_token: "%%% not a page token %%%".into(),
            })
            .await,
        "page_token",
    );

    // A token is tied to the request it came from (AIP-158): not taken by
    // another list, nor by the same list with other filters.
    invalid(
        "a plans token for keys",
        admin
            .list_api_keys(ListApiKeysRequest {
                page_size: 2,
                page_token: p1.next_page_token.clone(),
                ..Default::default()
            })
            .await,
        "page_token",
    );
    for name in ["k-a", "k-b", "k-c"] {
        ok(
            name,
            admin
                .create_api_key(CreateApiKeyRequest {
                    api_key: Some(ApiKey {
                        name: name.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await,
        );
    }
    let filtered = |token: String, prefix: &str| ListApiKeysRequest {
        page_size: 1,
        page_token: token,
        name_prefix: prefix.into(),
        ..Default::default()
    };
    let k1 = ok(
        "keys page 1",
        admin.list_api_keys(filtered(String::new(), "k-")).await,
    );
    invalid(
        "a filtered token without the filter",
        admin
            .list_api_keys(filtered(k1.next_page_token.clone(), ""))
            .await,
        "page_token",
    );
    let k2 = ok(
        "keys page 2",
        admin
            .list_api_keys(filtered(k1.next_page_token, "k-"))
            .await,
    );
    assert_eq!(k2.api_keys[0].name, "k-b", "{k2:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn update_plan_changes_only_the_masked_fields_and_applies_to_the_next_decision() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (created, value) = plan_with_key(
        &mut admin,
        UsagePlan {
            description: "original".into(),
            ..plan("gold", DOMAIN, throttle(0.001, 1), daily(100))
        },
        "alice",
    )
    .await;

    // One token: the second call is throttled.
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "call 1");
    assert_refused(&call_key(&s, DOMAIN, &value).await, "throttled", "call 2");

    // Only throttle.burst_limit changes, though the request carries other values.
    let updated = ok(
        "update burst",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "gold".into(),
                    description: "ignored".into(),
                    throttle: throttle(999.0, 3),
                    quota: daily(1),
                    ..Default::default()
                }),
                update_mask: mask(&["throttle.burst_limit"]),
                validate_only: false,
            })
            .await,
    );
    assert_eq!(updated.throttle, throttle(0.001, 3), "{updated:?}");
    assert_eq!(updated.description, "original");
    assert_eq!(updated.quota, created.quota);
    assert_eq!(updated.stages, created.stages);
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.create_time, created.create_time);
    assert!(
        updated.update_time.expect("update_time").seconds
            >= created.create_time.expect("create_time").seconds
    );
    assert_eq!(ok("get", get_plan(&mut admin, &created.id).await), updated);

    // A bucket of 3 (of which 1 may still count as used): two more calls
    // pass at once, and the bucket is empty again within the next two.
    assert_allowed(
        &call_key(&s, DOMAIN, &value).await,
        "call 3 after raising burst",
    );
    assert_allowed(
        &call_key(&s, DOMAIN, &value).await,
        "call 4 after raising burst",
    );
    let r5 = call_key(&s, DOMAIN, &value).await;
    let r6 = call_key(&s, DOMAIN, &value).await;
    assert_refused(&r6, "throttled", &format!("call 6 (call 5: {r5:?})"));

    // quota.limit only: the period and time zone stay.
    let updated = ok(
        "update quota.limit",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: created.id.clone(),
                    quota: Some(Quota {
                        limit: 7,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: mask(&["quota.limit"]),
                validate_only: false,
            })
            .await,
    );
    let q = updated.quota.as_ref().expect("quota kept");
    assert_eq!((q.limit, q.period), (7, Period::Day as i32), "{updated:?}");
    assert_eq!(q.time_zone, "UTC");

    // The `quota` path with no quota removes it.
    let updated = ok(
        "remove quota",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "gold".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["quota"]),
                validate_only: false,
            })
            .await,
    );
    assert_eq!(updated.quota, None, "{updated:?}");
    assert_eq!(updated.throttle, throttle(0.001, 3), "throttle kept");
    assert_eq!(ok("get", get_plan(&mut admin, "gold").await).quota, None);

    // Rename: the new name finds it, the old one does not.
    let updated = ok(
        "rename",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "gold".into(),
                    name: "platinum".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                validate_only: false,
            })
            .await,
    );
    assert_eq!(updated.name, "platinum");
    assert_eq!(updated.id, created.id);
    err(
        "old name",
        get_plan(&mut admin, "gold").await,
        Code::NotFound,
    );
    // The binding follows the plan: the key is decided by it, under its new name.
    let r = call_key(&s, DOMAIN, &value).await;
    assert_refused(&r, "throttled", "renamed plan, empty bucket");
    assert_eq!(limit_name(&r), "platinum/throttle", "{r:?}");
    ok("new name", get_plan(&mut admin, "platinum").await);

    // An unknown path is refused, naming update_mask, and changes nothing.
    invalid(
        "unknown mask path",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: created.id.clone(),
                    description: "changed".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["description", "throttle.nope"]),
                validate_only: false,
            })
            .await,
        "update_mask",
    );
    assert_eq!(
        ok("get", get_plan(&mut admin, &created.id).await).description,
        "original"
    );

    // Updating an unknown plan.
    err(
        "update unknown plan",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "nope".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["description"]),
                validate_only: false,
            })
            .await,
        Code::NotFound,
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn update_plan_with_an_empty_mask_replaces_every_mutable_field() {
    let s = server().await;
    let mut admin = s.admin().await;
    let created = create_plan(
        &mut admin,
        UsagePlan {
            description: "old".into(),
            tags: HashMap::from([("a".to_owned(), "b".to_owned())]),
            ..plan("gold", DOMAIN, throttle(10.0, 20), daily(100))
        },
    )
    .await;
    let updated = ok(
        "update all",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: created.id.clone(),
                    description: "new".into(),
                    ..plan("gold", OTHER, throttle(1.0, 2), None)
                }),
                update_mask: None,
                validate_only: false,
            })
            .await,
    );
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.name, "gold");
    assert_eq!(updated.description, "new");
    assert_eq!(updated.throttle, throttle(1.0, 2));
    assert_eq!(updated.quota, None);
    assert!(updated.tags.is_empty(), "{updated:?}");
    assert_eq!(updated.stages.len(), 1);
    assert_eq!(updated.stages[0].domain, OTHER);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_plan_needs_force_while_keys_are_bound() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (gold, value) =
        plan_with_key(&mut admin, plan("gold", DOMAIN, None, daily(100)), "alice").await;
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "bound key");

    let m = err(
        "delete with a bound key",
        admin
            .delete_usage_plan(DeleteUsagePlanRequest {
                plan: "gold".into(),
                force: false,
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(m.contains("force"), "{m}");
    // Nothing changed.
    ok("still there", get_plan(&mut admin, &gold.id).await);
    assert_eq!(
        ok("key", get_key(&mut admin, "alice").await).usage_plan_ids,
        std::slice::from_ref(&gold.id)
    );
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "still bound");

    ok(
        "force delete",
        admin
            .delete_usage_plan(DeleteUsagePlanRequest {
                plan: gold.id.clone(),
                force: true,
            })
            .await,
    );
    err(
        "get after delete",
        get_plan(&mut admin, &gold.id).await,
        Code::NotFound,
    );
    err(
        "get by name after delete",
        get_plan(&mut admin, "gold").await,
        Code::NotFound,
    );
    let key = ok("key survives", get_key(&mut admin, "alice").await);
    assert!(key.usage_plan_ids.is_empty(), "unbound: {key:?}");
    err(
        "delete again",
        admin
            .delete_usage_plan(DeleteUsagePlanRequest {
                plan: gold.id.clone(),
                force: true,
            })
            .await,
        Code::NotFound,
    );

    // A plan without keys is deleted without force.
    create_plan(&mut admin, plan("empty", OTHER, None, daily(1))).await;
    ok(
        "delete unbound plan",
        admin
            .delete_usage_plan(DeleteUsagePlanRequest {
                plan: "empty".into(),
                force: false,
            })
            .await,
    );
    assert!(list_plan_names(&mut admin).await.is_empty());
    s.shutdown().await;
}

// -------------------------------------------------------------- validation

#[tokio::test(flavor = "multi_thread")]
async fn invalid_plans_are_refused_naming_the_field_and_change_nothing() {
    let s = server().await;
    let mut admin = s.admin().await;
    let good = create_plan(
        &mut admin,
        plan("good", DOMAIN, throttle(10.0, 20), daily(100)),
    )
    .await;
    let base = || plan("bad", OTHER, throttle(10.0, 20), daily(100));
    let with_quota = |q: Quota| UsagePlan {
        quota: Some(q),
        ..base()
    };
    // A plan with one calendar-day limit of 10, `l` filling in the rest.
    let with_limit = |l: UsageLimit| UsagePlan {
        limits: vec![UsageLimit {
            limit: 10,
            window: LimitWindow::CalendarDay as i32,
            ..l
        }],
        ..base()
    };
    let method_throttles = |k: &str| {
        HashMap::from([(
            k.to_owned(),
            Throttle {
                rate_limit: 1.0,
                burst_limit: 1,
            },
        )])
    };

    let cases: Vec<(&str, UsagePlan, &str)> = vec![
        (
            "empty name",
            UsagePlan {
                name: String::new(),
                ..base()
            },
            "name",
        ),
        (
            "negative rate",
            UsagePlan {
                throttle: throttle(-1.0, 20),
                ..base()
            },
            "throttle.rate_limit",
        ),
        (
            "burst 0 with a rate",
            UsagePlan {
                throttle: throttle(5.0, 0),
                ..base()
            },
            "throttle.burst_limit",
        ),
        (
            "negative quota",
            with_quota(Quota {
                limit: -1,
                period: Period::Day as i32,
                ..Default::default()
            }),
            "quota.limit",
        ),
        (
            "unspecified period",
            with_quota(Quota {
                limit: 10,
                period: Period::Unspecified as i32,
                ..Default::default()
            }),
            "quota.period",
        ),
        (
            "a rate too small to compute with (1e-12 per second)",
            UsagePlan {
                throttle: throttle(1e-12, 5),
                ..base()
            },
            "throttle.rate_limit: must be 0 (no refill: burst_limit calls, then none) or at least 1e-9 per second",
        ),
        (
            "unknown time zone",
            with_quota(Quota {
                limit: 10,
                period: Period::Day as i32,
                time_zone: "Mars/Olympus_Mons".into(),
                ..Default::default()
            }),
            "quota.time_zone",
        ),
        (
            "week anchor 7",
            with_quota(Quota {
                limit: 10,
                period: Period::Week as i32,
                anchor_day: 7,
                ..Default::default()
            }),
            "quota.anchor_day",
        ),
        (
            "anchor_day and offset",
            with_quota(Quota {
                limit: 10,
                period: Period::Month as i32,
                anchor_day: 2,
                offset: Some(1),
                ..Default::default()
            }),
            "offset",
        ),
        (
            "empty stage domain",
            UsagePlan {
                stages: vec![stage("")],
                ..base()
            },
            "stages[0].domain",
        ),
        // What a limit does not use is refused, not silently dropped.
        (
            "count INPUT on a REQUESTS limit",
            with_limit(UsageLimit {
                name: "rpd".into(),
                metric: Metric::Requests as i32,
                count: TokenCount::Input as i32,
                ..Default::default()
            }),
            "limits[0].count: only a TOKENS limit counts",
        ),
        (
            "input_weight without count WEIGHTED",
            with_limit(UsageLimit {
                name: "tpd".into(),
                metric: Metric::Tokens as i32,
                count: TokenCount::Total as i32,
                input_weight: 0.5,
                ..Default::default()
            }),
            "limits[0].input_weight: only a limit with count WEIGHTED has weights",
        ),
        (
            "bad method throttle key",
            UsagePlan {
                stages: vec![ApiStage {
                    method_throttles: method_throttles("v1/chat/POST"),
                    ..stage(OTHER)
                }],
                ..base()
            },
            "stages[0].method_throttles",
        ),
    ];
    for (what, p, field) in cases {
        invalid(what, try_create_plan(&mut admin, p).await, field);
    }
    // The bad method key itself is named too.
    let m = err(
        "bad method key",
        try_create_plan(
            &mut admin,
            UsagePlan {
                stages: vec![ApiStage {
                    method_throttles: method_throttles("v1/chat/POST"),
                    ..stage(OTHER)
                }],
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("v1/chat/POST"), "{m}");

    // Names are unique.
    let m = err(
        "duplicate name",
        try_create_plan(&mut admin, plan("good", OTHER, None, daily(1))).await,
        Code::AlreadyExists,
    );
    assert!(
        m.contains("a usage plan named \"good\" already exists"),
        "{m}"
    );
    // A name that is another plan's id would make that id ambiguous.
    let m = err(
        "a name that is an id",
        try_create_plan(&mut admin, plan(&good.id, OTHER, None, daily(1))).await,
        Code::AlreadyExists,
    );
    assert!(m.contains("is the id of an existing usage plan"), "{m}");

    // An invalid update is refused and leaves the plan as it was.
    invalid(
        "update to burst 0",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "good".into(),
                    throttle: throttle(0.0, 0),
                    ..Default::default()
                }),
                update_mask: mask(&["throttle.burst_limit"]),
                validate_only: false,
            })
            .await,
        "throttle.burst_limit",
    );
    create_plan(&mut admin, plan("other", OTHER, None, None)).await;
    err(
        "rename onto a taken name",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "other".into(),
                    name: "good".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                validate_only: false,
            })
            .await,
        Code::AlreadyExists,
    );
    assert_eq!(ok("get good", get_plan(&mut admin, "good").await), good);

    // Only what was created successfully is there.
    assert_eq!(list_plan_names(&mut admin).await, ["good", "other"]);
    s.shutdown().await;
}

// -------------------------------------------------------------------- auth

#[tokio::test(flavor = "multi_thread")]
async fn admin_calls_need_the_bearer_token_but_health_does_not() {
    let s = server().await;

    // No token.
    let mut anon = s.admin_without_token().await;
    err(
        "no token",
        anon.list_usage_plans(ListUsagePlansRequest::default())
            .await,
        Code::Unauthenticated,
    );
    err(
        "no token, write",
        anon.create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(plan("sneaky", DOMAIN, None, daily(1))),
        })
        .await,
        Code::Unauthenticated,
    );

    // Wrong token, another scheme, a bare token.
    for value in [
        "Bearer not-the-admin-token".to_owned(),
        format!("Bearer {ADMIN_TOKEN}x"),
        "Basic dGVzdDp0ZXN0".to_owned(),
        format!("Basic {ADMIN_TOKEN}"),
        ADMIN_TOKEN.to_owned(),
    ] {
        let mut req = tonic::Request::new(CreateUsagePlanRequest {
            usage_plan: Some(plan("sneaky", DOMAIN, None, daily(1))),
        });
        req.metadata_mut()
            .insert("authorization", value.parse().expect("ascii metadata"));
        err(
            &format!("authorization {value:?}"),
            anon.create_usage_plan(req).await,
            Code::Unauthenticated,
        );
    }

    // The right token works, and none of the refused writes happened.
    let mut admin = s.admin().await;
    assert!(list_plan_names(&mut admin).await.is_empty());

    // Health on the admin port needs no token.
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.admin_addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("connect health"),
    );
    for service in ["", "sluice.admin.v1.AdminService"] {
        let r = ok(
            &format!("health {service:?}"),
            health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await,
        );
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    s.shutdown().await;
}

// ------------------------------------------------------------ key lifecycle

#[tokio::test(flavor = "multi_thread")]
async fn a_key_value_is_shown_once_and_only_a_bound_key_is_allowed() {
    let s = server().await;
    let mut admin = s.admin().await;
    let gold = create_plan(
        &mut admin,
        plan("gold", DOMAIN, throttle(1000.0, 1000), daily(1_000_000)),
    )
    .await;
    let created = ok("create key", try_create_key(&mut admin, "alice", "").await);
    let value = created.value.clone();
    assert!(value.starts_with("slk_"), "{value}");
    assert!(value.len() >= 36, "192 random bits: {value}");
    let key = created.api_key.clone().expect("api_key");
    assert!(!key.id.is_empty());
    assert_eq!(key.name, "alice");
    assert_eq!(key.customer_id, "acme");
    assert!(key.enabled, "enabled by default");
    assert!(key.usage_plan_ids.is_empty());
    assert!(
        !contains(&key.encode_to_vec(), value.as_bytes()),
        "the key record carries no value"
    );

    // Another key gets another value.
    let (_, other_value) = create_key(&mut admin, "bob").await;
    assert_ne!(other_value, value);

    // Get and List never contain the value.
    let by_name = ok("get by name", get_key(&mut admin, "alice").await);
    let by_id = ok("get by id", get_key(&mut admin, &key.id).await);
    assert_eq!(by_name, by_id);
    assert_eq!(by_name.id, key.id);
    assert!(!contains(&by_name.encode_to_vec(), value.as_bytes()));
    let list = ok(
        "list keys",
        admin.list_api_keys(ListApiKeysRequest::default()).await,
    );
    let names: Vec<&str> = list.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    let bytes = list.encode_to_vec();
    assert!(!contains(&bytes, value.as_bytes()));
    assert!(!contains(&bytes, other_value.as_bytes()));
    let filtered = ok(
        "list by prefix",
        admin
            .list_api_keys(ListApiKeysRequest {
                name_prefix: "bo".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(filtered.api_keys.len(), 1);
    assert_eq!(filtered.api_keys[0].name, "bob");

    // Not bound to a plan for this domain yet: invalid key.
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "invalid-key",
        "unbound key",
    );

    let b = bind(&mut admin, "gold", "alice").await;
    assert_eq!(
        (
            b.usage_plan_id.as_str(),
            b.key_id.as_str(),
            b.key_name.as_str()
        ),
        (gold.id.as_str(), key.id.as_str(), "alice")
    );
    let r = call_key(&s, DOMAIN, &value).await;
    assert_allowed(&r, "bound key");
    assert!(limit_name(&r).starts_with("gold/"), "{r:?}");
    assert_eq!(
        ok("get", get_key(&mut admin, "alice").await).usage_plan_ids,
        std::slice::from_ref(&gold.id)
    );

    // Unknown values are refused as invalid keys.
    for bad in [
        "slk_not-a-real-key-value-at-all",
        "x",
        &value[..value.len() - 1],
    ] {
        let r = call_key(&s, DOMAIN, bad).await;
        assert_refused(&r, "invalid-key", bad);
        assert_eq!(r.statuses.len(), 1);
    }
    // bob exists but is not bound.
    assert_refused(
        &call_key(&s, DOMAIN, &other_value).await,
        "invalid-key",
        "bob unbound",
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_and_expired_keys_are_refused_until_changed_back() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("gold", DOMAIN, throttle(1000.0, 1000), daily(1_000_000)),
        "alice",
    )
    .await;
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "fresh key");

    // Disable with mask "enabled": nothing else changes.
    let k = ok(
        "disable",
        update_key(
            &mut admin,
            ApiKey {
                id: "alice".into(),
                enabled: false,
                customer_id: "ignored".into(),
                ..Default::default()
            },
            &["enabled"],
        )
        .await,
    );
    assert!(!k.enabled);
    assert_eq!(k.customer_id, "acme", "not in the mask");
    assert_eq!(k.name, "alice");
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "invalid-key",
        "disabled",
    );

    ok(
        "enable",
        update_key(
            &mut admin,
            ApiKey {
                id: k.id.clone(),
                enabled: true,
                ..Default::default()
            },
            &["enabled"],
        )
        .await,
    );
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "re-enabled");

    // Expired ten seconds ago.
    let k = ok(
        "expire",
        update_key(
            &mut admin,
            ApiKey {
                id: "alice".into(),
                expire_time: Some(Timestamp {
                    seconds: now_secs() - 10,
                    nanos: 0,
                }),
                ..Default::default()
            },
            &["expire_time"],
        )
        .await,
    );
    assert!(k.enabled, "still enabled");
    assert!(k.expire_time.is_some());
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "invalid-key",
        "expired",
    );

    // An expiry in the future does not refuse it; clearing it neither.
    ok(
        "expire later",
        update_key(
            &mut admin,
            ApiKey {
                id: "alice".into(),
                expire_time: Some(Timestamp {
                    seconds: now_secs() + 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            },
            &["expire_time"],
        )
        .await,
    );
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "expires tomorrow");
    let k = ok(
        "clear expiry",
        update_key(
            &mut admin,
            ApiKey {
                id: "alice".into(),
                ..Default::default()
            },
            &["expire_time"],
        )
        .await,
    );
    assert_eq!(k.expire_time, None);
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "no expiry");

    // Creating a key disabled.
    let r = ok(
        "create disabled",
        admin
            .create_api_key(CreateApiKeyRequest {
                api_key: Some(ApiKey {
                    name: "dormant".into(),
                    ..Default::default()
                }),
                value: String::new(),
                disabled: true,
            })
            .await,
    );
    assert!(!r.api_key.as_ref().expect("api_key").enabled);
    bind(&mut admin, "gold", "dormant").await;
    assert_refused(
        &call_key(&s, DOMAIN, &r.value).await,
        "invalid-key",
        "created disabled",
    );

    // Unknown mask path.
    invalid(
        "bad key mask",
        update_key(
            &mut admin,
            ApiKey {
                id: "alice".into(),
                ..Default::default()
            },
            &["value"],
        )
        .await,
        "update_mask",
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_the_old_value_for_the_grace_period_and_deletion_revokes() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, v1) = plan_with_key(
        &mut admin,
        plan("gold", DOMAIN, throttle(1000.0, 1000), daily(1_000_000)),
        "alice",
    )
    .await;
    assert_allowed(&call_key(&s, DOMAIN, &v1).await, "v1");

    let before = now_secs();
    let r = ok("rotate with grace", rotate(&mut admin, "alice", 3600).await);
    let after = now_secs();
    let v2 = r.value.clone();
    assert!(v2.starts_with("slk_"), "{v2}");
    assert_ne!(v2, v1);
    let k = r.api_key.expect("api_key");
    let until = k
        .previous_value_expire_time
        .expect("previous_value_expire_time set")
        .seconds;
    assert!(
        (before + 3600..=after + 3600).contains(&until),
        "grace ends in an hour: {until}"
    );
    assert!(!contains(&k.encode_to_vec(), v2.as_bytes()));
    assert_allowed(&call_key(&s, DOMAIN, &v2).await, "new value");
    assert_allowed(&call_key(&s, DOMAIN, &v1).await, "old value within grace");
    // The old value still works for alice: no other key may take it,
    // created or imported.
    let e = try_create_key(&mut admin, "thief", &v1)
        .await
        .expect_err("a value in its grace period");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("\"alice\"'s previous value"), "{e:?}");
    let imported = ok(
        "import",
        admin
            .import_api_keys(ImportApiKeysRequest {
                csv: format!("Name,Key\nthief2,{v1}\n"),
                fail_on_warnings: false,
            })
            .await,
    );
    assert!(imported.ids.is_empty(), "{imported:?}");
    assert!(
        imported.warnings[0].contains("grace period"),
        "{imported:?}"
    );
    assert_allowed(&call_key(&s, DOMAIN, &v1).await, "still alice's");

    // Rotate again with no grace: the previous value is refused at once.
    let v3 = ok("rotate without grace", rotate(&mut admin, "alice", 0).await).value;
    assert_ne!(v3, v2);
    assert_allowed(&call_key(&s, DOMAIN, &v3).await, "newest value");
    assert_refused(
        &call_key(&s, DOMAIN, &v2).await,
        "invalid-key",
        "v2 after grace 0",
    );
    assert_refused(
        &call_key(&s, DOMAIN, &v1).await,
        "invalid-key",
        "v1 after grace 0",
    );

    // A grace period over 30 days is refused.
    invalid(
        "grace too long",
        rotate(&mut admin, "alice", 31 * 86_400).await,
        "grace_period",
    );
    assert_allowed(
        &call_key(&s, DOMAIN, &v3).await,
        "v3 after a refused rotation",
    );
    err(
        "rotate unknown",
        rotate(&mut admin, "nobody", 0).await,
        Code::NotFound,
    );

    // Deleting the key refuses its value, and a value still in its grace period.
    let v4 = ok(
        "rotate before delete",
        rotate(&mut admin, "alice", 3600).await,
    )
    .value;
    assert_allowed(&call_key(&s, DOMAIN, &v3).await, "v3 in grace");
    ok(
        "delete key",
        admin
            .delete_api_key(DeleteApiKeyRequest {
                key: "alice".into(),
            })
            .await,
    );
    assert_refused(
        &call_key(&s, DOMAIN, &v3).await,
        "invalid-key",
        "deleted key, value in grace",
    );
    assert_refused(
        &call_key(&s, DOMAIN, &v4).await,
        "invalid-key",
        "deleted key",
    );
    err(
        "get deleted",
        get_key(&mut admin, "alice").await,
        Code::NotFound,
    );
    let keys = ok(
        "list plan keys",
        admin
            .list_usage_plan_keys(ListUsagePlanKeysRequest {
                plan: "gold".into(),
                ..Default::default()
            })
            .await,
    );
    assert!(keys.keys.is_empty(), "binding gone with the key: {keys:?}");
    err(
        "delete again",
        admin
            .delete_api_key(DeleteApiKeyRequest {
                key: "alice".into(),
            })
            .await,
        Code::NotFound,
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn supplied_key_values_are_checked_and_unique() {
    let s = server().await;
    let mut admin = s.admin().await;
    create_plan(
        &mut admin,
        plan("gold", DOMAIN, throttle(1000.0, 1000), daily(1_000_000)),
    )
    .await;
    let mine = "my-own-key-value-0123456789";
    let r = ok(
        "supplied value",
        try_create_key(&mut admin, "alice", mine).await,
    );
    assert_eq!(r.value, mine, "the supplied value is returned");
    bind(&mut admin, "gold", "alice").await;
    assert_allowed(&call_key(&s, DOMAIN, mine).await, "supplied value");

    invalid(
        "too short",
        try_create_key(&mut admin, "bob", "short-value").await,
        "value",
    );
    invalid(
        "with a space",
        try_create_key(&mut admin, "bob", "has a space in the middle of it").await,
        "value",
    );
    err(
        "duplicate value",
        try_create_key(&mut admin, "bob", mine).await,
        Code::AlreadyExists,
    );
    err(
        "duplicate name",
        try_create_key(&mut admin, "alice", "").await,
        Code::AlreadyExists,
    );
    invalid(
        "empty name",
        try_create_key(&mut admin, "", "").await,
        "name",
    );

    // None of the failed calls created a key.
    let list = ok(
        "list",
        admin.list_api_keys(ListApiKeysRequest::default()).await,
    );
    let names: Vec<&str> = list.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["alice"]);
    s.shutdown().await;
}

// ----------------------------------------------------------------- bindings

#[tokio::test(flavor = "multi_thread")]
async fn a_key_has_one_plan_per_domain_and_each_domain_uses_its_plan() {
    let s = server().await;
    let mut admin = s.admin().await;
    let a = create_plan(&mut admin, plan("a", DOMAIN, throttle(1000.0, 1000), None)).await;
    let b = create_plan(&mut admin, plan("b", DOMAIN, None, daily(100))).await;
    let c = create_plan(&mut admin, plan("c", OTHER, None, daily(100))).await;
    let (key, value) = create_key(&mut admin, "alice").await;

    bind(&mut admin, "a", "alice").await;
    let m = err(
        "second plan for the same domain",
        try_bind(&mut admin, "b", &key.id).await,
        Code::FailedPrecondition,
    );
    assert!(m.contains(DOMAIN), "{m}");
    bind(&mut admin, &c.id, "alice").await;

    let mut ids = ok("get", get_key(&mut admin, "alice").await).usage_plan_ids;
    ids.sort();
    let mut want = vec![a.id.clone(), c.id.clone()];
    want.sort();
    assert_eq!(ids, want);

    let r = call_key(&s, DOMAIN, &value).await;
    assert_allowed(&r, "llm via a");
    assert_eq!(limit_name(&r), "a/throttle");
    let r = call_key(&s, OTHER, &value).await;
    assert_allowed(&r, "other via c");
    assert_eq!(limit_name(&r), "c/quota");
    assert_eq!(r.statuses[0].limit_remaining, 99);

    let list = |p: &str| ListUsagePlanKeysRequest {
        plan: p.to_owned(),
        ..Default::default()
    };
    let ka = ok("keys of a", admin.list_usage_plan_keys(list("a")).await);
    assert_eq!(
        ka.keys,
        [UsagePlanKey {
            usage_plan_id: a.id.clone(),
            key_id: key.id.clone(),
            key_name: "alice".into(),
        }]
    );
    assert!(ka.next_page_token.is_empty());
    let kb = ok("keys of b", admin.list_usage_plan_keys(list(&b.id)).await);
    assert!(
        kb.keys.is_empty(),
        "the refused binding did not happen: {kb:?}"
    );
    err(
        "keys of an unknown plan",
        admin.list_usage_plan_keys(list("nope")).await,
        Code::NotFound,
    );

    // Moving c onto llm too would give alice two plans there.
    err(
        "update c's stages onto llm",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "c".into(),
                    stages: vec![stage(OTHER), stage(DOMAIN)],
                    ..Default::default()
                }),
                update_mask: mask(&["stages"]),
                validate_only: false,
            })
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        ok("c unchanged", get_plan(&mut admin, "c").await).stages,
        c.stages
    );

    // Unbinding from a refuses the key in llm at once, but not in other.
    ok(
        "unbind",
        admin
            .delete_usage_plan_key(DeleteUsagePlanKeyRequest {
                plan: "a".into(),
                key: "alice".into(),
            })
            .await,
    );
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "invalid-key",
        "unbound from a",
    );
    assert_allowed(&call_key(&s, OTHER, &value).await, "still bound to c");
    assert!(ok("keys of a", admin.list_usage_plan_keys(list("a")).await)
        .keys
        .is_empty());
    err(
        "unbind again",
        admin
            .delete_usage_plan_key(DeleteUsagePlanKeyRequest {
                plan: "a".into(),
                key: "alice".into(),
            })
            .await,
        Code::NotFound,
    );

    // Now b may take llm.
    bind(&mut admin, "b", "alice").await;
    let r = call_key(&s, DOMAIN, &value).await;
    assert_allowed(&r, "llm via b");
    assert_eq!(limit_name(&r), "b/quota");

    err(
        "bind unknown key",
        try_bind(&mut admin, "a", "nobody").await,
        Code::NotFound,
    );
    err(
        "bind unknown plan",
        try_bind(&mut admin, "nope", "alice").await,
        Code::NotFound,
    );
    s.shutdown().await;
}

// ----------------------------------------------------------------- throttle

#[tokio::test(flavor = "multi_thread")]
async fn throttle_allows_exactly_the_burst_then_refuses() {
    let s = server().await;
    let mut admin = s.admin().await;
    // One token per 1000 s: nothing refills during the test.
    let (_, value) = plan_with_key(
        &mut admin,
        plan("tiny", DOMAIN, throttle(0.001, 5), None),
        "alice",
    )
    .await;

    let mut allowed = 0;
    for i in 0..8 {
        let r = call_key(&s, DOMAIN, &value).await;
        let st = &r.statuses[0];
        if i < 5 {
            assert_allowed(&r, &format!("call {i}"));
            assert_eq!(limit_name(&r), "tiny/throttle");
            assert_eq!(st.limit_remaining, 4 - i, "call {i}: {r:?}");
            allowed += 1;
        } else {
            assert_refused(&r, "throttled", &format!("call {i}"));
            assert_eq!(limit_name(&r), "tiny/throttle", "{r:?}");
            assert_eq!(st.limit_remaining, 0);
            let reset = st
                .duration_until_reset
                .as_ref()
                .expect("duration_until_reset on a refusal");
            assert!(reset.seconds >= 1, "{r:?}");
        }
    }
    assert_eq!(allowed, 5);

    // 6 hits never fit a bucket of 5, even when full; the refusal takes nothing.
    let (_, fresh) = create_key(&mut admin, "bob").await;
    bind(&mut admin, "tiny", "bob").await;
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_hits(&[("api_key", fresh.as_str())], 6)],
        ))
        .await;
    assert_refused(&r, "throttled", "6 hits");
    assert_eq!(limit_name(&r), "tiny/throttle");
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_hits(&[("api_key", fresh.as_str())], 5)],
        ))
        .await;
    assert_allowed(&r, "5 hits still fit");
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_refused(
        &call_key(&s, DOMAIN, &fresh).await,
        "throttled",
        "bucket empty",
    );

    // Request-level hits_addend counts too.
    let (_, third) = create_key(&mut admin, "carol").await;
    bind(&mut admin, "tiny", "carol").await;
    let r = s
        .check(request_hits(
            DOMAIN,
            vec![desc(&[("api_key", third.as_str())])],
            6,
        ))
        .await;
    assert_refused(&r, "throttled", "request hits_addend 6");
    s.shutdown().await;
}

// -------------------------------------------------------------------- quota

#[tokio::test(flavor = "multi_thread")]
async fn quota_allows_exactly_the_limit_per_utc_day() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(&mut admin, plan("q3", DOMAIN, None, daily(3)), "alice").await;

    for i in 0..3u32 {
        let r = call_key(&s, DOMAIN, &value).await;
        assert_allowed(&r, &format!("call {i}"));
        assert_limited(&r.statuses[0], OK, "q3/quota", 3, DAY, 2 - i);
    }
    let left = i64::try_from(DAY_SECS - unix_now() % DAY_SECS).expect("fits");
    let r = call_key(&s, DOMAIN, &value).await;
    assert_refused(&r, "quota-exceeded", "call 4");
    let st = &r.statuses[0];
    let l = st
        .current_limit
        .as_ref()
        .expect("current_limit on the refusal");
    assert_eq!(
        (l.name.as_str(), l.requests_per_unit, l.unit),
        ("q3/quota", 3, DAY)
    );
    assert_eq!(st.limit_remaining, 0);
    let reset = st
        .duration_until_reset
        .as_ref()
        .expect("duration_until_reset")
        .seconds;
    assert!(
        (1..=left).contains(&reset),
        "resets at midnight UTC: {reset}s, at most {left}s"
    );
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "quota-exceeded",
        "call 5",
    );

    let u = key_usage_today(&mut admin, "q3", "alice").await;
    let live = u.live.expect("live");
    assert_eq!(
        (live.quota_used, live.quota_remaining, live.quota_limit),
        (3, 0, 3)
    );
    assert_eq!(
        u.days[0].used, 3,
        "refused calls are not counted: {:?}",
        u.days
    );

    // Hits that do not fit are refused and not counted; a smaller call still fits.
    let (_, bob) = create_key(&mut admin, "bob").await;
    bind(&mut admin, "q3", "bob").await;
    let two = || request(DOMAIN, vec![desc_hits(&[("api_key", bob.as_str())], 2)]);
    let r = s.check(two()).await;
    assert_allowed(&r, "2 of 3");
    assert_eq!(r.statuses[0].limit_remaining, 1);
    assert_refused(&s.check(two()).await, "quota-exceeded", "2 more do not fit");
    let r = call_key(&s, DOMAIN, &bob).await;
    assert_allowed(&r, "the last one fits");
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let u = key_usage_today(&mut admin, "q3", "bob").await;
    assert_eq!(u.live.expect("live").quota_used, 3);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn throttled_calls_do_not_consume_quota() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("tq", DOMAIN, throttle(0.001, 1), daily(2)),
        "alice",
    )
    .await;
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "call 1");
    for i in 2..=4 {
        assert_refused(
            &call_key(&s, DOMAIN, &value).await,
            "throttled",
            &format!("call {i}"),
        );
    }
    let u = key_usage_today(&mut admin, "tq", "alice").await;
    let live = u.live.expect("live");
    assert_eq!(live.quota_used, 1, "only the allowed call counts: {live:?}");
    assert_eq!(live.quota_remaining, 1);
    assert_eq!(u.days[0].used, 1);
    assert_eq!(u.days[0].remaining, 1);

    // Raise the burst: the one quota unit left is still there.
    ok(
        "raise burst",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "tq".into(),
                    throttle: throttle(0.001, 100),
                    ..Default::default()
                }),
                update_mask: mask(&["throttle"]),
                validate_only: false,
            })
            .await,
    );
    let r = call_key(&s, DOMAIN, &value).await;
    assert_allowed(&r, "second quota unit");
    assert_eq!(limit_name(&r), "tq/quota", "the quota binds: {r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "quota-exceeded",
        "quota used up",
    );
    s.shutdown().await;
}

// --------------------------------------------------------- method throttles

#[tokio::test(flavor = "multi_thread")]
async fn a_method_throttle_replaces_the_plan_throttle_for_matching_calls() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        UsagePlan {
            stages: vec![ApiStage {
                method_throttles: HashMap::from([
                    (
                        "/v1/chat/completions/POST".to_owned(),
                        Throttle {
                            rate_limit: 0.001,
                            burst_limit: 1,
                        },
                    ),
                    (
                        "/v1/models/{id}/*".to_owned(),
                        Throttle {
                            rate_limit: 0.001,
                            burst_limit: 2,
                        },
                    ),
                ]),
                ..stage(DOMAIN)
            }],
            ..plan("mp", DOMAIN, throttle(1000.0, 100), daily(1000))
        },
        "alice",
    )
    .await;
    let chat = |v: &str| {
        request(
            DOMAIN,
            vec![desc(&[
                ("api_key", v),
                ("method", "POST"),
                ("path", "/v1/chat/completions?x=1"),
            ])],
        )
    };
    let models = |v: &str| {
        request(
            DOMAIN,
            vec![desc(&[
                ("api_key", v),
                ("method", "GET"),
                ("path", "/v1/models"),
            ])],
        )
    };

    let r = s.check(chat(&value)).await;
    assert_allowed(&r, "first chat call");
    assert!(
        limit_name(&r).contains("/v1/chat/completions/POST"),
        "the method throttle binds: {r:?}"
    );
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = s.check(chat(&value)).await;
    assert_refused(&r, "throttled", "second chat call");
    assert!(
        limit_name(&r).starts_with("mp/") && limit_name(&r).contains("/v1/chat/completions/POST"),
        "{r:?}"
    );

    // Another method and path: the plan throttle (burst 100) applies.
    for i in 0..3 {
        let r = s.check(models(&value)).await;
        assert_allowed(&r, &format!("GET /v1/models {i}"));
        assert_eq!(limit_name(&r), "mp/throttle", "{r:?}");
    }
    // Without method and path entries: the plan throttle too.
    let r = call_key(&s, DOMAIN, &value).await;
    assert_allowed(&r, "no method/path");
    assert_eq!(limit_name(&r), "mp/throttle");

    // "{id}" matches any one segment and "*" any method: one bucket of 2
    // for every model and method.
    let model = |method: &str, path: &str| {
        request(
            DOMAIN,
            vec![desc(&[
                ("api_key", value.as_str()),
                ("method", method),
                ("path", path),
            ])],
        )
    };
    let r = s.check(model("GET", "/v1/models/gpt-4o")).await;
    assert_allowed(&r, "GET a model");
    assert!(limit_name(&r).contains("/v1/models/{id}/*"), "{r:?}");
    assert_allowed(
        &s.check(model("DELETE", "/v1/models/other")).await,
        "DELETE a model",
    );
    let r = s.check(model("GET", "/v1/models/third")).await;
    assert_refused(&r, "throttled", "third model call");
    assert!(limit_name(&r).contains("/v1/models/{id}/*"), "{r:?}");
    // One segment only: a deeper path is not matched.
    let r = s.check(model("GET", "/v1/models/a/b")).await;
    assert_allowed(&r, "deeper path");
    assert_eq!(limit_name(&r), "mp/throttle", "{r:?}");

    // The quota counts every allowed call: 1 chat + 3 models + 1 plain + 2
    // model calls + 1 deeper path.
    let u = key_usage_today(&mut admin, "mp", "alice").await;
    let live = u.live.expect("live");
    assert_eq!(live.quota_used, 8, "{live:?}");
    assert_eq!(live.quota_remaining, 992);
    // The plan bucket took 4; the method bucket is separate.
    assert_eq!(live.throttle_burst, 100);
    s.shutdown().await;
}

// -------------------------------------------------------------- concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_never_pass_more_than_the_quota() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(&mut admin, plan("q50", DOMAIN, None, daily(50)), "alice").await;

    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(s.new_client().await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let mut client = clients[i % clients.len()].clone();
        let req = request(DOMAIN, vec![desc(&[("api_key", value.as_str())])]);
        tasks.spawn(async move {
            client
                .should_rate_limit(req)
                .await
                .expect("ShouldRateLimit")
                .into_inner()
        });
    }
    let (mut allowed, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("task did not panic");
        if r.overall_code == OK {
            allowed += 1;
        } else {
            assert_refused(&r, "quota-exceeded", "concurrent refusal");
            refused += 1;
        }
    }
    assert_eq!((allowed, refused), (50, 150));

    let live = key_usage_today(&mut admin, "q50", "alice")
        .await
        .live
        .expect("live");
    assert_eq!((live.quota_used, live.quota_remaining), (50, 0));
    s.shutdown().await;
}

// -------------------------------------------------------------------- usage

#[tokio::test(flavor = "multi_thread")]
async fn get_usage_reports_days_and_live_state_and_checks_dates() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (p, value) = plan_with_key(
        &mut admin,
        plan("u", DOMAIN, throttle(0.001, 10), daily(5)),
        "alice",
    )
    .await;
    for _ in 0..3 {
        assert_allowed(&call_key(&s, DOMAIN, &value).await, "use");
    }
    let now = now_secs();
    let day = utc_date(now);
    let yesterday = utc_date(now - 86_400);
    let midnight = now - now.rem_euclid(86_400);

    let u = ok(
        "GetUsage",
        try_usage(&mut admin, "u", "", &yesterday, &day).await,
    );
    assert_eq!(u.usage_plan_id, p.id);
    assert_eq!(
        (u.start_date.as_str(), u.end_date.as_str()),
        (yesterday.as_str(), day.as_str())
    );
    assert_eq!(u.items.len(), 1, "{u:?}");
    let k = &u.items[0];
    assert_eq!(k.key_name, "alice");
    assert_eq!(
        k.days,
        [
            DailyUsage {
                date: yesterday.clone(),
                used: 0,
                remaining: 5,
            },
            DailyUsage {
                date: day.clone(),
                used: 3,
                remaining: 2,
            },
        ]
    );
    let live = k.live.clone().expect("live");
    assert_eq!(
        (live.quota_used, live.quota_remaining, live.quota_limit),
        (3, 2, 5)
    );
    assert_eq!(live.period_start.expect("period_start").seconds, midnight);
    assert_eq!(
        live.period_end.expect("period_end").seconds,
        midnight + 86_400
    );
    assert_eq!(live.throttle_burst, 10);
    // 3 tokens taken; refill is 0.001/s, so well under half a token since.
    assert!(
        (7.0..7.5).contains(&live.throttle_tokens),
        "{}",
        live.throttle_tokens
    );
    // Whole millionths of a token, not the nanosecond arithmetic's noise.
    let millionths = live.throttle_tokens * 1e6;
    assert!(
        (millionths - millionths.round()).abs() < 1e-3,
        "{}",
        live.throttle_tokens
    );

    // By key, by id.
    let k2 = key_usage_today(&mut admin, &p.id, "alice").await;
    assert_eq!(k2.days, [k.days[1].clone()]);
    assert_eq!(k2.key_id, k.key_id);

    // Bad dates.
    for bad in ["2024-13-01", "yesterday", "2024-1-01", ""] {
        invalid(
            &format!("start_date {bad:?}"),
            try_usage(&mut admin, "u", "", bad, &day).await,
            "start_date",
        );
    }
    invalid(
        "bad end_date",
        try_usage(&mut admin, "u", "", &day, "2024-02-30").await,
        "end_date",
    );
    err(
        "end before start",
        try_usage(&mut admin, "u", "", &day, &yesterday).await,
        Code::InvalidArgument,
    );
    err(
        "unknown plan",
        try_usage(&mut admin, "nope", "", &day, &day).await,
        Code::NotFound,
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn update_usage_grants_and_revokes_quota_for_the_current_day() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(&mut admin, plan("u", DOMAIN, None, daily(5)), "alice").await;
    for _ in 0..3 {
        assert_allowed(&call_key(&s, DOMAIN, &value).await, "use");
    }

    // Revoke: nothing left today.
    let k = ok(
        "revoke",
        try_update_usage(&mut admin, "u", "alice", 0).await,
    );
    let live = k.live.clone().expect("live");
    assert_eq!(
        (live.quota_used, live.quota_remaining, live.quota_limit),
        (3, 0, 3)
    );
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "quota-exceeded",
        "revoked",
    );

    // Grant: 10 more, then refused, with the raised limit reported.
    let k = ok(
        "grant",
        try_update_usage(&mut admin, "u", "alice", 10).await,
    );
    let live = k.live.clone().expect("live");
    assert_eq!(
        (live.quota_used, live.quota_remaining, live.quota_limit),
        (3, 10, 13)
    );
    assert_eq!(k.key_name, "alice");
    for i in 0..10u32 {
        let r = call_key(&s, DOMAIN, &value).await;
        assert_allowed(&r, &format!("granted call {i}"));
        assert_limited(&r.statuses[0], OK, "u/quota", 13, DAY, 9 - i);
    }
    let r = call_key(&s, DOMAIN, &value).await;
    assert_refused(&r, "quota-exceeded", "grant used up");
    let l = r.statuses[0].current_limit.as_ref().expect("current_limit");
    assert_eq!((l.requests_per_unit, l.unit), (13, DAY));
    let u = key_usage_today(&mut admin, "u", "alice").await;
    assert_eq!((u.days[0].used, u.days[0].remaining), (13, 0));

    invalid(
        "negative remaining",
        try_update_usage(&mut admin, "u", "alice", -1).await,
        "remaining",
    );

    // A plan without a quota.
    create_plan(&mut admin, plan("noquota", OTHER, throttle(10.0, 10), None)).await;
    bind(&mut admin, "noquota", "alice").await;
    err(
        "no quota",
        try_update_usage(&mut admin, "noquota", "alice", 5).await,
        Code::FailedPrecondition,
    );
    // A key not bound to the plan.
    create_key(&mut admin, "bob").await;
    err(
        "unbound key",
        try_update_usage(&mut admin, "u", "bob", 5).await,
        Code::NotFound,
    );
    s.shutdown().await;
}

// ------------------------------------------------------------------- import

#[tokio::test(flavor = "multi_thread")]
async fn import_api_keys_from_aws_csv() {
    let s = server().await;
    let mut admin = s.admin().await;
    let imp = create_plan(&mut admin, plan("imp", DOMAIN, None, daily(100))).await;
    let imp2 = create_plan(&mut admin, plan("imp2", OTHER, None, daily(100))).await;

    let bob_value = "bob-key-0123456789abcdef";
    let dave_value = "dave-key-0123456789abcdef";
    let csv = format!(
        "Name,Key,Enabled,UsagePlanIds\n\
         bob,{bob_value},true,\"imp,imp2\"\n\
         carol,short,true,imp\n\
         dave,{dave_value},false,imp\n"
    );
    let r = ok(
        "import",
        admin
            .import_api_keys(ImportApiKeysRequest {
                csv,
                fail_on_warnings: false,
            })
            .await,
    );
    assert_eq!(r.ids.len(), 2, "{r:?}");
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].contains("line 3"), "{r:?}");

    let bob = ok("bob", get_key(&mut admin, "bob").await);
    assert!(bob.enabled);
    assert!(r.ids.contains(&bob.id));
    let mut ids = bob.usage_plan_ids.clone();
    ids.sort();
    let mut want = vec![imp.id.clone(), imp2.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert!(!contains(&bob.encode_to_vec(), bob_value.as_bytes()));
    err(
        "carol skipped",
        get_key(&mut admin, "carol").await,
        Code::NotFound,
    );

    let r1 = call_key(&s, DOMAIN, bob_value).await;
    assert_allowed(&r1, "imported key in llm");
    assert_eq!(limit_name(&r1), "imp/quota");
    let r2 = call_key(&s, OTHER, bob_value).await;
    assert_allowed(&r2, "imported key in other");
    assert_eq!(limit_name(&r2), "imp2/quota");
    assert_refused(
        &call_key(&s, DOMAIN, dave_value).await,
        "invalid-key",
        "imported disabled",
    );

    // fail_on_warnings: a bad row means nothing is imported.
    let erin_value = "erin-key-0123456789abcdef";
    let csv = format!(
        "Name,Key,Enabled,UsagePlanIds\n\
         erin,{erin_value},true,imp\n\
         frank,tiny,true,imp\n"
    );
    let m = err(
        "fail on warnings",
        admin
            .import_api_keys(ImportApiKeysRequest {
                csv,
                fail_on_warnings: true,
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("line 3"), "{m}");
    err(
        "erin not imported",
        get_key(&mut admin, "erin").await,
        Code::NotFound,
    );
    assert_refused(
        &call_key(&s, DOMAIN, erin_value).await,
        "invalid-key",
        "erin",
    );

    // A row with the value of an existing key updates that key.
    let r = ok(
        "re-import bob",
        admin
            .import_api_keys(ImportApiKeysRequest {
                csv: format!("Key,Name,Enabled\n{bob_value},bob,false\n"),
                fail_on_warnings: true,
            })
            .await,
    );
    assert_eq!(r.ids, std::slice::from_ref(&bob.id), "{r:?}");
    assert!(r.warnings.is_empty(), "{r:?}");
    let bob2 = ok("bob", get_key(&mut admin, "bob").await);
    assert!(!bob2.enabled, "{bob2:?}");
    assert_eq!(bob2.usage_plan_ids.len(), 2, "bindings kept: {bob2:?}");
    assert_refused(
        &call_key(&s, DOMAIN, bob_value).await,
        "invalid-key",
        "bob disabled by re-import",
    );

    // A missing Key column.
    invalid(
        "no Key column",
        admin
            .import_api_keys(ImportApiKeysRequest {
                csv: "Name,Value\ngrace,grace-key-0123456789abcdef\n".into(),
                fail_on_warnings: false,
            })
            .await,
        "csv",
    );
    let list = ok(
        "list",
        admin.list_api_keys(ListApiKeysRequest::default()).await,
    );
    let names: Vec<&str> = list.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["bob", "dave"]);
    s.shutdown().await;
}

// -------------------------------------------------------------- persistence

#[tokio::test(flavor = "multi_thread")]
async fn plans_keys_bindings_and_quota_usage_survive_a_restart() {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    let s = TestServer::builder().config(CONFIG).start().await;
    let mut admin = s.admin().await;
    let (p, value) = plan_with_key(&mut admin, plan("gold", DOMAIN, None, daily(5)), "alice").await;
    for _ in 0..2 {
        assert_allowed(&call_key(&s, DOMAIN, &value).await, "before restart");
    }
    // bob: a quota grant (1 left today, after 1 used).
    let (_, bob) = create_key(&mut admin, "bob").await;
    bind(&mut admin, "gold", "bob").await;
    assert_allowed(&call_key(&s, DOMAIN, &bob).await, "bob before restart");
    ok(
        "grant",
        try_update_usage(&mut admin, "gold", "bob", 1).await,
    );
    // carol: rotated with a grace period, so two values work.
    let (_, carol_old) = create_key(&mut admin, "carol").await;
    bind(&mut admin, "gold", "carol").await;
    let carol_new = ok("rotate", rotate(&mut admin, "carol", 3600).await).value;
    // A throttle bucket, emptied: a restart refills it.
    create_plan(&mut admin, plan("slow", OTHER, throttle(0.001, 1), None)).await;
    bind(&mut admin, "slow", "alice").await;
    assert_allowed(&call_key(&s, OTHER, &value).await, "slow 1");
    assert_refused(&call_key(&s, OTHER, &value).await, "throttled", "slow 2");

    let key = ok("key", get_key(&mut admin, "alice").await);
    drop(admin);
    let dir = s.shutdown().await;

    let s = TestServer::builder()
        .config(CONFIG)
        .data_dir(dir)
        .start()
        .await;
    let mut admin = s.admin().await;
    assert_eq!(ok("plan", get_plan(&mut admin, "gold").await), p);
    assert_eq!(list_plan_names(&mut admin).await, ["gold", "slow"]);
    assert_eq!(ok("key", get_key(&mut admin, &key.id).await), key);
    let keys = ok(
        "plan keys",
        admin
            .list_usage_plan_keys(ListUsagePlanKeysRequest {
                plan: "gold".into(),
                ..Default::default()
            })
            .await,
    );
    let names: Vec<&str> = keys.keys.iter().map(|k| k.key_name.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    assert_eq!(keys.keys[0].key_id, key.id);

    // alice's quota continues from 2.
    for i in 0..3u32 {
        let r = call_key(&s, DOMAIN, &value).await;
        assert_allowed(&r, &format!("after restart {i}"));
        assert_limited(&r.statuses[0], OK, "gold/quota", 5, DAY, 2 - i);
    }
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "quota-exceeded",
        "quota continues",
    );
    let u = key_usage_today(&mut admin, "gold", "alice").await;
    assert_eq!(u.days[0].used, 5);

    // bob's grant survived: exactly one more.
    assert_allowed(&call_key(&s, DOMAIN, &bob).await, "bob's granted call");
    assert_refused(
        &call_key(&s, DOMAIN, &bob).await,
        "quota-exceeded",
        "bob after grant",
    );

    // carol's old value is still in its grace period.
    assert_allowed(&call_key(&s, DOMAIN, &carol_new).await, "carol new value");
    assert_allowed(
        &call_key(&s, DOMAIN, &carol_old).await,
        "carol old value in grace",
    );

    // Buckets live in memory: the restart refilled alice's.
    assert_allowed(&call_key(&s, OTHER, &value).await, "slow after restart");
    assert_refused(
        &call_key(&s, OTHER, &value).await,
        "throttled",
        "slow again",
    );
    s.shutdown().await;
}

// ------------------------------------------------------- mixed descriptors

#[tokio::test(flavor = "multi_thread")]
async fn descriptors_without_the_key_entry_keep_following_the_config_rules() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) =
        plan_with_key(&mut admin, plan("gold", DOMAIN, None, daily(100)), "alice").await;
    let key = desc(&[("api_key", value.as_str())]);
    let ip = desc(&[("remote_address", "10.0.0.1")]);

    let r = s
        .check(request(DOMAIN, vec![key.clone(), ip.clone()]))
        .await;
    assert_eq!(r.statuses.len(), 2, "{r:?}");
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OK, "gold/quota", 100, DAY, 99);
    assert_limited(&r.statuses[1], OK, "per-ip", 2, DAY, 1);

    let r = s
        .check(request(DOMAIN, vec![ip.clone(), key.clone()]))
        .await;
    assert_eq!(r.statuses.len(), 2, "{r:?}");
    assert_limited(&r.statuses[0], OK, "per-ip", 2, DAY, 0);
    assert_limited(&r.statuses[1], OK, "gold/quota", 100, DAY, 98);

    // The config rule refuses; the plan still answers for its descriptor.
    let r = s
        .check(request(DOMAIN, vec![key.clone(), ip.clone()]))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT, "{r:?}");
    assert_limited(&r.statuses[0], OK, "gold/quota", 100, DAY, 97);
    assert_limited(&r.statuses[1], OVER_LIMIT, "per-ip", 2, DAY, 0);
    assert_eq!(
        reason(&r),
        None,
        "a config refusal has no plan reason: {r:?}"
    );

    // An invalid key next to a config rule: each gets its own status.
    let r = s
        .check(request(
            DOMAIN,
            vec![
                desc(&[("remote_address", "10.0.0.2")]),
                desc(&[("api_key", "slk_nope-nope-nope-nope")]),
            ],
        ))
        .await;
    assert_eq!(r.statuses.len(), 2, "{r:?}");
    assert_limited(&r.statuses[0], OK, "per-ip", 2, DAY, 1);
    assert_eq!(r.statuses[1].code, OVER_LIMIT);
    assert_eq!(reason(&r), Some("invalid-key"));

    // A domain no plan governs is decided by config rules alone.
    let r = s.hit("unconfigured", &[("api_key", value.as_str())]).await;
    assert_no_limit(&r.statuses[0]);
    s.shutdown().await;
}

// ---------------------------------------------------------------- stages

#[tokio::test(flavor = "multi_thread")]
async fn a_named_stage_with_a_custom_key_entry_governs_only_its_descriptors() {
    let s = server().await;
    let mut admin = s.admin().await;
    let prod = create_plan(
        &mut admin,
        UsagePlan {
            stages: vec![ApiStage {
                stage: "prod".into(),
                key_entry: "x_key".into(),
                ..stage(DOMAIN)
            }],
            ..plan("prod-plan", DOMAIN, None, daily(10))
        },
    )
    .await;
    assert_eq!(prod.stages[0].key_entry, "x_key");
    let dev = create_plan(
        &mut admin,
        UsagePlan {
            stages: vec![ApiStage {
                stage: "dev".into(),
                key_entry: "x_key".into(),
                ..stage(DOMAIN)
            }],
            ..plan("dev-plan", DOMAIN, None, daily(20))
        },
    )
    .await;
    let (_, value) = create_key(&mut admin, "alice").await;
    // One plan per domain *and stage*: both bindings are fine.
    bind(&mut admin, &prod.name, "alice").await;
    bind(&mut admin, &dev.name, "alice").await;
    let v = value.as_str();

    let r = s.hit(DOMAIN, &[("x_key", v), ("stage", "prod")]).await;
    assert_limited(&r.statuses[0], OK, "prod-plan/quota", 10, DAY, 9);
    let r = s.hit(DOMAIN, &[("stage", "dev"), ("x_key", v)]).await;
    assert_limited(&r.statuses[0], OK, "dev-plan/quota", 20, DAY, 19);

    // Not governed: no stage entry, another stage, or the default key entry.
    for pairs in [
        vec![("x_key", v)],
        vec![("x_key", v), ("stage", "staging")],
        vec![("api_key", v), ("stage", "prod")],
    ] {
        let r = s.hit(DOMAIN, &pairs).await;
        assert_no_limit(&r.statuses[0]);
        assert_eq!(reason(&r), None, "{pairs:?}: {r:?}");
    }
    // Governed, with an unknown key.
    let r = s
        .hit(
            DOMAIN,
            &[("x_key", "slk_unknown-unknown-unknown"), ("stage", "prod")],
        )
        .await;
    assert_refused(&r, "invalid-key", "unknown key in prod");

    // Only the governed calls were counted.
    let u = key_usage_today(&mut admin, "prod-plan", "alice").await;
    assert_eq!(u.live.expect("live").quota_used, 1);
    s.shutdown().await;
}

// ------------------------------------------------------------ check-only

#[tokio::test(flavor = "multi_thread")]
async fn a_check_only_call_counts_nothing() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("peek", DOMAIN, throttle(0.001, 5), daily(2)),
        "alice",
    )
    .await;
    let peek = || request(DOMAIN, vec![desc_hits(&[("api_key", value.as_str())], 0)]);
    for i in 0..3 {
        assert_allowed(&s.check(peek()).await, &format!("peek {i}"));
    }
    let live = key_usage_today(&mut admin, "peek", "alice")
        .await
        .live
        .expect("live");
    assert_eq!(live.quota_used, 0, "{live:?}");
    assert_eq!(live.throttle_tokens.floor(), 5.0, "{live:?}");

    assert_allowed(&call_key(&s, DOMAIN, &value).await, "call 1");
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "call 2");
    assert_refused(
        &s.check(peek()).await,
        "quota-exceeded",
        "peek when used up",
    );
    s.shutdown().await;
}

// ------------------------------------------------------- usage, no quota

#[tokio::test(flavor = "multi_thread")]
async fn usage_without_a_quota_counts_days_with_no_remaining() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("free", DOMAIN, throttle(1000.0, 1000), None),
        "alice",
    )
    .await;
    for _ in 0..2 {
        assert_allowed(&call_key(&s, DOMAIN, &value).await, "use");
    }
    let u = key_usage_today(&mut admin, "free", "alice").await;
    assert_eq!(
        u.days,
        [DailyUsage {
            date: today(),
            used: 2,
            remaining: -1,
        }]
    );
    let live = u.live.expect("live");
    assert_eq!(live.quota_used, 0, "{live:?}");
    assert_eq!(live.throttle_burst, 1000);
    s.shutdown().await;
}

// ---------------------------------------------------------------- calendars

/// Waits past local midnight (at UTC offset `offset_secs`) if it is near.
async fn avoid_local_midnight(offset_secs: i64) {
    let left = 86_400 - (now_secs() + offset_secs).rem_euclid(86_400);
    if left <= 60 {
        tokio::time::sleep(std::time::Duration::from_secs(left.unsigned_abs() + 1)).await;
    }
}

fn midnight(date: jiff::civil::Date, tz: &jiff::tz::TimeZone) -> i64 {
    date.to_zoned(tz.clone())
        .expect("local midnight exists")
        .timestamp()
        .as_second()
}

/// The start of the MONTH period anchored on `anchor` containing `date`
/// (a month shorter than the anchor starts on its last day).
fn month_start(date: jiff::civil::Date, anchor: i8) -> jiff::civil::Date {
    let in_month = |d: jiff::civil::Date| {
        d.first_of_month()
            .with()
            .day(anchor.min(d.days_in_month()))
            .build()
            .expect("valid day")
    };
    let here = in_month(date);
    if date >= here {
        here
    } else {
        in_month(date.first_of_month().yesterday().expect("a previous month"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_periods_follow_the_anchor_day_and_time_zone() {
    use jiff::tz::TimeZone;
    // Asia/Kolkata is UTC+05:30 all year.
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    avoid_local_midnight(19_800).await;
    let s = TestServer::start(CONFIG).await;
    let mut admin = s.admin().await;
    let quota = |period: Period, anchor_day: i32, offset: Option<i32>, tz: &str| {
        Some(Quota {
            limit: 10,
            period: period as i32,
            anchor_day,
            offset,
            time_zone: tz.to_owned(),
        })
    };
    let cases = [
        (
            "kolkata-day",
            "d1",
            quota(Period::Day, 0, None, "Asia/Kolkata"),
            DAY,
        ),
        ("week-monday", "d2", quota(Period::Week, 1, None, ""), WEEK),
        (
            "month-31",
            "d3",
            quota(Period::Month, 31, None, "UTC"),
            MONTH,
        ),
        (
            "month-offset-0",
            "d4",
            quota(Period::Month, 0, Some(0), "UTC"),
            MONTH,
        ),
    ];
    let (_, value) = create_key(&mut admin, "alice").await;
    for (name, domain, q, _) in &cases {
        create_plan(&mut admin, plan(name, domain, None, q.clone())).await;
        bind(&mut admin, name, "alice").await;
    }

    let now = now_secs();
    let utc = TimeZone::UTC;
    let kolkata = TimeZone::get("Asia/Kolkata").expect("tzdb has Asia/Kolkata");
    let ts = jiff::Timestamp::from_second(now).expect("now");
    let utc_today = ts.to_zoned(utc.clone()).date();
    let local_today = ts.to_zoned(kolkata.clone()).date();
    let weekday = i64::from(utc_today.weekday().to_sunday_zero_offset());
    let week_start = utc_today
        .checked_sub(jiff::Span::new().days((weekday - 1).rem_euclid(7)))
        .expect("date");
    let m31 = month_start(utc_today, 31);
    let m31_next = month_start(
        m31.last_of_month()
            .tomorrow()
            .expect("date")
            .last_of_month(),
        31,
    );
    let m1 = utc_today.first_of_month();
    let expected = [
        (
            midnight(local_today, &kolkata),
            midnight(local_today.tomorrow().expect("date"), &kolkata),
            local_today,
        ),
        (
            midnight(week_start, &utc),
            midnight(week_start, &utc) + 7 * 86_400,
            utc_today,
        ),
        (midnight(m31, &utc), midnight(m31_next, &utc), utc_today),
        (
            midnight(m1, &utc),
            midnight(m1.last_of_month().tomorrow().expect("date"), &utc),
            utc_today,
        ),
    ];

    for ((name, domain, _, unit), (start, end, date)) in cases.iter().zip(expected) {
        let r = call_key(&s, domain, &value).await;
        assert_allowed(&r, name);
        let st = &r.statuses[0];
        let l = st.current_limit.as_ref().expect("current_limit");
        assert_eq!(l.name, format!("{name}/quota"));
        assert_eq!(l.unit, *unit, "{name}: unit");
        let reset = st.duration_until_reset.as_ref().expect("reset").seconds;
        assert!(
            reset >= 1 && reset <= end - now,
            "{name}: resets in {reset}s, the period ends in {}s",
            end - now
        );
        let day = format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day());
        let u = ok(name, try_usage(&mut admin, name, "alice", &day, &day).await);
        let k = &u.items[0];
        assert_eq!(k.days.len(), 1);
        assert_eq!(
            (k.days[0].date.as_str(), k.days[0].used),
            (day.as_str(), 1),
            "{name}"
        );
        let live = k.live.clone().expect("live");
        assert_eq!(
            (
                live.period_start.expect("period_start").seconds,
                live.period_end.expect("period_end").seconds
            ),
            (start, end),
            "{name}: period"
        );
        assert_eq!(live.quota_used, 1, "{name}");
    }
    s.shutdown().await;
}

/// A key that sends many distinct model names gets at most 1000 per-model
/// counters a day (memory and disk stay bounded): past that, new models'
/// usage is counted under "(other models)". GetUsage answers at most 1000
/// rows (the most used kept, the rest counted in `models_omitted`), so the
/// answer stays small enough for clients.
#[tokio::test(flavor = "multi_thread")]
async fn model_counters_and_usage_rows_are_capped_at_1000() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("many", DOMAIN, throttle(1e6, 1_000_000), None),
        "alice",
    )
    .await;
    // One model used three times, then 1002 models once each.
    for _ in 0..3 {
        let r = s
            .hit(DOMAIN, &[("api_key", &value), ("model", "the-main-one")])
            .await;
        assert_allowed(&r, "the main model");
    }
    for i in 0..1002 {
        let m = format!("m-{i:04}");
        let r = s.hit(DOMAIN, &[("api_key", &value), ("model", &m)]).await;
        assert_allowed(&r, &m);
    }
    let u = key_usage_today(&mut admin, "many", "alice").await;
    // The main model and m-0000..m-0998 have their counters (1000); the
    // last three models share "(other models)" (3 requests), so 1001 rows,
    // of which the least used one is left out.
    assert_eq!(u.models.len(), 1000, "rows kept");
    assert_eq!(u.models_omitted, 1, "rows left out");
    let row = |name: &str| u.models.iter().find(|m| m.model == name);
    assert_eq!(
        row("the-main-one").expect("the most used is kept").requests,
        3
    );
    assert_eq!(
        row("(other models)")
            .expect("the models past the cap")
            .requests,
        3
    );
    for capped in ["m-0999", "m-1000", "m-1001"] {
        assert!(row(capped).is_none(), "{capped} has no counter of its own");
    }
    // Still in (date, model) order.
    assert!(u
        .models
        .windows(2)
        .all(|w| (&w[0].date, &w[0].model) < (&w[1].date, &w[1].model)));
    s.shutdown().await;
}

/// Lowering a plan's burst under a key that emptied the old bucket leaves
/// the key the tokens it has (none here), not the old bucket's debt: the
/// next call waits one token's time (1 s at 1/s), not the 100 s the old
/// burst would take to refill.
#[tokio::test(flavor = "multi_thread")]
async fn a_lowered_burst_does_not_lock_a_key_out() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("lb", DOMAIN, throttle(1.0, 100), None),
        "alice",
    )
    .await;
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_hits(&[("api_key", value.as_str())], 100)],
        ))
        .await;
    assert_allowed(&r, "the whole burst");
    ok(
        "lower burst",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "lb".into(),
                    throttle: throttle(1.0, 5),
                    ..Default::default()
                }),
                update_mask: mask(&["throttle"]),
                validate_only: false,
            })
            .await,
    );
    // Refused (the bucket holds what refilled since, under a second), and
    // told to come back within 2 s, not ~100 s.
    let r = call_key(&s, DOMAIN, &value).await;
    if r.overall_code != OK {
        assert_refused(&r, "throttled", "just after lowering");
        let wait = r.statuses[0]
            .duration_until_reset
            .as_ref()
            .expect("a wait")
            .seconds;
        assert!(wait <= 2, "retry in {wait} s: {r:?}");
    }
    s.shutdown().await;
}

/// A raised throttle rate refills a key's bucket from the update on, not
/// from the key's next call: a bucket drained under 0.01/s (one token per
/// 100 s), the rate then raised to 10/s, is full again 2.5 s later (the
/// update time is known to the second, so at most 1.5 s of it is counted),
/// and the next call passes. It used to be refused, with 0.025 tokens in
/// the bucket and GetUsage showing them.
#[tokio::test(flavor = "multi_thread")]
async fn a_raised_rate_refills_from_the_update() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(
        &mut admin,
        plan("rr", DOMAIN, throttle(0.01, 5), None),
        "alice",
    )
    .await;
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_hits(&[("api_key", value.as_str())], 5)],
        ))
        .await;
    assert_allowed(&r, "the whole burst");
    assert_refused(&call_key(&s, DOMAIN, &value).await, "throttled", "drained");
    ok(
        "raise rate",
        admin
            .update_usage_plan(UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "rr".into(),
                    throttle: throttle(10.0, 5),
                    ..Default::default()
                }),
                update_mask: mask(&["throttle.rate_limit"]),
                validate_only: false,
            })
            .await,
    );
    // No call in between: the bucket is converted when it is next used.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let live = key_usage_today(&mut admin, "rr", "alice")
        .await
        .live
        .expect("live");
    assert_eq!(live.throttle_tokens, 5.0, "{live:?}");
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "after the raise");
    s.shutdown().await;
}

/// A quota removed and given back counts the calls made without it (they
/// were counted per day all along): GetUsage's day and the live quota
/// agree, and the quota is spent when they say. It used to come back with
/// the count from before its removal (3, not 5 used), free calls in between.
#[tokio::test(flavor = "multi_thread")]
async fn a_quota_given_back_counts_the_calls_made_without_it() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(&mut admin, plan("qb", DOMAIN, None, daily(6)), "alice").await;
    for i in 0..3 {
        assert_allowed(&call_key(&s, DOMAIN, &value).await, &format!("call {i}"));
    }
    let update = |quota: Option<Quota>| UpdateUsagePlanRequest {
        usage_plan: Some(UsagePlan {
            id: "qb".into(),
            quota,
            ..Default::default()
        }),
        update_mask: mask(&["quota"]),
        validate_only: false,
    };
    ok("remove quota", admin.update_usage_plan(update(None)).await);
    for i in 0..2 {
        assert_allowed(
            &call_key(&s, DOMAIN, &value).await,
            &format!("unquota'd call {i}"),
        );
    }
    ok(
        "quota back",
        admin.update_usage_plan(update(daily(6))).await,
    );
    let usage = key_usage_today(&mut admin, "qb", "alice").await;
    let live = usage.live.expect("live");
    assert_eq!((live.quota_used, live.quota_remaining), (5, 1), "{live:?}");
    let today = usage.days.last().expect("today");
    assert_eq!((today.used, today.remaining), (5, 1), "{today:?}");
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "the sixth");
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "quota-exceeded",
        "spent",
    );
    s.shutdown().await;
}

/// Changing a plan's quota calendar (time zone, period) mid-period keeps
/// the calls already made in the new current period, and a key's grant:
/// the count is rebuilt from the key's daily usage. Before, the new period
/// started at 0, so a zone change gave every key its quota again.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_quota_calendar_keeps_the_calls_made() {
    let s = server().await;
    let mut admin = s.admin().await;
    let (_, value) = plan_with_key(&mut admin, plan("zc", DOMAIN, None, daily(3)), "alice").await;
    for i in 0..3 {
        assert_allowed(&call_key(&s, DOMAIN, &value).await, &format!("call {i}"));
    }
    // One more unit granted for today: 4 in all, 3 used.
    ok(
        "grant",
        try_update_usage(&mut admin, "zc", "alice", 1).await,
    );
    let update = |quota: Option<Quota>| UpdateUsagePlanRequest {
        usage_plan: Some(UsagePlan {
            id: "zc".into(),
            quota,
            ..Default::default()
        }),
        update_mask: mask(&["quota"]),
        validate_only: false,
    };
    let mut kolkata = daily(3).unwrap();
    kolkata.time_zone = "Asia/Kolkata".into();
    ok("zone", admin.update_usage_plan(update(Some(kolkata))).await);
    let live = key_usage_today(&mut admin, "zc", "alice")
        .await
        .live
        .expect("live");
    assert_eq!((live.quota_used, live.quota_limit), (3, 4), "{live:?}");
    // The granted unit is there; then the quota is spent.
    assert_allowed(&call_key(&s, DOMAIN, &value).await, "the granted unit");
    assert_refused(
        &call_key(&s, DOMAIN, &value).await,
        "quota-exceeded",
        "spent",
    );
    // DAY to WEEK: this week holds at least today's 4 calls.
    let mut week = daily(10).unwrap();
    week.period = Period::Week as i32;
    ok("period", admin.update_usage_plan(update(Some(week))).await);
    let live = key_usage_today(&mut admin, "zc", "alice")
        .await
        .live
        .expect("live");
    assert!(live.quota_used >= 4, "{live:?}");
    s.shutdown().await;
}
