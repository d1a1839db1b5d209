//! Usage limits of plans (request, token and spend limits for LLM traffic)
//! through the library API with an injected clock: no network, no wall
//! clock. Every instant is a literal built from a civil UTC date by an
//! independent days-from-civil helper, and every expected `remaining`,
//! `reset_in` and header below was computed by hand (arithmetic in the
//! comments).
//!
//! Vocabulary (see `RateLimiter::decide_plan`): a *request* is a governed
//! descriptor without a `usage` entry (or `usage=requests`); a *charge* is a
//! descriptor with `usage` = `input_tokens` / `output_tokens` /
//! `total_tokens` whose `hits_addend` is the token count, sent after the
//! response. Requests count in request limits and only check token and
//! spend limits; charges count in token and spend limits, even over them.
//!
//! Refusals by a sliding (MINUTE/HOUR) limit: `reset_in` (and
//! `retry-after`) is the time until the sliding estimate lets the call
//! through (`sluice::plans::usage::sliding_retry_after`), not the end of the
//! fixed window. With `prev`/`cur` the previous/current fixed windows'
//! counts (`cur` without the refused call), `need` its amount (at least 1;
//! 1 for a charge, whose `cur` includes it), limit `L`, `into` seconds into
//! the current window (len 60):
//! - if `cur + need <= L`: wait until the previous share
//!   `ceil(prev * (60 - t) / 60)` is `<= L - cur - need`, i.e. until
//!   `t = 60 - floor((L - cur - need) * 60 / prev)` (0 if `prev` = 0);
//!   `reset_in = max(t - into, 1)`;
//! - else: to the window's end (`60 - into`), then until the current
//!   count's own share is `<= L - need`: `+ 60 - floor((L - need) * 60 / cur)`.
//!
//! OK statuses, and refusals by calendar windows, keep "seconds to the end of
//! the current window".

use std::collections::BTreeMap;
use std::path::PathBuf;

use proptest::prelude::*;
use sluice::engine::{Code, Decision, Descriptor, Entry, Reason, Request, Status, Unit};
use sluice::limiter::{QuotaState, RateLimiter};
use sluice::plans::model::{
    ApiKey, HeaderStyle, LimitWindow, Metric, PeriodKind, Plan, Price, Quota, Scope, Stage,
    Throttle, TokenCount, UsageLimit, DEFAULT_KEY_ENTRY,
};
use sluice::plans::registry::Registry;
use sluice::storage::memory::MemoryCounters;

/// The domain of the embedded default config.
const DOMAIN: &str = "llm-gateway";
/// Microseconds per second.
const S: i64 = 1_000_000;
/// Microseconds per millisecond.
const MS: i64 = 1_000;
/// Seconds per day.
const DAY: i64 = 86_400;
/// Admin writes happen "earlier" than every decision below.
const ADMIN_NOW: i64 = 1_700_000_000;

