//! The pure parts of deciding a plan-governed descriptor: which throttle
//! applies, the counter and bucket keys, and the limits reported to Envoy.
//!
//! Precedence, as Amazon API Gateway documents it: a per-method throttle of
//! the stage replaces the plan throttle for matching calls; the quota always
//! applies. The quota counts calendar periods per key across every stage of
//! the plan.

use std::sync::Arc;

use super::catalog::CompiledPlan;
use super::model::{LimitWindow, PeriodKind, Quota, Scope, Throttle, UsageLimit};
use crate::engine::{Entry, Limit, Unit};

/// First byte of every plan counter key. Config-rule counter keys start with
/// the big-endian length of a domain (< 2^24), so they never start with it.
pub const PLAN_KEY_TAG: u8 = 0xFF;

fn key(kind: u8, parts: &[&[u8]], tail: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + parts.iter().map(|p| p.len() + 1).sum::<usize>() + 8);
    key_into(&mut k, kind, parts, tail);
    k
}

/// Appends a key to `k` (a decision builds all its keys in one buffer).
fn key_into(k: &mut Vec<u8>, kind: u8, parts: &[&[u8]], tail: i64) {
    k.push(PLAN_KEY_TAG);
    k.push(kind);
    for p in parts {
        // Ids and method keys never contain NUL (ids are [a-z0-9], and a
        // NUL in a method key is rejected by MethodKey::parse's charset).
        k.extend_from_slice(p);
        k.push(0);
    }
    k.extend_from_slice(&tail.to_be_bytes());
}

/// Appends the key that `f` writes to `buf` and returns where it is: a
/// decision builds every key in one buffer, one allocation for all.
pub fn push_key(buf: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> std::ops::Range<usize> {
    let start = buf.len();
    f(buf);
    start..buf.len()
}

/// The quota counter of a key in a plan for the period starting at `start`.
pub fn quota_key(plan_id: &str, key_id: &str, start: i64) -> Vec<u8> {
    key(b'q', &[plan_id.as_bytes(), key_id.as_bytes()], start)
}

/// [`quota_key`], appended to `buf`.
pub fn quota_key_into(buf: &mut Vec<u8>, plan_id: &str, key_id: &str, start: i64) {
    key_into(buf, b'q', &[plan_id.as_bytes(), key_id.as_bytes()], start);
}

/// The daily usage counter of a key in a plan for the day starting at `day_start`.
pub fn daily_key(plan_id: &str, key_id: &str, day_start: i64) -> Vec<u8> {
    key(b'd', &[plan_id.as_bytes(), key_id.as_bytes()], day_start)
}

/// [`daily_key`], appended to `buf`.
pub fn daily_key_into(buf: &mut Vec<u8>, plan_id: &str, key_id: &str, day_start: i64) {
    key_into(
        buf,
        b'd',
        &[plan_id.as_bytes(), key_id.as_bytes()],
        day_start,
    );
}

/// The bucket of a key's plan throttle, or of one per-method throttle
/// (`method` = (stage index, method key)).
pub fn bucket_key(plan_id: &str, key_id: &str, method: Option<(usize, &str)>) -> Vec<u8> {
    let mut k = Vec::new();
    bucket_key_into(&mut k, plan_id, key_id, method);
    k
}

/// [`bucket_key`], appended to `buf`.
pub fn bucket_key_into(
    buf: &mut Vec<u8>,
    plan_id: &str,
    key_id: &str,
    method: Option<(usize, &str)>,
) {
    match method {
        None => key_into(buf, b't', &[plan_id.as_bytes(), key_id.as_bytes()], -1),
        Some((stage, m)) => key_into(
            buf,
            b't',
            &[plan_id.as_bytes(), key_id.as_bytes(), m.as_bytes()],
            stage as i64,
        ),
    }
}

/// The throttle for a call: the most specific matching per-method throttle
/// of the stage (with its key), else the plan throttle, else none; with the
/// limit it reports.
pub fn select_throttle<'a>(
    plan: &'a CompiledPlan,
    stage: usize,
    entries: &[Entry],
) -> Option<(&'a Throttle, Option<&'a str>, &'a Arc<Limit>)> {
    let s = &plan.plan.stages[stage];
    let methods = &plan.method_keys[stage];
    if !methods.is_empty() {
        let get = |name: &str| {
            entries
                .iter()
                .find(|e| e.key == name)
                .map(|e| e.value.as_str())
        };
        if let (Some(method), Some(path)) = (get(&s.method_entry), get(&s.path_entry)) {
            let best = methods
                .iter()
                .filter_map(|m| m.pattern.matches(path, method).map(|score| (score, m)))
                .max_by_key(|(score, _)| *score);
            if let Some((_, m)) = best {
                return Some((&m.throttle, Some(m.key.as_str()), &m.limit));
            }
        }
    }
    match (&plan.plan.throttle, &plan.throttle_limit) {
        (Some(t), Some(l)) => Some((t, None, l)),
        _ => None,
    }
}

