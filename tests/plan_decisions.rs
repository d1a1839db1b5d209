//! Usage-plan decisions through the library API with an injected clock: no
//! network, no wall clock. Every time is a literal instant (Unix
//! microseconds) built from a civil UTC date by an independent
//! days-from-civil helper, and every expected `remaining` / `reset_in` below
//! was computed by hand (the arithmetic is in the comments).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use sluice::engine::{Code, Decision, Descriptor, Entry, Reason, Request, Status, Unit};
use sluice::limiter::{DayUsage, QuotaState, RateLimiter};
use sluice::plans::catalog::CompiledPlan;
use sluice::plans::model::{
    ApiKey, PeriodKind, Plan, Quota, Stage, Throttle, DEFAULT_KEY_ENTRY, DEFAULT_METHOD_ENTRY,
    DEFAULT_PATH_ENTRY,
};
use sluice::plans::period::{Calendar, Period, Span};
use sluice::plans::registry::Registry;
use sluice::plans::Error as PlanError;
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

#[test]
fn the_clock_helper_agrees_with_known_instants() {
    assert_eq!(utc(1970, 1, 1, 0, 0, 0), 0);
    assert_eq!(utc(2026, 1, 1, 0, 0, 0), 1_767_225_600);
    assert_eq!(utc(2026, 3, 8, 0, 0, 0), 1_772_928_000);
    assert_eq!(utc(2027, 2, 28, 0, 0, 0), 1_803_772_800);
    assert_eq!(utc(2027, 3, 31, 0, 0, 0), 1_806_451_200);
    assert_eq!(utc(2026, 11, 1, 0, 0, 0), 1_793_491_200);
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

    /// Creates a key with `value` (20+ characters), bound to `plan` if given.
    async fn key(&self, name: &str, value: &str, plan: Option<&str>) -> ApiKey {
        let (k, v) = self
            .registry
            .create_key(api_key(name), Some(value.to_owned()), ADMIN_NOW)
            .await
            .unwrap();
        assert_eq!(v, value);
        if let Some(p) = plan {
            self.registry.bind(p, &k.id, ADMIN_NOW).await.unwrap();
        }
        self.registry.get_key(&k.id).unwrap()
    }

    /// A plan with the given limits over `DOMAIN`, and one key bound to it.
    /// Returns (plan, key, key value).
    async fn plan_and_key(
        &self,
        name: &str,
        throttle: Option<(f64, u32)>,
        quota: Option<(u64, PeriodKind, u32, &str)>,
    ) -> (Plan, ApiKey, String) {
        let p = self.plan(plan(name, throttle, quota)).await;
        let value = value_of(name);
        let k = self.key(&format!("{name}-key"), &value, Some(&p.id)).await;
        (p, k, value)
    }

    async fn decide_in(&self, domain: &str, descriptors: Vec<Descriptor>, now_us: i64) -> Decision {
        let req = Request {
            domain: domain.into(),
            descriptors,
            hits_addend: 0,
        };
        let d = self.limiter.decide(&req, now_us).await.unwrap();
        assert_eq!(d.statuses.len(), req.descriptors.len());
        let over = d.statuses.iter().any(|s| s.code == Code::OverLimit);
        assert_eq!(d.overall == Code::OverLimit, over, "overall code: {d:?}");
        d
    }

    /// One descriptor with `entries` and `hits` in `domain`.
    async fn one(&self, domain: &str, entries: &[(&str, &str)], hits: u64, now_us: i64) -> Status {
        self.decide_in(domain, vec![desc(entries, hits)], now_us)
            .await
            .statuses
            .remove(0)
    }

    /// One call of `hits` with the API key `value` in `DOMAIN`.
    async fn call(&self, value: &str, hits: u64, now_us: i64) -> Status {
        self.one(DOMAIN, &[(DEFAULT_KEY_ENTRY, value)], hits, now_us)
            .await
    }

    fn compiled(&self, plan_id: &str) -> Arc<CompiledPlan> {
        self.limiter.catalog().plan(plan_id).unwrap().clone()
    }

    async fn quota(&self, plan_id: &str, key_id: &str, now_s: i64) -> QuotaState {
        self.limiter
            .quota_state(&self.compiled(plan_id), key_id, now_s)
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

fn plan(
    name: &str,
    throttle: Option<(f64, u32)>,
    quota: Option<(u64, PeriodKind, u32, &str)>,
) -> Plan {
    Plan {
        id: String::new(),
        name: name.into(),
        description: String::new(),
        throttle: throttle.map(|(rate_limit, burst_limit)| Throttle {
            rate_limit,
            burst_limit,
        }),
        quota: quota.map(|(limit, period, anchor_day, tz)| Quota {
            limit,
            period,
            anchor_day,
            time_zone: tz.into(),
        }),
        stages: vec![stage(DOMAIN)],
        tags: BTreeMap::new(),
        create_time: 0,
        update_time: 0,
        limits: Vec::new(),
        prices: BTreeMap::new(),
        header_style: Default::default(),
        retired_limits: BTreeMap::new(),
    }
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

fn ok(remaining: u32, reset_in: u64) -> Summary {
    (Code::Ok, remaining, Some(reset_in), None)
}

fn throttled(reset_in: u64) -> Summary {
    (Code::OverLimit, 0, Some(reset_in), Some(Reason::Throttled))
}

fn quota_exceeded(reset_in: u64) -> Summary {
    (
        Code::OverLimit,
        0,
        Some(reset_in),
        Some(Reason::QuotaExceeded),
    )
}

fn invalid_key() -> Status {
    Status {
        code: Code::OverLimit,
        limit: None,
        remaining: 0,
        reset_in: None,
        reason: Some(Reason::InvalidKey),
    }
}

/// The status of a descriptor no limit applies to.
fn no_limit() -> Status {
    Status {
        code: Code::Ok,
        limit: None,
        remaining: 0,
        reset_in: None,
        reason: None,
    }
}

fn l(n: u32, unit: Unit, name: &str) -> Option<(u32, Unit, String)> {
    Some((n, unit, name.to_owned()))
}

/// Runs a table of (time, hits, expected) calls for one key value.
async fn run_table(env: &Env, value: &str, table: &[(i64, u64, Summary)]) {
    for (i, &(now, hits, want)) in table.iter().enumerate() {
        let got = env.call(value, hits, now).await;
        assert_eq!(
            sum(&got),
            want,
            "row {i} (t={now} us, hits={hits}): {got:?}"
        );
    }
}

// ------------------------------------------------------ 1-3: throttles --

#[tokio::test]
async fn throttle_burst_then_steady_rate() {
    let env = Env::new();
    let (p, _, a) = env.plan_and_key("steady", Some((10.0, 20)), None).await;
    let b_value = value_of("steady-b");
    env.key("steady-b", &b_value, Some(&p.id)).await;
    let t0 = at(2026, 1, 1, 10, 0, 0);

    // 25 calls at t0: the burst of 20 passes. After the i-th allowed call
    // the bucket is i * 100 ms away from full: remaining 20 - i, reset_in
    // ceil(i / 10) s. A refusal needs 1 more token = 100 ms -> 1 s.
    for value in [a.as_str(), b_value.as_str()] {
        let mut table = Vec::new();
        for i in 1..=20u32 {
            table.push((t0, 1, ok(20 - i, u64::from(i.div_ceil(10)))));
        }
        for _ in 21..=25 {
            table.push((t0, 1, throttled(1)));
        }
        run_table(&env, value, &table).await;
    }
    let s = env.call(&a, 1, t0).await;
    assert_eq!(lim(&s), l(10, Unit::Second, "steady/throttle"));

    // Key a: at t0 + 100 ms exactly one token is back (bucket 2.0 s from
    // full, then 2.0 s again after taking it: remaining 0, reset_in 2).
    run_table(
        &env,
        &a,
        &[
            (t0 + 100 * MS, 1, ok(0, 2)),
            (t0 + 100 * MS, 1, throttled(1)),
            // 1 us before the next token (due at t0 + 200 ms).
            (t0 + 200 * MS - 1, 1, throttled(1)),
            (t0 + 200 * MS, 1, ok(0, 2)),
        ],
    )
    .await;

    // Key b (20 used at t0, nothing since): at t0 + 1 s ten tokens are
    // back. The i-th call leaves 10 - i and puts the full time at
    // (2 + i/10) s - 1 s after now: reset_in ceil(1 + i/10) = 2.
    let t1 = t0 + S;
    let mut table: Vec<(i64, u64, Summary)> = (1..=10u32).map(|i| (t1, 1, ok(10 - i, 2))).collect();
    table.push((t1, 1, throttled(1)));
    run_table(&env, &b_value, &table).await;
}

#[tokio::test]
async fn fractional_rate_refills_every_two_seconds() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key("half", Some((0.5, 1)), None).await;
    let t0 = at(2026, 1, 1, 10, 0, 0);
    run_table(
        &env,
        &v,
        &[
            // One token, refilled in 2 s.
            (t0, 1, ok(0, 2)),
            (t0 + S, 1, throttled(1)),
            // 1 ms before the token: 0.001 s rounds up to 1.
            (t0 + 1_999 * MS, 1, throttled(1)),
            (t0 + 2 * S, 1, ok(0, 2)),
            (t0 + 2 * S, 1, throttled(2)),
        ],
    )
    .await;
    let s = env.call(&v, 1, t0 + 2 * S).await;
    assert_eq!(lim(&s), l(30, Unit::Minute, "half/throttle"));
    let s = env.call(&v, 1, t0 + 4 * S).await;
    assert_eq!(sum(&s), ok(0, 2));
    assert_eq!(lim(&s), l(30, Unit::Minute, "half/throttle"));
}

#[tokio::test]
async fn weighted_hits_and_check_only_calls_against_the_throttle() {
    let env = Env::new();
    let (_, _, v) = env.plan_and_key("weighted", Some((1.0, 10)), None).await;
    let t0 = at(2026, 1, 1, 10, 0, 0);
    run_table(
        &env,
        &v,
        &[
            // A check with a full bucket passes and takes nothing.
            (t0, 0, ok(10, 0)),
            (t0, 5, ok(5, 5)),
            (t0, 0, ok(5, 5)),
            (t0, 5, ok(0, 10)),
            // 5 hits need 5 tokens: 5 s away.
            (t0, 5, throttled(5)),
            // A check needs one token: 1 s away.
            (t0, 0, throttled(1)),
            // 1 s later one token: a check passes twice (consuming nothing),
            // 2 hits do not fit (1 s more), 1 hit does.
            (t0 + S, 0, ok(1, 9)),
            (t0 + S, 0, ok(1, 9)),
            (t0 + S, 2, throttled(1)),
            (t0 + S, 1, ok(0, 10)),
            // More hits than the burst never fit: reset_in is "never".
            (
                t0 + 100 * S,
                11,
                (
                    Code::OverLimit,
                    0,
                    Some(u64::from(u32::MAX)),
                    Some(Reason::Throttled),
                ),
            ),
            (t0 + 100 * S, 10, ok(0, 10)),
        ],
    )
    .await;
}

#[tokio::test]
async fn weighted_hits_and_check_only_calls_against_the_quota() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key("wq", None, Some((5, PeriodKind::Day, 0, "UTC")))
        .await;
    let t = at(2026, 1, 1, 23, 0, 0); // 1 h to midnight
    run_table(
        &env,
        &v,
        &[
            (t, 0, ok(5, 3600)),
            (t, 3, ok(2, 3600)),
            // 3 more would make 6 > 5: refused, and nothing is counted.
            (t, 3, quota_exceeded(3600)),
            (t, 0, ok(2, 3600)),
            (t, 2, ok(0, 3600)),
            // No unit left: a check fails too.
            (t, 0, quota_exceeded(3600)),
            (t + 3599 * S, 1, quota_exceeded(1)),
            (t + 3600 * S, 5, ok(0, 86_400)),
        ],
    )
    .await;
}

// ------------------------------------------------------ 4-8: calendars --

#[tokio::test]
async fn daily_quota_in_utc_resets_at_midnight() {
    let env = Env::new();
    let (_, k, v) = env
        .plan_and_key("daily", None, Some((3, PeriodKind::Day, 0, "UTC")))
        .await;
    // 10:17:23.5 UTC: 24 h - 37 043 s = 49 357 s to midnight.
    let t = at(2026, 1, 1, 10, 17, 23) + 500 * MS;
    let midnight = at(2026, 1, 2, 0, 0, 0);
    run_table(
        &env,
        &v,
        &[
            (t, 1, ok(2, 49_357)),
            (t, 1, ok(1, 49_357)),
            (t, 1, ok(0, 49_357)),
            (t, 1, quota_exceeded(49_357)),
            (midnight - 1, 1, quota_exceeded(1)),
            (midnight, 1, ok(2, 86_400)),
            (midnight + 86_399 * S, 1, ok(1, 1)),
        ],
    )
    .await;
    let s = env.call(&v, 1, t).await;
    assert_eq!(lim(&s), l(3, Unit::Day, "daily/quota"));
    let q = env
        .quota(
            &k.plan_ids.iter().next().unwrap().clone(),
            &k.id,
            midnight / S,
        )
        .await;
    assert_eq!(
        q,
        QuotaState {
            period: Span {
                start: midnight / S,
                end: midnight / S + DAY
            },
            used: 2,
            limit: 3,
            grant: 0
        }
    );
}

#[tokio::test]
async fn weekly_quota_anchor_monday_vs_sunday() {
    let env = Env::new();
    // 2026-03-02 is a Monday, 2026-03-08 a Sunday.
    let (_, _, mon) = env
        .plan_and_key("week-mon", None, Some((2, PeriodKind::Week, 1, "UTC")))
        .await;
    let (_, _, sun) = env
        .plan_and_key("week-sun", None, Some((2, PeriodKind::Week, 0, "UTC")))
        .await;
    let wed_noon = at(2026, 3, 4, 12, 0, 0);
    let sat_last = at(2026, 3, 7, 23, 59, 59);
    let sun_10 = at(2026, 3, 8, 10, 0, 0);
    let sun_last = at(2026, 3, 8, 23, 59, 59);
    let next_mon = at(2026, 3, 9, 0, 0, 0);

    // Anchor 1: the week is [Mon 03-02, Mon 03-09).
    run_table(
        &env,
        &mon,
        &[
            // 4.5 days to Monday.
            (wed_noon, 1, ok(1, 388_800)),
            // Sunday still counts in the week that started on Monday 03-02.
            (sun_10, 1, ok(0, 50_400)),
            (sun_last, 1, quota_exceeded(1)),
            // Monday 00:00:00 starts a new week of 7 days.
            (next_mon, 1, ok(1, 604_800)),
        ],
    )
    .await;
    let s = env.call(&mon, 1, next_mon).await;
    assert_eq!(lim(&s), l(2, Unit::Week, "week-mon/quota"));

    // Anchor 0: the week is [Sun 03-01, Sun 03-08), then [03-08, 03-15).
    run_table(
        &env,
        &sun,
        &[
            // 3.5 days to Sunday.
            (wed_noon, 1, ok(1, 302_400)),
            (sat_last, 1, ok(0, 1)),
            // Sunday starts a new week: 7 d - 10 h to the next Sunday.
            (sun_10, 1, ok(1, 568_800)),
            (sun_last, 1, ok(0, 518_401)),
            // Monday is in the same week: 6 days to Sunday 03-15.
            (next_mon, 1, quota_exceeded(518_400)),
        ],
    )
    .await;
}

#[tokio::test]
async fn monthly_quota_anchor_31_and_15() {
    let env = Env::new();
    let (_, _, a31) = env
        .plan_and_key("month-31", None, Some((1, PeriodKind::Month, 31, "UTC")))
        .await;
    let (_, _, a15) = env
        .plan_and_key("month-15", None, Some((1, PeriodKind::Month, 15, "UTC")))
        .await;

    // Anchor 31 in 2027: periods start 2026-12-31, 2027-01-31, 2027-02-28,
    // 2027-03-31, 2027-04-30.
    run_table(
        &env,
        &a31,
        &[
            (at(2027, 1, 30, 23, 59, 59), 1, ok(0, 1)),
            // Jan 31 -> Feb 28: 28 days.
            (at(2027, 1, 31, 0, 0, 0), 1, ok(0, 28 * DAY as u64)),
            // Feb 27 12:00 -> Feb 28: 12 h.
            (at(2027, 2, 27, 12, 0, 0), 1, quota_exceeded(43_200)),
            // Feb 28 -> Mar 31: 31 days.
            (at(2027, 2, 28, 0, 0, 0), 1, ok(0, 31 * DAY as u64)),
            (at(2027, 3, 30, 23, 59, 59), 1, quota_exceeded(1)),
            // Mar 31 -> Apr 30: 30 days.
            (at(2027, 3, 31, 0, 0, 0), 1, ok(0, 30 * DAY as u64)),
            // Leap year: 2028-01-31 -> 2028-02-29 -> 2028-03-31.
            (at(2028, 2, 28, 23, 59, 59), 1, ok(0, 1)),
            (at(2028, 2, 29, 0, 0, 0), 1, ok(0, 31 * DAY as u64)),
        ],
    )
    .await;
    let s = env.call(&a31, 1, at(2027, 3, 31, 0, 0, 0)).await;
    assert_eq!(lim(&s), l(1, Unit::Month, "month-31/quota"));

    run_table(
        &env,
        &a15,
        &[
            (at(2027, 2, 14, 23, 59, 59), 1, ok(0, 1)),
            // Feb 15 -> Mar 15: 28 days.
            (at(2027, 2, 15, 0, 0, 0), 1, ok(0, 28 * DAY as u64)),
            // Mar 1 06:00 -> Mar 15: 14 days - 6 h = 1 188 000 s.
            (at(2027, 3, 1, 6, 0, 0), 1, quota_exceeded(1_188_000)),
            // Mar 15 -> Apr 15: 31 days.
            (at(2027, 3, 15, 0, 0, 0), 1, ok(0, 31 * DAY as u64)),
        ],
    )
    .await;
}

#[tokio::test]
async fn daily_quota_in_new_york_across_both_dst_switches() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key(
            "ny",
            None,
            Some((1, PeriodKind::Day, 0, "America/New_York")),
        )
        .await;
    // 2026-03-08 (a Sunday) is the US spring-forward day: EST (UTC-5)
    // until 07:00 UTC, EDT (UTC-4) after. Local Mar 8 is
    // [05:00 UTC Mar 8, 04:00 UTC Mar 9): 23 hours.
    run_table(
        &env,
        &v,
        &[
            // 04:30 UTC = 23:30 EST on Mar 7: 30 min to local midnight.
            (at(2026, 3, 8, 4, 30, 0), 1, ok(0, 1_800)),
            (at(2026, 3, 8, 4, 59, 59), 1, quota_exceeded(1)),
            // 05:30 UTC = 00:30 EST on Mar 8: a new day, 22.5 h long from here.
            (at(2026, 3, 8, 5, 30, 0), 1, ok(0, 81_000)),
            // Across the switch (01:59:59 EST -> 03:00 EDT) the day goes on.
            (at(2026, 3, 8, 6, 59, 59), 1, quota_exceeded(75_601)),
            (at(2026, 3, 8, 7, 0, 0), 1, quota_exceeded(75_600)),
            (at(2026, 3, 9, 3, 59, 59), 1, quota_exceeded(1)),
            // Mar 9 00:00 EDT: a 24-hour day.
            (at(2026, 3, 9, 4, 0, 0), 1, ok(0, 86_400)),
            // 2026-11-01 (a Sunday) falls back: local Nov 1 is
            // [04:00 UTC Nov 1, 05:00 UTC Nov 2): 25 hours.
            (at(2026, 11, 1, 3, 59, 59), 1, ok(0, 1)),
            (at(2026, 11, 1, 4, 0, 0), 1, ok(0, 90_000)),
            // 01:30 EST after the fall back (06:30 UTC) is the same day.
            (at(2026, 11, 1, 6, 30, 0), 1, quota_exceeded(81_000)),
            (at(2026, 11, 2, 5, 0, 0), 1, ok(0, 86_400)),
        ],
    )
    .await;
}

