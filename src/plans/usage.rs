//! Usage limits for LLM traffic (pure): what a call counts against each
//! limit, which per-model limit applies, windows, counter keys, and the
//! sliding-window estimate.
//!
//! **Sliding windows** (MINUTE, HOUR) use the sliding-window counter: one
//! counter per fixed window, and the usage "in the last 60 s" estimated as
//! `current + previous * (overlap of the previous window with the last 60 s)`.
//! A fixed window lets through up to 2x the limit around a window edge
//! (limit at the end of one window, limit again at the start of the next);
//! the estimate removes that edge burst as long as traffic in the previous
//! window was spread evenly, and it needs only ordinary counters, which
//! persist and restore like every other counter. (GCRA would bound bursts
//! too, but cannot take the after-the-fact charges of streamed responses
//! without letting a bucket's debt grow without limit.)

use std::collections::BTreeMap;

use super::model::{LimitWindow, Metric, Price, Scope, TokenCount, UsageLimit};
use super::period::{Calendar, Period, Span};
use crate::engine::wildcard_match;

/// The most tokens one charge may carry (per kind: input, output, total),
/// however it arrives (ShouldRateLimit with a `usage` entry, ReportUsage,
/// Reserve, Settle): far above any model's context and output (a few
/// million), far below what would saturate a counter. A larger figure is a
/// client's bug; counted, it would exhaust every token and spend limit of
/// the key at once, with no way back until the windows end.
pub const MAX_TOKENS_PER_CALL: u64 = 1_000_000_000;

/// What one call counts: requests, and tokens split as the gateway knows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Requests.
    pub requests: u64,
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
    /// Tokens reported only as a total (e.g. Envoy's `llm_total_token`).
    pub total_only: u64,
}

impl Usage {
    /// The usage reported by a descriptor whose entry `usage` is `kind`, with
    /// `hits`: `None` if `kind` is unknown.
    pub fn from_kind(kind: &str, hits: u64) -> Option<Usage> {
        let mut u = Usage::default();
        match kind {
            "requests" => u.requests = hits,
            "input_tokens" => u.input = hits,
            "output_tokens" => u.output = hits,
            "total_tokens" => u.total_only = hits,
            _ => return None,
        }
        Some(u)
    }

    /// Whether nothing is counted (a check-only call).
    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

/// The price of `model`: an exact key first, else the longest matching glob.
pub fn price_for<'a>(prices: &'a BTreeMap<String, Price>, model: &str) -> Option<&'a Price> {
    if let Some(p) = prices.get(model) {
        return Some(p);
    }
    prices
        .iter()
        .filter(|(pat, _)| wildcard_match(pat, model))
        .max_by_key(|(pat, _)| pat.len())
        .map(|(_, p)| p)
}

/// The amount `usage` counts against `limit` (rounded up: never under-counts).
/// Tokens reported only as a total count at weight 1 in TOTAL and WEIGHTED
/// token limits (an INPUT or OUTPUT limit cannot tell which they were, so
/// they count 0 there), and at the output price in spend limits (the higher
/// price, so budgets are not under-charged).
pub fn amount(limit: &UsageLimit, usage: &Usage, price: Option<&Price>) -> u64 {
    match limit.metric {
        Metric::Requests => usage.requests,
        Metric::Tokens => match limit.count {
            TokenCount::Input => usage.input,
            TokenCount::Output => usage.output,
            TokenCount::Total => usage
                .input
                .saturating_add(usage.output)
                .saturating_add(usage.total_only),
            TokenCount::Weighted {
                input_weight,
                output_weight,
            } => {
                let w = usage.input as f64 * input_weight
                    + usage.output as f64 * output_weight
                    + usage.total_only as f64;
                if w >= u64::MAX as f64 {
                    u64::MAX
                } else {
                    w.ceil() as u64
                }
            }
        },
        Metric::Spend => price.map_or(0, |p| spend(usage, p)),
    }
}

