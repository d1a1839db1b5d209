//! envoyproxy/ratelimit's HTTP port (its PORT, 8080 there), for
//! deployments that probe or call it: `GET /healthcheck` answers `200 OK`
//! (500 while writes to disk fail),
//! and `POST /json` takes a `RateLimitRequest` in proto3's JSON mapping and
//! answers the `RateLimitResponse` the same way, with HTTP 200 when the
//! overall code is OK and 429 when it is OVER_LIMIT (as upstream). Off
//! unless `--http-listen` is given.
//!
//! The JSON mapping is written out here (the generated types have no serde):
//! field names in lowerCamelCase (snake_case also read), enums by name
//! (numbers also read), 64-bit wrappers as numbers or strings, defaults left
//! out of answers.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use super::convert::{request_from_proto, response_to_proto, RequestLimits};
use crate::limiter::RateLimiter;
use crate::proto::common::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::proto::common::RateLimitDescriptor;
use crate::proto::rls::rate_limit_response::rate_limit::Unit;
use crate::proto::rls::rate_limit_response::Code;
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};
use crate::proto::types::RateLimitUnit;
use crate::storage::{unix_now_us, CounterStore};

struct Ctx<S> {
    limiter: Arc<RateLimiter<S>>,
    limits: RequestLimits,
}