#[tokio::test]
async fn daily_quota_in_tokyo_starts_at_15_utc() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key("tokyo", None, Some((1, PeriodKind::Day, 0, "Asia/Tokyo")))
        .await;
    run_table(
        &env,
        &v,
        &[
            // 23:59:59 JST on Jan 1.
            (at(2026, 1, 1, 14, 59, 59), 1, ok(0, 1)),
            // 00:00 JST on Jan 2.
            (at(2026, 1, 1, 15, 0, 0), 1, ok(0, 86_400)),
            // 23:00 JST on Jan 2: the same local day, 1 h left.
            (at(2026, 1, 2, 14, 0, 0), 1, quota_exceeded(3_600)),
            (at(2026, 1, 2, 15, 0, 0), 1, ok(0, 86_400)),
        ],
    )
    .await;
}

#[tokio::test]
async fn aws_offsets_map_to_anchor_days() {
    // The admin layer turns AWS `offset` into `anchor_day`; the plan model
    // stores the anchor. Check the mapping, then that a plan stored with the
    // mapped anchor cuts periods as hand-computed.
    let anchor = |p, off| Calendar::from_offset(p, off, "UTC").unwrap().anchor();
    assert_eq!(anchor(Period::Day, 0), 0);
    assert_eq!(anchor(Period::Week, 0), 0);
    assert_eq!(anchor(Period::Week, 1), 1);
    assert_eq!(anchor(Period::Week, 6), 6);
    assert_eq!(anchor(Period::Month, 0), 1);
    assert_eq!(anchor(Period::Month, 14), 15);
    assert_eq!(anchor(Period::Month, 30), 31);
    assert!(Calendar::from_offset(Period::Week, 7, "UTC").is_err());
    assert!(Calendar::from_offset(Period::Month, 31, "UTC").is_err());

    let env = Env::new();
    let now = at(2027, 3, 1, 6, 0, 0); // a Monday
                                       // (name, period, anchor_day, hand-computed reset_in at `now`)
    let cases: [(&str, PeriodKind, u32, u64); 6] = [
        // Month offset 0 -> anchor 1: Mar 1 06:00 -> Apr 1 = 31 d - 6 h.
        (
            "m-off0",
            PeriodKind::Month,
            anchor(Period::Month, 0),
            31 * 86_400 - 21_600,
        ),
        // Stored anchor 0 for MONTH means 1 as well.
        ("m-anchor0", PeriodKind::Month, 0, 31 * 86_400 - 21_600),
        // Offset 14 -> anchor 15: Mar 15, 14 d - 6 h.
        (
            "m-off14",
            PeriodKind::Month,
            anchor(Period::Month, 14),
            1_188_000,
        ),
        // Offset 30 -> anchor 31: Mar 31, 30 d - 6 h.
        (
            "m-off30",
            PeriodKind::Month,
            anchor(Period::Month, 30),
            30 * 86_400 - 21_600,
        ),
        // Week offset 1 (Monday): the week began today at 00:00, 7 d - 6 h.
        (
            "w-off1",
            PeriodKind::Week,
            anchor(Period::Week, 1),
            7 * 86_400 - 21_600,
        ),
        // Week offset 3 (Wednesday): Mar 3, 2 d - 6 h.
        (
            "w-off3",
            PeriodKind::Week,
            anchor(Period::Week, 3),
            2 * 86_400 - 21_600,
        ),
    ];
    for (name, period, anchor_day, reset_in) in cases {
        let (_, _, v) = env
            .plan_and_key(name, None, Some((5, period, anchor_day, "UTC")))
            .await;
        let s = env.call(&v, 1, now).await;
        assert_eq!(sum(&s), ok(4, reset_in), "{name}");
    }

    // Out-of-range anchors and unknown zones are refused by name.
    for (period, anchor_day, tz, field) in [
        (PeriodKind::Day, 1, "UTC", "quota.anchor_day"),
        (PeriodKind::Week, 7, "UTC", "quota.anchor_day"),
        (PeriodKind::Month, 32, "UTC", "quota.anchor_day"),
        (PeriodKind::Day, 0, "Mars/Olympus_Mons", "quota.time_zone"),
    ] {
        let p = plan("bad", None, Some((1, period, anchor_day, tz)));
        match env.registry.create_plan(p, ADMIN_NOW).await {
            Err(PlanError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{period:?} {anchor_day} {tz}: {other:?}"),
        }
    }
}

// -------------------------------------------------- 9-10: precedence --

#[tokio::test]
async fn per_method_throttles_replace_the_plan_throttle() {
    let env = Env::new();
    let mut p = plan(
        "routes",
        Some((1.0, 10)),
        Some((100, PeriodKind::Day, 0, "UTC")),
    );
    let mt = |burst| Throttle {
        rate_limit: 1.0,
        burst_limit: burst,
    };
    p.stages[0].method_throttles = BTreeMap::from([
        ("/v1/chat/completions/POST".to_owned(), mt(1)),
        ("/v1/{x}/completions/POST".to_owned(), mt(2)),
        ("/v1/chat/completions/*".to_owned(), mt(3)),
    ]);
    let p = env.plan(p).await;
    let v = value_of("routes");
    let k = env.key("routes-key", &v, Some(&p.id)).await;
    let t = at(2026, 1, 1, 10, 0, 0);
    let call = |method: Option<&'static str>, path: &'static str| {
        let v = v.clone();
        let env = &env;
        async move {
            let mut e = vec![(DEFAULT_KEY_ENTRY, v.as_str()), (DEFAULT_PATH_ENTRY, path)];
            if let Some(m) = method {
                e.push((DEFAULT_METHOD_ENTRY, m));
            }
            env.one(DOMAIN, &e, 1, t).await
        }
    };
    let chat_post = "routes/throttle/v1/chat/completions/POST";
    let x_post = "routes/throttle/v1/{x}/completions/POST";
    let chat_any = "routes/throttle/v1/chat/completions/*";
    let plan_t = "routes/throttle";
    // (method, path, expected, reported limit name)
    let table: [(Option<&'static str>, &'static str, Summary, &str); 10] = [
        // Exact literal + method (score 7) beats "*" (6) and "{x}" (5).
        (Some("POST"), "/v1/chat/completions", ok(0, 1), chat_post),
        (
            Some("POST"),
            "/v1/chat/completions",
            throttled(1),
            chat_post,
        ),
        // Only the {param} key matches other middle segments.
        (Some("POST"), "/v1/embeddings/completions", ok(1, 1), x_post),
        // Methods compare case-insensitively.
        (Some("post"), "/v1/text/completions", ok(0, 2), x_post),
        (Some("POST"), "/v1/abc/completions", throttled(1), x_post),
        // Any other method on the chat path: the "*" key.
        (Some("GET"), "/v1/chat/completions", ok(2, 1), chat_any),
        // A query string is not part of the path: the POST bucket, empty.
        (
            Some("POST"),
            "/v1/chat/completions?stream=true",
            throttled(1),
            chat_post,
        ),
        // Other paths: the plan throttle.
        (Some("GET"), "/v1/models", ok(9, 1), plan_t),
        (Some("POST"), "/v1/chat/completions/extra", ok(8, 2), plan_t),
        // Without a method entry no per-method throttle can match.
        (None, "/v1/chat/completions", ok(7, 3), plan_t),
    ];
    for (i, (m, path, want, name)) in table.into_iter().enumerate() {
        let s = call(m, path).await;
        assert_eq!(sum(&s), want, "row {i}: {m:?} {path}: {s:?}");
        assert_eq!(lim(&s), l(1, Unit::Second, name), "row {i}");
    }
    // The quota counts every allowed call whatever throttle applied:
    // rows 0, 2, 3, 5, 7, 8, 9.
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 7);

    // update_plan: a new per-method throttle applies at once.
    env.registry
        .update_plan(
            &p.id,
            |p| {
                p.stages[0]
                    .method_throttles
                    .insert("/v1/models/GET".into(), mt(1));
                Ok(())
            },
            ADMIN_NOW,
        )
        .await
        .unwrap();
    let s = call(Some("GET"), "/v1/models").await;
    assert_eq!(sum(&s), ok(0, 1));
    assert_eq!(lim(&s), l(1, Unit::Second, "routes/throttle/v1/models/GET"));
    let s = call(Some("GET"), "/v1/models").await;
    assert_eq!(sum(&s), throttled(1));
    // The plan bucket was left alone: 7 tokens, as after row 9.
    let s = call(Some("GET"), "/v2/other").await;
    assert_eq!(sum(&s), ok(6, 4));
}

