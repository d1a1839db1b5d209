//! The `ShouldRateLimit` answer encoded straight from a [`Decision`].
//!
//! Building a [`RateLimitResponse`] first costs an owned string per limit
//! name and per header name and value, and the vectors that hold them: a
//! dozen allocations for a plan's answer with its six `x-ratelimit-*`
//! headers, made only to be copied into the wire buffer and freed. A
//! [`WireResponse`] writes the same bytes from the decision itself, in one
//! pass into one buffer, when the handler returns (tonic then copies them
//! into its frame as one slice). A plan
//! refusal (a reason header, a JSON body, dynamic metadata) is rare and
//! still goes through the generated types ([`convert::response_to_proto`]).
//!
//! The encoding is the one prost produces for the equivalent
//! `RateLimitResponse`, byte for byte (fields in tag order, proto3 defaults
//! left out); a test holds the two together.
//!
//! Requests come in as a [`WireRequest`]: the `RateLimitRequest` message
//! with its strings read as bytes (the same wire encoding), so a descriptor
//! value that is not UTF-8 (Envoy forwards header bytes as they came) is
//! decided instead of failing the call's decoding: a failed call passes
//! behind an Envoy that fails open, so any client could skip its limit
//! with one bad byte in a header.

use prost::bytes::{Buf, BufMut};
use prost::encoding::DecodeContext;
use prost::encoding::{skip_field, WireType};
use prost::DecodeError;

use crate::engine::{Code, Decision, Limit, Status};
use crate::proto::rls::RateLimitResponse;
use crate::server::convert;

/// A `RateLimitRequest` as it comes off the wire: the generated message
/// with its `string` fields as bytes (wire-compatible: both are
/// length-delimited). [`convert::request_from_proto`] reads them as UTF-8,
/// invalid sequences replaced by U+FFFD (so such values share counters:
/// never fewer hits counted, only more).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireRequest {
    /// `domain`.
    #[prost(bytes = "vec", tag = "1")]
    pub domain: Vec<u8>,
    /// `descriptors`.
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<WireDescriptor>,
    /// `hits_addend`.
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// A `RateLimitDescriptor` with its entries' strings as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireDescriptor {
    /// `entries`.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<WireEntry>,
    /// `limit`.
    #[prost(message, optional, tag = "2")]
    pub limit: Option<crate::proto::common::rate_limit_descriptor::RateLimitOverride>,
    /// `hits_addend` (a `google.protobuf.UInt64Value`).
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<u64>,
}

/// A descriptor entry with its strings as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEntry {
    /// `key`.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// `value`.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

impl From<crate::proto::rls::RateLimitRequest> for WireRequest {
    fn from(r: crate::proto::rls::RateLimitRequest) -> Self {
        WireRequest {
            domain: r.domain.into_bytes(),
            descriptors: r
                .descriptors
                .into_iter()
                .map(|d| WireDescriptor {
                    entries: d
                        .entries
                        .into_iter()
                        .map(|e| WireEntry {
                            key: e.key.into_bytes(),
                            value: e.value.into_bytes(),
                        })
                        .collect(),
                    limit: d.limit,
                    hits_addend: d.hits_addend,
                })
                .collect(),
            hits_addend: r.hits_addend,
        }
    }
}

/// A `ShouldRateLimit` answer, ready to encode.
#[derive(Debug)]
pub enum WireResponse {
    /// A decision without a plan refusal, already encoded (the bytes of the
    /// `RateLimitResponse` message).
    Encoded(Vec<u8>),
    /// A response built with the generated types (plan refusals).
    Built(RateLimitResponse),
}

impl Default for WireResponse {
    fn default() -> Self {
        WireResponse::Built(RateLimitResponse::default())
    }
}

impl WireResponse {
    /// The answer for `d`: encoded now unless a plan refused it.
    pub fn new(d: Decision) -> Self {
        if convert::refusal_reason(&d).is_some() {
            WireResponse::Built(convert::response_to_proto(d))
        } else {
            WireResponse::Encoded(encode_decision(&d))
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

// Wire types.
const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;

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

fn seconds(reset_in: u64) -> u64 {
    // int64 on the wire: prost clamps nothing, convert.rs caps at i64::MAX.
    i64::try_from(reset_in).unwrap_or(i64::MAX) as u64
}

/// Bytes a field key and a varint (a value or a length) may take at most.
const KEY_VARINT: usize = 1 + 10;
/// At most what a status takes besides its limit's name: its own key and
/// length, and those of its limit and reset duration, and four varint fields.
const STATUS_MAX: usize = 9 * KEY_VARINT;
/// At most what a header takes besides its name and value.
const HEADER_MAX: usize = 3 * KEY_VARINT;

/// At most the encoded length of `d` (every key and varint at its longest).
fn size_bound(d: &Decision) -> usize {
    KEY_VARINT
        + d.statuses
            .iter()
            .map(|s| {
                STATUS_MAX
                    + s.limit
                        .as_deref()
                        .and_then(|l| l.name.as_deref())
                        .map_or(0, str::len)
            })
            .sum::<usize>()
        + d.headers
            .iter()
            .map(|(k, v)| HEADER_MAX + k.len() + v.len())
            .sum::<usize>()
}

/// A write cursor over a buffer sized by [`size_bound`].
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    #[inline]
    fn byte(&mut self, b: u8) {
        self.buf[self.at] = b;
        self.at += 1;
    }

    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    /// A field key (every tag here is below 16: one byte).
    #[inline]
    fn key(&mut self, tag: u32, wire_type: u32) {
        self.byte(((tag << 3) | wire_type) as u8);
    }

    /// A varint field; proto3 leaves out a 0.
    #[inline]
    fn varint_field(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, VARINT);
            self.varint(v);
        }
    }

