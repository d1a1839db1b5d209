//! The `ShouldRateLimit` answer encoded straight from a [`Decision`].
//!
//! Building a [`RateLimitResponse`] first costs an owned string per limit
//! name and per header name and value, and the vectors that hold them: a
//! dozen allocations for a plan's answer with its six `x-ratelimit-*`
//! headers, made only to be copied into the wire buffer and freed. A
//! [`WireResponse`] writes the same bytes from the decision itself. A plan
//! refusal (a reason header, a JSON body, dynamic metadata) is rare and
//! still goes through the generated types ([`convert::response_to_proto`]).
//!
//! The encoding is the one prost produces for the equivalent
//! `RateLimitResponse`, byte for byte (fields in tag order, proto3 defaults
//! left out); a test holds the two together.

use prost::bytes::{Buf, BufMut};
use prost::encoding::DecodeContext;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, skip_field, WireType};
use prost::DecodeError;

use crate::engine::{Code, Decision, Limit, Status};
use crate::proto::rls::RateLimitResponse;
use crate::server::convert;

/// A `ShouldRateLimit` answer, ready to encode.
#[derive(Debug)]
pub enum WireResponse {
    /// A decision without a plan refusal, encoded directly.
    Decision(Decision),
    /// A response built with the generated types (plan refusals).
    Built(RateLimitResponse),
}

impl Default for WireResponse {
    fn default() -> Self {
        WireResponse::Built(RateLimitResponse::default())
    }
}

impl WireResponse {
    /// The answer for `d`: encoded directly unless a plan refused it.
    pub fn new(d: Decision) -> Self {
        if convert::refusal_reason(&d).is_some() {
            WireResponse::Built(convert::response_to_proto(d))
        } else {
            WireResponse::Decision(d)
        }
    }
}

// Field numbers (envoy/service/ratelimit/v3/rls.proto and the messages it uses).
const RESPONSE_OVERALL_CODE: u32 = 1;
const RESPONSE_STATUSES: u32 = 2;
const RESPONSE_HEADERS_TO_ADD: u32 = 3;
const STATUS_CODE: u32 = 1;
const STATUS_CURRENT_LIMIT: u32 = 2;
const STATUS_LIMIT_REMAINING: u32 = 3;
const STATUS_DURATION_UNTIL_RESET: u32 = 4;
const LIMIT_REQUESTS_PER_UNIT: u32 = 1;
const LIMIT_UNIT: u32 = 2;
const LIMIT_NAME: u32 = 3;
const DURATION_SECONDS: u32 = 1;
const HEADER_KEY: u32 = 1;
const HEADER_VALUE: u32 = 2;

/// Bytes of a field key (every tag here is below 16: one byte).
const KEY_LEN: usize = 1;

fn code(c: Code) -> u64 {
    // The wire enum: UNKNOWN = 0, OK = 1, OVER_LIMIT = 2.
    match c {
        Code::Ok => 1,
        Code::OverLimit => 2,
    }
}

/// An int32/enum field as prost writes it (negative values sign-extended).
fn int32(v: i32) -> u64 {
    i64::from(v) as u64
}

fn varint_field_len(v: u64) -> usize {
    if v == 0 {
        0
    } else {
        KEY_LEN + encoded_len_varint(v)
    }
}

fn varint_field(tag: u32, v: u64, buf: &mut impl BufMut) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn str_field_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        KEY_LEN + encoded_len_varint(s.len() as u64) + s.len()
    }
}