#[tokio::test]
async fn the_binding_limit_is_reported() {
    let env = Env::new();
    let t = at(2026, 1, 1, 10, 0, 0); // 50 400 s to midnight
                                      // Quota 2 vs burst 20: after one call, quota 1 left < 19 tokens.
    let (_, _, q) = env
        .plan_and_key(
            "bind-q",
            Some((10.0, 20)),
            Some((2, PeriodKind::Day, 0, "UTC")),
        )
        .await;
    let s = env.call(&q, 1, t).await;
    assert_eq!(sum(&s), ok(1, 50_400));
    assert_eq!(lim(&s), l(2, Unit::Day, "bind-q/quota"));
    // Quota 1000 vs burst 20: the throttle (19 tokens, full in 100 ms).
    let (_, _, th) = env
        .plan_and_key(
            "bind-t",
            Some((10.0, 20)),
            Some((1000, PeriodKind::Day, 0, "UTC")),
        )
        .await;
    let s = env.call(&th, 1, t).await;
    assert_eq!(sum(&s), ok(19, 1));
    assert_eq!(lim(&s), l(10, Unit::Second, "bind-t/throttle"));
    // A tie (19 and 19) reports the throttle.
    let (_, _, tie) = env
        .plan_and_key(
            "bind-tie",
            Some((10.0, 20)),
            Some((20, PeriodKind::Day, 0, "UTC")),
        )
        .await;
    let s = env.call(&tie, 1, t).await;
    assert_eq!(sum(&s), ok(19, 1));
    assert_eq!(lim(&s), l(10, Unit::Second, "bind-tie/throttle"));
}

