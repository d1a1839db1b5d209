//! Wire compatibility of sluice's hand-written protos with Envoy's published
//! RLS v3 API, using the independently generated `envoy-types` crate as the
//! reference implementation.
//!
//! Each test builds the same logical message twice, once with each crate's
//! types, with a distinct value in every field (so a swapped or renumbered
//! field cannot go unnoticed). It then encodes with one crate, decodes with the
//! other and compares the result with the other crate's own copy, in both
//! directions. Whole-message `==` covers every field, including any that
//! only one side happens to set.

use std::collections::{BTreeMap, HashMap};

use prost::Message;

use envoy_types::pb::envoy::config::core::v3 as e_core;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as e_common;
use envoy_types::pb::envoy::r#type::v3 as e_types;
use envoy_types::pb::envoy::service::ratelimit::v3 as e_rls;
use envoy_types::pb::google::protobuf as e_pb;

use sluice::proto::common as s_common;
use sluice::proto::core as s_core;
use sluice::proto::rls as s_rls;
use sluice::proto::types as s_types;

use e_common::rate_limit_descriptor as e_desc;
use e_rls::rate_limit_response as e_resp;
use s_common::rate_limit_descriptor as s_desc;
use s_rls::rate_limit_response as s_resp;

// ---------------------------------------------------------------------------
// Shared test data, as plain values, so both builders use exactly the same.
// ---------------------------------------------------------------------------

/// (entries, limit override as (requests_per_unit, unit), hits_addend)
type DescriptorData = (
    &'static [(&'static str, &'static str)],
    Option<(u32, i32)>,
    Option<u64>,
);

const DOMAIN: &str = "llm-gateway";
const REQUEST_HITS_ADDEND: u32 = 4_000_000_123;

fn descriptor_data() -> Vec<DescriptorData> {
    vec![
        // Several entries, an override, an explicit zero hits_addend (which
        // must stay `Some(0)`, not collapse to "unset").
        (
            &[
                ("tenant", "acme"),
                ("model", "gpt-4o"),
                ("plan", "enterprise"),
            ],
            Some((1_000, s_types::RateLimitUnit::Minute as i32)),
            Some(0),
        ),
        // Largest possible per-descriptor hits_addend.
        (
            &[("api_key", "sk-\u{e9}\u{1F680}"), ("route", "/v1/chat")],
            Some((77, s_types::RateLimitUnit::Year as i32)),
            Some(u64::MAX),
        ),
        // No override, no hits_addend (absent, distinct from Some(0)).
        (&[("remote_address", "10.0.0.1")], None, None),
        // Entry with an empty value and an override with the UNKNOWN unit.
        (&[("generic_key", ""), ("k", "v")], Some((5, 0)), Some(42)),
    ]
}

fn envoy_request() -> e_rls::RateLimitRequest {
    e_rls::RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: descriptor_data()
            .into_iter()
            .map(|(entries, limit, hits)| e_common::RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| e_desc::Entry {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                limit: limit.map(|(requests_per_unit, unit)| e_desc::RateLimitOverride {
                    requests_per_unit,
                    unit,
                }),
                hits_addend: hits.map(|value| e_pb::UInt64Value { value }),
                is_negative_hits: false,
            })
            .collect(),
        hits_addend: REQUEST_HITS_ADDEND,
    }
}

fn sluice_request() -> s_rls::RateLimitRequest {
    s_rls::RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: descriptor_data()
            .into_iter()
            .map(|(entries, limit, hits)| s_common::RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| s_desc::Entry {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                limit: limit.map(|(requests_per_unit, unit)| s_desc::RateLimitOverride {
                    requests_per_unit,
                    unit,
                }),
                hits_addend: hits,
            })
            .collect(),
        hits_addend: REQUEST_HITS_ADDEND,
    }
}