fn str_field(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

/// A nested message field of body length `len`.
fn message_len(len: usize) -> usize {
    KEY_LEN + encoded_len_varint(len as u64) + len
}

fn message_key(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn limit_body_len(l: &Limit) -> usize {
    varint_field_len(u64::from(l.requests_per_unit))
        + varint_field_len(int32(l.unit.wire()))
        + str_field_len(l.name.as_deref().unwrap_or_default())
}

fn seconds(reset_in: u64) -> u64 {
    // int64 on the wire: prost clamps nothing, convert.rs caps at i64::MAX.
    i64::try_from(reset_in).unwrap_or(i64::MAX) as u64
}

fn status_body_len(s: &Status) -> usize {
    varint_field_len(code(s.code))
        + s.limit
            .as_deref()
            .map_or(0, |l| message_len(limit_body_len(l)))
        + varint_field_len(u64::from(s.remaining))
        + s.reset_in
            .map_or(0, |r| message_len(varint_field_len(seconds(r))))
}

fn header_body_len(key: &str, value: &str) -> usize {
    str_field_len(key) + str_field_len(value)
}

fn decision_len(d: &Decision) -> usize {
    varint_field_len(code(d.overall))
        + d.statuses
            .iter()
            .map(|s| message_len(status_body_len(s)))
            .sum::<usize>()
        + d.headers
            .iter()
            .map(|(k, v)| message_len(header_body_len(k, v)))
            .sum::<usize>()
}

fn encode_decision(d: &Decision, buf: &mut impl BufMut) {
    varint_field(RESPONSE_OVERALL_CODE, code(d.overall), buf);
    for s in &d.statuses {
        message_key(RESPONSE_STATUSES, status_body_len(s), buf);
        varint_field(STATUS_CODE, code(s.code), buf);
        if let Some(l) = s.limit.as_deref() {
            message_key(STATUS_CURRENT_LIMIT, limit_body_len(l), buf);
            varint_field(LIMIT_REQUESTS_PER_UNIT, u64::from(l.requests_per_unit), buf);
            varint_field(LIMIT_UNIT, int32(l.unit.wire()), buf);
            str_field(LIMIT_NAME, l.name.as_deref().unwrap_or_default(), buf);
        }
        varint_field(STATUS_LIMIT_REMAINING, u64::from(s.remaining), buf);
        if let Some(r) = s.reset_in {
            let secs = seconds(r);
            message_key(STATUS_DURATION_UNTIL_RESET, varint_field_len(secs), buf);
            varint_field(DURATION_SECONDS, secs, buf);
        }
    }
    for (k, v) in d.headers.iter() {
        message_key(RESPONSE_HEADERS_TO_ADD, header_body_len(k, v), buf);
        str_field(HEADER_KEY, k, buf);
        str_field(HEADER_VALUE, v, buf);
    }
}

impl prost::Message for WireResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            WireResponse::Decision(d) => encode_decision(d, buf),
            WireResponse::Built(r) => r.encode_raw(buf),
        }
    }

    /// Encode-only: the server never decodes an answer. Fields are skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match self {
            WireResponse::Decision(d) => decision_len(d),
            WireResponse::Built(r) => r.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = WireResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::engine::{Reason, Unit};

    fn arb_limit() -> impl Strategy<Value = Option<Arc<Limit>>> {
        let unit = prop::sample::select(Unit::ALL.to_vec());
        let name = prop::option::of(prop_oneof![
            Just(String::new()),
            ".{0,40}",
            "[a-z/*-]{1,200}"
        ]);
        prop::option::of(
            (
                prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()],
                unit,
                name,
            )
                .prop_map(|(requests_per_unit, unit, name)| {
                    Arc::new(Limit {
                        requests_per_unit,
                        unit,
                        name: name.map(Arc::from),
                    })
                }),
        )
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        (
            any::<bool>(),
            arb_limit(),
            prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()],
            prop::option::of(prop_oneof![
                Just(0u64),
                Just(u64::MAX),
                Just(i64::MAX as u64 + 1),
                any::<u64>()
            ]),
        )
            .prop_map(|(over, limit, remaining, reset_in)| Status {
                code: if over { Code::OverLimit } else { Code::Ok },
                limit,
                remaining,
                reset_in,
                // A config rule's status: no plan reason.
                reason: None,
            })
    }

    fn arb_decision() -> impl Strategy<Value = Decision> {
        let key = prop::sample::select(vec![
            "",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-tokens",
            "ratelimit-policy",
            "retry-after",
        ]);
        (
            any::<bool>(),
            prop::collection::vec(arb_status(), 0..5),
            prop::collection::vec((key, prop_oneof![Just(String::new()), ".{0,300}"]), 0..10),
        )
            .prop_map(|(over, statuses, headers)| Decision {
                overall: if over { Code::OverLimit } else { Code::Ok },
                statuses,
                headers: headers.into_iter().collect(),
            })
    }

    proptest! {
        /// The direct encoding is prost's encoding of the response that
        /// convert.rs builds, byte for byte, and its length is exact.
        #[test]
        fn direct_encoding_is_prosts_byte_for_byte(d in arb_decision()) {
            let want = convert::response_to_proto(d.clone()).encode_to_vec();
            let wire = WireResponse::new(d);
            prop_assert!(matches!(wire, WireResponse::Decision(_)));
            prop_assert_eq!(wire.encoded_len(), want.len());
            prop_assert_eq!(wire.encode_to_vec(), want);
        }
    }

    #[test]
    fn a_plan_refusal_is_built_with_its_reason_headers_and_body() {
        let d = Decision {
            overall: Code::OverLimit,
            statuses: vec![Status {
                code: Code::OverLimit,
                limit: None,
                remaining: 0,
                reset_in: Some(7),
                reason: Some(Reason::QuotaExceeded),
            }],
            headers: [("retry-after", "7".to_owned())].into_iter().collect(),
        };
        let want = convert::response_to_proto(d.clone());
        let wire = WireResponse::new(d);
        assert!(matches!(wire, WireResponse::Built(_)));
        let got = RateLimitResponse::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert_eq!(got, want);
        assert!(got
            .response_headers_to_add
            .iter()
            .any(|h| h.key == convert::REASON_HEADER && h.value == "quota-exceeded"));
        assert!(!got.raw_body.is_empty());
    }
}