#[tokio::test]
async fn a_throttle_refusal_does_not_consume_quota() {
    let env = Env::new();
    let (p, k, v) = env
        .plan_and_key(
            "refund-a",
            Some((1.0, 2)),
            Some((3, PeriodKind::Day, 0, "UTC")),
        )
        .await;
    let t = at(2026, 1, 1, 10, 0, 0);
    run_table(
        &env,
        &v,
        &[
            // Throttle 1 left (full in 1 s) vs quota 2 left: the throttle.
            (t, 1, ok(1, 1)),
            (t, 1, ok(0, 2)),
            (t, 1, throttled(1)),
            // 2 hits need 2 tokens: 2 s away.
            (t, 2, throttled(2)),
        ],
    )
    .await;
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 2);
    run_table(
        &env,
        &v,
        &[
            // Had the refusals counted, this would be quota-exceeded.
            (t + S, 1, ok(0, 2)),
            (t + 2 * S, 1, quota_exceeded(50_398)),
        ],
    )
    .await;
    assert_eq!(env.quota(&p.id, &k.id, t / S).await.used, 3);
}

#[tokio::test]
async fn a_quota_refusal_does_not_consume_throttle_tokens() {
    let env = Env::new();
    let (p, k, v) = env
        .plan_and_key(
            "refund-b",
            Some((1.0, 5)),
            Some((2, PeriodKind::Day, 0, "UTC")),
        )
        .await;
    let t = at(2026, 1, 1, 10, 0, 0);
    run_table(
        &env,
        &v,
        &[
            // Quota 1 left < 4 tokens: the quota is reported.
            (t, 1, ok(1, 50_400)),
            (t, 1, ok(0, 50_400)),
            (t, 1, quota_exceeded(50_400)),
            (t, 3, quota_exceeded(50_400)),
            (t, 1, quota_exceeded(50_400)),
        ],
    )
    .await;
    let (_, live) = env
        .limiter
        .usage(&env.compiled(&p.id), &k.id, &[], t)
        .await
        .unwrap();
    assert_eq!(live.throttle, Some((3.0, 5)));
    // Grant 10 more for today; at the same instant 3 tokens are left, so a
    // call leaves 2 (the throttle binds: 2 < 12 - 3 = 9).
    let day_start = utc(2026, 1, 1, 0, 0, 0);
    env.registry
        .set_grant(&p.id, &k.id, day_start, 10, 0)
        .await
        .unwrap();
    let s = env.call(&v, 1, t).await;
    assert_eq!(sum(&s), ok(2, 3));
    assert_eq!(lim(&s), l(1, Unit::Second, "refund-b/throttle"));
}

