//! Usage plans and API keys against the real `sluice` binary: the admin
//! token file, durability of admin writes and of quota usage across kill -9
//! and graceful restarts, and bad admin input not hurting the server.

mod proc;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use proc::*;
use sluice::proto::admin as pb;
use sluice::proto::admin::admin_service_client::AdminServiceClient;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::RateLimitResponse;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

type Admin = AdminServiceClient<Channel>;

/// The admin token file in `data`.
fn token_file(data: &Path) -> PathBuf {
    data.join("admin-token")
}

/// The token in the file (trimmed), checked non-empty.
fn read_token(data: &Path) -> String {
    let file = token_file(data);
    let raw =
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let t = raw.trim().to_owned();
    assert!(!t.is_empty(), "{} is empty", file.display());
    t
}

/// An admin client (requests are bounded by the channel's timeout).
async fn admin_client(addr: SocketAddr) -> Admin {
    AdminServiceClient::new(connect(addr).await)
}

/// `msg` with `authorization: Bearer <token>` (none when `token` is None).
fn authed<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii token"),
        );
    }
    r
}

async fn list_plans(
    c: &mut Admin,
    token: Option<&str>,
) -> Result<pb::ListUsagePlansResponse, tonic::Status> {
    c.list_usage_plans(authed(pb::ListUsagePlansRequest::default(), token))
        .await
        .map(tonic::Response::into_inner)
}

/// A plan for `domain`, with an optional throttle (rate, burst) and a DAY quota.
fn plan(name: &str, domain: &str, throttle: Option<(f64, i32)>, quota: i64) -> pb::UsagePlan {
    pb::UsagePlan {
        name: name.into(),
        throttle: throttle.map(|(rate_limit, burst_limit)| pb::Throttle {
            rate_limit,
            burst_limit,
        }),
        quota: Some(pb::Quota {
            limit: quota,
            period: pb::Period::Day as i32,
            ..Default::default()
        }),
        stages: vec![pb::ApiStage {
            domain: domain.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Creates `plan`, a key `key_name` and binds it: (plan, key, key value).
async fn plan_with_key(
    c: &mut Admin,
    token: &str,
    plan: pb::UsagePlan,
    key_name: &str,
) -> (pb::UsagePlan, pb::ApiKey, String) {
    let plan = c
        .create_usage_plan(authed(
            pb::CreateUsagePlanRequest {
                usage_plan: Some(plan),
            },
            Some(token),
        ))
        .await
        .expect("CreateUsagePlan")
        .into_inner();
    let created = c
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    name: key_name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Some(token),
        ))
        .await
        .expect("CreateApiKey")
        .into_inner();
    assert!(!created.value.is_empty(), "no key value: {created:?}");
    let key = created.api_key.expect("api_key in the response");
    let bound = c
        .create_usage_plan_key(authed(
            pb::CreateUsagePlanKeyRequest {
                plan: plan.name.clone(),
                key: key.name.clone(),
            },
            Some(token),
        ))
        .await
        .expect("CreateUsagePlanKey")
        .into_inner();
    assert_eq!(bound.usage_plan_id, plan.id, "{bound:?}");
    assert_eq!(bound.key_id, key.id, "{bound:?}");
    (plan, key, created.value)
}

/// The `x-sluice-reason` response header, if any.
fn reason(r: &RateLimitResponse) -> Option<&str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == "x-sluice-reason")
        .map(|h| h.value.as_str())
}

/// One call with an API key in `domain`.
async fn call_key(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    key: &str,
) -> RateLimitResponse {
    should(c, request(domain, &[("api_key", key)])).await
}

/// The name of the first status's current limit ("" if none).
fn limit_name(r: &RateLimitResponse) -> &str {
    r.statuses
        .first()
        .and_then(|s| s.current_limit.as_ref())
        .map_or("", |l| l.name.as_str())
}