/// How a throttle is reported in `current_limit`: the rate as whole
/// requests per the smallest unit that makes it whole (0.5/s = 30/MINUTE).
pub fn throttle_limit(plan_name: &str, t: &Throttle, method: Option<&str>) -> Arc<Limit> {
    let mut best = (t.rate_limit * 86_400.0).round().min(f64::from(u32::MAX));
    let mut unit = Unit::Day;
    for (u, secs) in [
        (Unit::Second, 1.0),
        (Unit::Minute, 60.0),
        (Unit::Hour, 3600.0),
    ] {
        let n = t.rate_limit * secs;
        if (n - n.round()).abs() < 1e-9 {
            best = n.round().min(f64::from(u32::MAX));
            unit = u;
            break;
        }
    }
    if best < 1.0 && t.rate_limit > 0.0 {
        // Under one a day: per year, at least 1 (0 would read as "always
        // over" to an RLS client, which the throttle is not).
        best = (t.rate_limit * 31_536_000.0).round().max(1.0);
        unit = Unit::Year;
    } else if t.rate_limit <= 0.0 {
        // No refill: the burst, once, then nothing; per year is the
        // nearest unit (0 per day read as "always over" while the burst's
        // calls passed). A burst of 0 is 0: always over, as it is.
        best = f64::from(t.burst_limit);
        unit = Unit::Year;
    }
    let name = match method {
        None => format!("{plan_name}/throttle"),
        Some(m) => format!("{plan_name}/throttle{m}"),
    };
    Arc::new(Limit {
        requests_per_unit: best as u32,
        unit,
        name: Some(name.into()),
    })
}

/// How a quota is reported: the period's limit (with grants), per DAY, WEEK or MONTH.
pub fn quota_limit(plan_name: &str, q: &Quota, effective: u64) -> Arc<Limit> {
    Arc::new(Limit {
        requests_per_unit: u32::try_from(effective).unwrap_or(u32::MAX),
        unit: match q.period {
            PeriodKind::Day => Unit::Day,
            PeriodKind::Week => Unit::Week,
            PeriodKind::Month => Unit::Month,
        },
        name: Some(format!("{plan_name}/quota").into()),
    })
}

/// How a usage limit is reported: "plan/limit", "plan/customer/limit" for a
/// customer-level one, with `[pattern]` for a per-model limit.
pub fn usage_limit(plan_name: &str, l: &UsageLimit, pattern: Option<&str>, lim: u64) -> Arc<Limit> {
    let scope = if l.scope == Scope::Customer {
        "customer/"
    } else {
        ""
    };
    let name = match pattern {
        Some(m) => format!("{plan_name}/{scope}{}[{m}]", l.name),
        None => format!("{plan_name}/{scope}{}", l.name),
    };
    Arc::new(Limit {
        requests_per_unit: u32::try_from(lim).unwrap_or(u32::MAX),
        unit: match l.window {
            LimitWindow::Minute => Unit::Minute,
            LimitWindow::Hour => Unit::Hour,
            LimitWindow::Day => Unit::Day,
            LimitWindow::Week => Unit::Week,
            LimitWindow::Month => Unit::Month,
        },
        name: Some(name.into()),
    })
}

/// The quota limit for a period: the plan's limit plus the period's grant
/// (negative grants revoke), never below 0.
pub fn effective_quota(limit: u64, grant: i64) -> u64 {
    let v = i128::from(limit) + i128::from(grant);
    u64::try_from(v.max(0)).unwrap_or(u64::MAX)
}

/// Whether a quota counter value allows the call: a counting call was
/// applied only if it stayed within the limit; a check-only call (0 hits)
/// passes while at least one unit is left.
pub fn quota_allows(value: u64, hits: u64, effective: u64) -> bool {
    if hits == 0 {
        value < effective
    } else {
        value <= effective
    }
}

/// Microseconds rounded up to whole seconds.
pub fn ceil_secs(micros: i64) -> u64 {
    u64::try_from(micros.max(0))
        .unwrap_or(0)
        .div_ceil(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_rates_are_reported_in_whole_units() {
        let t = |r| Throttle {
            rate_limit: r,
            burst_limit: 1,
        };
        let l = throttle_limit("p", &t(10.0), None);
        assert_eq!((l.requests_per_unit, l.unit), (10, Unit::Second));
        let l = throttle_limit("p", &t(0.5), None);
        assert_eq!((l.requests_per_unit, l.unit), (30, Unit::Minute));
        let l = throttle_limit("p", &t(1.0 / 7200.0), Some("/x/GET"));
        assert_eq!((l.requests_per_unit, l.unit), (12, Unit::Day));
        assert_eq!(l.name.as_deref(), Some("p/throttle/x/GET"));
        // Under one a day: per year, never 0 (RLS's "always over").
        let l = throttle_limit("p", &t(1e-6), None);
        assert_eq!((l.requests_per_unit, l.unit), (32, Unit::Year));
        let l = throttle_limit("p", &t(1e-9), None);
        assert_eq!((l.requests_per_unit, l.unit), (1, Unit::Year));
        // No refill: the burst, per year (not 0, "always over", while the
        // burst's calls pass); with no burst either, 0.
        let l = throttle_limit("p", &t(0.0), None);
        assert_eq!((l.requests_per_unit, l.unit), (1, Unit::Year));
        let none = Throttle {
            rate_limit: 0.0,
            burst_limit: 0,
        };
        assert_eq!(throttle_limit("p", &none, None).requests_per_unit, 0);
    }

    #[test]
    fn keys_of_different_kinds_and_owners_differ() {
        let a = quota_key("p1", "k1", 0);
        assert_ne!(a, daily_key("p1", "k1", 0));
        assert_ne!(a, quota_key("p1", "k11", 0));
        assert_ne!(a, quota_key("p11", "k1", 0));
        assert_ne!(
            bucket_key("p", "k", None),
            bucket_key("p", "k", Some((0, "/GET")))
        );
        assert_eq!(a[0], PLAN_KEY_TAG);
    }

    #[test]
    fn grants_and_check_only_calls() {
        assert_eq!(effective_quota(10, 5), 15);
        assert_eq!(effective_quota(10, -20), 0);
        assert!(quota_allows(10, 1, 10));
        assert!(!quota_allows(11, 1, 10));
        assert!(quota_allows(9, 0, 10));
        assert!(!quota_allows(10, 0, 10));
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(1_000_000), 1);
        assert_eq!(ceil_secs(-5), 0);
    }
}