// ------------------------------------------------- 11: grants, usage --

#[tokio::test]
async fn grants_change_the_effective_limit_never_below_zero() {
    let env = Env::new();
    let (p, k, v) = env
        .plan_and_key("grants", None, Some((3, PeriodKind::Day, 0, "UTC")))
        .await;
    let day = utc(2026, 1, 1, 0, 0, 0);
    let t = at(2026, 1, 1, 12, 0, 0); // 43 200 s to midnight
    run_table(
        &env,
        &v,
        &[
            (t, 1, ok(2, 43_200)),
            (t, 2, ok(0, 43_200)),
            (t, 1, quota_exceeded(43_200)),
        ],
    )
    .await;
    // A grant for tomorrow changes nothing today.
    env.registry
        .set_grant(&p.id, &k.id, day + DAY, 100, 0)
        .await
        .unwrap();
    assert_eq!(sum(&env.call(&v, 1, t).await), quota_exceeded(43_200));
    // +2 today: limit 5, 3 used.
    env.registry
        .set_grant(&p.id, &k.id, day, 2, 0)
        .await
        .unwrap();
    let s = env.call(&v, 1, t).await;
    assert_eq!(sum(&s), ok(1, 43_200));
    assert_eq!(lim(&s), l(5, Unit::Day, "grants/quota"));
    // -10 today: 3 - 10 < 0 -> limit 0; even a check is refused.
    env.registry
        .set_grant(&p.id, &k.id, day, -10, 0)
        .await
        .unwrap();
    let s = env.call(&v, 0, t).await;
    assert_eq!(sum(&s), quota_exceeded(43_200));
    assert_eq!(lim(&s), l(0, Unit::Day, "grants/quota"));
    assert_eq!(
        env.quota(&p.id, &k.id, t / S).await,
        QuotaState {
            period: Span {
                start: day,
                end: day + DAY
            },
            used: 4,
            limit: 0,
            grant: -10
        }
    );
    // Tomorrow: 3 + 100.
    let s = env.call(&v, 1, at(2026, 1, 2, 0, 0, 0)).await;
    assert_eq!(sum(&s), ok(102, 86_400));
    assert_eq!(lim(&s), l(103, Unit::Day, "grants/quota"));
}