/// One descriptor status: (code, current_limit as (name, rpu, unit),
/// limit_remaining, duration_until_reset as (s, ns), quota).
type StatusData = (
    i32,
    Option<(&'static str, u32, i32)>,
    u32,
    Option<(i64, i32)>,
    Option<QuotaData>,
);

/// (requests, valid_until as (s, ns), id)
type QuotaData = (u32, Option<(i64, i32)>, &'static str);

fn status_data() -> Vec<StatusData> {
    use s_resp::rate_limit::Unit;
    use s_resp::Code;
    vec![
        (
            Code::Ok as i32,
            Some(("tenant-minute", 1_000, Unit::Minute as i32)),
            999,
            Some((59, 250_000_000)),
            Some((11, Some((1_700_000_000, 123_456_789)), "quota-a")),
        ),
        (
            Code::OverLimit as i32,
            Some(("weekly-plan", 50_000, Unit::Week as i32)),
            0,
            Some((6 * 24 * 3600 + 17, 1)),
            None,
        ),
        (
            Code::Ok as i32,
            Some(("", u32::MAX, Unit::Year as i32)),
            u32::MAX - 1,
            None,
            Some((3, None, "quota-no-expiry")),
        ),
        // An UNKNOWN status with nothing else set.
        (Code::Unknown as i32, None, 0, None, None),
    ]
}

const RAW_BODY: &[u8] = b"{\"error\":\"rate limited\"}\x00\xff\xfe";
const RESPONSE_QUOTA: QuotaData = (123_456, Some((1_800_000_000, 999_999_999)), "overall-quota");

/// (key, value, raw_value)
type HeaderData = (&'static str, &'static str, &'static [u8]);

const RESPONSE_HEADERS: &[HeaderData] = &[
    ("x-ratelimit-limit", "1000, 1000;w=60", b""),
    ("x-ratelimit-remaining", "999", b""),
    ("x-raw", "", b"\x00\x80\xffnon-utf8"),
];
const REQUEST_HEADERS: &[HeaderData] = &[
    ("x-sluice-plan", "enterprise", b""),
    ("x-both", "text", b"bytes\x01"),
];

fn envoy_headers(data: &[HeaderData]) -> Vec<e_core::HeaderValue> {
    data.iter()
        .map(|(k, v, raw)| e_core::HeaderValue {
            key: (*k).into(),
            value: (*v).into(),
            raw_value: raw.to_vec(),
        })
        .collect()
}

fn sluice_headers(data: &[HeaderData]) -> Vec<s_core::HeaderValue> {
    data.iter()
        .map(|(k, v, raw)| s_core::HeaderValue {
            key: (*k).into(),
            value: (*v).into(),
            raw_value: raw.to_vec(),
        })
        .collect()
}

fn envoy_quota((requests, valid_until, id): QuotaData) -> e_resp::Quota {
    e_resp::Quota {
        requests,
        id: id.into(),
        expiration_specifier: valid_until.map(|(seconds, nanos)| {
            e_resp::quota::ExpirationSpecifier::ValidUntil(e_pb::Timestamp { seconds, nanos })
        }),
    }
}

fn sluice_quota((requests, valid_until, id): QuotaData) -> s_resp::Quota {
    s_resp::Quota {
        requests,
        id: id.into(),
        expiration_specifier: valid_until.map(|(seconds, nanos)| {
            s_resp::quota::ExpirationSpecifier::ValidUntil(prost_types::Timestamp {
                seconds,
                nanos,
            })
        }),
    }
}

/// dynamic_metadata covering every `google.protobuf.Value` kind, nested.
fn envoy_metadata() -> e_pb::Struct {
    use e_pb::value::Kind;
    let v = |kind| e_pb::Value { kind: Some(kind) };
    let inner = e_pb::Struct {
        fields: HashMap::from([
            (
                "plan".to_string(),
                v(Kind::StringValue("enterprise".into())),
            ),
            ("tokens".to_string(), v(Kind::NumberValue(1234.5))),
        ]),
    };
    e_pb::Struct {
        fields: HashMap::from([
            ("limited".to_string(), v(Kind::BoolValue(true))),
            ("remaining".to_string(), v(Kind::NumberValue(-0.25))),
            (
                "descriptor".to_string(),
                v(Kind::StringValue("tenant=acme".into())),
            ),
            (
                "nothing".to_string(),
                v(Kind::NullValue(e_pb::NullValue::NullValue as i32)),
            ),
            ("usage".to_string(), v(Kind::StructValue(inner))),
            (
                "windows".to_string(),
                v(Kind::ListValue(e_pb::ListValue {
                    values: vec![
                        v(Kind::NumberValue(60.0)),
                        v(Kind::StringValue("1h".into())),
                        v(Kind::BoolValue(false)),
                    ],
                })),
            ),
        ]),
    }
}

fn sluice_metadata() -> prost_types::Struct {
    use prost_types::value::Kind;
    let v = |kind| prost_types::Value { kind: Some(kind) };
    let inner = prost_types::Struct {
        fields: BTreeMap::from([
            (
                "plan".to_string(),
                v(Kind::StringValue("enterprise".into())),
            ),
            ("tokens".to_string(), v(Kind::NumberValue(1234.5))),
        ]),
    };
    prost_types::Struct {
        fields: BTreeMap::from([
            ("limited".to_string(), v(Kind::BoolValue(true))),
            ("remaining".to_string(), v(Kind::NumberValue(-0.25))),
            (
                "descriptor".to_string(),
                v(Kind::StringValue("tenant=acme".into())),
            ),
            (
                "nothing".to_string(),
                v(Kind::NullValue(prost_types::NullValue::NullValue as i32)),
            ),
            ("usage".to_string(), v(Kind::StructValue(inner))),
            (
                "windows".to_string(),
                v(Kind::ListValue(prost_types::ListValue {
                    values: vec![
                        v(Kind::NumberValue(60.0)),
                        v(Kind::StringValue("1h".into())),
                        v(Kind::BoolValue(false)),
                    ],
                })),
            ),
        ]),
    }
}

fn envoy_response() -> e_rls::RateLimitResponse {
    e_rls::RateLimitResponse {
        overall_code: e_resp::Code::OverLimit as i32,
        statuses: status_data()
            .into_iter()
            .map(
                |(code, limit, remaining, reset, quota)| e_resp::DescriptorStatus {
                    code,
                    current_limit: limit.map(|(name, requests_per_unit, unit)| e_resp::RateLimit {
                        name: name.into(),
                        requests_per_unit,
                        unit,
                    }),
                    limit_remaining: remaining,
                    duration_until_reset: reset
                        .map(|(seconds, nanos)| e_pb::Duration { seconds, nanos }),
                    quota: quota.map(envoy_quota),
                },
            )
            .collect(),
        response_headers_to_add: envoy_headers(RESPONSE_HEADERS),
        request_headers_to_add: envoy_headers(REQUEST_HEADERS),
        raw_body: RAW_BODY.to_vec(),
        dynamic_metadata: Some(envoy_metadata()),
        quota: Some(envoy_quota(RESPONSE_QUOTA)),
    }
}

fn sluice_response() -> s_rls::RateLimitResponse {
    s_rls::RateLimitResponse {
        overall_code: s_resp::Code::OverLimit as i32,
        statuses: status_data()
            .into_iter()
            .map(
                |(code, limit, remaining, reset, quota)| s_resp::DescriptorStatus {
                    code,
                    current_limit: limit.map(|(name, requests_per_unit, unit)| s_resp::RateLimit {
                        name: name.into(),
                        requests_per_unit,
                        unit,
                    }),
                    limit_remaining: remaining,
                    duration_until_reset: reset
                        .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                    quota: quota.map(sluice_quota),
                },
            )
            .collect(),
        response_headers_to_add: sluice_headers(RESPONSE_HEADERS),
        request_headers_to_add: sluice_headers(REQUEST_HEADERS),
        raw_body: RAW_BODY.to_vec(),
        dynamic_metadata: Some(sluice_metadata()),
        quota: Some(sluice_quota(RESPONSE_QUOTA)),
    }
}

// ---------------------------------------------------------------------------
// 1. RateLimitRequest
// ---------------------------------------------------------------------------

#[test]
fn request_envoy_to_sluice() {
    let bytes = envoy_request().encode_to_vec();
    let decoded = s_rls::RateLimitRequest::decode(bytes.as_slice())
        .expect("sluice must decode an envoy-types RateLimitRequest");

    // Spot checks of the subtle fields, for a readable failure.
    assert_eq!(decoded.domain, DOMAIN);
    assert_eq!(decoded.hits_addend, REQUEST_HITS_ADDEND);
    assert_eq!(decoded.descriptors.len(), 4);
    assert_eq!(
        decoded.descriptors[0].hits_addend,
        Some(0),
        "Some(0) must survive"
    );
    assert_eq!(decoded.descriptors[1].hits_addend, Some(u64::MAX));
    assert_eq!(decoded.descriptors[2].hits_addend, None);
    assert_eq!(decoded.descriptors[2].limit, None);
    assert_eq!(
        decoded.descriptors[0].limit,
        Some(s_desc::RateLimitOverride {
            requests_per_unit: 1_000,
            unit: s_types::RateLimitUnit::Minute as i32,
        })
    );
    assert_eq!(decoded.descriptors[0].entries[2].key, "plan");
    assert_eq!(decoded.descriptors[0].entries[2].value, "enterprise");
    assert_eq!(
        decoded.descriptors[1].entries[0].value,
        "sk-\u{e9}\u{1F680}"
    );

    // Every field.
    assert_eq!(decoded, sluice_request());
}

#[test]
fn request_sluice_to_envoy() {
    let bytes = sluice_request().encode_to_vec();
    let decoded = e_rls::RateLimitRequest::decode(bytes.as_slice())
        .expect("envoy-types must decode a sluice RateLimitRequest");
    assert_eq!(
        decoded.descriptors[0].hits_addend,
        Some(e_pb::UInt64Value { value: 0 })
    );
    assert_eq!(
        decoded.descriptors[1].hits_addend,
        Some(e_pb::UInt64Value { value: u64::MAX })
    );
    assert_eq!(decoded.descriptors[2].hits_addend, None);
    assert_eq!(decoded, envoy_request());
}

#[test]
fn request_encodings_are_byte_identical() {
    // No maps in the request, so both generators must emit the same bytes.
    assert_eq!(
        envoy_request().encode_to_vec(),
        sluice_request().encode_to_vec()
    );
}

#[test]
fn request_round_trips_through_sluice_losslessly() {
    let original = envoy_request();
    let via_sluice = s_rls::RateLimitRequest::decode(original.encode_to_vec().as_slice()).unwrap();
    let back = e_rls::RateLimitRequest::decode(via_sluice.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back, original);
}

// ---------------------------------------------------------------------------
// 2. RateLimitResponse
// ---------------------------------------------------------------------------

#[test]
fn response_sluice_to_envoy() {
    let bytes = sluice_response().encode_to_vec();
    let decoded = e_rls::RateLimitResponse::decode(bytes.as_slice())
        .expect("envoy-types must decode a sluice RateLimitResponse");

    assert_eq!(decoded.overall_code, e_resp::Code::OverLimit as i32);
    assert_eq!(decoded.statuses.len(), 4);
    let weekly = decoded.statuses[1].current_limit.as_ref().unwrap();
    assert_eq!(weekly.unit, e_resp::rate_limit::Unit::Week as i32);
    assert_eq!(weekly.unit, 7);
    assert_eq!(weekly.name, "weekly-plan");
    assert_eq!(weekly.requests_per_unit, 50_000);
    assert_eq!(decoded.statuses[0].limit_remaining, 999);
    assert_eq!(
        decoded.statuses[0].duration_until_reset,
        Some(e_pb::Duration {
            seconds: 59,
            nanos: 250_000_000
        })
    );
    assert_eq!(
        decoded.statuses[0].quota.as_ref().unwrap().id,
        "quota-a".to_string()
    );
    assert_eq!(
        decoded.response_headers_to_add[2].raw_value,
        b"\x00\x80\xffnon-utf8"
    );
    assert_eq!(decoded.raw_body, RAW_BODY);
    assert_eq!(decoded.dynamic_metadata, Some(envoy_metadata()));
    assert_eq!(decoded.quota, Some(envoy_quota(RESPONSE_QUOTA)));

    // Every field.
    assert_eq!(decoded, envoy_response());
}

#[test]
fn response_envoy_to_sluice() {
    let bytes = envoy_response().encode_to_vec();
    let decoded = s_rls::RateLimitResponse::decode(bytes.as_slice())
        .expect("sluice must decode an envoy-types RateLimitResponse");
    assert_eq!(
        decoded.statuses[1].current_limit.as_ref().unwrap().unit,
        s_resp::rate_limit::Unit::Week as i32
    );
    assert_eq!(decoded, sluice_response());
}

#[test]
fn response_round_trips_through_envoy_losslessly() {
    let original = sluice_response();
    let via_envoy = e_rls::RateLimitResponse::decode(original.encode_to_vec().as_slice()).unwrap();
    let back = s_rls::RateLimitResponse::decode(via_envoy.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back, original);
}

#[test]
fn response_encodings_are_byte_identical_without_maps() {
    // Struct is a map (HashMap in envoy-types, so its encoding order is
    // unspecified); everything else must encode to the same bytes.
    let mut e = envoy_response();
    let mut s = sluice_response();
    e.dynamic_metadata = None;
    s.dynamic_metadata = None;
    assert_eq!(e.encode_to_vec(), s.encode_to_vec());
}

#[test]
fn default_messages_encode_empty_on_both_sides() {
    assert!(s_rls::RateLimitResponse::default()
        .encode_to_vec()
        .is_empty());
    assert!(e_rls::RateLimitResponse::default()
        .encode_to_vec()
        .is_empty());
    assert_eq!(
        s_rls::RateLimitResponse::decode(&[][..]).unwrap(),
        s_rls::RateLimitResponse::default()
    );
    assert_eq!(
        s_rls::RateLimitRequest::decode(&[][..]).unwrap(),
        s_rls::RateLimitRequest::default()
    );
}

// ---------------------------------------------------------------------------
// 3. Enum numbers
// ---------------------------------------------------------------------------

/// Over a range well past every defined number, the two enums must define
/// the same numbers with the same proto names.
macro_rules! assert_same_enum {
    ($sluice:ty, $envoy:ty) => {{
        let mut defined = 0;
        for n in -8..=64 {
            let s = <$sluice>::try_from(n).ok().map(|v| v.as_str_name());
            let e = <$envoy>::try_from(n).ok().map(|v| v.as_str_name());
            assert_eq!(
                s,
                e,
                "{} vs {}: number {n}",
                stringify!($sluice),
                stringify!($envoy)
            );
            defined += usize::from(s.is_some());
        }
        defined
    }};
}

#[test]
fn rate_limit_response_unit_numbers_agree() {
    use e_resp::rate_limit::Unit as E;
    use s_resp::rate_limit::Unit as S;
    let pairs = [
        (S::Unknown, E::Unknown, 0),
        (S::Second, E::Second, 1),
        (S::Minute, E::Minute, 2),
        (S::Hour, E::Hour, 3),
        (S::Day, E::Day, 4),
        (S::Month, E::Month, 5),
        (S::Year, E::Year, 6),
        (S::Week, E::Week, 7),
    ];
    for (s, e, n) in pairs {
        assert_eq!(s as i32, e as i32, "{s:?}");
        assert_eq!(s as i32, n, "{s:?}");
        assert_eq!(s.as_str_name(), e.as_str_name());
    }
    assert_eq!(assert_same_enum!(S, E), pairs.len());
}

#[test]
fn rate_limit_unit_numbers_agree() {
    use e_types::RateLimitUnit as E;
    use s_types::RateLimitUnit as S;
    let pairs = [
        (S::Unknown, E::Unknown, 0),
        (S::Second, E::Second, 1),
        (S::Minute, E::Minute, 2),
        (S::Hour, E::Hour, 3),
        (S::Day, E::Day, 4),
        (S::Month, E::Month, 5),
        (S::Year, E::Year, 6),
    ];
    for (s, e, n) in pairs {
        assert_eq!(s as i32, e as i32, "{s:?}");
        assert_eq!(s as i32, n, "{s:?}");
        assert_eq!(s.as_str_name(), e.as_str_name());
    }
    assert_eq!(assert_same_enum!(S, E), pairs.len());
}

#[test]
fn code_numbers_agree() {
    use e_resp::Code as E;
    use s_resp::Code as S;
    let pairs = [
        (S::Unknown, E::Unknown, 0),
        (S::Ok, E::Ok, 1),
        (S::OverLimit, E::OverLimit, 2),
    ];
    for (s, e, n) in pairs {
        assert_eq!(s as i32, e as i32, "{s:?}");
        assert_eq!(s as i32, n, "{s:?}");
        assert_eq!(s.as_str_name(), e.as_str_name());
    }
    assert_eq!(assert_same_enum!(S, E), pairs.len());
}

#[test]
fn every_unit_survives_the_wire_in_both_directions() {
    for n in 0..=7 {
        let e = e_resp::RateLimit {
            name: format!("u{n}"),
            requests_per_unit: 100 + n as u32,
            unit: n,
        };
        let s = s_resp::RateLimit::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(s.unit, n);
        assert!(s_resp::rate_limit::Unit::try_from(s.unit).is_ok());
        let back = e_resp::RateLimit::decode(s.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, e);
    }
    for n in 0..=6 {
        let e = e_desc::RateLimitOverride {
            requests_per_unit: 9,
            unit: n,
        };
        let s = s_desc::RateLimitOverride::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(s.unit, n);
        assert!(s_types::RateLimitUnit::try_from(s.unit).is_ok());
        let back = e_desc::RateLimitOverride::decode(s.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, e);
    }
}

// ---------------------------------------------------------------------------
// 4. Fields sluice does not define
// ---------------------------------------------------------------------------

#[test]
fn envoy_only_descriptor_field_is_negative_hits_is_skipped() {
    // envoy-types' RateLimitDescriptor has `bool is_negative_hits = 4`, which
    // sluice's subset does not define. It must decode without error, with
    // everything else intact.
    let mut request = envoy_request();
    for d in &mut request.descriptors {
        d.is_negative_hits = true;
    }
    let decoded = s_rls::RateLimitRequest::decode(request.encode_to_vec().as_slice())
        .expect("an unknown field must not fail decoding");
    assert_eq!(decoded, sluice_request());

    // sluice drops it (prost keeps no unknown fields), so re-encoding yields
    // the default `false`.
    let back = e_rls::RateLimitRequest::decode(decoded.encode_to_vec().as_slice()).unwrap();
    assert!(back.descriptors.iter().all(|d| !d.is_negative_hits));
    assert_eq!(back, envoy_request());
}

fn put_varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(tag: u32, wire_type: u8, buf: &mut Vec<u8>) {
    put_varint((u64::from(tag) << 3) | u64::from(wire_type), buf);
}

/// One unknown field of each wire type (varint, fixed64, length-delimited,
/// fixed32), at high field numbers a future Envoy might use.
fn unknown_fields() -> Vec<u8> {
    let mut b = Vec::new();
    put_key(1000, 0, &mut b);
    put_varint(u64::MAX, &mut b);
    put_key(1001, 1, &mut b);
    b.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    put_key(1002, 2, &mut b);
    put_varint(5, &mut b);
    b.extend_from_slice(b"hello");
    put_key(536_870_911, 5, &mut b); // the largest field number
    b.extend_from_slice(&7u32.to_le_bytes());
    b
}

fn put_message(tag: u32, body: &[u8], buf: &mut Vec<u8>) {
    put_key(tag, 2, buf);
    put_varint(body.len() as u64, buf);
    buf.extend_from_slice(body);
}

#[test]
fn unknown_fields_at_every_level_of_a_response_are_skipped() {
    // Rebuild the envoy-types response by hand, splicing unknown fields into
    // the top level and into every nested message sluice defines.
    let resp = envoy_response();
    let extra = unknown_fields();

    let with_extra = |m: &dyn Fn(&mut Vec<u8>)| {
        let mut b = extra.clone();
        m(&mut b);
        b.extend_from_slice(&extra);
        b
    };

    let mut bytes = extra.clone();
    bytes.extend_from_slice(
        &e_rls::RateLimitResponse {
            overall_code: resp.overall_code,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    for status in &resp.statuses {
        let body = with_extra(&|b| {
            let mut st = status.clone();
            let limit = st.current_limit.take();
            let quota = st.quota.take();
            b.extend_from_slice(&st.encode_to_vec());
            if let Some(limit) = &limit {
                put_message(2, &with_extra(&|b| b.extend(limit.encode_to_vec())), b);
            }
            if let Some(quota) = &quota {
                put_message(5, &with_extra(&|b| b.extend(quota.encode_to_vec())), b);
            }
        });
        put_message(2, &body, &mut bytes);
    }
    for (tag, headers) in [
        (3, &resp.response_headers_to_add),
        (4, &resp.request_headers_to_add),
    ] {
        for h in headers {
            put_message(
                tag,
                &with_extra(&|b| b.extend(h.encode_to_vec())),
                &mut bytes,
            );
        }
    }
    bytes.extend_from_slice(
        &e_rls::RateLimitResponse {
            raw_body: resp.raw_body.clone(),
            dynamic_metadata: resp.dynamic_metadata.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let quota = resp.quota.clone().unwrap();
    put_message(
        7,
        &with_extra(&|b| b.extend(quota.encode_to_vec())),
        &mut bytes,
    );
    bytes.extend_from_slice(&extra);

    // Sanity: the unknown fields really are in there, and the reference
    // implementation reads it as the same response.
    assert!(bytes.len() > resp.encoded_len() + 10 * extra.len());
    assert_eq!(
        e_rls::RateLimitResponse::decode(bytes.as_slice()).unwrap(),
        resp
    );
    let decoded = s_rls::RateLimitResponse::decode(bytes.as_slice())
        .expect("unknown fields must not fail decoding");
    assert_eq!(decoded, sluice_response());
}

#[test]
fn unknown_fields_at_every_level_of_a_request_are_skipped() {
    let req = envoy_request();
    let extra = unknown_fields();
    let mut bytes = extra.clone();
    bytes.extend_from_slice(
        &e_rls::RateLimitRequest {
            domain: req.domain.clone(),
            hits_addend: req.hits_addend,
            descriptors: vec![],
        }
        .encode_to_vec(),
    );
    for d in &req.descriptors {
        let mut body = extra.clone();
        for entry in &d.entries {
            let mut e = extra.clone();
            e.extend(entry.encode_to_vec());
            put_message(1, &e, &mut body);
        }
        if let Some(limit) = &d.limit {
            let mut l = limit.encode_to_vec();
            l.extend_from_slice(&extra);
            put_message(2, &l, &mut body);
        }
        if let Some(hits) = &d.hits_addend {
            let mut h = hits.encode_to_vec();
            h.extend_from_slice(&extra);
            put_message(3, &h, &mut body);
        }
        body.extend_from_slice(&extra);
        put_message(2, &body, &mut bytes);
    }

    assert!(bytes.len() > req.encoded_len() + 10 * extra.len());
    assert_eq!(
        e_rls::RateLimitRequest::decode(bytes.as_slice()).unwrap(),
        req
    );
    let decoded = s_rls::RateLimitRequest::decode(bytes.as_slice())
        .expect("unknown fields must not fail decoding");
    assert_eq!(decoded, sluice_request());
}

#[test]
fn unknown_enum_numbers_are_kept_as_numbers() {
    // A unit or code from a future Envoy must decode (open enums) and keep its
    // number, not fail or silently become UNKNOWN.
    let e = e_resp::DescriptorStatus {
        code: 9,
        current_limit: Some(e_resp::RateLimit {
            name: "future".into(),
            requests_per_unit: 1,
            unit: 42,
        }),
        ..Default::default()
    };
    let s = s_resp::DescriptorStatus::decode(e.encode_to_vec().as_slice()).unwrap();
    assert_eq!(s.code, 9);
    assert_eq!(s.current_limit.as_ref().unwrap().unit, 42);
    assert_eq!(
        e_resp::DescriptorStatus::decode(s.encode_to_vec().as_slice()).unwrap(),
        e
    );

    let o = e_desc::RateLimitOverride {
        requests_per_unit: 1,
        unit: 7, // WEEK in RateLimitResponse.RateLimit.Unit, undefined here
    };
    let s = s_desc::RateLimitOverride::decode(o.encode_to_vec().as_slice()).unwrap();
    assert_eq!(s.unit, 7);
}

// ---------------------------------------------------------------------------
// Names: the gRPC path and type URLs depend on the fully qualified names.
// ---------------------------------------------------------------------------

#[test]
fn sluice_descriptor_set_uses_envoys_fully_qualified_names() {
    use prost::Name;
    let fds = prost_types::FileDescriptorSet::decode(sluice::proto::FILE_DESCRIPTOR_SET)
        .expect("sluice's descriptor set decodes");

    let mut messages = Vec::new();
    let mut enums = Vec::new();
    let mut methods = Vec::new();
    fn walk(
        prefix: &str,
        msgs: &[prost_types::DescriptorProto],
        out: &mut Vec<String>,
        enums: &mut Vec<String>,
    ) {
        for m in msgs {
            let name = format!("{prefix}.{}", m.name());
            for e in &m.enum_type {
                enums.push(format!("{name}.{}", e.name()));
            }
            walk(&name, &m.nested_type, out, enums);
            out.push(name);
        }
    }
    for file in &fds.file {
        walk(
            file.package(),
            &file.message_type,
            &mut messages,
            &mut enums,
        );
        for e in &file.enum_type {
            enums.push(format!("{}.{}", file.package(), e.name()));
        }
        for svc in &file.service {
            for m in &svc.method {
                methods.push((
                    format!("/{}.{}/{}", file.package(), svc.name(), m.name()),
                    m.input_type().to_string(),
                    m.output_type().to_string(),
                ));
            }
        }
    }

    for full in [
        e_rls::RateLimitRequest::full_name(),
        e_rls::RateLimitResponse::full_name(),
        e_resp::RateLimit::full_name(),
        e_resp::Quota::full_name(),
        e_resp::DescriptorStatus::full_name(),
        e_common::RateLimitDescriptor::full_name(),
        e_desc::Entry::full_name(),
        e_desc::RateLimitOverride::full_name(),
        e_core::HeaderValue::full_name(),
    ] {
        assert!(
            messages.contains(&full),
            "sluice lacks message {full}; has {messages:?}"
        );
    }
    for full in [
        "envoy.service.ratelimit.v3.RateLimitResponse.Code",
        "envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit",
        "envoy.type.v3.RateLimitUnit",
    ] {
        assert!(
            enums.iter().any(|e| e == full),
            "sluice lacks enum {full}; has {enums:?}"
        );
    }
    assert!(
        methods.contains(&(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit".to_string(),
            format!(".{}", e_rls::RateLimitRequest::full_name()),
            format!(".{}", e_rls::RateLimitResponse::full_name()),
        )),
        "{methods:?}"
    );
}