/// The cost of `usage` at `price`, in micro-units, rounded up.
pub fn spend(usage: &Usage, p: &Price) -> u64 {
    let micros = u128::from(usage.input) * u128::from(p.input_per_million)
        + u128::from(usage.output.saturating_add(usage.total_only))
            * u128::from(p.output_per_million);
    u64::try_from(micros.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// What a per-model usage counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelMetric {
    /// Requests allowed.
    Requests,
    /// Input tokens.
    Input,
    /// Output tokens.
    Output,
    /// Tokens reported only as a total.
    Total,
    /// Spend in micro-units.
    Spend,
}

impl ModelMetric {
    /// Every metric.
    pub const ALL: [ModelMetric; 5] = [
        ModelMetric::Requests,
        ModelMetric::Input,
        ModelMetric::Output,
        ModelMetric::Total,
        ModelMetric::Spend,
    ];

    fn tag(self) -> u8 {
        match self {
            ModelMetric::Requests => b'r',
            ModelMetric::Input => b'i',
            ModelMetric::Output => b'o',
            ModelMetric::Total => b't',
            ModelMetric::Spend => b's',
        }
    }

    fn from_tag(t: u8) -> Option<ModelMetric> {
        ModelMetric::ALL.into_iter().find(|m| m.tag() == t)
    }
}

/// The prefix of a key's per-model daily usage counters in a plan.
pub fn model_usage_prefix(plan_id: &str, key_id: &str) -> Vec<u8> {
    model_usage_prefix_with(plan_id, key_id, 0)
}

/// The prefix with room for `extra` more bytes.
fn model_usage_prefix_with(plan_id: &str, key_id: &str, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + plan_id.len() + key_id.len() + extra);
    model_usage_prefix_into(&mut k, plan_id, key_id);
    k
}

fn model_usage_prefix_into(k: &mut Vec<u8>, plan_id: &str, key_id: &str) {
    k.push(super::decide::PLAN_KEY_TAG);
    k.push(b'm');
    for part in [plan_id.as_bytes(), key_id.as_bytes()] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part);
    }
}

/// A per-model daily usage counter: prefix, day start, metric, model.
pub fn model_usage_key(
    plan_id: &str,
    key_id: &str,
    day_start: i64,
    metric: ModelMetric,
    model: &str,
) -> Vec<u8> {
    let mut k = model_usage_prefix_with(plan_id, key_id, 9 + model.len());
    model_usage_rest_into(&mut k, day_start, metric, model);
    k
}

/// [`model_usage_key`], appended to `k`.
pub fn model_usage_key_into(
    k: &mut Vec<u8>,
    plan_id: &str,
    key_id: &str,
    day_start: i64,
    metric: ModelMetric,
    model: &str,
) {
    model_usage_prefix_into(k, plan_id, key_id);
    model_usage_rest_into(k, day_start, metric, model);
}

fn model_usage_rest_into(k: &mut Vec<u8>, day_start: i64, metric: ModelMetric, model: &str) {
    k.extend_from_slice(&day_start.to_be_bytes());
    k.push(metric.tag());
    k.extend_from_slice(model.as_bytes());
}

/// Most per-model daily usage counters a key gets in a plan per day. A
/// distinct model takes one to four (requests, input, output or total
/// tokens, spend), so 250 to 1000 models a day keep rows of their own; past
/// it, a new model's usage is counted under [`OTHER_MODEL`]. Without a cap
/// a client sending a new model name with every call would grow memory and
/// disk for the whole retention period.
pub const MAX_MODEL_COUNTERS_PER_DAY: u64 = 1000;

/// The longest model name with per-model usage counters of its own. Each
/// model a key uses gets daily usage counters kept for the retention
/// period; names are short in practice (tens of bytes), and a bound keeps a
/// client from filling disk and memory with megabyte-long ones. The usage
/// API refuses longer names; in a ShouldRateLimit descriptor their usage is
/// counted under [`OTHER_MODEL`] (limits and prices still match the name).
pub const MAX_MODEL_NAME: usize = 256;

/// The model name usage is counted under once a key has
/// [`MAX_MODEL_COUNTERS_PER_DAY`] per-model counters for the day.
pub const OTHER_MODEL: &str = "(other models)";