#[tokio::test]
async fn usage_reports_days_and_live_state() {
    let env = Env::new();
    // Weekly quota of 10 from Monday, throttle 1/s burst 20.
    let (p, k, v) = env
        .plan_and_key(
            "usage",
            Some((1.0, 20)),
            Some((10, PeriodKind::Week, 1, "UTC")),
        )
        .await;
    let mon = at(2026, 3, 2, 9, 0, 0);
    let tue = at(2026, 3, 3, 9, 0, 0);
    let thu = at(2026, 3, 5, 9, 0, 0);
    assert_eq!(sum(&env.call(&v, 3, mon).await).0, Code::Ok);
    assert_eq!(sum(&env.call(&v, 2, tue).await).0, Code::Ok);
    // A refused call is not counted in the day.
    assert_eq!(
        sum(&env.call(&v, 50, tue).await),
        (
            Code::OverLimit,
            0,
            Some(u64::from(u32::MAX)),
            Some(Reason::Throttled)
        )
    );
    assert_eq!(sum(&env.call(&v, 1, thu).await).0, Code::Ok);

    let date = |d| jiff::civil::date(2026, 3, d);
    let dates: Vec<_> = (1..=6).map(date).collect(); // Sun 03-01 .. Fri 03-06
    let now = thu + 500 * MS;
    let (days, live) = env
        .limiter
        .usage(&env.compiled(&p.id), &k.id, &dates, now)
        .await
        .unwrap();
    let want = |grant: u64| {
        vec![
            // Sunday belongs to the previous week: nothing used, 10 left.
            DayUsage {
                date: date(1),
                used: 0,
                remaining: Some(10),
            },
            DayUsage {
                date: date(2),
                used: 3,
                remaining: Some(7 + grant),
            },
            DayUsage {
                date: date(3),
                used: 2,
                remaining: Some(5 + grant),
            },
            DayUsage {
                date: date(4),
                used: 0,
                remaining: Some(5 + grant),
            },
            DayUsage {
                date: date(5),
                used: 1,
                remaining: Some(4 + grant),
            },
            // The future has no remaining yet.
            DayUsage {
                date: date(6),
                used: 0,
                remaining: None,
            },
        ]
    };
    assert_eq!(days, want(0));
    let week = Span {
        start: utc(2026, 3, 2, 0, 0, 0),
        end: utc(2026, 3, 9, 0, 0, 0),
    };
    assert_eq!(
        live.quota,
        Some(QuotaState {
            period: week,
            used: 6,
            limit: 10,
            grant: 0
        })
    );
    // One token taken at 09:00:00, half refilled by 09:00:00.5.
    assert_eq!(live.throttle, Some((19.5, 20)));

    env.registry
        .set_grant(&p.id, &k.id, week.start, 5, 0)
        .await
        .unwrap();
    let (days, live) = env
        .limiter
        .usage(&env.compiled(&p.id), &k.id, &dates, now)
        .await
        .unwrap();
    assert_eq!(days, want(5));
    assert_eq!(live.quota.map(|q| (q.limit, q.grant)), Some((15, 5)));
}

#[tokio::test]
async fn usage_days_follow_the_quota_time_zone() {
    let env = Env::new();
    let (p, k, v) = env
        .plan_and_key(
            "usage-tokyo",
            None,
            Some((10, PeriodKind::Day, 0, "Asia/Tokyo")),
        )
        .await;
    // 2026-01-01 14:30 UTC is Jan 1 in Tokyo, 15:30 UTC is Jan 2.
    env.call(&v, 2, at(2026, 1, 1, 14, 30, 0)).await;
    env.call(&v, 3, at(2026, 1, 1, 15, 30, 0)).await;
    let dates = [jiff::civil::date(2026, 1, 1), jiff::civil::date(2026, 1, 2)];
    let (days, _) = env
        .limiter
        .usage(
            &env.compiled(&p.id),
            &k.id,
            &dates,
            at(2026, 1, 1, 16, 0, 0),
        )
        .await
        .unwrap();
    assert_eq!(
        days,
        vec![
            DayUsage {
                date: dates[0],
                used: 2,
                remaining: Some(8)
            },
            DayUsage {
                date: dates[1],
                used: 3,
                remaining: Some(7)
            },
        ]
    );
}

// ------------------------------------------------------------ 12: keys --

#[tokio::test]
async fn disabled_expired_and_unknown_keys_are_refused() {
    let env = Env::new();
    let (_, k, v) = env.plan_and_key("keys", Some((100.0, 100)), None).await;
    let t = at(2026, 1, 1, 10, 0, 0);
    assert_eq!(env.call(&v, 1, t).await.code, Code::Ok);
    assert_eq!(
        env.call("no-such-key-0123456789abcdef", 1, t).await,
        invalid_key()
    );

    env.registry
        .update_key(
            &k.id,
            |k| {
                k.enabled = false;
                Ok(())
            },
            ADMIN_NOW,
        )
        .await
        .unwrap();
    assert_eq!(env.call(&v, 1, t).await, invalid_key());
    env.registry
        .update_key(
            &k.id,
            |k| {
                k.enabled = true;
                k.expire_time = Some(t / S);
                Ok(())
            },
            ADMIN_NOW,
        )
        .await
        .unwrap();
    // Refused from expire_time on; 1 us before it is still accepted.
    assert_eq!(env.call(&v, 1, t - 1).await.code, Code::Ok);
    assert_eq!(env.call(&v, 1, t).await, invalid_key());
    assert_eq!(env.call(&v, 1, t + 10 * S).await, invalid_key());

    // A key bound to no plan, and one bound to a plan of another domain.
    let free = value_of("unbound");
    env.key("unbound", &free, None).await;
    assert_eq!(env.call(&free, 1, t).await, invalid_key());
    let mut other = plan("elsewhere", Some((1.0, 1)), None);
    other.stages = vec![stage("other-domain")];
    let other = env.plan(other).await;
    let ov = value_of("elsewhere");
    env.key("elsewhere-key", &ov, Some(&other.id)).await;
    assert_eq!(env.call(&ov, 1, t).await, invalid_key());
    assert_eq!(
        sum(&env
            .one("other-domain", &[(DEFAULT_KEY_ENTRY, &ov)], 1, t)
            .await),
        ok(0, 1)
    );
}