/// Serves `/healthcheck` and `/json` on `listener`, its connections within
/// `conn`, until `shutdown` completes (then the port closes, which a probe
/// sees as unhealthy).
///
/// # Errors
/// An I/O error from the listener.
pub async fn serve_http<S: CounterStore>(
    listener: TcpListener,
    limiter: Arc<RateLimiter<S>>,
    limits: RequestLimits,
    conn: super::io::ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Any method on both paths, as upstream's handlers; bodies up to gRPC's
    // own message limit (4 MiB).
    // Unhealthy (500, as upstream answers when it is) while the store's
    // writes to disk fail, as gRPC health says NOT_SERVING.
    let writes_ok = limiter.store().writes_ok();
    let health = move || {
        let ok = writes_ok.as_ref().is_none_or(|rx| *rx.borrow());
        async move {
            if ok {
                (StatusCode::OK, "OK")
            } else {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage failing: writes to disk fail (see the server log)",
                )
            }
        }
    };
    let app = Router::new()
        .route("/healthcheck", any(health))
        .route("/json", any(json_call::<S>))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this port serves /healthcheck and /json (POST a JSON RateLimitRequest)\n",
            )
        })
        .layer(DefaultBodyLimit::max(4 << 20))
        .with_state(Arc::new(Ctx { limiter, limits }));
    // The gRPC ports' connection bounds (--max-connections,
    // --idle-timeout-secs) hold here too.
    axum::serve(super::io::http_listener(listener, conn)?, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn json_call<S: CounterStore>(State(ctx): State<Arc<Ctx<S>>>, body: String) -> Response {
    let bad = |status: StatusCode, msg: String| {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            msg + "\n",
        )
            .into_response()
    };
    let req = match serde_json::from_str::<JsonRequest>(&body)
        .map_err(|e| format!("invalid JSON RateLimitRequest: {e}"))
        .and_then(JsonRequest::into_proto)
    {
        Ok(r) => r,
        Err(m) => return bad(StatusCode::BAD_REQUEST, m),
    };
    let req = match request_from_proto(req.into(), &ctx.limits) {
        Ok(r) => r,
        Err(e) => return bad(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let decision = match ctx.limiter.decide(&req, unix_now_us()).await {
        Ok(d) => d,
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let resp = response_to_proto(decision);
    let status = if resp.overall_code == Code::OverLimit as i32 {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::OK
    };
    (status, axum::Json(response_json(&resp))).into_response()
}

/// A count as proto3's JSON mapping writes it: a number (`1e0` too), a
/// string holding one, or null (0).
fn num(v: &Value, field: &str) -> Result<u64, String> {
    let bad = || format!("{field}: expected a whole number >= 0, got {v}");
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => n.as_u64().map_or_else(
            || {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19)
                    .map(|f| f as u64)
                    .ok_or_else(bad)
            },
            Ok,
        ),
        Value::String(s) => s.trim().parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<JsonDescriptor>,
    #[serde(default, rename = "hitsAddend", alias = "hits_addend")]
    hits_addend: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDescriptor {
    #[serde(default)]
    entries: Vec<JsonEntry>,
    #[serde(default)]
    limit: Option<JsonOverride>,
    #[serde(default, rename = "hitsAddend", alias = "hits_addend")]
    hits_addend: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOverride {
    #[serde(default, rename = "requestsPerUnit", alias = "requests_per_unit")]
    requests_per_unit: Value,
    #[serde(default)]
    unit: Value,
}

impl JsonRequest {
    fn into_proto(self) -> Result<RateLimitRequest, String> {
        let u32_of = |n: &Value, field: &str| -> Result<u32, String> {
            let v = num(n, field)?;
            u32::try_from(v).map_err(|_| format!("{field}: {v} is above 4294967295"))
        };
        let mut descriptors = Vec::with_capacity(self.descriptors.len());
        for (i, d) in self.descriptors.into_iter().enumerate() {
            let limit = match d.limit {
                None => None,
                Some(o) => Some(RateLimitOverride {
                    requests_per_unit: u32_of(
                        &o.requests_per_unit,
                        &format!("descriptors[{i}].limit.requestsPerUnit"),
                    )?,
                    unit: match &o.unit {
                        Value::String(s) => RateLimitUnit::from_str_name(s)
                            .map(|u| u as i32)
                            .ok_or_else(|| {
                                format!("descriptors[{i}].limit.unit: unknown unit {s:?}")
                            })?,
                        // A number (the server names a bad one), or null.
                        v => i32::try_from(num(v, &format!("descriptors[{i}].limit.unit"))?)
                            .unwrap_or(i32::MAX),
                    },
                }),
            };
            let field = format!("descriptors[{i}].hitsAddend");
            descriptors.push(RateLimitDescriptor {
                entries: d
                    .entries
                    .into_iter()
                    .map(|e| Entry {
                        key: e.key.unwrap_or_default(),
                        value: e.value.unwrap_or_default(),
                    })
                    .collect(),
                limit,
                // Absent or null: unset (the request's hits apply).
                hits_addend: match &d.hits_addend {
                    Value::Null => None,
                    v => Some(num(v, &field)?),
                },
            });
        }
        Ok(RateLimitRequest {
            domain: self.domain,
            descriptors,
            hits_addend: u32_of(&self.hits_addend, "hitsAddend")?,
        })
    }
}

fn code_name(c: i32) -> &'static str {
    Code::try_from(c).unwrap_or(Code::Unknown).as_str_name()
}

/// `resp` in proto3's JSON mapping, default values left out.
fn response_json(resp: &RateLimitResponse) -> Value {
    let mut out = Map::new();
    out.insert("overallCode".into(), code_name(resp.overall_code).into());
    let statuses: Vec<Value> = resp
        .statuses
        .iter()
        .map(|s| {
            let mut o = Map::new();
            o.insert("code".into(), code_name(s.code).into());
            if let Some(l) = &s.current_limit {
                let mut lim = Map::new();
                if !l.name.is_empty() {
                    lim.insert("name".into(), l.name.clone().into());
                }
                if l.requests_per_unit != 0 {
                    lim.insert("requestsPerUnit".into(), l.requests_per_unit.into());
                }
                let unit = Unit::try_from(l.unit).unwrap_or(Unit::Unknown);
                if unit != Unit::Unknown {
                    lim.insert("unit".into(), unit.as_str_name().into());
                }
                o.insert("currentLimit".into(), Value::Object(lim));
            }
            if s.limit_remaining != 0 {
                o.insert("limitRemaining".into(), s.limit_remaining.into());
            }
            if let Some(d) = &s.duration_until_reset {
                o.insert(
                    "durationUntilReset".into(),
                    format!("{}s", d.seconds).into(),
                );
            }
            Value::Object(o)
        })
        .collect();
    if !statuses.is_empty() {
        out.insert("statuses".into(), statuses.into());
    }
    let headers = |hs: &[crate::proto::core::HeaderValue]| -> Value {
        hs.iter()
            .map(|h| json!({ "key": h.key, "value": h.value }))
            .collect::<Vec<_>>()
            .into()
    };
    if !resp.response_headers_to_add.is_empty() {
        out.insert(
            "responseHeadersToAdd".into(),
            headers(&resp.response_headers_to_add),
        );
    }
    if !resp.request_headers_to_add.is_empty() {
        out.insert(
            "requestHeadersToAdd".into(),
            headers(&resp.request_headers_to_add),
        );
    }
    if !resp.raw_body.is_empty() {
        use base64::Engine;
        out.insert(
            "rawBody".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&resp.raw_body)
                .into(),
        );
    }
    if let Some(m) = &resp.dynamic_metadata {
        out.insert("dynamicMetadata".into(), struct_json(m));
    }
    Value::Object(out)
}

fn struct_json(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_json).collect::<Vec<_>>().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_camel_and_snake_case_enums_by_name_or_number() {
        let r: JsonRequest = serde_json::from_str(
            r#"{"domain": "d", "hits_addend": 2, "descriptors": [
                {"entries": [{"key": "k", "value": "v"}], "hitsAddend": "5",
                 "limit": {"requestsPerUnit": 3, "unit": "MINUTE"}},
                {"entries": [], "limit": {"requests_per_unit": "4", "unit": 7}}]}"#,
        )
        .unwrap();
        let p = r.into_proto().unwrap();
        assert_eq!(p.domain, "d");
        // Nulls are defaults; 1e0 is a whole number.
        let n: JsonRequest = serde_json::from_str(
            r#"{"domain": "d", "hitsAddend": 1e0, "descriptors": [{"entries": [{"key": "k", "value": null}], "hitsAddend": null}]}"#,
        )
        .unwrap();
        let n = n.into_proto().unwrap();
        assert_eq!((n.hits_addend, n.descriptors[0].hits_addend), (1, None));
        assert_eq!(n.descriptors[0].entries[0].value, "");
        assert_eq!(p.hits_addend, 2);
        assert_eq!(p.descriptors[0].hits_addend, Some(5));
        let l = p.descriptors[0].limit.as_ref().unwrap();
        assert_eq!(
            (l.requests_per_unit, l.unit),
            (3, RateLimitUnit::Minute as i32)
        );
        let l = p.descriptors[1].limit.as_ref().unwrap();
        assert_eq!((l.requests_per_unit, l.unit), (4, 7));
        for (bad, want) in [
            (r#"{"domain": "d", "descriptor": []}"#, "unknown field"),
            (
                r#"{"domain": "d", "hitsAddend": 4294967296}"#,
                "above 4294967295",
            ),
            (
                r#"{"descriptors": [{"limit": {"unit": "FORTNIGHT"}}]}"#,
                "descriptors[0].limit.unit: unknown unit \"FORTNIGHT\"",
            ),
        ] {
            let e = serde_json::from_str::<JsonRequest>(bad)
                .map_err(|e| e.to_string())
                .and_then(JsonRequest::into_proto)
                .unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