/// The counter of how many per-model counters a key has in a plan on the
/// day starting at `day_start` (the same prefix; GetUsage skips it).
pub fn model_count_key(plan_id: &str, key_id: &str, day_start: i64) -> Vec<u8> {
    let mut k = model_usage_prefix_with(plan_id, key_id, 9);
    k.extend_from_slice(&day_start.to_be_bytes());
    k.push(b'#');
    k
}

/// Decodes the part of a per-model usage counter key after its prefix.
pub fn decode_model_usage(rest: &[u8]) -> Option<(i64, ModelMetric, String)> {
    if rest.len() < 9 {
        return None;
    }
    let day = i64::from_be_bytes(rest[..8].try_into().ok()?);
    let metric = ModelMetric::from_tag(rest[8])?;
    let model = String::from_utf8(rest[9..].to_vec()).ok()?;
    Some((day, metric, model))
}

/// Whether a call's usage touches `limit` at all (a request-only call does
/// not touch token limits, a token report does not touch request limits).
pub fn touches(limit: &UsageLimit, usage: &Usage) -> bool {
    match limit.metric {
        Metric::Requests => usage.requests > 0,
        Metric::Tokens | Metric::Spend => {
            usage.input > 0 || usage.output > 0 || usage.total_only > 0
        }
    }
}

/// The limit for `model` and the pattern that selected it (`None` = the
/// default limit): an exact pattern first, else the longest matching glob.
pub fn model_limit<'a>(limit: &'a UsageLimit, model: Option<&str>) -> (Option<&'a str>, u64) {
    if let Some(m) = model {
        if let Some((k, v)) = limit.model_limits.get_key_value(m) {
            return (Some(k.as_str()), *v);
        }
        if let Some((k, v)) = limit
            .model_limits
            .iter()
            .filter(|(pat, _)| wildcard_match(pat, m))
            .max_by_key(|(pat, _)| pat.len())
        {
            return (Some(k.as_str()), *v);
        }
    }
    (None, limit.limit)
}

/// A limit's calendar (for calendar windows).
pub fn calendar(limit: &UsageLimit) -> Option<Calendar> {
    let period: Period = limit.window.period()?;
    Calendar::new(period, limit.anchor_day, &limit.time_zone).ok()
}

/// The current window of a limit at `now` (Unix seconds): the calendar
/// period, or the fixed window of a sliding limit.
pub fn window(limit: &UsageLimit, cal: Option<&Calendar>, now: i64) -> Span {
    match (limit.window.sliding_secs(), cal) {
        (Some(len), _) => {
            let start = now - now.rem_euclid(len);
            Span {
                start,
                end: start + len,
            }
        }
        (None, Some(c)) => c.containing(now),
        // A calendar window whose calendar does not build (validated away).
        (None, None) => Span {
            start: now - now.rem_euclid(86_400),
            end: now - now.rem_euclid(86_400) + 86_400,
        },
    }
}

/// The previous window's weight in the sliding estimate at `now`: the part
/// of it still inside the last `len` seconds, in millionths.
pub fn previous_weight_ppm(now: i64, len: i64) -> u64 {
    let into = now.rem_euclid(len);
    u64::try_from((len - into) * 1_000_000 / len).unwrap_or(0)
}

/// The sliding estimate's share of the previous window (rounded up).
pub fn previous_share(prev: u64, weight_ppm: u64) -> u64 {
    u64::try_from((u128::from(prev) * u128::from(weight_ppm)).div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
}

/// Seconds until a sliding limit lets `need` units through (at least 1):
/// the previous window's share shrinks as it slides out, and once the
/// current window ends, the current count becomes the sliding share.
/// `prev` and `cur` are the counts of the previous and current fixed windows
/// (without the refused call), `into` the seconds into the current window.
pub fn sliding_retry_after(prev: u64, cur: u64, need: u64, lim: u64, into: i64, len: i64) -> u64 {
    let need = need.max(1);
    let len_u = u64::try_from(len).unwrap_or(1).max(1);
    let into_u = u64::try_from(into.clamp(0, len)).unwrap_or(0);
    // When, into a window, a share of `count` has shrunk to at most `room`.
    let when = |count: u64, room: u64| -> u64 {
        if count == 0 {
            return 0;
        }
        let keep = u128::from(room) * u128::from(len_u) / u128::from(count);
        len_u.saturating_sub(u64::try_from(keep).unwrap_or(u64::MAX))
    };
    if cur.saturating_add(need) <= lim {
        let t = when(prev, lim - cur - need);
        t.saturating_sub(into_u).max(1)
    } else if need <= lim {
        (len_u - into_u) + when(cur, lim - need)
    } else {
        // Never fits one window: say one full window.
        len_u.max(1)
    }
}

/// Whose counter: the key's id, or its customer id (a key without one is
/// its own customer).
pub fn scope_id<'a>(limit: &UsageLimit, key_id: &'a str, customer_id: &'a str) -> (u8, &'a str) {
    match limit.scope {
        Scope::Customer if !customer_id.is_empty() => (b'c', customer_id),
        _ => (b'k', key_id),
    }
}

