//! Token bucket arithmetic (pure; time is passed in as Unix microseconds).
//!
//! Amazon API Gateway's throttle: a bucket of capacity `burst_limit` starts
//! full and refills continuously at `rate_limit` tokens per second; a call
//! takes one token per hit and is refused, taking nothing, when the bucket
//! holds fewer. A check with 0 hits passes when one token is there.

use super::model::Throttle;

/// A bucket's state: GCRA's "theoretical arrival time" in Unix nanoseconds.
/// The bucket holds `burst - max(0, tat - now) / interval` tokens, so all
/// arithmetic is on integers and nothing drifts however often it is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketState {
    /// Theoretical arrival time, Unix nanoseconds.
    pub tat: i128,
    /// When the bucket is full again (Unix microseconds); a full bucket is
    /// the same as no bucket, so it may be dropped from then on.
    pub full_at: i64,
    /// The throttle `tat` was computed with: nanoseconds per token and
    /// capacity. When the plan's throttle changes, a key keeps what it had:
    /// a lowered burst keeps the tokens the bucket holds (up to the new
    /// capacity) rather than its debt, which would lock the key out for the
    /// old burst's time; a raised burst adds the difference at once.
    pub interval: i128,
    /// See `interval`.
    pub burst: u32,
}

/// The result of a take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the hits were taken.
    pub allowed: bool,
    /// Whole tokens left.
    pub remaining: u64,
    /// Microseconds until the bucket is full (allowed) or until the refused
    /// hits would fit (refused); `None` when that never happens.
    pub reset_in: Option<i64>,
}

/// A rate of 0 refills once in this many nanoseconds: never, in practice.
const NEVER_NS: i128 = 1_000_000_000_000_000_000;

/// Nanoseconds per token.
fn interval(t: &Throttle) -> i128 {
    if t.rate_limit > 0.0 {
        ((1e9 / t.rate_limit).round() as i128).max(1)
    } else {
        NEVER_NS
    }
}

fn ns(micros: i64) -> i128 {
    i128::from(micros) * 1000
}

fn micros_ceil(ns: i128) -> i64 {
    let m = (ns.max(0) + 999) / 1000;
    i64::try_from(m).unwrap_or(i64::MAX)
}

fn state(tat: i128, t: &Throttle) -> BucketState {
    BucketState {
        tat,
        full_at: micros_ceil(tat),
        interval: interval(t),
        burst: t.burst_limit,
    }
}

/// The state's theoretical arrival time under throttle `t` at `now_ns`
/// (never before it). Under the throttle it was computed with, that is its
/// own. Under another one (the plan changed at `changed_ns`; seen at the
/// bucket's next use), the bucket is converted as it stood at the change:
/// its debt in tokens then by its own throttle, `d`, becomes, with a burst
/// as large or larger, the same debt (the added capacity is there at once);
/// with a smaller burst, the tokens it held, `old burst - d`, at most the
/// new burst. From the change on it refills at the new rate (a raised rate
/// counts from the change, not from the key's next call). Plans keep their
/// update time in whole seconds, so the change is known to a second:
/// `changed_s` is that Unix second, and the bucket is converted at
/// whichever end of it leaves fewer tokens (never more than either). A
/// change time after `now_ns` (clocks) counts as `now_ns`. The one
/// conversion in floating point; throttle changes are rare.
fn tat_under(s: &BucketState, t: &Throttle, now_ns: i128, changed_s: i64) -> i128 {
    let iv = interval(t);
    if s.interval == iv && s.burst == t.burst_limit {
        return s.tat.max(now_ns);
    }
    let burst = f64::from(t.burst_limit);
    let at = |at: i128| {
        let at = at.min(now_ns);
        let debt = (s.tat - at).max(0) as f64 / s.interval as f64;
        let tokens = if t.burst_limit >= s.burst {
            burst - debt
        } else {
            (f64::from(s.burst) - debt).min(burst)
        }
        .max(0.0);
        at + ((burst - tokens) * iv as f64).round() as i128
    };
    let start = i128::from(changed_s) * 1_000_000_000;
    at(start).max(at(start + 1_000_000_000)).max(now_ns)
}