#[tokio::test]
async fn rotated_values_work_during_the_grace_period_only() {
    let env = Env::new();
    let (_, k, old) = env
        .plan_and_key("rotate", None, Some((100, PeriodKind::Day, 0, "UTC")))
        .await;
    let t = at(2026, 1, 1, 10, 0, 0); // 50 400 s to midnight
    assert_eq!(sum(&env.call(&old, 1, t).await), ok(99, 50_400));
    let new = value_of("rotate-new");
    let (_, got) = env
        .registry
        .rotate_key(&k.id, 60, Some(new.clone()), t / S)
        .await
        .unwrap();
    assert_eq!(got, new);
    // Both values are the same key: one quota.
    assert_eq!(sum(&env.call(&new, 1, t).await), ok(98, 50_400));
    // The old value until 1 us before t + 60 s (now_s = t + 59 s) ...
    assert_eq!(
        sum(&env.call(&old, 1, t + 60 * S - 1).await),
        ok(97, 50_341)
    );
    // ... and no longer from t + 60 s on, while the new one goes on.
    assert_eq!(env.call(&old, 1, t + 60 * S).await, invalid_key());
    assert_eq!(sum(&env.call(&new, 1, t + 60 * S).await), ok(96, 50_340));

    // A rotation without grace revokes the old value at once.
    let newer = value_of("rotate-newer");
    env.registry
        .rotate_key(&k.id, 0, Some(newer.clone()), t / S + 100)
        .await
        .unwrap();
    let t2 = t + 100 * S;
    assert_eq!(env.call(&new, 1, t2).await, invalid_key());
    assert_eq!(sum(&env.call(&newer, 1, t2).await), ok(95, 50_300));
}

#[tokio::test]
async fn named_stages_need_the_stage_entry() {
    let env = Env::new();
    let mut p = plan("staged", Some((1.0, 5)), None);
    p.stages = vec![Stage {
        stage: "prod".into(),
        ..stage("staged-domain")
    }];
    let p = env.plan(p).await;
    let v = value_of("staged");
    env.key("staged-key", &v, Some(&p.id)).await;
    let t = at(2026, 1, 1, 10, 0, 0);
    let d = "staged-domain";
    // Without or with another stage entry the plan does not govern the
    // descriptor: config rules decide, and this domain has none.
    assert_eq!(
        env.one(d, &[(DEFAULT_KEY_ENTRY, &v)], 1, t).await,
        no_limit()
    );
    assert_eq!(
        env.one(d, &[("stage", "dev"), (DEFAULT_KEY_ENTRY, &v)], 1, t)
            .await,
        no_limit()
    );
    let s = env
        .one(d, &[("stage", "prod"), (DEFAULT_KEY_ENTRY, &v)], 1, t)
        .await;
    assert_eq!(sum(&s), ok(4, 1));
    assert_eq!(lim(&s), l(1, Unit::Second, "staged/throttle"));

    // In a domain with a whole-domain plan and a "prod" plan, a descriptor
    // naming "prod" is decided by the "prod" stage: a key bound only to the
    // whole-domain plan is refused there.
    let (_, _, whole) = env.plan_and_key("whole", Some((1.0, 5)), None).await;
    let mut prod = plan("prod-only", Some((1.0, 5)), None);
    prod.stages[0].stage = "prod".into();
    env.plan(prod).await;
    assert_eq!(sum(&env.call(&whole, 1, t).await), ok(4, 1));
    assert_eq!(
        env.one(
            DOMAIN,
            &[("stage", "prod"), (DEFAULT_KEY_ENTRY, &whole)],
            1,
            t
        )
        .await,
        invalid_key()
    );
}

#[tokio::test]
async fn a_custom_key_entry_is_honoured() {
    let env = Env::new();
    let mut p = plan("custom", Some((1.0, 3)), None);
    p.stages = vec![Stage {
        key_entry: "x-api-key".into(),
        ..stage("custom-domain")
    }];
    let p = env.plan(p).await;
    let v = value_of("custom");
    env.key("custom-key", &v, Some(&p.id)).await;
    let t = at(2026, 1, 1, 10, 0, 0);
    let s = env.one("custom-domain", &[("x-api-key", &v)], 1, t).await;
    assert_eq!(sum(&s), ok(2, 1));
    assert_eq!(
        env.one(
            "custom-domain",
            &[("x-api-key", "wrong-0123456789abcdefgh")],
            1,
            t
        )
        .await,
        invalid_key()
    );
    // The default entry name means nothing in this domain.
    assert_eq!(
        env.one("custom-domain", &[(DEFAULT_KEY_ENTRY, &v)], 1, t)
            .await,
        no_limit()
    );
}

// ---------------------------------------------- 13: config rules mix --

#[tokio::test]
async fn descriptors_without_the_key_entry_go_to_the_config_rules() {
    let env = Env::new();
    let (_, _, v) = env
        .plan_and_key(
            "mixed",
            Some((10.0, 20)),
            Some((1000, PeriodKind::Day, 0, "UTC")),
        )
        .await;
    let t = at(2026, 1, 1, 10, 0, 0);
    // remote_address: 10 per second from the embedded default config.
    for i in 1..=10u32 {
        let s = env
            .one(DOMAIN, &[("remote_address", "10.0.0.1")], 1, t)
            .await;
        assert_eq!(sum(&s), ok(10 - i, 1), "call {i}");
        assert_eq!(lim(&s).map(|(n, u, _)| (n, u)), Some((10, Unit::Second)));
    }
    let s = env
        .one(DOMAIN, &[("remote_address", "10.0.0.1")], 1, t)
        .await;
    assert_eq!(sum(&s), (Code::OverLimit, 0, Some(1), None));
    // generic_key=health is unlimited.
    let s = env.one(DOMAIN, &[("generic_key", "health")], 1, t).await;
    assert_eq!((s.code, s.remaining, s.limit), (Code::Ok, u32::MAX, None));
    // With the key entry, the plan decides even where a config rule would
    // match (api_key + model), and an unknown key is refused.
    let s = env
        .one(
            DOMAIN,
            &[(DEFAULT_KEY_ENTRY, &v), ("model", "gpt-4o-mini")],
            1,
            t,
        )
        .await;
    assert_eq!(sum(&s), ok(19, 1));
    assert_eq!(lim(&s), l(10, Unit::Second, "mixed/throttle"));
    assert_eq!(
        env.one(
            DOMAIN,
            &[(DEFAULT_KEY_ENTRY, "not-a-key-0123456789abcdef")],
            1,
            t
        )
        .await,
        invalid_key()
    );

    // One request mixing both kinds: statuses stay in request order.
    let d = env
        .decide_in(
            DOMAIN,
            vec![
                desc(&[("remote_address", "10.0.0.2")], 1),
                desc(&[(DEFAULT_KEY_ENTRY, &v)], 1),
                desc(&[("remote_address", "10.0.0.1")], 1),
                desc(&[("generic_key", "health")], 1),
            ],
            t,
        )
        .await;
    let got: Vec<Summary> = d.statuses.iter().map(sum).collect();
    assert_eq!(
        got,
        vec![
            ok(9, 1),
            ok(18, 1),
            (Code::OverLimit, 0, Some(1), None),
            (Code::Ok, u32::MAX, None, None),
        ]
    );
    assert_eq!(d.overall, Code::OverLimit);
    assert_eq!(lim(&d.statuses[1]), l(10, Unit::Second, "mixed/throttle"));

    // A domain no plan governs: config rules only (none for this domain).
    assert_eq!(
        env.one("other-domain", &[(DEFAULT_KEY_ENTRY, &v)], 1, t)
            .await,
        no_limit()
    );
}