/// The counter of a limit for one scope, model pattern and window.
pub fn counter_key(
    plan_id: &str,
    limit_name: &str,
    scope: (u8, &str),
    pattern: Option<&str>,
    window_start: i64,
) -> Vec<u8> {
    // Tag, kind, five length-prefixed parts, the window start: one allocation.
    let mut k = Vec::with_capacity(
        2 + 5 * 4
            + plan_id.len()
            + limit_name.len()
            + 1
            + scope.1.len()
            + pattern.map_or(0, str::len)
            + 8,
    );
    counter_key_into(&mut k, plan_id, limit_name, scope, pattern, window_start);
    k
}

/// [`counter_key`], appended to `k`.
fn counter_key_into(
    k: &mut Vec<u8>,
    plan_id: &str,
    limit_name: &str,
    scope: (u8, &str),
    pattern: Option<&str>,
    window_start: i64,
) {
    counter_key_prefix_into(k, plan_id, limit_name);
    counter_key_rest_into(k, scope, pattern, window_start);
}

/// The part of a limit's counter keys that every call shares: tag, kind,
/// plan id and limit name. A compiled plan keeps it per limit
/// ([`super::catalog::CompiledPlan::limit_key_prefixes`]).
pub fn counter_key_prefix(plan_id: &str, limit_name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 2 * 4 + plan_id.len() + limit_name.len());
    counter_key_prefix_into(&mut k, plan_id, limit_name);
    k
}

/// [`counter_key`] appended to `k`, from a [`counter_key_prefix`]: the same bytes, with
/// the shared part copied in one piece.
pub fn counter_key_from_prefix_into(
    k: &mut Vec<u8>,
    prefix: &[u8],
    scope: (u8, &str),
    pattern: Option<&str>,
    window_start: i64,
) {
    k.extend_from_slice(prefix);
    counter_key_rest_into(k, scope, pattern, window_start);
}

fn counter_key_prefix_into(k: &mut Vec<u8>, plan_id: &str, limit_name: &str) {
    k.push(super::decide::PLAN_KEY_TAG);
    k.push(b'l');
    for part in [plan_id.as_bytes(), limit_name.as_bytes()] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part);
    }
}

fn counter_key_rest_into(
    k: &mut Vec<u8>,
    scope: (u8, &str),
    pattern: Option<&str>,
    window_start: i64,
) {
    let pattern = pattern.unwrap_or("");
    k.reserve(4 + 1 + 4 + scope.1.len() + 4 + pattern.len() + 8);
    k.extend_from_slice(&1u32.to_be_bytes());
    k.push(scope.0);
    k.extend_from_slice(&(scope.1.len() as u32).to_be_bytes());
    k.extend_from_slice(scope.1.as_bytes());
    k.extend_from_slice(&(pattern.len() as u32).to_be_bytes());
    k.extend_from_slice(pattern.as_bytes());
    k.extend_from_slice(&window_start.to_be_bytes());
}