// ---------------------------------------------------------------------------
// 1. The admin token
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_generates_a_private_admin_token_and_later_starts_reuse_it() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let file = token_file(&data);
    let cmd = SluiceCmd::serve_embedded(&data).cwd(tmp.path());

    let mut s = cmd.start();
    let admin = s.admin_addr();
    let mode = std::fs::metadata(&file)
        .unwrap_or_else(|e| panic!("{} not created: {e}", file.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode of {}: {mode:o}", file.display());
    let bytes = std::fs::read(&file).expect("read token file");
    let token = read_token(&data);
    assert!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "token is not printable ASCII: {token:?}"
    );
    let log = s.stderr();
    let shown = file.display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("admin token") && l.contains(&shown)),
        "no log line names the token file {shown}:\n{log}"
    );
    assert!(!log.contains(&token), "the log shows the token:\n{log}");

    let mut c = admin_client(admin).await;
    list_plans(&mut c, Some(&token))
        .await
        .expect("the file's token is accepted");
    for bad in [Some("not-the-token"), None] {
        let e = list_plans(&mut c, bad)
            .await
            .expect_err("a wrong or missing token must be refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}: {e:?}");
    }
    drop(c);
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", s.stderr());
    let log = s.stderr();
    assert!(!log.contains(&token), "the log shows the token:\n{log}");
    drop(s);

    // A second start reuses the file as it is.
    let mut s = cmd.start();
    let admin = s.admin_addr();
    assert_eq!(
        std::fs::read(&file).expect("read token file"),
        bytes,
        "the token file changed on the second start"
    );
    let mode = std::fs::metadata(&file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode after restart: {mode:o}");
    let mut c = admin_client(admin).await;
    list_plans(&mut c, Some(&token))
        .await
        .expect("the same token is accepted after a restart");
    let log = s.stderr();
    assert!(!log.contains(&token), "the log shows the token:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_flag_replaces_the_file_token() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let cmd = SluiceCmd::serve_embedded(&data).cwd(tmp.path());
    let mut s = cmd.start();
    let admin = s.admin_addr();
    let file_token = read_token(&data);
    // The file's token works while no flag is given. (The call also keeps
    // the SIGTERM below clear of the startup race that
    // `sigterm_right_after_startup_stops_cleanly` is about.)
    list_plans(&mut admin_client(admin).await, Some(&file_token))
        .await
        .expect("the file's token is accepted without --admin-token");
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", s.stderr());
    drop(s);
    let before = std::fs::read(token_file(&data)).expect("token file");

    let mut s = cmd.clone().args(["--admin-token", "mytoken"]).start();
    let admin = s.admin_addr();
    let mut c = admin_client(admin).await;
    let e = list_plans(&mut c, Some(&file_token))
        .await
        .expect_err("the file's token must not be accepted with --admin-token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    list_plans(&mut c, Some("mytoken"))
        .await
        .expect("--admin-token's token is accepted");
    assert_eq!(
        std::fs::read(token_file(&data)).expect("token file"),
        before,
        "--admin-token must not rewrite the token file"
    );
    let log = s.stderr();
    assert!(!log.contains("mytoken"), "the log shows the token:\n{log}");
}

/// A server that has logged where it listens is up: a SIGTERM from then on
/// is a graceful stop (exit 0, "stopped cleanly"), never death by the
/// signal's default action. Repeated, since a startup race shows only
/// sometimes.
#[test]
fn sigterm_right_after_startup_stops_cleanly() {
    for i in 0..20 {
        let tmp = tempdir();
        let data = tmp.path().join("data");
        let mut s = SluiceCmd::serve_embedded(&data).cwd(tmp.path()).start();
        s.admin_addr();
        let status = s.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "start {i}: SIGTERM right after the listening lines ended sluice with {status} \
             (signal {:?}) instead of a graceful stop; stderr:\n{}",
            status.signal(),
            s.stderr()
        );
        assert!(s.stderr().contains("stopped cleanly"), "{}", s.stderr());
    }
}

#[test]
fn empty_admin_token_file_is_refused() {
    for content in ["", "\n", "  \n"] {
        let tmp = tempdir();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("create data dir");
        let file = token_file(&data);
        std::fs::write(&file, content).expect("write token file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let f = SluiceCmd::serve_embedded(&data)
            .cwd(tmp.path())
            .expect_failure();
        assert!(
            !f.success(),
            "{content:?}: should exit non-zero: {}",
            f.output()
        );
        let shown = file.display().to_string();
        assert!(
            f.stderr.contains(&shown),
            "{content:?}: the error should name {shown}:\n{}",
            f.stderr
        );
        assert!(
            f.stderr.contains("empty"),
            "{content:?}: the error should say the token is empty:\n{}",
            f.stderr
        );
        assert_eq!(
            std::fs::read_to_string(&file).expect("token file"),
            content,
            "the token file must be left alone"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Admin writes are durable when acknowledged
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_admin_writes_survive_kill9() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let cmd = SluiceCmd::serve_embedded(&data).cwd(tmp.path());
    let domain = "llm-gateway";

    let mut s = cmd.start();
    let admin = s.admin_addr();
    let token = read_token(&data);
    let mut c = admin_client(admin).await;
    let (plan, key, value) = plan_with_key(
        &mut c,
        &token,
        plan("gold", domain, Some((100.0, 200)), 1000),
        "alice",
    )
    .await;
    // No pause: each write must have been on disk before it was acknowledged.
    let status = s.kill9();
    assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");
    drop((c, s));

    let mut s = cmd.start();
    let admin = s.admin_addr();
    let mut c = admin_client(admin).await;
    let got = c
        .get_usage_plan(authed(
            pb::GetUsagePlanRequest {
                plan: "gold".into(),
            },
            Some(&token),
        ))
        .await
        .expect("the plan survives kill -9")
        .into_inner();
    assert_eq!(got.id, plan.id);
    assert_eq!(got.throttle, plan.throttle);
    assert_eq!(got.quota, plan.quota);
    assert_eq!(got.stages, plan.stages);
    let got_key = c
        .get_api_key(authed(
            pb::GetApiKeyRequest {
                key: "alice".into(),
            },
            Some(&token),
        ))
        .await
        .expect("the key survives kill -9")
        .into_inner();
    assert_eq!(got_key.id, key.id);
    assert_eq!(
        got_key.usage_plan_ids,
        vec![plan.id.clone()],
        "the binding survives kill -9"
    );
    let bound = c
        .list_usage_plan_keys(authed(
            pb::ListUsagePlanKeysRequest {
                plan: "gold".into(),
                ..Default::default()
            },
            Some(&token),
        ))
        .await
        .expect("ListUsagePlanKeys")
        .into_inner();
    assert_eq!(bound.keys.len(), 1, "{bound:?}");
    assert_eq!(bound.keys[0].key_name, "alice", "{bound:?}");

    // The plan governs the domain: the key value is decided by it.
    let mut rls = s.client().await;
    let r = call_key(&mut rls, domain, &value).await;
    assert_eq!(r.overall_code, OK, "{r:?}");
    assert!(
        limit_name(&r).starts_with("gold/"),
        "decided by the plan: {r:?}"
    );
    let r = call_key(&mut rls, domain, "slk_not-a-key-at-all-000000").await;
    assert_eq!(r.overall_code, OVER_LIMIT, "{r:?}");
    assert_eq!(reason(&r), Some("invalid-key"), "{r:?}");
}

// ---------------------------------------------------------------------------
// 3. Quota usage across restarts
// ---------------------------------------------------------------------------

const QUOTA_DOMAIN: &str = "metered";

/// Starts `cmd`, creates a 5/DAY plan with a key, makes 3 calls (checking
/// what is left): the key value and the running server.
async fn use_three_of_five(cmd: &SluiceCmd, data: &Path) -> (String, Sluice) {
    let mut s = cmd.start();
    let admin = s.admin_addr();
    let token = read_token(data);
    let mut c = admin_client(admin).await;
    let (_, _, value) =
        plan_with_key(&mut c, &token, plan("five", QUOTA_DOMAIN, None, 5), "bob").await;
    let mut rls = s.client().await;
    for left in [4, 3, 2] {
        let r = call_key(&mut rls, QUOTA_DOMAIN, &value).await;
        assert_eq!(r.overall_code, OK, "{r:?}");
        assert_eq!(limit_name(&r), "five/quota", "{r:?}");
        assert_eq!(r.statuses[0].limit_remaining, left, "{r:?}");
    }
    (value, s)
}

/// After a restart: exactly two more calls pass, then the quota refuses.
async fn exactly_two_more_pass(cmd: &SluiceCmd, value: &str) {
    let s = cmd.start();
    let mut rls = s.client().await;
    let mut codes = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let r = call_key(&mut rls, QUOTA_DOMAIN, value).await;
        codes.push(r.overall_code);
        last = Some(r);
    }
    assert_eq!(
        codes,
        vec![OK, OK, OVER_LIMIT, OVER_LIMIT, OVER_LIMIT],
        "after 3 of 5 used before the restart; last response: {last:?}"
    );
    let last = last.expect("5 calls");
    assert_eq!(reason(&last), Some("quota-exceeded"), "{last:?}");
    assert_eq!(limit_name(&last), "five/quota", "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_usage_survives_kill9_with_sync_durability() {
    // The quota is per UTC day: do not straddle midnight.
    avoid_window_edge(86_400, 120);
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let cmd = SluiceCmd::serve_embedded(&data)
        .cwd(tmp.path())
        .args(["--durability", "sync"]);
    let (value, mut s) = use_three_of_five(&cmd, &data).await;
    // At once: with sync durability every acknowledged hit is on disk.
    let status = s.kill9();
    assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");
    drop(s);
    exactly_two_more_pass(&cmd, &value).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_usage_survives_graceful_stop_with_interval_durability() {
    // The default (interval durability, 100 ms), and an interval so long
    // that only the final flush on SIGTERM can have written the counters.
    for extra in [&[][..], &["--flush-interval-ms", "60000"][..]] {
        avoid_window_edge(86_400, 120);
        let tmp = tempdir();
        let data = tmp.path().join("data");
        let cmd = SluiceCmd::serve_embedded(&data)
            .cwd(tmp.path())
            .args(extra.iter().copied());
        let (value, mut s) = use_three_of_five(&cmd, &data).await;
        let status = s.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "{extra:?}: graceful stop should exit 0; stderr:\n{}",
            s.stderr()
        );
        drop(s);
        exactly_two_more_pass(&cmd, &value).await;
    }
}

// ---------------------------------------------------------------------------
// 4. Bad admin input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_admin_calls_leave_the_server_serving() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).cwd(tmp.path()).start();
    let admin = s.admin_addr();
    let token = read_token(&data);
    let t = Some(token.as_str());
    let mut c = admin_client(admin).await;

    let bad_plans = [
        ("no name", plan("", "d", None, 5)),
        ("negative burst", plan("p", "d", Some((1.0, -1)), 5)),
        ("NaN rate", plan("p", "d", Some((f64::NAN, 5)), 5)),
        ("infinite rate", plan("p", "d", Some((f64::INFINITY, 5)), 5)),
        ("rate without burst", plan("p", "d", Some((1.0, 0)), 5)),
        ("negative quota", plan("p", "d", None, -1)),
        ("empty domain", plan("p", "", None, 5)),
        (
            "no period",
            pb::UsagePlan {
                quota: Some(pb::Quota {
                    limit: 5,
                    ..Default::default()
                }),
                ..plan("p", "d", None, 5)
            },
        ),
        (
            "unknown time zone",
            pb::UsagePlan {
                quota: Some(pb::Quota {
                    limit: 5,
                    period: pb::Period::Day as i32,
                    time_zone: "Mars/Olympus_Mons".into(),
                    ..Default::default()
                }),
                ..plan("p", "d", None, 5)
            },
        ),
    ];
    for (what, p) in bad_plans {
        let e = c
            .create_usage_plan(authed(
                pb::CreateUsagePlanRequest {
                    usage_plan: Some(p),
                },
                t,
            ))
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    let e = c
        .create_usage_plan(authed(pb::CreateUsagePlanRequest { usage_plan: None }, t))
        .await
        .expect_err("no plan");
    assert_eq!(e.code(), Code::InvalidArgument, "no plan: {e:?}");
    let e = c
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    name: "k".into(),
                    ..Default::default()
                }),
                value: "short".into(),
                ..Default::default()
            },
            t,
        ))
        .await
        .expect_err("short key value");
    assert_eq!(e.code(), Code::InvalidArgument, "short key value: {e:?}");
    let e = c
        .get_usage(authed(
            pb::GetUsageRequest {
                plan: "p".into(),
                start_date: "2024-13-45".into(),
                end_date: "2024-01-01".into(),
                ..Default::default()
            },
            t,
        ))
        .await
        .expect_err("bad date");
    assert_eq!(e.code(), Code::InvalidArgument, "bad date: {e:?}");
    let e = c
        .update_usage(authed(
            pb::UpdateUsageRequest {
                plan: "p".into(),
                key: "k".into(),
                remaining: -1,
            },
            t,
        ))
        .await
        .expect_err("negative remaining");
    assert_eq!(e.code(), Code::InvalidArgument, "negative remaining: {e:?}");
    let e = c
        .list_usage_plans(authed(
            pb::ListUsagePlansRequest {
                page_size: -1,
                ..Default::default()
            },
            t,
        ))
        .await
        .expect_err("negative page size");
    assert_eq!(e.code(), Code::InvalidArgument, "negative page size: {e:?}");

    // Still up: nothing was created, the admin API answers, the RLS port
    // decides, and both report SERVING.
    assert!(s.is_running(), "sluice exited:\n{}", s.stderr());
    let plans = list_plans(&mut c, t).await.expect("ListUsagePlans");
    assert!(plans.usage_plans.is_empty(), "{plans:?}");
    let mut rls = s.client().await;
    let r = should(
        &mut rls,
        request("llm-gateway", &[("remote_address", "10.9.8.7")]),
    )
    .await;
    assert_eq!(r.overall_code, OK, "{r:?}");
    assert_eq!(first_limit(&r), Some(10), "{r:?}");
    let mut h = s.health().await;
    for name in ["", "ratelimit"] {
        assert_eq!(
            health_status(&mut h, name).await,
            ServingStatus::Serving as i32,
            "RLS health of {name:?}"
        );
    }
    let mut h = tonic_health::pb::health_client::HealthClient::new(connect(admin).await);
    for name in ["", "sluice.admin.v1.AdminService"] {
        assert_eq!(
            health_status(&mut h, name).await,
            ServingStatus::Serving as i32,
            "admin health of {name:?}"
        );
    }
}

/// An admin token longer than any client could send in a header (HTTP/2
/// header lists are capped at 16 KiB by default) is refused at start-up,
/// rather than starting a server nobody can administer.
#[test]
fn an_admin_token_too_long_to_send_is_refused() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let long = "t".repeat(20_000);
    let f = SluiceCmd::serve_embedded(&data)
        .args(["--admin-token", long.as_str()])
        .expect_failure();
    assert!(!f.success());
    assert!(
        f.stderr.contains("is 20000 bytes long; at most 4096"),
        "{}",
        f.stderr
    );
    // 4096 bytes is fine.
    let mut s = SluiceCmd::serve_embedded(&data)
        .args(["--admin-token", "t".repeat(4096).as_str()])
        .start();
    s.admin_addr();
}