// -------------------------------------------------------- properties --

/// Runs calls `(delay_ms, hits)` from `t0` for one key of a plan with the
/// given limits; returns (time in us, hits, allowed) per call.
fn simulate(
    throttle: Option<(f64, u32)>,
    quota: u64,
    t0: i64,
    calls: &[(i64, u64)],
) -> Vec<(i64, u64, Status)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::new();
        let (_, _, v) = env
            .plan_and_key("prop", throttle, Some((quota, PeriodKind::Day, 0, "UTC")))
            .await;
        let mut now = t0;
        let mut out = Vec::with_capacity(calls.len());
        for &(delay_ms, hits) in calls {
            now += delay_ms * MS;
            let s = env.call(&v, hits, now).await;
            out.push((now, hits, s));
        }
        out
    })
}

fn calls_strategy() -> impl Strategy<Value = Vec<(i64, u64)>> {
    // Many calls in the same instant, some spread over a few seconds.
    prop::collection::vec(
        (prop_oneof![3 => Just(0i64), 2 => 0i64..400], 0u64..3),
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Allowed hits never exceed the quota within a period, nor
    /// burst + rate * elapsed over any stretch of calls.
    #[test]
    fn allowed_hits_respect_quota_and_throttle(
        quota in 1u64..8,
        burst in 1u32..6,
        rate in prop_oneof![Just(0.5f64), Just(1.0), Just(2.0), Just(5.0)],
        start_offset_ms in 0i64..3000,
        calls in calls_strategy(),
    ) {
        // Start just before a UTC midnight, so sequences cross a period.
        let t0 = at(2026, 1, 2, 0, 0, 0) - 2 * S + start_offset_ms * MS;
        let out = simulate(Some((rate, burst)), quota, t0, &calls);
        let allowed: Vec<(i64, u64)> = out
            .iter()
            .map(|(t, h, s)| (*t, if s.code == Code::Ok { *h } else { 0 }))
            .collect();
        let mut per_day: BTreeMap<i64, u64> = BTreeMap::new();
        for (t, h) in &allowed {
            *per_day.entry(t.div_euclid(DAY * S)).or_default() += h;
        }
        for (day, n) in &per_day {
            prop_assert!(*n <= quota, "day {day}: {n} hits > quota {quota}");
        }
        // Interval per token in ns, exact for these rates.
        let iv_ns = (1e9 / rate).round() as i128;
        for i in 0..allowed.len() {
            let mut n: i128 = 0;
            for j in i..allowed.len() {
                n += i128::from(allowed[j].1);
                let elapsed_ns = i128::from(allowed[j].0 - allowed[i].0) * 1000;
                prop_assert!(
                    n * iv_ns <= i128::from(burst) * iv_ns + elapsed_ns,
                    "calls {i}..={j}: {n} hits in {elapsed_ns} ns > burst {burst} + rate {rate}"
                );
            }
        }
        for (_, _, s) in &out {
            if s.code == Code::OverLimit {
                prop_assert!(matches!(s.reason, Some(Reason::Throttled | Reason::QuotaExceeded)));
            }
        }
    }

    /// Without a throttle, each decision is exactly what a simple model of
    /// the quota says.
    #[test]
    fn quota_only_matches_a_model(
        quota in 0u64..6,
        start_offset_ms in 0i64..3000,
        calls in calls_strategy(),
    ) {
        let t0 = at(2026, 1, 2, 0, 0, 0) - 2 * S + start_offset_ms * MS;
        let out = simulate(None, quota, t0, &calls);
        let mut used: BTreeMap<i64, u64> = BTreeMap::new();
        for (i, (t, hits, s)) in out.iter().enumerate() {
            let day = t.div_euclid(DAY * S);
            let u = used.entry(day).or_default();
            let allow = if *hits == 0 { *u < quota } else { *u + hits <= quota };
            if allow {
                *u += hits;
            }
            let reset_in = ((day + 1) * DAY - t.div_euclid(S)) as u64;
            let want = if allow {
                ok(u32::try_from(quota - *u).unwrap(), reset_in)
            } else {
                quota_exceeded(reset_in)
            };
            prop_assert_eq!(sum(s), want, "call {}", i);
        }
    }
}

// ------------------------------------ one decision per key per request --

/// Envoy sends one descriptor per `rate_limits` entry, so one request may
/// carry the same key in several descriptors (e.g. `api_key` and
/// `api_key` + `model`). The plan decides the request once: one token, one
/// quota unit, the same status for each of those descriptors; the method
/// and path may come from any of them.
#[tokio::test]
async fn descriptors_sharing_a_key_are_decided_once_per_request() {
    let env = Env::new();
    let mut p = plan(
        "grouped",
        Some((0.001, 10)),
        Some((100, PeriodKind::Day, 0, "UTC")),
    );
    p.stages[0].method_throttles = BTreeMap::from([(
        "/v1/chat/completions/POST".to_owned(),
        Throttle {
            rate_limit: 0.001,
            burst_limit: 3,
        },
    )]);
    let p = env.plan(p).await;
    let v = value_of("grouped");
    let k = env.key("grouped-key", &v, Some(&p.id)).await;
    let t = at(2026, 1, 1, 10, 0, 0);
    let d = env
        .decide_in(
            DOMAIN,
            vec![
                desc(&[(DEFAULT_KEY_ENTRY, &v)], 1),
                desc(&[(DEFAULT_KEY_ENTRY, &v), ("model", "gpt-4o")], 1),
                desc(&[("remote_address", "10.0.0.9")], 1),
            ],
            t,
        )
        .await;
    assert_eq!(d.statuses[0], d.statuses[1], "{d:?}");
    assert_eq!(sum(&d.statuses[0]), ok(9, 1000));
    assert_eq!(lim(&d.statuses[0]).unwrap().2, "grouped/throttle");
    assert_ne!(
        d.statuses[2], d.statuses[0],
        "the third follows the config rules"
    );
    assert_eq!(env.quota(&p.id, &k.id, t / 1_000_000).await.used, 1);

    // Method and path in the second descriptor select the per-method throttle.
    let d = env
        .decide_in(
            DOMAIN,
            vec![
                desc(&[(DEFAULT_KEY_ENTRY, &v)], 1),
                desc(
                    &[
                        (DEFAULT_KEY_ENTRY, &v),
                        (DEFAULT_METHOD_ENTRY, "POST"),
                        (DEFAULT_PATH_ENTRY, "/v1/chat/completions"),
                    ],
                    1,
                ),
            ],
            t,
        )
        .await;
    assert_eq!(d.statuses[0], d.statuses[1], "{d:?}");
    assert_eq!(
        lim(&d.statuses[0]).unwrap().2,
        "grouped/throttle/v1/chat/completions/POST"
    );
    assert_eq!(sum(&d.statuses[0]), ok(2, 1000));
    assert_eq!(env.quota(&p.id, &k.id, t / 1_000_000).await.used, 2);
}