    /// A string field; proto3 leaves out an empty one.
    #[inline]
    fn str_field(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.key(tag, LENGTH_DELIMITED);
            self.varint(s.len() as u64);
            self.buf[self.at..self.at + s.len()].copy_from_slice(s.as_bytes());
            self.at += s.len();
        }
    }

    /// Starts a nested message field: its key and one byte for its length,
    /// set by [`end_message`](Self::end_message). Returns where the body
    /// starts.
    #[inline]
    fn begin_message(&mut self, tag: u32) -> usize {
        self.key(tag, LENGTH_DELIMITED);
        self.byte(0);
        self.at
    }

    /// Sets the length of the message whose body started at `body`: in the
    /// byte kept for it, or (a body of 128 bytes or more) in a longer
    /// varint, the body moved right to make room.
    #[inline]
    fn end_message(&mut self, body: usize) {
        let len = self.at - body;
        if len < 0x80 {
            self.buf[body - 1] = len as u8;
        } else {
            self.long_length(body, len);
        }
    }

    #[cold]
    fn long_length(&mut self, body: usize, len: usize) {
        let mut prefix = [0u8; 10];
        let mut n = 0;
        let mut v = len as u64;
        while v >= 0x80 {
            prefix[n] = (v as u8) | 0x80;
            n += 1;
            v >>= 7;
        }
        prefix[n] = v as u8;
        n += 1;
        self.buf.copy_within(body..self.at, body - 1 + n);
        self.buf[body - 1..body - 1 + n].copy_from_slice(&prefix[..n]);
        self.at += n - 1;
    }

    fn limit(&mut self, l: &Limit) {
        let body = self.begin_message(STATUS_CURRENT_LIMIT);
        self.varint_field(LIMIT_REQUESTS_PER_UNIT, u64::from(l.requests_per_unit));
        self.varint_field(LIMIT_UNIT, int32(l.unit.wire()));
        self.str_field(LIMIT_NAME, l.name.as_deref().unwrap_or_default());
        self.end_message(body);
    }

    fn status(&mut self, s: &Status) {
        let body = self.begin_message(RESPONSE_STATUSES);
        self.varint_field(STATUS_CODE, code(s.code));
        if let Some(l) = s.limit.as_deref() {
            self.limit(l);
        }
        self.varint_field(STATUS_LIMIT_REMAINING, u64::from(s.remaining));
        if let Some(r) = s.reset_in {
            let reset = self.begin_message(STATUS_DURATION_UNTIL_RESET);
            self.varint_field(DURATION_SECONDS, seconds(r));
            self.end_message(reset);
        }
        self.end_message(body);
    }
}

/// The `RateLimitResponse` bytes of `d`, in one pass into one allocation:
/// each nested message's length is written once its body is (no second
/// walk to size them).
fn encode_decision(d: &Decision) -> Vec<u8> {
    let mut buf = vec![0u8; size_bound(d)];
    let mut out = Out {
        buf: &mut buf,
        at: 0,
    };
    out.varint_field(RESPONSE_OVERALL_CODE, code(d.overall));
    for s in &d.statuses {
        out.status(s);
    }
    for (k, v) in d.headers.iter() {
        let body = out.begin_message(RESPONSE_HEADERS_TO_ADD);
        out.str_field(HEADER_KEY, k);
        out.str_field(HEADER_VALUE, v);
        out.end_message(body);
    }
    let len = out.at;
    buf.truncate(len);
    buf
}

impl prost::Message for WireResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            WireResponse::Encoded(bytes) => buf.put_slice(bytes),
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
            WireResponse::Encoded(bytes) => bytes.len(),
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
            prop_assert!(matches!(wire, WireResponse::Encoded(_)));
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

    /// A config rule's refusal (no reason) before a plan's refusal does not
    /// hide the plan's reason: a gateway maps invalid-key to 403 whatever
    /// the descriptors' order.
    #[test]
    fn a_rule_refusal_first_does_not_hide_the_plan_reason() {
        let over = |reason| Status {
            code: Code::OverLimit,
            limit: None,
            remaining: 0,
            reset_in: None,
            reason,
        };
        let d = Decision {
            overall: Code::OverLimit,
            statuses: vec![over(None), over(Some(Reason::InvalidKey))],
            headers: Default::default(),
        };
        assert_eq!(convert::refusal_reason(&d), Some(Reason::InvalidKey));
        let wire = WireResponse::new(d);
        let got = RateLimitResponse::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert!(got
            .response_headers_to_add
            .iter()
            .any(|h| h.key == convert::REASON_HEADER && h.value == "invalid-key"));
    }
}
