//! What a gateway receives when a usage plan refuses a call: the reason in a
//! response header, in dynamic metadata (for Envoy's local_reply_config) and
//! as an OpenAI-style JSON body; nothing of the sort on an allowed call.

mod common;

use common::{desc, request, TestServer, OK, OVER_LIMIT};
use prost_types::value::Kind;
use sluice::proto::admin::{
    ApiKey, ApiStage, CreateApiKeyRequest, CreateUsagePlanKeyRequest, CreateUsagePlanRequest,
    Period, Quota, Throttle, UsagePlan,
};
use sluice::proto::rls::RateLimitResponse;

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

fn metadata_reason(r: &RateLimitResponse) -> Option<String> {
    let v = r.dynamic_metadata.as_ref()?.fields.get("sluice_reason")?;
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        other => panic!("sluice_reason is not a string: {other:?}"),
    }
}

fn assert_refusal(r: &RateLimitResponse, reason: &str) {
    assert_eq!(r.overall_code, OVER_LIMIT, "{r:?}");
    assert_eq!(header(r, "x-sluice-reason"), Some(reason), "{r:?}");
    assert_eq!(header(r, "content-type"), Some("application/json"), "{r:?}");
    assert_eq!(metadata_reason(r).as_deref(), Some(reason), "{r:?}");
    let body = String::from_utf8(r.raw_body.clone()).expect("utf-8 body");
    let json: serde_json::Value = serde_json::from_str(&body).expect("the body is JSON");
    assert_eq!(json["error"]["type"], reason, "{body}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Creates `plan` (governing domain `llm`) and a key `key` bound to it on
/// `server`; returns the key's value.
async fn plan_with_key(server: &TestServer, plan: UsagePlan, key: &str) -> String {
    let mut admin = server.admin().await;
    let name = plan.name.clone();
    admin
        .create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(UsagePlan {
                stages: vec![ApiStage {
                    domain: "llm".into(),
                    ..Default::default()
                }],
                ..plan
            }),
        })
        .await
        .unwrap();
    let value = admin
        .create_api_key(CreateApiKeyRequest {
            api_key: Some(ApiKey {
                name: key.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    admin
        .create_usage_plan_key(CreateUsagePlanKeyRequest {
            plan: name,
            key: key.into(),
        })
        .await
        .unwrap();
    value
}

#[tokio::test]
async fn refusals_carry_reason_header_metadata_and_body_and_allowed_calls_do_not() {
    let server = TestServer::start("domain: other\ndescriptors: []\n").await;
    let value = plan_with_key(
        &server,
        UsagePlan {
            name: "gold".into(),
            throttle: Some(Throttle {
                rate_limit: 0.001,
                burst_limit: 1,
            }),
            ..Default::default()
        },
        "alice",
    )
    .await;

    let ok = server
        .check(request("llm", vec![desc(&[("api_key", &value)])]))
        .await;
    assert_eq!(ok.overall_code, OK, "{ok:?}");
    assert_eq!(header(&ok, "x-sluice-reason"), None, "{ok:?}");
    // The plan's default header style: OpenAI's, for the binding request limit.
    assert_eq!(
        header(&ok, "x-ratelimit-limit-requests"),
        Some("1"),
        "{ok:?}"
    );
    assert_eq!(
        header(&ok, "x-ratelimit-remaining-requests"),
        Some("0"),
        "{ok:?}"
    );
    assert_eq!(header(&ok, "retry-after"), None, "{ok:?}");
    assert!(
        ok.raw_body.is_empty() && ok.dynamic_metadata.is_none(),
        "{ok:?}"
    );

    let throttled = server
        .check(request("llm", vec![desc(&[("api_key", &value)])]))
        .await;
    assert_refusal(&throttled, "throttled");
    assert_eq!(
        header(&throttled, "retry-after"),
        Some("1000"),
        "{throttled:?}"
    );

    let invalid = server
        .check(request("llm", vec![desc(&[("api_key", "no-such-key")])]))
        .await;
    assert_refusal(&invalid, "invalid-key");
    server.shutdown().await;
}

/// A quota above the wire's u32 is shown whole in the headers: the limit
/// was clamped to 4294967295 while the remaining count was not, so a client
/// read more remaining than the limit.
#[tokio::test]
async fn a_quota_above_u32_is_shown_whole_in_the_headers() {
    let server = TestServer::start("domain: other\ndescriptors: []\n").await;
    let big: i64 = 1 << 40;
    let value = plan_with_key(
        &server,
        UsagePlan {
            name: "big".into(),
            quota: Some(Quota {
                limit: big,
                period: Period::Day as i32,
                ..Default::default()
            }),
            ..Default::default()
        },
        "bob",
    )
    .await;
    let ok = server
        .check(request("llm", vec![desc(&[("api_key", &value)])]))
        .await;
    assert_eq!(ok.overall_code, OK, "{ok:?}");
    assert_eq!(
        header(&ok, "x-ratelimit-limit-requests"),
        Some(big.to_string().as_str()),
        "{ok:?}"
    );
    assert_eq!(
        header(&ok, "x-ratelimit-remaining-requests"),
        Some((big - 1).to_string().as_str()),
        "{ok:?}"
    );
}