/// Tokens in a bucket at `now` (Unix microseconds); full when absent.
/// `changed_at` is the Unix second in which the throttle last changed (the
/// plan's update time), for a bucket last used under another one.
pub fn tokens_at(s: Option<BucketState>, t: &Throttle, now: i64, changed_at: i64) -> f64 {
    let burst = f64::from(t.burst_limit);
    match s {
        None => burst,
        Some(s) => {
            let now_ns = ns(now);
            let debt = tat_under(&s, t, now_ns, changed_at) - now_ns;
            (burst - debt as f64 / interval(t) as f64).max(0.0)
        }
    }
}

/// Takes `hits` tokens at `now` (Unix microseconds). Returns the new state
/// (unchanged when refused) and the outcome. `changed_at` is the Unix
/// second in which the throttle last changed (the plan's update time), for
/// a bucket last used under another one.
pub fn take(
    s: Option<BucketState>,
    t: &Throttle,
    hits: u64,
    now: i64,
    changed_at: i64,
) -> (BucketState, Outcome) {
    let now_ns = ns(now);
    let iv = interval(t);
    let cap = i128::from(t.burst_limit) * iv;
    let tat = s.map_or(now_ns, |s| tat_under(&s, t, now_ns, changed_at));
    let need = i128::from(hits.max(1));
    let fits_at = tat + need * iv - now_ns;
    let allowed = fits_at <= cap;
    let new_tat = if allowed {
        tat + i128::from(hits) * iv
    } else {
        tat
    };
    let debt = new_tat - now_ns;
    let remaining = u64::try_from((cap - debt).max(0) / iv).unwrap_or(0);
    let never = t.rate_limit <= 0.0;
    let reset_in = if allowed {
        if never && debt > 0 {
            None
        } else {
            Some(micros_ceil(debt))
        }
    } else if never || need > i128::from(t.burst_limit) {
        None
    } else {
        Some(micros_ceil(fits_at - cap))
    };
    let new = if allowed {
        state(new_tat, t)
    } else {
        match s {
            // Unchanged, unless the throttle changed (then converted).
            Some(s) if s.interval == iv && s.burst == t.burst_limit => s,
            _ => state(tat, t),
        }
    };
    (
        new,
        Outcome {
            allowed,
            remaining,
            reset_in,
        },
    )
}