/// The key of a reported request id (for ReportUsage idempotency): per
/// key, so ids that two keys (or tenants) happen to share do not swallow
/// each other's reports.
pub fn report_key(plan_id: &str, key_id: &str, request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 12 + plan_id.len() + key_id.len() + request_id.len());
    k.push(super::decide::PLAN_KEY_TAG);
    k.push(b'r');
    for part in [plan_id.as_bytes(), key_id.as_bytes(), request_id.as_bytes()] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part);
    }
    k
}

/// Whether a window's limit is sliding.
pub fn is_sliding(w: LimitWindow) -> bool {
    w.sliding_secs().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(metric: Metric, count: TokenCount) -> UsageLimit {
        UsageLimit {
            name: "l".into(),
            metric,
            count,
            limit: 100,
            window: LimitWindow::Minute,
            anchor_day: 0,
            time_zone: "UTC".into(),
            model_limits: BTreeMap::new(),
            scope: Scope::Key,
        }
    }

    #[test]
    fn amounts_per_metric_and_count() {
        let u = Usage {
            requests: 1,
            input: 10,
            output: 3,
            total_only: 0,
        };
        assert_eq!(
            amount(&limit(Metric::Requests, TokenCount::Total), &u, None),
            1
        );
        assert_eq!(
            amount(&limit(Metric::Tokens, TokenCount::Input), &u, None),
            10
        );
        assert_eq!(
            amount(&limit(Metric::Tokens, TokenCount::Output), &u, None),
            3
        );
        assert_eq!(
            amount(&limit(Metric::Tokens, TokenCount::Total), &u, None),
            13
        );
        let w = TokenCount::Weighted {
            input_weight: 0.25,
            output_weight: 1.5,
        };
        // 10 * 0.25 + 3 * 1.5 = 7
        assert_eq!(amount(&limit(Metric::Tokens, w), &u, None), 7);
        let price = Price {
            input_per_million: 2_500_000,
            output_per_million: 10_000_000,
        };
        // 10 tokens at 2.50/M + 3 at 10.00/M = 0.000025 + 0.000030 = 55 micro-units
        assert_eq!(
            amount(&limit(Metric::Spend, TokenCount::Total), &u, Some(&price)),
            55
        );
        let one = Usage {
            input: 1,
            ..Usage::default()
        };
        // 1 token at 2.50/M = 2.5 micro-units: rounded up
        assert_eq!(
            amount(&limit(Metric::Spend, TokenCount::Total), &one, Some(&price)),
            3
        );
        let big = Usage {
            input: 1_000_000,
            output: 500_000,
            ..Usage::default()
        };
        // 2.50 + 5.00 = 7.50 = 7_500_000 micro-units, exactly
        assert_eq!(
            amount(&limit(Metric::Spend, TokenCount::Total), &big, Some(&price)),
            7_500_000
        );
        assert_eq!(
            amount(&limit(Metric::Spend, TokenCount::Total), &big, None),
            0
        );
    }

    #[test]
    fn model_limits_and_prices_pick_exact_then_longest_glob() {
        let mut l = limit(Metric::Tokens, TokenCount::Total);
        l.model_limits = BTreeMap::from([
            ("gpt-4o*".to_owned(), 10),
            ("gpt-4o-mini*".to_owned(), 20),
            ("o1".to_owned(), 30),
        ]);
        assert_eq!(model_limit(&l, Some("gpt-4o-2024")), (Some("gpt-4o*"), 10));
        assert_eq!(
            model_limit(&l, Some("gpt-4o-mini-x")),
            (Some("gpt-4o-mini*"), 20)
        );
        assert_eq!(model_limit(&l, Some("o1")), (Some("o1"), 30));
        assert_eq!(model_limit(&l, Some("claude")), (None, 100));
        assert_eq!(model_limit(&l, None), (None, 100));
        let p = |i| Price {
            input_per_million: i,
            output_per_million: 0,
        };
        let prices = BTreeMap::from([
            ("gpt-4o*".to_owned(), p(1)),
            ("gpt-4o".to_owned(), p(2)),
            ("*".to_owned(), p(3)),
        ]);
        assert_eq!(price_for(&prices, "gpt-4o").unwrap().input_per_million, 2);
        assert_eq!(
            price_for(&prices, "gpt-4o-mini").unwrap().input_per_million,
            1
        );
        assert_eq!(price_for(&prices, "other").unwrap().input_per_million, 3);
    }

    #[test]
    fn sliding_weights() {
        assert_eq!(previous_weight_ppm(120, 60), 1_000_000);
        assert_eq!(previous_weight_ppm(150, 60), 500_000);
        assert_eq!(previous_weight_ppm(179, 60), 16_666);
        assert_eq!(previous_share(100, 500_000), 50);
        assert_eq!(previous_share(3, 500_000), 2, "rounded up");
        assert_eq!(previous_share(0, 1_000_000), 0);
    }

    #[test]
    fn sliding_retry_after_follows_the_estimate() {
        // 10 in the previous minute, none now, limit 10, 1 s into the window:
        // ceil(10 * (60 - t) / 60) <= 9 from t = 6 s, so 5 s from now.
        assert_eq!(sliding_retry_after(10, 0, 1, 10, 1, 60), 5);
        // Current window full (10 of 10): wait for its end, then until its
        // share is <= 9: 50 s + 6 s.
        assert_eq!(sliding_retry_after(0, 10, 1, 10, 10, 60), 56);
        // More than the limit never fits: one window.
        assert_eq!(sliding_retry_after(0, 0, 11, 10, 0, 60), 60);
        assert_eq!(sliding_retry_after(3, 0, 1, 10, 0, 60), 1, "at least 1 s");
    }

    #[test]
    fn model_usage_keys_round_trip() {
        let prefix = model_usage_prefix("p", "k");
        let k = model_usage_key("p", "k", -86_400, ModelMetric::Spend, "gpt-4o");
        assert!(k.starts_with(&prefix));
        assert_eq!(
            decode_model_usage(&k[prefix.len()..]),
            Some((-86_400, ModelMetric::Spend, "gpt-4o".to_owned()))
        );
        assert_eq!(decode_model_usage(b"short"), None);
        assert!(!model_usage_key("p", "k2", 0, ModelMetric::Input, "").starts_with(&prefix));
    }

    /// Counter keys are stored in sled: their bytes must not change across
    /// versions, and the prefix path must build the same bytes.
    #[test]
    fn counter_key_bytes_are_fixed_and_the_prefix_path_builds_the_same() {
        let want: Vec<u8> = [
            &[0xFF, b'l'][..],
            &[0, 0, 0, 1, b'p'],
            &[0, 0, 0, 3, b't', b'p', b'm'],
            &[0, 0, 0, 1, b'k'],
            &[0, 0, 0, 2, b'k', b'1'],
            &[0, 0, 0, 2, b'g', b'*'],
            &60i64.to_be_bytes(),
        ]
        .concat();
        assert_eq!(counter_key("p", "tpm", (b'k', "k1"), Some("g*"), 60), want);
        for (plan, limit, scope, pattern, start) in [
            ("p", "tpm", (b'k', "k1"), Some("g*"), 60),
            ("plan-a", "tokens per day", (b'c', "cust"), None, -86_400),
            ("", "", (b'k', ""), Some(""), 0),
        ] {
            let mut k = vec![7u8];
            counter_key_from_prefix_into(
                &mut k,
                &counter_key_prefix(plan, limit),
                scope,
                pattern,
                start,
            );
            assert_eq!(k[0], 7, "appends");
            assert_eq!(k[1..], counter_key(plan, limit, scope, pattern, start)[..]);
        }
    }

    #[test]
    fn counter_keys_differ_by_every_part() {
        let base = counter_key("p", "tpm", (b'k', "k1"), None, 60);
        assert_ne!(base, counter_key("p", "tpm", (b'c', "k1"), None, 60));
        assert_ne!(
            base,
            counter_key("p", "tpm", (b'k', "k1"), Some("gpt*"), 60)
        );
        assert_ne!(base, counter_key("p", "tpm", (b'k', "k1"), None, 120));
        assert_ne!(base, counter_key("p", "tpd", (b'k', "k1"), None, 60));
        assert_ne!(
            counter_key("ab", "c", (b'k', "x"), None, 0),
            counter_key("a", "bc", (b'k', "x"), None, 0)
        );
    }
}