// ---------------------------------------------------------------- clock --

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`), independent of the crate's calendar code.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of a UTC civil time.
fn utc(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> i64 {
    days_from_civil(y, mo, d) * DAY + h * 3600 + mi * 60 + s
}

/// Unix microseconds of a UTC civil time.
fn at(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> i64 {
    utc(y, mo, d, h, mi, s) * S
}

/// Unix seconds of W = 2026-01-01 10:00:00 UTC, the start of a minute
/// window (1_767_261_600 = 29_454_360 * 60).
fn w_secs() -> i64 {
    utc(2026, 1, 1, 10, 0, 0)
}

/// Unix microseconds of W + `secs`.
fn w(secs: i64) -> i64 {
    (w_secs() + secs) * S
}

#[test]
fn the_clock_helper_agrees_with_known_instants() {
    assert_eq!(utc(1970, 1, 1, 0, 0, 0), 0);
    assert_eq!(utc(2026, 1, 1, 0, 0, 0), 1_767_225_600);
    assert_eq!(w_secs(), 1_767_261_600);
    assert_eq!(w_secs() % 60, 0, "W starts a minute window");
    assert_eq!(utc(2026, 3, 8, 0, 0, 0), 1_772_928_000);
}

// ------------------------------------------------------------- fixtures --

struct Env {
    registry: Registry,
    limiter: RateLimiter<MemoryCounters>,
}

impl Env {
    fn new() -> Env {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let registry = Registry::open(db, PathBuf::from("<temporary>")).unwrap();
        let limiter = RateLimiter::new(
            sluice::config::embedded_default().unwrap(),
            MemoryCounters::default(),
        )
        .with_plans(registry.handle());
        Env { registry, limiter }
    }

    async fn plan(&self, p: Plan) -> Plan {
        self.registry.create_plan(p, ADMIN_NOW).await.unwrap()
    }

    /// Creates a key named `name` (value `value_of(name)`) with `customer`,
    /// bound to `plan_id`; returns (key, value).
    async fn key(&self, name: &str, customer: &str, plan_id: &str) -> (ApiKey, String) {
        let mut k = api_key(name);
        k.customer_id = customer.into();
        let value = value_of(name);
        let (k, v) = self
            .registry
            .create_key(k, Some(value.clone()), ADMIN_NOW)
            .await
            .unwrap();
        assert_eq!(v, value);
        self.registry.bind(plan_id, &k.id, ADMIN_NOW).await.unwrap();
        (self.registry.get_key(&k.id).unwrap(), value)
    }

    /// A plan and one key (no customer) bound to it: (plan, key, value).
    async fn plan_and_key(&self, p: Plan) -> (Plan, ApiKey, String) {
        let p = self.plan(p).await;
        let (k, v) = self.key(&format!("{}-key", p.name), "", &p.id).await;
        (p, k, v)
    }

    async fn decide(&self, descriptors: Vec<Descriptor>, now_us: i64) -> Decision {
        let req = Request {
            domain: DOMAIN.into(),
            descriptors,
            hits_addend: 0,
        };
        let d = self.limiter.decide(&req, now_us).await.unwrap();
        assert_eq!(d.statuses.len(), req.descriptors.len());
        let over = d.statuses.iter().any(|s| s.code == Code::OverLimit);
        assert_eq!(d.overall == Code::OverLimit, over, "overall code: {d:?}");
        d
    }

    /// A request (no `usage` entry) of `hits` for key `value`.
    async fn request_d(&self, value: &str, model: Option<&str>, hits: u64, now: i64) -> Decision {
        let mut e = vec![(DEFAULT_KEY_ENTRY, value)];
        if let Some(m) = model {
            e.push(("model", m));
        }
        self.decide(vec![desc(&e, hits)], now).await
    }

    async fn request(&self, value: &str, model: Option<&str>, hits: u64, now: i64) -> Status {
        self.request_d(value, model, hits, now)
            .await
            .statuses
            .remove(0)
    }

    /// A charge of `tokens` of `kind` (the `usage` entry) for key `value`.
    async fn charge_d(
        &self,
        value: &str,
        kind: &str,
        model: Option<&str>,
        tokens: u64,
        now: i64,
    ) -> Decision {
        let mut e = vec![(DEFAULT_KEY_ENTRY, value), ("usage", kind)];
        if let Some(m) = model {
            e.push(("model", m));
        }
        self.decide(vec![desc(&e, tokens)], now).await
    }

    async fn charge(
        &self,
        value: &str,
        kind: &str,
        model: Option<&str>,
        tokens: u64,
        now: i64,
    ) -> Status {
        self.charge_d(value, kind, model, tokens, now)
            .await
            .statuses
            .remove(0)
    }

    async fn quota(&self, plan_id: &str, key_id: &str, now_s: i64) -> QuotaState {
        let plan = self.limiter.catalog().plan(plan_id).unwrap().clone();
        self.limiter
            .quota_state(&plan, key_id, now_s)
            .await
            .unwrap()
            .unwrap()
    }
}

fn desc(entries: &[(&str, &str)], hits: u64) -> Descriptor {
    Descriptor {
        entries: entries.iter().map(|(k, v)| Entry::new(*k, *v)).collect(),
        limit: None,
        hits_addend: Some(hits),
    }
}

fn value_of(name: &str) -> String {
    format!("{name}-value-0123456789abcdef")
}

fn stage(domain: &str) -> Stage {
    Stage {
        domain: domain.into(),
        ..Stage::default()
    }
}

/// A plan over `DOMAIN` with `limits` and nothing else.
fn plan(name: &str, limits: Vec<UsageLimit>) -> Plan {
    Plan {
        name: name.into(),
        stages: vec![stage(DOMAIN)],
        limits,
        ..Plan::default()
    }
}

fn throttle(rate_limit: f64, burst_limit: u32) -> Option<Throttle> {
    Some(Throttle {
        rate_limit,
        burst_limit,
    })
}

fn daily_quota(limit: u64) -> Option<Quota> {
    Some(Quota {
        limit,
        period: PeriodKind::Day,
        anchor_day: 0,
        time_zone: "UTC".into(),
    })
}

/// A key-scoped limit in UTC without per-model limits.
fn limit(name: &str, metric: Metric, count: TokenCount, n: u64, window: LimitWindow) -> UsageLimit {
    UsageLimit {
        name: name.into(),
        metric,
        count,
        limit: n,
        window,
        anchor_day: 0,
        time_zone: "UTC".into(),
        model_limits: BTreeMap::new(),
        scope: Scope::Key,
    }
}

/// `n` requests per sliding minute.
fn rpm(name: &str, n: u64) -> UsageLimit {
    limit(
        name,
        Metric::Requests,
        TokenCount::Total,
        n,
        LimitWindow::Minute,
    )
}

/// `n` total tokens per sliding minute.
fn tpm(name: &str, n: u64) -> UsageLimit {
    limit(
        name,
        Metric::Tokens,
        TokenCount::Total,
        n,
        LimitWindow::Minute,
    )
}

fn api_key(name: &str) -> ApiKey {
    ApiKey {
        name: name.into(),
        ..ApiKey::default()
    }
}

/// The comparable part of a status: (code, remaining, reset_in, reason).
type Summary = (Code, u32, Option<u64>, Option<Reason>);

fn sum(s: &Status) -> Summary {
    (s.code, s.remaining, s.reset_in, s.reason)
}

fn ok(remaining: u32, reset_in: u64) -> Summary {
    (Code::Ok, remaining, Some(reset_in), None)
}

fn over(reset_in: u64, reason: Reason) -> Summary {
    (Code::OverLimit, 0, Some(reset_in), Some(reason))
}

const REQ_LIMIT: Reason = Reason::RequestLimit { customer: false };
const TOK_LIMIT: Reason = Reason::TokenLimit { customer: false };
const TOK_LIMIT_CUSTOMER: Reason = Reason::TokenLimit { customer: true };
const BUDGET: Reason = Reason::BudgetExceeded { customer: false };

/// The reported limit: (requests per unit, unit, name).
fn lim(s: &Status) -> Option<(u32, Unit, String)> {
    s.limit.as_ref().map(|l| {
        (
            l.requests_per_unit,
            l.unit,
            l.name.as_deref().unwrap_or("").to_owned(),
        )
    })
}

fn l(n: u32, unit: Unit, name: &str) -> Option<(u32, Unit, String)> {
    Some((n, unit, name.to_owned()))
}

/// A header's value.
fn hdr<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    d.headers.get(name)
}

fn headers(pairs: &[(&'static str, &str)]) -> sluice::engine::Headers {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

// ------------------------------------------------- 1: request limits --

#[tokio::test]
async fn request_limit_refuses_the_fourth_and_does_not_count_refusals() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key(plan("rl", vec![rpm("rpm", 3)])).await;

    // W+10: window [W, W+60), reset_in 50; the previous window is empty.
    for want in [2, 1, 0] {
        assert_eq!(sum(&env.request(&v, None, 1, w(10)).await), ok(want, 50));
    }
    // Refused: cur 3 + 1 > 3, so wait for the window's end (50 s), then
    // until ceil(3 * (60 - t) / 60) <= 2: t = 60 - floor(2 * 60 / 3) = 20;
    // 50 + 20 = 70 (at W+80).
    let s = env.request(&v, None, 1, w(10)).await;
    assert_eq!(sum(&s), over(70, REQ_LIMIT));
    assert_eq!(lim(&s), l(3, Unit::Minute, "rl/rpm"));
    // More refusals, later in the same window: (60 - 20) + 20 = 60 (still
    // W+80).
    assert_eq!(
        sum(&env.request(&v, None, 1, w(20)).await),
        over(60, REQ_LIMIT)
    );
    assert_eq!(
        sum(&env.request(&v, None, 1, w(20)).await),
        over(60, REQ_LIMIT)
    );

    // W+90: the previous window [W, W+60) weighs 30/60. Counted: 3 (the 3
    // refusals are not counted), so its share is ceil(3 * 0.5) = 2 and one
    // request fits: 1 + 2 = 3. (Had the refusals counted, the previous
    // counter would be 6, its share 3, and nothing would fit.)
    assert_eq!(sum(&env.request(&v, None, 1, w(90)).await), ok(0, 30));
    // Refused: prev 3, cur 1, 1 + 1 <= 3: wait until ceil(3 * (60 - t) / 60)
    // <= 3 - 1 - 1 = 1: t = 60 - floor(1 * 60 / 3) = 40; 40 - 30 = 10.
    assert_eq!(
        sum(&env.request(&v, None, 1, w(90)).await),
        over(10, REQ_LIMIT)
    );

    // W+150: previous window [W+60, W+120) holds 1 (the refusal at W+90 is
    // not counted), weight 30/60: share ceil(0.5) = 1; two requests fit.
    assert_eq!(sum(&env.request(&v, None, 1, w(150)).await), ok(1, 30));
    assert_eq!(sum(&env.request(&v, None, 1, w(150)).await), ok(0, 30));
    // Refused: prev 1, cur 2, 2 + 1 <= 3: the share must reach 3 - 2 - 1 = 0:
    // t = 60 - floor(0 * 60 / 1) = 60; 60 - 30 = 30 (the window's end).
    assert_eq!(
        sum(&env.request(&v, None, 1, w(150)).await),
        over(30, REQ_LIMIT)
    );
}

/// Without a quota, a key's daily usage (GetUsage's `days[].used`, "hits
/// allowed that day") counts the calls its limits allowed, not the ones they
/// refused: a request limit's refusals and a spent token limit's alike.
#[tokio::test]
async fn daily_usage_without_a_quota_counts_only_allowed_calls() {
    let env = Env::new();
    let (rp, rk, rv) = env.plan_and_key(plan("rq", vec![rpm("rpm", 1)])).await;
    let (tp, tk, tv) = env.plan_and_key(plan("tq", vec![tpm("tpm", 100)])).await;
    assert_eq!(env.request(&rv, None, 1, w(10)).await.code, Code::Ok);
    for _ in 0..3 {
        assert_eq!(
            sum(&env.request(&rv, None, 1, w(10)).await).0,
            Code::OverLimit
        );
    }
    // The token limit: one request allowed, 150 tokens charged (over 100),
    // then requests refused until the window moves on.
    assert_eq!(env.request(&tv, None, 1, w(10)).await.code, Code::Ok);
    env.charge(&tv, "total_tokens", None, 150, w(11)).await;
    for _ in 0..3 {
        assert_eq!(
            sum(&env.request(&tv, None, 1, w(12)).await).0,
            Code::OverLimit
        );
    }
    let day = jiff::civil::date(2026, 1, 1);
    for (p, k) in [(&rp, &rk), (&tp, &tk)] {
        let compiled = env.limiter.catalog().plan(&p.id).unwrap().clone();
        let (days, _) = env
            .limiter
            .usage(&compiled, &k.id, &[day], w(20))
            .await
            .unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!((days[0].date, days[0].used), (day, 1), "plan {}", p.name);
    }
}

// --------------------------------------------- 2: the sliding window --

/// Most hits in any half-open span of `len` seconds.
fn max_in_any_span(allowed: &[(i64, u64)], len: i64) -> u64 {
    allowed
        .iter()
        .map(|&(start, _)| {
            allowed
                .iter()
                .filter(|&&(t, _)| t >= start && t < start + len)
                .map(|&(_, h)| h)
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0)
}

/// The sliding estimate at second `s`, times 60 (exact):
/// `previous * (60 - into) + current * 60`, counting hits at seconds <= `s`.
fn estimate_x60(allowed: &[(i64, u64)], s: i64) -> u64 {
    let start = s - s.rem_euclid(60);
    let in_span = |a: i64, b: i64| -> u64 {
        allowed
            .iter()
            .filter(|&&(t, _)| t >= a && t < b)
            .map(|&(_, h)| h)
            .sum()
    };
    let prev = in_span(start - 60, start);
    let cur = in_span(start, s + 1);
    let into = u64::try_from(s - start).unwrap();
    prev * (60 - into) + cur * 60
}

#[tokio::test]
async fn sliding_minute_removes_the_fixed_window_edge_burst() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key(plan("sw", vec![rpm("rpm", 10)])).await;
    let mut allowed: Vec<(i64, u64)> = Vec::new();
    // Runs `n` requests at W+`secs`; returns how many were allowed.
    async fn burst(env: &Env, v: &str, secs: i64, n: u32, allowed: &mut Vec<(i64, u64)>) -> u32 {
        let mut ok_count = 0;
        for _ in 0..n {
            if env.request(v, None, 1, w(secs)).await.code == Code::Ok {
                ok_count += 1;
                allowed.push((w_secs() + secs, 1));
            }
        }
        ok_count
    }

    // 10 requests 50 s into window W: all pass (remaining 9..0, reset 10).
    for want in (0..10).rev() {
        assert_eq!(sum(&env.request(&v, None, 1, w(50)).await), ok(want, 10));
        allowed.push((w_secs() + 50, 1));
    }
    // Refused: cur 10 + 1 > 10: 10 s to the window's end, then until
    // ceil(10 * (60 - t) / 60) <= 9: t = 60 - floor(9 * 60 / 10) = 6;
    // 10 + 6 = 16 (at W+66).
    assert_eq!(
        sum(&env.request(&v, None, 1, w(50)).await),
        over(16, REQ_LIMIT)
    );

    // W+61, 1 s into the next window: the previous one weighs 59/60
    // (983_333 ppm), share ceil(10 * 0.983333) = 10: nothing passes.
    // A fixed one-minute window would let 10 more through here: 20
    // requests within 11 s (W+50 .. W+61).
    // reset_in: prev 10, cur 0: share <= 10 - 0 - 1 = 9 from t = 6 (as
    // above): 6 - 1 = 5 (W+66 again).
    assert_eq!(
        sum(&env.request(&v, None, 1, w(61)).await),
        over(5, REQ_LIMIT)
    );
    assert_eq!(burst(&env, &v, 61, 5, &mut allowed).await, 0);

    // W+90, 30 s in: share ceil(10 * 0.5) = 5, so 5 pass (remaining 4..0,
    // reset 30) and the 6th is refused.
    for want in (0..5).rev() {
        assert_eq!(sum(&env.request(&v, None, 1, w(90)).await), ok(want, 30));
        allowed.push((w_secs() + 90, 1));
    }
    // reset_in: prev 10, cur 5: share <= 10 - 5 - 1 = 4 from
    // t = 60 - floor(4 * 60 / 10) = 36: 36 - 30 = 6.
    assert_eq!(
        sum(&env.request(&v, None, 1, w(90)).await),
        over(6, REQ_LIMIT)
    );

    // W+120, the start of the window after: the previous window (holding
    // the 5 of W+90) weighs 60/60, so 5 are left (a check-only call, which
    // counts nothing; reset_in 60).
    assert_eq!(sum(&env.request(&v, None, 0, w(120)).await), ok(5, 60));

    // W+180: the previous window [W+120, W+180) is empty: all 10 again.
    assert_eq!(burst(&env, &v, 180, 11, &mut allowed).await, 10);

    // Any 60 s span: the sliding estimate never exceeds the limit (it is
    // exactly 10 at W+50 and at W+90; no rounding slack was used here) ...
    let max_estimate = (w_secs()..w_secs() + 240)
        .map(|s| estimate_x60(&allowed, s))
        .max()
        .unwrap();
    assert_eq!(max_estimate, 10 * 60);
    // ... but the estimate assumes the previous window's traffic was spread
    // evenly. Here all of it came at its end (W+50), so the real count in
    // [W+50, W+110) is 10 + 5 = 15: 1.5x the limit. The exact bound
    // observed over every 60 s span of this sequence is 15, against 20 for
    // a fixed window (W+50 and W+61).
    assert_eq!(max_in_any_span(&allowed, 60), 15);
    assert_eq!(allowed.len(), 25);
}

#[tokio::test]
async fn sliding_refusal_retry_after_is_when_the_call_fits() {
    let env = Env::new();
    // Refused at W+`secs` with reset_in `want`: a call `want` - 1 s later is
    // still refused, one exactly `want` s later passes.
    async fn check(env: &Env, v: &str, secs: i64, want: u64) {
        let d = env.request_d(v, None, 1, w(secs)).await;
        let s = &d.statuses[0];
        assert_eq!(sum(s), over(want, REQ_LIMIT), "refusal at W+{secs}");
        // The client headers say the same as retry-after, not the end of
        // the fixed window under the sliding estimate.
        assert_eq!(hdr(&d, "retry-after"), Some(want.to_string().as_str()));
        assert_eq!(
            hdr(&d, "x-ratelimit-reset-requests"),
            Some(sluice::plans::headers::openai_duration(want).as_str())
        );
        let r = i64::try_from(s.reset_in.unwrap()).unwrap();
        assert!(r > 1);
        assert_eq!(
            env.request(v, None, 1, w(secs + r - 1)).await.reason,
            Some(REQ_LIMIT),
            "1 s early, at W+{}",
            secs + r - 1
        );
        assert_eq!(
            env.request(v, None, 1, w(secs + r)).await.code,
            Code::Ok,
            "on time, at W+{}",
            secs + r
        );
    }

    // Previous window full: 10 of 10 at W+50, refused at W+61 (prev 10,
    // cur 0): the share ceil(10 * (60 - t) / 60) <= 10 - 0 - 1 = 9 from
    // t = 60 - floor(9 * 60 / 10) = 6, so 6 - 1 = 5 s (W+66). At W+65 the
    // share is ceil(10 * 55 / 60) = ceil(9.17) = 10 (refused); at W+66 it
    // is ceil(10 * 54 / 60) = 9 (passes).
    let (_, _, a) = env.plan_and_key(plan("rp", vec![rpm("rpm", 10)])).await;
    for _ in 0..10 {
        assert_eq!(env.request(&a, None, 1, w(50)).await.code, Code::Ok);
    }
    check(&env, &a, 61, 5).await;

    // Current window full: 10 of 10 at W+10 (previous window empty),
    // refused at W+10: 50 s to the window's end, then the same 6 s for the
    // 10 to shrink to a share of 9: 56 s (W+66 again).
    let (_, _, b) = env.plan_and_key(plan("rc", vec![rpm("rpm", 10)])).await;
    for _ in 0..10 {
        assert_eq!(env.request(&b, None, 1, w(10)).await.code, Code::Ok);
    }
    check(&env, &b, 10, 56).await;
}

// ------------------------------------------------- 3: token limits --

#[tokio::test]
async fn token_limit_checks_requests_and_counts_charges_even_over_it() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key(plan("tok", vec![tpm("tpm", 1000)])).await;

    // W+5: requests only check the token limit: they pass and count nothing.
    for _ in 0..3 {
        let s = env.request(&v, None, 1, w(5)).await;
        assert_eq!(sum(&s), ok(1000, 55));
        assert_eq!(lim(&s), l(1000, Unit::Minute, "tok/tpm"));
    }
    // A charge of 1200 (the tokens were spent) is counted over the limit.
    // reset_in: cur 1200 (with the charge), need 1: 55 s to the window's
    // end, then until ceil(1200 * (60 - t) / 60) <= 999:
    // t = 60 - floor(999 * 60 / 1200) = 60 - floor(49.95) = 11; 55 + 11 = 66
    // (at W+71).
    let s = env.charge(&v, "total_tokens", None, 1200, w(5)).await;
    assert_eq!(sum(&s), over(66, TOK_LIMIT));
    assert_eq!(lim(&s), l(1000, Unit::Minute, "tok/tpm"));
    // The next requests are refused (need 1, cur 1200, still W+71):
    // 54 + 11 = 65 and 1 + 11 = 12.
    assert_eq!(
        sum(&env.request(&v, None, 1, w(6)).await),
        over(65, TOK_LIMIT)
    );
    assert_eq!(
        sum(&env.request(&v, None, 1, w(59)).await),
        over(12, TOK_LIMIT)
    );
    // W+70 (10 s into the next window): weight 50/60 = 833_333 ppm,
    // share ceil(1200 * 0.833333) = ceil(999.9996) = 1000: still refused.
    // reset_in: prev 1200, cur 0: t = 11 (as above), 11 - 10 = 1.
    assert_eq!(
        sum(&env.request(&v, None, 1, w(70)).await),
        over(1, TOK_LIMIT)
    );
    // W+71: weight 49/60 = 816_666 ppm, share ceil(979.9992) = 980: passes,
    // 20 tokens left.
    assert_eq!(sum(&env.request(&v, None, 1, w(71)).await), ok(20, 49));
    // Which is exactly what a charge of 20 may use (980 + 20 = 1000).
    assert_eq!(
        sum(&env.charge(&v, "total_tokens", None, 20, w(71)).await),
        ok(0, 49)
    );
    // reset_in: prev 1200, cur 20: share <= 1000 - 20 - 1 = 979 from
    // t = 60 - floor(979 * 60 / 1200) = 60 - floor(48.95) = 12: 12 - 11 = 1.
    assert_eq!(
        sum(&env.request(&v, None, 1, w(71)).await),
        over(1, TOK_LIMIT)
    );
}

#[tokio::test]
async fn total_counts_input_and_output_and_input_limits_ignore_output() {
    let env = Env::new();
    let (_, _, total) = env.plan_and_key(plan("tot", vec![tpm("tpm", 1000)])).await;
    let input_only = limit(
        "in",
        Metric::Tokens,
        TokenCount::Input,
        1000,
        LimitWindow::Minute,
    );
    let (_, _, inp) = env.plan_and_key(plan("inp", vec![input_only])).await;
    let weighted = limit(
        "wt",
        Metric::Tokens,
        TokenCount::Weighted {
            input_weight: 0.5,
            output_weight: 2.0,
        },
        1000,
        LimitWindow::Minute,
    );
    let (_, _, wt) = env.plan_and_key(plan("wtd", vec![weighted])).await;
    let t = w(30);

    // TOTAL: input 300, output 200, total 100 all count: 1000 - 600 = 400.
    for (kind, n, want) in [
        ("input_tokens", 300, 700),
        ("output_tokens", 200, 500),
        ("total_tokens", 100, 400),
    ] {
        assert_eq!(
            sum(&env.charge(&total, kind, None, n, t).await),
            ok(want, 30)
        );
    }
    assert_eq!(sum(&env.request(&total, None, 1, t).await), ok(400, 30));

    // INPUT: output charges count nothing; input charges count.
    assert_eq!(
        sum(&env.charge(&inp, "output_tokens", None, 5000, t).await),
        ok(1000, 30)
    );
    assert_eq!(
        sum(&env.charge(&inp, "input_tokens", None, 400, t).await),
        ok(600, 30)
    );
    assert_eq!(
        sum(&env.charge(&inp, "output_tokens", None, 5000, t).await),
        ok(600, 30)
    );
    assert_eq!(sum(&env.request(&inp, None, 1, t).await), ok(600, 30));

    // WEIGHTED (input 0.5, output 2.0), rounded up per charge:
    // input 3 -> ceil(1.5) = 2; output 7 -> 14; input 1 -> ceil(0.5) = 1;
    // input 4 -> 2 exactly; total 10 -> weight 1 -> 10.
    for (kind, n, want) in [
        ("input_tokens", 3, 998),
        ("output_tokens", 7, 984),
        ("input_tokens", 1, 983),
        ("input_tokens", 4, 981),
        ("total_tokens", 10, 971),
    ] {
        assert_eq!(
            sum(&env.charge(&wt, kind, None, n, t).await),
            ok(want, 30),
            "{kind} {n}"
        );
    }
    // Output 486 -> 972 > 971 left: counted, over the limit.
    // reset_in: cur 29 + 972 = 1001, need 1: 30 s to the window's end, then
    // t = 60 - floor(999 * 60 / 1001) = 60 - floor(59.88) = 1: 30 + 1 = 31
    // (the same for the request after it).
    assert_eq!(
        sum(&env.charge(&wt, "output_tokens", None, 486, t).await),
        over(31, TOK_LIMIT)
    );
    assert_eq!(
        sum(&env.request(&wt, None, 1, t).await),
        over(31, TOK_LIMIT)
    );
}

// ------------------------------------------- 4: check-only requests --

#[tokio::test]
async fn check_only_requests_pass_while_one_is_left_and_count_nothing() {
    let env = Env::new();
    let mut p = plan("chk", vec![rpm("rpm", 3)]);
    p.quota = daily_quota(5);
    let (p, k, v) = env.plan_and_key(p).await;
    let t = w(10);

    // hits_addend 0: remaining stays 3 however often we check (quota 5
    // left is not binding).
    for _ in 0..5 {
        assert_eq!(sum(&env.request(&v, None, 0, t).await), ok(3, 50));
    }
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 0);
    // Real requests: 3 pass (remaining 2, 1, 0).
    for want in [2, 1, 0] {
        assert_eq!(sum(&env.request(&v, None, 1, t).await), ok(want, 50));
    }
    // Now a check is refused: it needs at least one left. reset_in: need 1,
    // cur 3: 50 s to the window's end, then t = 60 - floor(2 * 60 / 3) = 20:
    // 50 + 20 = 70.
    assert_eq!(sum(&env.request(&v, None, 0, t).await), over(70, REQ_LIMIT));
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 3);
    // The request-level hits_addend 0 means 1 (only a descriptor's own 0
    // checks), so this is a real request, refused.
    let req = Request {
        domain: DOMAIN.into(),
        descriptors: vec![Descriptor {
            entries: vec![Entry::new(DEFAULT_KEY_ENTRY, v.as_str())],
            limit: None,
            hits_addend: None,
        }],
        hits_addend: 0,
    };
    let d = env.limiter.decide(&req, t).await.unwrap();
    // The same wait (need 1, cur 3 without it): 70.
    assert_eq!(sum(&d.statuses[0]), over(70, REQ_LIMIT));
}

// ---------------------------------------------- 5: calendar windows --

#[tokio::test]
async fn calendar_day_in_new_york_resets_at_local_midnight() {
    let env = Env::new();
    let mut tpd = limit(
        "tpd",
        Metric::Tokens,
        TokenCount::Total,
        1000,
        LimitWindow::Day,
    );
    tpd.time_zone = "America/New_York".into();
    let (_, _, v) = env.plan_and_key(plan("cal", vec![tpd])).await;

    // 2026-03-08 is the day DST starts in New York (02:00 EST -> 03:00
    // EDT, at 07:00 UTC): the local day runs 05:00 UTC (midnight EST) to
    // 2026-03-09 04:00 UTC (midnight EDT), 23 hours.
    // 04:59:59 UTC is still 2026-03-07 23:59:59 EST: 1 s to midnight.
    let s = env.request(&v, None, 1, at(2026, 3, 8, 4, 59, 59)).await;
    assert_eq!(sum(&s), ok(1000, 1));
    assert_eq!(lim(&s), l(1000, Unit::Day, "cal/tpd"));
    // 12:00 UTC = 08:00 EDT: 16 h = 57_600 s to local midnight.
    let t1 = at(2026, 3, 8, 12, 0, 0);
    assert_eq!(
        sum(&env.charge(&v, "total_tokens", None, 1000, t1).await),
        ok(0, 57_600)
    );
    assert_eq!(
        sum(&env.request(&v, None, 1, t1).await),
        over(57_600, TOK_LIMIT)
    );
    // Not at UTC midnight: 2026-03-09 00:00 UTC is 20:00 EDT, 4 h left.
    assert_eq!(
        sum(&env.request(&v, None, 1, at(2026, 3, 9, 0, 0, 0)).await),
        over(14_400, TOK_LIMIT)
    );
    assert_eq!(
        sum(&env.request(&v, None, 1, at(2026, 3, 9, 3, 59, 59)).await),
        over(1, TOK_LIMIT)
    );
    // Local midnight: a new day of 24 h (04:00 UTC to 04:00 UTC).
    assert_eq!(
        sum(&env.request(&v, None, 1, at(2026, 3, 9, 4, 0, 0)).await),
        ok(1000, 86_400)
    );
}

#[tokio::test]
async fn calendar_month_anchored_on_the_15th() {
    let env = Env::new();
    let mut m = limit(
        "tpmo",
        Metric::Tokens,
        TokenCount::Total,
        500,
        LimitWindow::Month,
    );
    m.anchor_day = 15;
    let (_, _, v) = env.plan_and_key(plan("mon", vec![m])).await;

    // 2026-01-14 23:59:59: window [Dec 15, Jan 15), 1 s left.
    let s = env.request(&v, None, 1, at(2026, 1, 14, 23, 59, 59)).await;
    assert_eq!(sum(&s), ok(500, 1));
    assert_eq!(lim(&s), l(500, Unit::Month, "mon/tpmo"));
    // 2026-01-20 00:00: window [Jan 15, Feb 15), 26 d = 2_246_400 s left.
    let t = at(2026, 1, 20, 0, 0, 0);
    assert_eq!(
        sum(&env.charge(&v, "total_tokens", None, 500, t).await),
        ok(0, 2_246_400)
    );
    // The 1st of the month is no boundary: 14 d = 1_209_600 s left.
    assert_eq!(
        sum(&env.request(&v, None, 1, at(2026, 2, 1, 0, 0, 0)).await),
        over(1_209_600, TOK_LIMIT)
    );
    // 2026-02-14 12:00: 12 h = 43_200 s left.
    assert_eq!(
        sum(&env.request(&v, None, 1, at(2026, 2, 14, 12, 0, 0)).await),
        over(43_200, TOK_LIMIT)
    );
    // Feb 15 00:00: window [Feb 15, Mar 15) = 28 days = 2_419_200 s.
    assert_eq!(
        sum(&env.request(&v, None, 1, at(2026, 2, 15, 0, 0, 0)).await),
        ok(500, 2_419_200)
    );
}

// ------------------------------------------------ 6: per-model limits --

/// A stage's `model_entry` names the entry the model comes in (Envoy AI
/// Gateway sends it under a generated key): per-model limits and prices
/// read it, and an entry named `model` is then just another entry.
#[tokio::test]
async fn a_stage_model_entry_names_where_the_model_comes_from() {
    let env = Env::new();
    let mut t = tpm("tpm", 50);
    t.model_limits = BTreeMap::from([("gpt-4o*".to_owned(), 100)]);
    let mut p = plan("aigw-model", vec![t]);
    p.stages[0].model_entry = "rule-0-match-1".into();
    let (_, _, v) = env.plan_and_key(p).await;
    let now = w(20);
    let charge = |entries: Vec<(&str, &str)>, n: u64| {
        let mut e = vec![(DEFAULT_KEY_ENTRY, v.as_str()), ("usage", "total_tokens")];
        e.extend(entries);
        env.decide(vec![desc(&e, n)], now)
    };
    let d = charge(vec![("rule-0-match-1", "gpt-4o")], 60).await;
    assert_eq!(sum(&d.statuses[0]), ok(40, 40));
    assert_eq!(
        lim(&d.statuses[0]),
        l(100, Unit::Minute, "aigw-model/tpm[gpt-4o*]")
    );
    // An entry named `model` is not the model in this stage.
    let d = charge(vec![("model", "gpt-4o")], 20).await;
    assert_eq!(sum(&d.statuses[0]), ok(30, 40));
    assert_eq!(lim(&d.statuses[0]), l(50, Unit::Minute, "aigw-model/tpm"));
}

#[tokio::test]
async fn per_model_limits_have_their_own_counters() {
    let env = Env::new();
    let mut t = tpm("tpm", 50);
    t.model_limits = BTreeMap::from([
        ("gpt-4o*".to_owned(), 100),
        ("gpt-4o-mini*".to_owned(), 1000),
    ]);
    let (_, _, v) = env.plan_and_key(plan("pm", vec![t])).await;
    let now = w(20); // reset_in 40
    let gpt4o = l(100, Unit::Minute, "pm/tpm[gpt-4o*]");
    let mini = l(1000, Unit::Minute, "pm/tpm[gpt-4o-mini*]");
    let default = l(50, Unit::Minute, "pm/tpm");

    // (model, tokens, remaining, reported limit)
    for (model, n, want, which) in [
        (Some("gpt-4o-2024-08-06"), 60, 40, &gpt4o),
        (Some("gpt-4o"), 30, 10, &gpt4o),
        (Some("gpt-4o-mini"), 500, 500, &mini),
        (Some("claude-3-5-sonnet"), 20, 30, &default),
        (None, 20, 10, &default),
    ] {
        let s = env.charge(&v, "total_tokens", model, n, now).await;
        assert_eq!(sum(&s), ok(want, 40), "{model:?}");
        assert_eq!(&lim(&s), which, "{model:?}");
    }
    // Requests see the counter of their model.
    for (model, want, which) in [
        (Some("gpt-4o-2024-05-13"), 10, &gpt4o),
        (Some("gpt-4o-mini-2024-07-18"), 500, &mini),
        (Some("claude-3-5-sonnet"), 10, &default),
        (None, 10, &default),
    ] {
        let s = env.request(&v, model, 1, now).await;
        assert_eq!(sum(&s), ok(want, 40), "{model:?}");
        assert_eq!(&lim(&s), which, "{model:?}");
    }
    // gpt-4o* used up: gpt-4o refused, the others unaffected.
    assert_eq!(
        sum(&env
            .charge(&v, "total_tokens", Some("gpt-4o"), 10, now)
            .await),
        ok(0, 40)
    );
    // reset_in: cur 100 of 100, need 1: 40 s to the window's end, then
    // t = 60 - floor(99 * 60 / 100) = 60 - floor(59.4) = 1: 40 + 1 = 41.
    let s = env.request(&v, Some("gpt-4o-2024-08-06"), 1, now).await;
    assert_eq!(sum(&s), over(41, TOK_LIMIT));
    assert_eq!(lim(&s), gpt4o);
    assert_eq!(
        sum(&env.request(&v, Some("gpt-4o-mini"), 1, now).await),
        ok(500, 40)
    );
    assert_eq!(
        sum(&env.request(&v, Some("claude-3-opus"), 1, now).await),
        ok(10, 40)
    );
    // The default counter over (40 + 15 = 55 > 50): every unlisted model
    // and model-less request is refused; gpt-4o-mini still passes.
    // reset_in: cur 55, need 1: 40 + (60 - floor(49 * 60 / 55)) =
    // 40 + (60 - floor(53.45)) = 40 + 7 = 47.
    let s = env
        .charge(&v, "total_tokens", Some("llama-3"), 15, now)
        .await;
    assert_eq!(sum(&s), over(47, TOK_LIMIT));
    assert_eq!(lim(&s), default);
    assert_eq!(
        sum(&env.request(&v, None, 1, now).await),
        over(47, TOK_LIMIT)
    );
    assert_eq!(
        sum(&env.request(&v, Some("claude-3-5-sonnet"), 1, now).await),
        over(47, TOK_LIMIT)
    );
    assert_eq!(
        sum(&env.request(&v, Some("gpt-4o-mini"), 1, now).await),
        ok(500, 40)
    );
}

// ----------------------------------------------------------- 7: spend --

fn spend_plan(name: &str) -> Plan {
    let mut p = plan(
        name,
        vec![limit(
            "budget",
            Metric::Spend,
            TokenCount::Total,
            1_000_000,
            LimitWindow::Day,
        )],
    );
    p.prices = BTreeMap::from([(
        "gpt-4o*".to_owned(),
        Price {
            input_per_million: 2_500_000,
            output_per_million: 10_000_000,
        },
    )]);
    p
}

#[tokio::test]
async fn spend_accumulates_exact_micro_units_and_refuses_when_spent() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key(spend_plan("spend")).await;
    // 2026-01-01 18:00 UTC: 6 h = 21_600 s to the end of the day.
    let t = at(2026, 1, 1, 18, 0, 0);
    let g = Some("gpt-4o");

    // 100k input at 2.50/M = 250_000; 50k output at 10.00/M = 500_000.
    let s = env.charge(&v, "input_tokens", g, 100_000, t).await;
    assert_eq!(sum(&s), ok(750_000, 21_600));
    assert_eq!(lim(&s), l(1_000_000, Unit::Day, "spend/budget"));
    assert_eq!(
        sum(&env
            .charge(&v, "output_tokens", Some("gpt-4o-2024-08-06"), 50_000, t)
            .await),
        ok(250_000, 21_600)
    );
    // Requests do not spend.
    assert_eq!(sum(&env.request(&v, g, 1, t).await), ok(250_000, 21_600));
    // A model without a price adds 0.
    assert_eq!(
        sum(&env
            .charge(&v, "input_tokens", Some("claude-3"), 1_000_000, t)
            .await),
        ok(250_000, 21_600)
    );
    assert_eq!(
        sum(&env.charge(&v, "output_tokens", None, 1_000_000, t).await),
        ok(250_000, 21_600)
    );
    // 25k output = 250_000: exactly spent, still OK.
    assert_eq!(
        sum(&env.charge(&v, "output_tokens", g, 25_000, t).await),
        ok(0, 21_600)
    );
    // Spent: requests are refused, whatever the model (one budget).
    for model in [g, Some("claude-3"), None] {
        let s = env.request(&v, model, 1, t).await;
        assert_eq!(sum(&s), over(21_600, BUDGET), "{model:?}");
        assert_eq!(lim(&s), l(1_000_000, Unit::Day, "spend/budget"));
    }
    // One more input token (3 micro-units) is counted over the budget.
    assert_eq!(
        sum(&env.charge(&v, "input_tokens", g, 1, t).await),
        over(21_600, BUDGET)
    );
    // The next day, a new budget (24 h).
    assert_eq!(
        sum(&env.request(&v, g, 1, at(2026, 1, 2, 0, 0, 0)).await),
        ok(1_000_000, 86_400)
    );
}

/// A catch-all price (`*`) prices usage that names no model too (a gateway
/// that sends no model entry); a pattern that needs characters does not.
#[tokio::test]
async fn a_catch_all_price_charges_usage_without_a_model() {
    let env = Env::new();
    let mut p = spend_plan("spend-any");
    p.prices.insert(
        "*".to_owned(),
        Price {
            input_per_million: 1_000_000,
            output_per_million: 2_000_000,
        },
    );
    let (_, _, v) = env.plan_and_key(p).await;
    let t = at(2026, 1, 1, 18, 0, 0);
    // 1000 input tokens at 1.00/M = 1000 micro-units.
    assert_eq!(
        sum(&env.charge(&v, "input_tokens", None, 1000, t).await),
        ok(999_000, 21_600)
    );
    // gpt-4o still has its own (longer) pattern: 1000 at 2.50/M = 2500.
    assert_eq!(
        sum(&env
            .charge(&v, "input_tokens", Some("gpt-4o"), 1000, t)
            .await),
        ok(996_500, 21_600)
    );
}

/// A charge above the per-call maximum (1e9 tokens), e.g. a gateway bug
/// sending u64::MAX as hits_addend, is refused as an invalid request and
/// counts nothing; one at the maximum is counted.
#[tokio::test]
async fn a_charge_above_the_maximum_is_refused_and_counts_nothing() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key(plan("cap", vec![tpm("tpm", 2_000_000_000)]))
        .await;
    let t = w(10);
    for tokens in [u64::MAX, 1_000_000_001] {
        let s = env.charge(&v, "total_tokens", None, tokens, t).await;
        assert_eq!(s.code, Code::OverLimit, "{tokens}: {s:?}");
        assert_eq!(s.reason, Some(Reason::InvalidRequest), "{tokens}: {s:?}");
    }
    // Nothing was counted: a check sees the whole limit.
    assert_eq!(
        sum(&env.request(&v, None, 0, t).await),
        ok(2_000_000_000, 50)
    );
    let s = env.charge(&v, "total_tokens", None, 1_000_000_000, t).await;
    assert_eq!(sum(&s), ok(1_000_000_000, 50), "1e9 of 2e9 left");
}

/// OpenAI clients read `x-ratelimit-*-tokens` as tokens: a spend budget,
/// even a spent one, never shows there; the token limit does.
#[tokio::test]
async fn openai_token_headers_show_token_limits_never_the_budget() {
    let env = Env::new();
    let mut p = spend_plan("mixed");
    p.limits.push(tpm("tpm", 100_000));
    let (_, _, v) = env.plan_and_key(p).await;
    let t = at(2026, 1, 1, 18, 0, 0);
    let g = Some("gpt-4o");
    // 100k output tokens at 10.00/M = 1_000_000: the budget is spent; the
    // minute's tokens too (100k of 100k).
    env.charge(&v, "output_tokens", g, 100_000, t).await;
    // A minute later the token limit's window has moved on (its sliding
    // share is what is left of the last minute); the budget is still spent.
    let d = env.request_d(&v, g, 0, t + 120 * S).await;
    assert_eq!(hdr(&d, "x-ratelimit-limit-tokens"), Some("100000"));
    assert_eq!(hdr(&d, "x-ratelimit-remaining-tokens"), Some("100000"));
    let s = &d.statuses[0];
    assert_eq!(sum(s), over(21_480, BUDGET));
}

#[tokio::test]
async fn spend_rounds_up_per_charge() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key(spend_plan("round")).await;
    let t = at(2026, 1, 1, 18, 0, 0);
    let g = Some("gpt-4o-mini");
    // (kind, tokens, cost): 1 input = 2.5 -> 3; again 3 (rounded per
    // charge, not 5 for the two); 2 input = 5 exactly; 1 total token at
    // the output price = 10; 3 output = 30.
    let mut left = 1_000_000u32;
    for (kind, n, cost) in [
        ("input_tokens", 1, 3),
        ("input_tokens", 1, 3),
        ("input_tokens", 2, 5),
        ("total_tokens", 1, 10),
        ("output_tokens", 3, 30),
    ] {
        left -= cost;
        assert_eq!(
            sum(&env.charge(&v, kind, g, n, t).await),
            ok(left, 21_600),
            "{kind} {n}"
        );
    }
    assert_eq!(left, 999_949);
}

// --------------------------------------------------- 8: customer scope --

/// The `ratelimit` (IETF) entry of `name`: `r=..;t=..`.
fn ietf_entry<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    let want = format!("\"{name}\";");
    hdr(d, "ratelimit")?
        .split(", ")
        .find_map(|e| e.strip_prefix(want.as_str()))
}

#[tokio::test]
async fn customer_scope_is_shared_by_keys_of_one_customer() {
    let env = Env::new();
    let mut cust = tpm("cust", 100);
    cust.scope = Scope::Customer;
    let mut p = plan("cs", vec![cust, tpm("per-key", 60)]);
    p.header_style = HeaderStyle::Ietf;
    let p = env.plan(p).await;
    let (_, a) = env.key("cs-a", "acme", &p.id).await;
    let (_, b) = env.key("cs-b", "acme", &p.id).await;
    let (_, c) = env.key("cs-c", "", &p.id).await;
    let (_, d) = env.key("cs-d", "", &p.id).await;
    let now = w(30); // reset_in 30

    // A spends its per-key limit (60 of 60) and 60 of acme's 100.
    let s = env.charge(&a, "total_tokens", None, 60, now).await;
    assert_eq!(sum(&s), ok(0, 30));
    assert_eq!(lim(&s), l(60, Unit::Minute, "cs/per-key"));
    // reset_in: cur 60 of 60, need 1: 30 s to the window's end, then
    // t = 60 - floor(59 * 60 / 60) = 1: 30 + 1 = 31.
    let s = env.request(&a, None, 1, now).await;
    assert_eq!(sum(&s), over(31, TOK_LIMIT));
    assert_eq!(lim(&s), l(60, Unit::Minute, "cs/per-key"));

    // B: its own per-key counter, acme's shared one (40 left).
    let dec = env.request_d(&b, None, 1, now).await;
    assert_eq!(sum(&dec.statuses[0]), ok(40, 30));
    assert_eq!(
        lim(&dec.statuses[0]),
        l(100, Unit::Minute, "cs/customer/cust")
    );
    // t: full once what was counted slides out: this window's end (30 s)
    // plus one window; B's own counter, unused, is full now.
    assert_eq!(ietf_entry(&dec, "cs/customer/cust"), Some("r=40;t=90"));
    assert_eq!(ietf_entry(&dec, "cs/per-key"), Some("r=60;t=0"));
    // B spends the rest of acme's limit: now B is refused by the customer
    // limit ...
    assert_eq!(
        sum(&env.charge(&b, "total_tokens", None, 40, now).await),
        ok(0, 30)
    );
    // reset_in: cur 100 of 100, need 1: 30 + (60 - floor(99 * 60 / 100)) =
    // 30 + (60 - floor(59.4)) = 31.
    let s = env.request(&b, None, 1, now).await;
    assert_eq!(sum(&s), over(31, TOK_LIMIT_CUSTOMER));
    assert_eq!(lim(&s), l(100, Unit::Minute, "cs/customer/cust"));
    // ... and so is A (the customer limit is listed first; also 31).
    assert_eq!(
        sum(&env.request(&a, None, 1, now).await),
        over(31, TOK_LIMIT_CUSTOMER)
    );

    // C and D have no customer_id: each is its own customer.
    let dec = env.request_d(&c, None, 1, now).await;
    assert_eq!(sum(&dec.statuses[0]), ok(60, 30));
    // Unused: full now.
    assert_eq!(ietf_entry(&dec, "cs/customer/cust"), Some("r=100;t=0"));
    // C charges 70: over its per-key limit (70 > 60), within its own
    // customer limit (70 <= 100). reset_in: cur 70, need 1:
    // 30 + (60 - floor(59 * 60 / 70)) = 30 + (60 - floor(50.57)) = 40.
    assert_eq!(
        sum(&env.charge(&c, "total_tokens", None, 70, now).await),
        over(40, TOK_LIMIT)
    );
    let dec = env.request_d(&d, None, 1, now).await;
    assert_eq!(sum(&dec.statuses[0]), ok(60, 30));
    assert_eq!(ietf_entry(&dec, "cs/customer/cust"), Some("r=100;t=0"));
    assert_eq!(ietf_entry(&dec, "cs/per-key"), Some("r=60;t=0"));
}

// ------------------------------ 9: charges skip the throttle and quota --

#[tokio::test]
async fn charges_do_not_touch_throttle_or_quota() {
    let env = Env::new();
    let mut p = plan("nt", vec![tpm("tpm", 1000)]);
    p.throttle = throttle(0.001, 1);
    p.quota = daily_quota(100);
    let (p, k, v) = env.plan_and_key(p).await;
    let now = w(30);

    // The request takes the only token (1000 s per token): the throttle is
    // binding with 0 left, full again in 1000 s.
    assert_eq!(sum(&env.request(&v, None, 1, now).await), ok(0, 1000));
    assert_eq!(
        sum(&env.request(&v, None, 1, now).await),
        over(1000, Reason::Throttled)
    );
    assert_eq!(env.quota(&p.id, &k.id, now / S).await.used, 1);
    // Charges pass the empty throttle and report the token limit.
    let s = env.charge(&v, "total_tokens", None, 300, now).await;
    assert_eq!(sum(&s), ok(700, 30));
    assert_eq!(lim(&s), l(1000, Unit::Minute, "nt/tpm"));
    // 300 + 800 = 1100 > 1000. reset_in: cur 1100, need 1:
    // 30 + (60 - floor(999 * 60 / 1100)) = 30 + (60 - floor(54.49)) = 36.
    assert_eq!(
        sum(&env.charge(&v, "output_tokens", None, 800, now).await),
        over(36, TOK_LIMIT)
    );
    // The quota is unchanged.
    assert_eq!(env.quota(&p.id, &k.id, now / S).await.used, 1);
}

// -------------------------------- 10: a token refusal rolls back counts --

#[tokio::test]
async fn token_refusal_rolls_back_quota_request_limit_and_throttle() {
    let env = Env::new();
    let mut p = plan("rb", vec![rpm("rpm", 5), tpm("tpm", 100)]);
    p.throttle = throttle(0.001, 2);
    p.quota = daily_quota(10);
    p.header_style = HeaderStyle::Ietf;
    let (p, k, v) = env.plan_and_key(p).await;
    let now = w(30);

    assert_eq!(
        sum(&env.charge(&v, "total_tokens", None, 100, now).await),
        ok(0, 30)
    );
    // The throttle, quota and rpm admit it; tpm (100 of 100) refuses.
    // reset_in: cur 100, need 1: 30 + (60 - floor(99 * 60 / 100)) = 31.
    let d = env.request_d(&v, None, 1, now).await;
    assert_eq!(sum(&d.statuses[0]), over(31, TOK_LIMIT));
    // The throttle's token was given back: the bucket is full, t=0.
    assert_eq!(ietf_entry(&d, "rb/throttle"), Some("r=2;t=0"));
    assert_eq!(env.quota(&p.id, &k.id, now / S).await.used, 0);

    env.registry
        .update_plan(
            &p.id,
            |p| {
                p.limits[1].limit = 1000;
                Ok(())
            },
            ADMIN_NOW,
        )
        .await
        .unwrap();
    // Same instant: 1 of 2 throttle tokens left (the refused call's token
    // was given back), quota 9 of 10, rpm 4 of 5, tpm 900 of 1000.
    // Reset: throttle 1000 s to refill one token; quota to midnight,
    // 14 h - 30 s = 50_370 s; the minute windows 30 s.
    let d = env.request_d(&v, None, 1, now).await;
    assert_eq!(sum(&d.statuses[0]), ok(1, 1000));
    assert_eq!(
        d.headers,
        headers(&[
            (
                "ratelimit-policy",
                "\"rb/throttle\";q=2;w=2000, \"rb/quota\";q=10;w=86400, \"rb/rpm\";q=5;w=60, \
                 \"rb/tpm\";q=1000;w=60;sluice-unit=\"tokens\""
            ),
            (
                "ratelimit",
                "\"rb/throttle\";r=1;t=1000, \"rb/quota\";r=9;t=50370, \"rb/rpm\";r=4;t=90, \
                 \"rb/tpm\";r=900;t=90"
            ),
        ])
    );
    assert_eq!(env.quota(&p.id, &k.id, now / S).await.used, 1);
}

// ------------------------------------------------ 11: unknown usage kind --

#[tokio::test]
async fn unknown_usage_kind_is_an_invalid_request_and_counts_nothing() {
    let env = Env::new();
    let mut p = plan("uk", vec![rpm("rpm", 5), tpm("tpm", 1000)]);
    p.throttle = throttle(0.001, 1);
    p.quota = daily_quota(10);
    p.header_style = HeaderStyle::Ietf;
    let (p, k, v) = env.plan_and_key(p).await;
    let now = w(30);

    let s = env.charge(&v, "foo", None, 500, now).await;
    assert_eq!(
        s,
        Status {
            code: Code::OverLimit,
            limit: None,
            remaining: 0,
            // An invalid request carries no reset (no retry-after).
            reset_in: None,
            reason: Some(Reason::InvalidRequest),
        }
    );
    assert_eq!(env.quota(&p.id, &k.id, now / S).await.used, 0);
    // Nothing was taken: the single throttle token is still there.
    let d = env.request_d(&v, None, 1, now).await;
    assert_eq!(sum(&d.statuses[0]), ok(0, 1000));
    assert_eq!(
        hdr(&d, "ratelimit"),
        Some(
            "\"uk/throttle\";r=0;t=1000, \"uk/quota\";r=9;t=50370, \"uk/rpm\";r=4;t=90, \
             \"uk/tpm\";r=1000;t=0"
        )
    );
}

// ------------------------------------------------------------ 12: headers --

#[tokio::test]
async fn openai_headers_report_the_binding_limits_and_tokens_go_down() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key(plan("hd", vec![rpm("rpm", 3), tpm("tpm", 1000)]))
        .await;

    // Resets: when each limit is full again, for the request counted at
    // second 20 one window after this one ends (40 s + 60 s); the unused
    // token limit is full now.
    let d = env.request_d(&v, None, 1, w(20)).await;
    assert_eq!(
        d.headers,
        headers(&[
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "2"),
            ("x-ratelimit-reset-requests", "1m40s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-reset-tokens", "0s"),
        ])
    );
    // After a charge of 250 tokens the remaining tokens go down, in the
    // charge's own answer and in the next request's.
    let d = env.charge_d(&v, "total_tokens", None, 250, w(20)).await;
    assert_eq!(hdr(&d, "x-ratelimit-remaining-tokens"), Some("750"));
    assert_eq!(hdr(&d, "x-ratelimit-remaining-requests"), Some("2"));
    let d = env.request_d(&v, None, 1, w(25)).await;
    assert_eq!(
        d.headers,
        headers(&[
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "1"),
            ("x-ratelimit-reset-requests", "1m35s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "750"),
            ("x-ratelimit-reset-tokens", "1m35s"),
        ])
    );
    assert_eq!(hdr(&d, "retry-after"), None);
    // Over the token limit (250 + 800 = 1050 > 1000). retry-after: cur
    // 1050, need 1: 35 + (60 - floor(999 * 60 / 1050)) =
    // 35 + (60 - floor(57.09)) = 38.
    let d = env.charge_d(&v, "output_tokens", None, 800, w(25)).await;
    assert_eq!(hdr(&d, "x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(hdr(&d, "retry-after"), Some("38"));
}

#[tokio::test]
async fn openai_headers_on_a_refusal_report_what_is_left_after_rollback() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key(plan("hr", vec![rpm("rpm", 3), tpm("tpm", 1000)]))
        .await;
    assert_eq!(sum(&env.request(&v, None, 1, w(20)).await), ok(2, 40));
    assert_eq!(
        sum(&env.charge(&v, "total_tokens", None, 1000, w(20)).await),
        ok(0, 40)
    );
    // Refused by tpm: the request's rpm count is rolled back, so 2 requests
    // are left, as the next check-only call confirms.
    // reset_in: cur 1000, need 1: 34 + (60 - floor(999 * 60 / 1000)) =
    // 34 + (60 - floor(59.94)) = 35.
    let d = env.request_d(&v, None, 1, w(26)).await;
    assert_eq!(sum(&d.statuses[0]), over(35, TOK_LIMIT));
    assert_eq!(hdr(&d, "retry-after"), Some("35"));
    assert_eq!(hdr(&d, "x-ratelimit-remaining-tokens"), Some("0"));
    let check = env.request_d(&v, None, 0, w(26)).await;
    assert_eq!(hdr(&check, "x-ratelimit-remaining-requests"), Some("2"));
    assert_eq!(
        hdr(&d, "x-ratelimit-remaining-requests"),
        Some("2"),
        "the refused request's header counts the call it rolled back: {:?}",
        d.headers
    );
}

#[tokio::test]
async fn ietf_headers_list_every_policy_and_none_adds_nothing() {
    let env = Env::new();
    let mut p = plan("hi", vec![rpm("rpm", 3), tpm("tpm", 1000)]);
    p.header_style = HeaderStyle::Ietf;
    let (_, _, v) = env.plan_and_key(p).await;
    let d = env.request_d(&v, None, 1, w(20)).await;
    assert_eq!(
        d.headers,
        headers(&[
            (
                "ratelimit-policy",
                "\"hi/rpm\";q=3;w=60, \"hi/tpm\";q=1000;w=60;sluice-unit=\"tokens\""
            ),
            // t: when each is full again: the request counted at second 20
            // slides out one window after this one ends (40 + 60); the
            // unused token limit is full now.
            ("ratelimit", "\"hi/rpm\";r=2;t=100, \"hi/tpm\";r=1000;t=0"),
        ])
    );
    // A refusal adds retry-after: cur 3 of 3, need 1:
    // 40 + (60 - floor(2 * 60 / 3)) = 40 + 20 = 60.
    env.request(&v, None, 2, w(20)).await;
    let d = env.request_d(&v, None, 1, w(20)).await;
    assert_eq!(sum(&d.statuses[0]), over(60, REQ_LIMIT));
    assert_eq!(hdr(&d, "retry-after"), Some("60"));
    assert!(hdr(&d, "x-ratelimit-limit-requests").is_none());

    // Both styles.
    let mut p = plan("hb", vec![rpm("rpm", 3)]);
    p.header_style = HeaderStyle::Both;
    let (_, _, vb) = env.plan_and_key(p).await;
    let d = env.request_d(&vb, None, 1, w(20)).await;
    assert_eq!(
        d.headers,
        headers(&[
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "2"),
            ("x-ratelimit-reset-requests", "1m40s"),
            ("ratelimit-policy", "\"hb/rpm\";q=3;w=60"),
            ("ratelimit", "\"hb/rpm\";r=2;t=100"),
        ])
    );

    // NONE: no headers, not even retry-after on a refusal.
    let mut p = plan("hn", vec![rpm("rpm", 1)]);
    p.header_style = HeaderStyle::None;
    let (_, _, vn) = env.plan_and_key(p).await;
    let d = env.request_d(&vn, None, 1, w(20)).await;
    assert_eq!(sum(&d.statuses[0]), ok(0, 40));
    assert!(d.headers.is_empty(), "{:?}", d.headers);
    // reset_in: cur 1 of 1, need 1: 40 + (60 - floor(0 * 60 / 1)) = 100
    // (the one request must slide out entirely: W+120).
    let d = env.request_d(&vn, None, 1, w(20)).await;
    assert_eq!(sum(&d.statuses[0]), over(100, REQ_LIMIT));
    assert!(d.headers.is_empty(), "{:?}", d.headers);
}

// --------------------------------------------------------- 13: property --

/// One step: delay in ms, then a request (`Some(hits)`, 0 = check only) or
/// a charge of `total_tokens` (`None`, tokens).
type Step = (i64, Option<u64>, u64);

fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            prop_oneof![3 => Just(0i64), 3 => 0i64..5_000, 1 => 5_000i64..40_000],
            prop_oneof![
                4 => Just(Some(1u64)),
                1 => Just(Some(2u64)),
                1 => Just(Some(0u64)),
                2 => Just(None),
            ],
            0u64..400,
        ),
        1..80,
    )
}

/// Runs `steps` from `t0`; returns (time in us, request hits or None for a
/// charge, status).
fn simulate(limit_n: u64, t0: i64, steps: &[Step]) -> Vec<(i64, Option<u64>, Status)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::new();
        let (_, _, v) = env
            .plan_and_key(plan("prop", vec![rpm("rpm", limit_n), tpm("tpm", 1000)]))
            .await;
        let mut now = t0;
        let mut out = Vec::with_capacity(steps.len());
        for &(delay_ms, req, tokens) in steps {
            now += delay_ms * MS;
            let s = match req {
                Some(hits) => env.request(&v, None, hits, now).await,
                None => env.charge(&v, "total_tokens", None, tokens, now).await,
            };
            out.push((now, req, s));
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Allowed requests never exceed the limit in a fixed minute, and the
    /// sliding estimate `previous * weight + current` never exceeds
    /// `limit + 1` at any second; request refusals happen exactly when the
    /// estimate (rounded up) plus the hits would exceed the limit.
    #[test]
    fn sliding_request_limit_holds(
        limit_n in 1u64..8,
        start_ms in 0i64..60_000,
        steps in steps_strategy(),
    ) {
        let t0 = w(0) + start_ms * MS;
        let out = simulate(limit_n, t0, &steps);
        let mut allowed: Vec<(i64, u64)> = Vec::new();
        for (t, req, s) in &out {
            let secs = t.div_euclid(S);
            match req {
                None => prop_assert!(
                    matches!(s.reason, None | Some(Reason::TokenLimit { customer: false })),
                    "charge at {secs}: {s:?}"
                ),
                Some(hits) => {
                    // The request limit's view before this call.
                    let start = secs - secs.rem_euclid(60);
                    let into = u64::try_from(secs - start).unwrap();
                    let prev: u64 = allowed.iter().filter(|(a, _)| (start - 60..start).contains(a)).map(|(_, h)| h).sum();
                    let cur: u64 = allowed.iter().filter(|(a, _)| (start..=secs).contains(a)).map(|(_, h)| h).sum();
                    let share = (prev * (60 - into)).div_ceil(60);
                    let fits = if *hits == 0 {
                        share + cur < limit_n
                    } else {
                        share + cur + hits <= limit_n
                    };
                    if fits {
                        prop_assert!(
                            matches!(s.reason, None | Some(Reason::TokenLimit { customer: false })),
                            "request {hits} at {secs} (share {share}, cur {cur}): {s:?}"
                        );
                    } else {
                        prop_assert_eq!(s.reason, Some(REQ_LIMIT), "request {} at {}", hits, secs);
                    }
                    if s.code == Code::Ok && *hits > 0 {
                        allowed.push((secs, *hits));
                    }
                }
            }
        }
        // Per fixed minute window.
        let mut per_window: BTreeMap<i64, u64> = BTreeMap::new();
        for (t, h) in &allowed {
            *per_window.entry(t.div_euclid(60)).or_default() += h;
        }
        for (win, n) in &per_window {
            prop_assert!(*n <= limit_n, "window {win}: {n} > {limit_n}");
        }
        // The estimate at every second of the run (times 60, exact): the
        // bound asked for is limit + 1 (rounding); the one observed is the
        // limit itself (the limiter rounds the previous share up).
        let (first, last) = (t0.div_euclid(S), out.last().unwrap().0.div_euclid(S));
        for s in first..=last {
            let e = estimate_x60(&allowed, s);
            prop_assert!(e <= (limit_n + 1) * 60, "second {s}: estimate {e}/60 > {limit_n} + 1");
            prop_assert!(e <= limit_n * 60, "second {s}: estimate {e}/60 > {limit_n}");
        }
    }
}

// ------------------- a stage's default usage: the Envoy AI Gateway case --

/// Envoy AI Gateway sends the same descriptors twice: at request time with
/// hits_addend 0 and when the stream is done with the token count, with no
/// entry to tell them apart. A stage with `default_usage: total_tokens`
/// reads the first as a check and the second as a charge.
#[tokio::test]
async fn a_stage_default_usage_turns_plain_descriptors_into_checks_and_charges() {
    let env = Env::new();
    let mut p = plan("aigw", vec![tpm("tpm", 1000)]);
    p.stages[0].default_usage = "total_tokens".into();
    let (_, _, v) = env.plan_and_key(p).await;
    let t = w(10);
    let call = |hits: u64| env.decide(vec![desc(&[("api_key", &v)], hits)], t);
    // Request time (hits 0): a check, 1000 left, nothing counted.
    let d = call(0).await;
    assert_eq!(sum(&d.statuses[0]), ok(1000, 50));
    // Stream done with 600 tokens: a charge.
    let d = call(600).await;
    assert_eq!(sum(&d.statuses[0]), ok(400, 50));
    assert_eq!(sum(&call(0).await.statuses[0]), ok(400, 50));
    // Another 600 tokens are counted even though they exceed the limit.
    let d = call(600).await;
    assert_eq!(d.statuses[0].code, sluice::engine::Code::OverLimit);
    // The next request-time check is refused: 1200 of 1000 used.
    let d = call(0).await;
    assert_eq!(d.statuses[0].code, sluice::engine::Code::OverLimit);
    assert_eq!(d.statuses[0].reason, Some(TOK_LIMIT));
}

/// In a stage with a default usage kind, the request-time check (hits 0)
/// counts the request: Envoy AI Gateway sends it once per request, and no
/// other call would count requests, so without this a plan's throttle,
/// quota and request limits would never count behind AI Gateway. The
/// charges after the response count tokens only.
#[tokio::test]
async fn a_default_usage_check_counts_the_request_in_throttle_quota_and_request_limits() {
    let env = Env::new();
    let mut p = plan("aigw-req", vec![rpm("rpm", 3), tpm("tpm", 1_000_000)]);
    p.stages[0].default_usage = "total_tokens".into();
    p.quota = daily_quota(2);
    let (p, k, v) = env.plan_and_key(p).await;
    let t = w(10);
    let call = |hits: u64| env.decide(vec![desc(&[("api_key", &v)], hits)], t);
    for _ in 0..2 {
        assert_eq!(call(0).await.statuses[0].code, sluice::engine::Code::Ok);
        // The charge after the response: tokens only.
        assert_eq!(call(500).await.statuses[0].code, sluice::engine::Code::Ok);
    }
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 2);
    // The third request is over the daily quota of 2.
    let d = call(0).await;
    assert_eq!(d.statuses[0].code, sluice::engine::Code::OverLimit);
    assert_eq!(d.statuses[0].reason, Some(Reason::QuotaExceeded));
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 2);
}

/// The same for the throttle: the check takes a token, charges never do.
#[tokio::test]
async fn a_default_usage_check_takes_a_throttle_token_and_charges_do_not() {
    let env = Env::new();
    let mut p = plan("aigw-thr", vec![tpm("tpm", 1_000_000)]);
    p.stages[0].default_usage = "total_tokens".into();
    p.throttle = throttle(0.001, 1);
    let (_, _, v) = env.plan_and_key(p).await;
    let t = w(10);
    let call = |hits: u64| env.decide(vec![desc(&[("api_key", &v)], hits)], t);
    assert_eq!(call(0).await.statuses[0].code, sluice::engine::Code::Ok);
    assert_eq!(call(700).await.statuses[0].code, sluice::engine::Code::Ok);
    // Burst 1, one token a 1000 s: the next request waits.
    let d = call(0).await;
    assert_eq!(d.statuses[0].reason, Some(Reason::Throttled));
}