/// Gives back `hits` tokens taken earlier (when a later limit refused the
/// call), never above capacity. `changed_at` as for [`take`].
pub fn refund(s: BucketState, t: &Throttle, hits: u64, now: i64, changed_at: i64) -> BucketState {
    let now_ns = ns(now);
    state(
        (tat_under(&s, t, now_ns, changed_at) - i128::from(hits) * interval(t)).max(now_ns),
        t,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;
    /// A throttle change time (Unix second) after every call: a changed
    /// throttle is then converted at the call that sees it.
    const LATE: i64 = i64::MAX / 2_000_000_000;

    fn run(t: &Throttle, calls: &[(i64, u64)]) -> Vec<bool> {
        let mut st = None;
        calls
            .iter()
            .map(|&(now, hits)| {
                let (s, o) = take(st, t, hits, now, LATE);
                st = Some(s);
                o.allowed
            })
            .collect()
    }

    /// A raised rate refills from the time it was raised, not from the
    /// key's next call: a bucket drained under 0.01/s, its rate raised to
    /// 10/s at 1 s, is full at 2.2 s (it used to hold 0.022 tokens then, and
    /// refuse). A lowered rate keeps the tokens held at the change and
    /// refills slower from then on.
    #[test]
    fn a_changed_rate_counts_from_the_change() {
        let slow = Throttle {
            rate_limit: 0.01,
            burst_limit: 5,
        };
        let fast = Throttle {
            rate_limit: 10.0,
            burst_limit: 5,
        };
        let (drained, o) = take(None, &slow, 5, 0, LATE);
        assert!(o.allowed && o.remaining == 0);
        // Changed in second 1: converted at 2 s, the end leaving fewer
        // tokens; 0.2 s at 10/s refills 2 by 2.2 s, 5 (full) by 2.5 s.
        let t = tokens_at(Some(drained), &fast, 2_200_000, 1);
        assert!((t - 2.02).abs() < 1e-6, "{t}");
        assert_eq!(tokens_at(Some(drained), &fast, 2_500_000, 1), 5.0);
        let (_, o) = take(Some(drained), &fast, 1, 2_500_000, 1);
        assert!(o.allowed, "{o:?}");
        assert_eq!(o.remaining, 4);
        // Converted at the call (a change time after it): 0.025 tokens.
        let (_, o) = take(Some(drained), &fast, 1, 2_500_000, LATE);
        assert!(!o.allowed, "{o:?}");

        // Lowered: a bucket under 10/s drained of 5 at 100 s, the rate
        // lowered to 0.01/s in second 100: converted at 100 s (the end
        // leaving fewer: 0 tokens, not the 5 refilled by 101 s), then 0.01
        // per second: 0.1 at 110 s.
        let (s, _) = take(None, &fast, 5, 100 * S, LATE);
        let t = tokens_at(Some(s), &slow, 110 * S, 100);
        assert!((t - 0.1).abs() < 1e-6, "{t}");
        // Changed in second 101 (refilled to 5 by then): 5 at 110 s.
        let t = tokens_at(Some(s), &slow, 110 * S, 101);
        assert!((t - 5.0).abs() < 1e-6, "{t}");
    }

    #[test]
    fn burst_then_steady_rate() {
        let t = Throttle {
            rate_limit: 10.0,
            burst_limit: 20,
        };
        // 25 calls at once: the burst of 20 passes.
        let at_once: Vec<(i64, u64)> = (0..25).map(|_| (0, 1)).collect();
        assert_eq!(run(&t, &at_once).iter().filter(|a| **a).count(), 20);
        // Then one call every 100 ms (the steady rate) all pass, and a
        // second call in the same instant does not.
        let mut calls = at_once.clone();
        for i in 1..=10 {
            calls.push((i * S / 10, 1));
            calls.push((i * S / 10, 1));
        }
        let r = run(&t, &calls);
        for i in 0..10 {
            assert!(r[25 + 2 * i], "steady call {i}");
            assert!(!r[26 + 2 * i], "extra call {i}");
        }
    }

    #[test]
    fn aws_worked_example_scaled_down() {
        // AWS: 10,000 rps, burst 5,000: 5,000 at t=0 and 5,000 at t=101 ms -> 6,000 served
        // (the bucket refills 1,010 tokens in 101 ms; AWS rounds to 1,000).
        let t = Throttle {
            rate_limit: 10_000.0,
            burst_limit: 5_000,
        };
        let mut calls: Vec<(i64, u64)> = (0..5_000).map(|_| (0, 1)).collect();
        calls.extend((0..5_000).map(|_| (101_000, 1)));
        assert_eq!(run(&t, &calls).iter().filter(|a| **a).count(), 6_010);
    }

    #[test]
    fn fractional_rate_and_refused_calls_take_nothing() {
        let t = Throttle {
            rate_limit: 0.5,
            burst_limit: 1,
        };
        assert_eq!(
            run(&t, &[(0, 1), (S, 1), (2 * S - 1, 1), (2 * S, 1)]),
            vec![true, false, false, true]
        );
    }

    #[test]
    fn weighted_hits_and_check_only_calls() {
        let t = Throttle {
            rate_limit: 1.0,
            burst_limit: 5,
        };
        let (s, o) = take(None, &t, 3, 0, LATE);
        assert!(o.allowed);
        assert_eq!(o.remaining, 2);
        assert_eq!(o.reset_in, Some(3 * S));
        let (s, o) = take(Some(s), &t, 3, 0, LATE);
        assert!(!o.allowed, "2 tokens < 3 hits");
        assert_eq!(o.reset_in, Some(S), "one more token in 1 s");
        let (s, o) = take(Some(s), &t, 0, 0, LATE);
        assert!(o.allowed, "a check passes with tokens left");
        assert_eq!(o.remaining, 2);
        let (_, o) = take(Some(s), &t, 6, 0, LATE);
        assert!(!o.allowed);
        assert_eq!(o.reset_in, None, "6 hits never fit a bucket of 5");
    }

    #[test]
    fn zero_rate_zero_burst_refuses_everything() {
        let t = Throttle {
            rate_limit: 0.0,
            burst_limit: 0,
        };
        assert_eq!(run(&t, &[(0, 1), (100 * S, 0)]), vec![false, false]);
    }

    #[test]
    fn refund_restores_tokens_up_to_capacity() {
        let t = Throttle {
            rate_limit: 1.0,
            burst_limit: 2,
        };
        let (s, _) = take(None, &t, 2, 0, LATE);
        assert_eq!(tokens_at(Some(s), &t, 0, LATE), 0.0);
        let s = refund(s, &t, 1, 0, LATE);
        assert_eq!(tokens_at(Some(s), &t, 0, LATE), 1.0);
        let s = refund(s, &t, 5, 0, LATE);
        assert_eq!(tokens_at(Some(s), &t, 0, LATE), 2.0);
        assert_eq!(s.full_at, 0);
    }

    /// A plan's throttle changed under a used bucket: a lowered burst keeps
    /// the tokens the bucket holds, up to the new capacity, rather than its
    /// debt, which locked a key out for the old burst's time (100 tokens at
    /// 1/s: 90 s); a raised burst adds the difference at once.
    #[test]
    fn a_changed_throttle_carries_the_tokens_over() {
        let big = Throttle {
            rate_limit: 1.0,
            burst_limit: 100,
        };
        let small = Throttle {
            rate_limit: 1.0,
            burst_limit: 5,
        };
        let (s, o) = take(None, &big, 100, 0, LATE);
        assert!(o.allowed);
        // 6 s later under burst 5: 6 tokens refilled, 5 kept; 1 taken.
        let (s2, o) = take(Some(s), &small, 1, 6 * S, LATE);
        assert!(o.allowed, "{o:?}");
        assert_eq!(o.remaining, 4);
        assert_eq!((s2.burst, s2.interval), (5, 1_000_000_000));
        // 9 of 50 left, lowered to 3: 3 left at once.
        let mid = Throttle {
            rate_limit: 1.0,
            burst_limit: 50,
        };
        let (s, _) = take(None, &mid, 41, 0, LATE);
        assert_eq!(tokens_at(Some(s), &mid, 0, LATE), 9.0);
        let three = Throttle {
            rate_limit: 1.0,
            burst_limit: 3,
        };
        assert_eq!(tokens_at(Some(s), &three, 0, LATE), 3.0);
        // A raised burst: the 41 used stay used, 59 of 100 left.
        assert_eq!(tokens_at(Some(s), &big, 0, LATE), 59.0);
        // A rate change: the 9 tokens stay 9. The change is seen at the
        // bucket's next use (here 1 s later): until then it refilled at the
        // rate it had (10 tokens), from then on at the new one.
        let fast = Throttle {
            rate_limit: 10.0,
            burst_limit: 50,
        };
        assert_eq!(tokens_at(Some(s), &fast, 0, LATE), 9.0);
        let (s3, o) = take(Some(s), &fast, 0, S, LATE);
        assert!(o.allowed);
        assert_eq!(o.remaining, 10);
        assert_eq!(tokens_at(Some(s3), &fast, S + S / 2, LATE), 15.0);
    }

    #[test]
    fn clock_going_back_refills_nothing() {
        let t = Throttle {
            rate_limit: 1.0,
            burst_limit: 1,
        };
        assert_eq!(run(&t, &[(10 * S, 1), (5 * S, 1)]), vec![true, false]);
    }
}
