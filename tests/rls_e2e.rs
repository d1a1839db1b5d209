//! End-to-end tests of the RLS v3 server over a real TCP port with the tonic
//! client, asserting exact wire values against envoyproxy/ratelimit semantics.
//!
//! Counting tests use day (or hour) windows and step over a window boundary
//! if one is imminent, so nothing depends on timing.

mod common;

use std::collections::BTreeSet;

use common::*;
use sluice::proto::rls::rate_limit_response::{rate_limit::Unit as WireUnit, Code as WireCode};
use sluice::server::RequestLimits;

const DOMAIN: &str = "e2e";

const CONFIG: &str = r#"
domain: e2e
descriptors:
  # Plain counting.
  - key: basic
    value: three
    rate_limit:
      unit: day
      requests_per_unit: 3
      name: basic-three

  # Precedence on one level: key_value > wildcards (config order) > key.
  - key: model
    value: gpt-4o
    rate_limit: {unit: day, requests_per_unit: 10, name: exact}
  - key: model
    value: gpt-4*
    rate_limit: {unit: day, requests_per_unit: 15, name: wildcard-first}
  - key: model
    value: gpt-*
    rate_limit: {unit: day, requests_per_unit: 20, name: wildcard}
  - key: model
    rate_limit: {unit: day, requests_per_unit: 30, name: key-only}

  # Nesting: a limit applies only at the request's last entry, depth must match.
  - key: tenant
    value: acme
    rate_limit: {unit: day, requests_per_unit: 5, name: tenant-parent}
    descriptors:
      - key: user
        rate_limit: {unit: day, requests_per_unit: 2, name: tenant-user}

  # No backtracking: org=acme wins over org, even if only org has a deeper match.
  - key: org
    value: acme
    descriptors:
      - key: team
        value: red
        rate_limit: {unit: day, requests_per_unit: 4, name: acme-red}
  - key: org
    descriptors:
      - key: team
        rate_limit: {unit: day, requests_per_unit: 6, name: any-org-team}

  # Key-only: one counter per distinct value.
  - key: user_id
    rate_limit: {unit: day, requests_per_unit: 2, name: per-user}

  # share_threshold: every value matching the wildcard shares one counter.
  - key: path
    value: /api/*
    share_threshold: true
    rate_limit: {unit: day, requests_per_unit: 3, name: shared}
  # Without it, a wildcard rule counts each value separately.
  - key: route
    value: /v1/*
    rate_limit: {unit: day, requests_per_unit: 3, name: per-route}

  # Allowlisted: matches, no limit.
  - key: healthcheck

  - key: vip
    rate_limit: {unlimited: true}

  - key: blocked
    rate_limit: {unit: day, requests_per_unit: 0, name: deny}

  - key: shadow
    shadow_mode: true
    rate_limit: {unit: day, requests_per_unit: 2, name: shadow}

  # quota_mode: a soft limit, denied only when every quota-mode descriptor is.
  - key: backend_quota
    quota_mode: true
    rate_limit: {unit: day, requests_per_unit: 1, name: backend-quota}

  # replaces
  - key: plan
    value: free
    rate_limit: {unit: day, requests_per_unit: 1, name: free-plan}
  - key: upgrade
    value: premium
    rate_limit:
      unit: day
      requests_per_unit: 100
      name: premium-plan
      replaces:
        - name: free-plan

  # hits_addend
  - key: tokens
    rate_limit: {unit: day, requests_per_unit: 10, name: tokens}

  # concurrency
  - key: hot
    rate_limit: {unit: hour, requests_per_unit: 150, name: hot}

  # every unit
  - key: unit
    value: second
    rate_limit: {unit: second, requests_per_unit: 1000}
  - key: unit
    value: minute
    rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: unit
    value: hour
    rate_limit: {unit: hour, requests_per_unit: 1000}
  - key: unit
    value: day
    rate_limit: {unit: DAY, requests_per_unit: 1000}
  - key: unit
    value: week
    rate_limit: {unit: week, requests_per_unit: 1000}
  - key: unit
    value: month
    rate_limit: {unit: month, requests_per_unit: 1000}
  - key: unit
    value: year
    rate_limit: {unit: year, requests_per_unit: 1000}
"#;

const DAY_SECS: u64 = 86_400;
const HOUR_SECS: u64 = 3_600;
/// Seconds before a window boundary within which a counting test waits for
/// the next window instead of starting.
const EDGE_MARGIN: u64 = 60;

async fn server() -> TestServer {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    TestServer::start(CONFIG).await
}

/// The helper's literal wire numbers are the generated enums' numbers.
#[test]
fn wire_numbers_match_the_generated_enums() {
    assert_eq!(UNKNOWN, WireCode::Unknown as i32);
    assert_eq!(OK, WireCode::Ok as i32);
    assert_eq!(OVER_LIMIT, WireCode::OverLimit as i32);
    assert_eq!(
        [SECOND, MINUTE, HOUR, DAY, MONTH, YEAR, WEEK],
        [
            WireUnit::Second as i32,
            WireUnit::Minute as i32,
            WireUnit::Hour as i32,
            WireUnit::Day as i32,
            WireUnit::Month as i32,
            WireUnit::Year as i32,
            WireUnit::Week as i32,
        ]
    );
    assert_eq!(
        [SECOND, MINUTE, HOUR, DAY, MONTH, YEAR, WEEK],
        [1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!([UNKNOWN, OK, OVER_LIMIT], [0, 1, 2]);
}

// ---------------------------------------------------------------- statuses

#[tokio::test(flavor = "multi_thread")]
async fn statuses_one_per_descriptor_in_request_order() {
    let s = server().await;
    let r = s
        .check(request(
            DOMAIN,
            vec![
                desc(&[("vip", "x")]),
                desc(&[("basic", "three")]),
                desc(&[("nothing", "matches")]),
                desc(&[("blocked", "x")]),
                desc(&[("model", "gpt-4o")]),
            ],
        ))
        .await;
    assert_eq!(r.statuses.len(), 5);
    assert_unlimited(&r.statuses[0]);
    assert_limited(&r.statuses[1], OK, "basic-three", 3, DAY, 2);
    assert_no_limit(&r.statuses[2]);
    assert_limited(&r.statuses[3], OVER_LIMIT, "deny", 0, DAY, 0);
    assert_limited(&r.statuses[4], OK, "exact", 10, DAY, 9);
    assert_eq!(r.overall_code, OVER_LIMIT);
    s.shutdown().await;
}

/// Answers of every size interleaved on one connection: under 256 bytes,
/// between 256 and 1024 (copied into h2's write buffer and written together,
/// `server::io`), and over 1024 (written from their own buffer). Each
/// answer arrives whole and belongs to its own call.
#[tokio::test(flavor = "multi_thread")]
async fn answers_small_and_large_interleave_whole_on_one_connection() {
    let s = server().await;
    let client = s.client();
    let mut tasks = Vec::new();
    for round in 0..20 {
        for n in [1usize, 20, 60] {
            let mut c = client.clone();
            // Alternate a limit checked without counting and an unlimited
            // key; the first descriptor says which call this is. The
            // limit with the longest name keeps the largest answer over
            // 1024 bytes whatever the time until reset (its varint
            // shrinks towards midnight).
            let mut descriptors = vec![desc(&[("nothing", &format!("call-{round}-{n}"))])];
            for i in 1..n {
                descriptors.push(if i % 2 == 1 {
                    desc_hits(&[("model", "gpt-4x")], 0)
                } else {
                    desc(&[("vip", "x")])
                });
            }
            let req = request(DOMAIN, descriptors);
            tasks.push(tokio::spawn(async move {
                let r = c.should_rate_limit(req).await.expect("call succeeds");
                (n, r.into_inner())
            }));
        }
    }
    let mut sizes = BTreeSet::new();
    for t in tasks {
        let (n, r) = t.await.expect("task did not panic");
        sizes.insert(prost::Message::encoded_len(&r) / 256);
        assert_eq!(r.statuses.len(), n);
        assert_eq!(r.overall_code, OK);
        assert_no_limit(&r.statuses[0]);
        for (i, st) in r.statuses.iter().enumerate().skip(1) {
            if i % 2 == 1 {
                assert_limited(st, OK, "wildcard-first", 15, DAY, 15);
            } else {
                assert_unlimited(st);
            }
        }
    }
    // The three sizes really are below 256, between 256 and 1024, above 1024.
    assert!(sizes.contains(&0), "sizes / 256: {sizes:?}");
    assert!(
        sizes.iter().any(|&k| (1..4).contains(&k)),
        "sizes / 256: {sizes:?}"
    );
    assert!(sizes.iter().any(|&k| k >= 4), "sizes / 256: {sizes:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_domain_and_no_match_are_ok_without_limit() {
    let s = server().await;
    // Unknown domain: every descriptor OK, no limit, never an error.
    let r = s
        .check(request(
            "no-such-domain",
            vec![
                desc(&[("basic", "three")]),
                desc(&[("vip", "x")]),
                desc(&[]),
            ],
        ))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.len(), 3);
    for st in &r.statuses {
        assert_no_limit(st);
    }
    // An override does not apply to an unknown domain.
    let r = s
        .check(request(
            "no-such-domain",
            vec![desc_override(&[("k", "v")], 0, DAY)],
        ))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_no_limit(&r.statuses[0]);

    // Known domain, no matching rule (unknown key, unknown value of a
    // key_value rule, allowlisted rule, no entries, a parent without a limit).
    for pairs in [
        &[("nothing", "matches")][..],
        &[("basic", "four")][..],
        &[("healthcheck", "x")][..],
        &[][..],
        &[("org", "acme")][..],
    ] {
        for _ in 0..3 {
            let r = s.hit(DOMAIN, pairs).await;
            assert_eq!(r.overall_code, OK, "{pairs:?}");
            assert_no_limit(&r.statuses[0]);
        }
    }
    s.shutdown().await;
}

// ---------------------------------------------------------------- counting

#[tokio::test(flavor = "multi_thread")]
async fn ok_until_the_limit_then_over_limit() {
    let s = server().await;
    let d = &[("basic", "three")];
    for remaining in [2, 1, 0] {
        let r = s.hit(DOMAIN, d).await;
        assert_eq!(r.overall_code, OK);
        assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, remaining);
    }
    for _ in 0..3 {
        let r = s.hit(DOMAIN, d).await;
        assert_eq!(r.overall_code, OVER_LIMIT);
        // current_limit and duration_until_reset stay set when over.
        assert_limited(&r.statuses[0], OVER_LIMIT, "basic-three", 3, DAY, 0);
    }
    // Over-limit hits are counted too (upstream increments before comparing).
    assert_eq!(s.stored_count(DOMAIN, &desc(d)), Some(6));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overall_over_limit_if_any_descriptor_is_over() {
    let s = server().await;
    for _ in 0..3 {
        s.hit(DOMAIN, &[("basic", "three")]).await;
    }
    let r = s
        .check(request(
            DOMAIN,
            vec![
                desc(&[("model", "claude")]),
                desc(&[("basic", "three")]),
                desc(&[("vip", "x")]),
                desc(&[("nothing", "x")]),
            ],
        ))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OK, "key-only", 30, DAY, 29);
    assert_limited(&r.statuses[1], OVER_LIMIT, "basic-three", 3, DAY, 0);
    assert_unlimited(&r.statuses[2]);
    assert_no_limit(&r.statuses[3]);

    // The same request without the over descriptor is OK overall.
    let r = s
        .check(request(
            DOMAIN,
            vec![desc(&[("model", "claude")]), desc(&[("vip", "x")])],
        ))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OK, "key-only", 30, DAY, 28);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_unit_reports_its_wire_number_and_window() {
    let s = server().await;
    for (value, unit) in [
        ("second", SECOND),
        ("minute", MINUTE),
        ("hour", HOUR),
        ("day", DAY),
        ("week", WEEK),
        ("month", MONTH),
        ("year", YEAR),
    ] {
        // One hit per counter: the first hit of any window leaves 999.
        let r = s.hit(DOMAIN, &[("unit", value)]).await;
        assert_eq!(r.overall_code, OK);
        assert_limited(&r.statuses[0], OK, "", 1000, unit, 999);
    }
    s.shutdown().await;
}

// ---------------------------------------------------------------- matching

#[tokio::test(flavor = "multi_thread")]
async fn key_value_beats_wildcard_beats_key_only() {
    let s = server().await;
    let r = s.hit(DOMAIN, &[("model", "gpt-4o")]).await;
    assert_limited(&r.statuses[0], OK, "exact", 10, DAY, 9);
    // Both wildcards match gpt-4o-mini: the first in config order wins.
    let r = s.hit(DOMAIN, &[("model", "gpt-4o-mini")]).await;
    assert_limited(&r.statuses[0], OK, "wildcard-first", 15, DAY, 14);
    let r = s.hit(DOMAIN, &[("model", "gpt-3.5")]).await;
    assert_limited(&r.statuses[0], OK, "wildcard", 20, DAY, 19);
    // `*` matches zero characters too.
    let r = s.hit(DOMAIN, &[("model", "gpt-")]).await;
    assert_limited(&r.statuses[0], OK, "wildcard", 20, DAY, 19);
    let r = s.hit(DOMAIN, &[("model", "claude")]).await;
    assert_limited(&r.statuses[0], OK, "key-only", 30, DAY, 29);
    // Wildcard without share_threshold: each value has its own counter.
    let r = s.hit(DOMAIN, &[("model", "gpt-3.5")]).await;
    assert_limited(&r.statuses[0], OK, "wildcard", 20, DAY, 18);
    let r = s.hit(DOMAIN, &[("model", "gpt-4o")]).await;
    assert_limited(&r.statuses[0], OK, "exact", 10, DAY, 8);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_depth_must_equal_and_there_is_no_backtracking() {
    let s = server().await;
    // A limit on a parent applies to a request that ends there.
    let r = s.hit(DOMAIN, &[("tenant", "acme")]).await;
    assert_limited(&r.statuses[0], OK, "tenant-parent", 5, DAY, 4);
    // The child limit applies to the two-entry request (not the parent's).
    let r = s.hit(DOMAIN, &[("tenant", "acme"), ("user", "bob")]).await;
    assert_limited(&r.statuses[0], OK, "tenant-user", 2, DAY, 1);
    // Deeper than the config: no limit.
    let r = s
        .hit(DOMAIN, &[("tenant", "acme"), ("user", "bob"), ("x", "y")])
        .await;
    assert_no_limit(&r.statuses[0]);
    // Deeper than a leaf rule: no limit.
    let r = s.hit(DOMAIN, &[("basic", "three"), ("x", "y")]).await;
    assert_no_limit(&r.statuses[0]);
    // Wrong order of entries: no limit.
    let r = s.hit(DOMAIN, &[("user", "bob"), ("tenant", "acme")]).await;
    assert_no_limit(&r.statuses[0]);
    // The parent counter was not touched by the child requests.
    let r = s.hit(DOMAIN, &[("tenant", "acme")]).await;
    assert_limited(&r.statuses[0], OK, "tenant-parent", 5, DAY, 3);

    // No backtracking: org=acme matched, its children have no team=blue,
    // and the walk does not fall back to the `org` node.
    let r = s.hit(DOMAIN, &[("org", "acme"), ("team", "blue")]).await;
    assert_no_limit(&r.statuses[0]);
    let r = s.hit(DOMAIN, &[("org", "acme"), ("team", "red")]).await;
    assert_limited(&r.statuses[0], OK, "acme-red", 4, DAY, 3);
    let r = s.hit(DOMAIN, &[("org", "other"), ("team", "blue")]).await;
    assert_limited(&r.statuses[0], OK, "any-org-team", 6, DAY, 5);
    // A request ending at a node without a limit: no limit.
    let r = s.hit(DOMAIN, &[("org", "other")]).await;
    assert_no_limit(&r.statuses[0]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_only_counts_each_distinct_value_separately() {
    let s = server().await;
    let alice = &[("user_id", "alice")];
    let bob = &[("user_id", "bob")];
    assert_limited(
        &s.hit(DOMAIN, alice).await.statuses[0],
        OK,
        "per-user",
        2,
        DAY,
        1,
    );
    assert_limited(
        &s.hit(DOMAIN, alice).await.statuses[0],
        OK,
        "per-user",
        2,
        DAY,
        0,
    );
    assert_limited(
        &s.hit(DOMAIN, alice).await.statuses[0],
        OVER_LIMIT,
        "per-user",
        2,
        DAY,
        0,
    );
    assert_limited(
        &s.hit(DOMAIN, bob).await.statuses[0],
        OK,
        "per-user",
        2,
        DAY,
        1,
    );
    // Nested key-only: one counter per user under the tenant.
    let r = s.hit(DOMAIN, &[("tenant", "acme"), ("user", "u1")]).await;
    assert_limited(&r.statuses[0], OK, "tenant-user", 2, DAY, 1);
    let r = s.hit(DOMAIN, &[("tenant", "acme"), ("user", "u2")]).await;
    assert_limited(&r.statuses[0], OK, "tenant-user", 2, DAY, 1);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn share_threshold_shares_one_counter_across_matching_values() {
    let s = server().await;
    for (value, code, remaining) in [
        ("/api/a", OK, 2),
        ("/api/b", OK, 1),
        ("/api/c/d", OK, 0),
        ("/api/e", OVER_LIMIT, 0),
        ("/api/a", OVER_LIMIT, 0),
    ] {
        let r = s.hit(DOMAIN, &[("path", value)]).await;
        assert_limited(&r.statuses[0], code, "shared", 3, DAY, remaining);
    }
    // A value that does not match the wildcard has no rule.
    assert_no_limit(&s.hit(DOMAIN, &[("path", "/other")]).await.statuses[0]);
    // Without share_threshold the same kind of rule counts per value.
    for value in ["/v1/a", "/v1/b", "/v1/c"] {
        let r = s.hit(DOMAIN, &[("route", value)]).await;
        assert_limited(&r.statuses[0], OK, "per-route", 3, DAY, 2);
    }
    s.shutdown().await;
}

// ---------------------------------------------------------------- hits

#[tokio::test(flavor = "multi_thread")]
async fn per_descriptor_hits_addend_zero_checks_without_counting() {
    let s = server().await;
    let d = &[("tokens", "peek")];
    // Peek at a fresh counter: full remaining, and nothing is created.
    for _ in 0..3 {
        let r = s.check(request(DOMAIN, vec![desc_hits(d, 0)])).await;
        assert_eq!(r.overall_code, OK);
        assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 10);
    }
    assert_eq!(s.stored_count(DOMAIN, &desc(d)), Some(0));
    // Even with a request-level hits_addend, Some(0) peeks.
    let r = s
        .check(request_hits(DOMAIN, vec![desc_hits(d, 0)], 7))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 10);
    // Count 4, then peeks see 6 left and do not move it.
    let r = s.check(request(DOMAIN, vec![desc_hits(d, 4)])).await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 6);
    for _ in 0..3 {
        let r = s.check(request(DOMAIN, vec![desc_hits(d, 0)])).await;
        assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 6);
    }
    // At exactly the limit a peek is OK with 0 left; over it, OVER_LIMIT.
    let r = s.check(request(DOMAIN, vec![desc_hits(d, 6)])).await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 0);
    let r = s.check(request(DOMAIN, vec![desc_hits(d, 0)])).await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 0);
    let r = s.check(request(DOMAIN, vec![desc_hits(d, 1)])).await;
    assert_limited(&r.statuses[0], OVER_LIMIT, "tokens", 10, DAY, 0);
    let r = s.check(request(DOMAIN, vec![desc_hits(d, 0)])).await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "tokens", 10, DAY, 0);
    assert_eq!(s.stored_count(DOMAIN, &desc(d)), Some(11));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_descriptor_hits_addend_overrides_the_request_hits_addend() {
    let s = server().await;
    // Request hits 5; the first descriptor says 2, the second inherits 5.
    let r = s
        .check(request_hits(
            DOMAIN,
            vec![
                desc_hits(&[("tokens", "a")], 2),
                desc(&[("tokens", "b")]),
                desc_hits(&[("tokens", "c")], 1),
            ],
            5,
        ))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 8);
    assert_limited(&r.statuses[1], OK, "tokens", 10, DAY, 5);
    assert_limited(&r.statuses[2], OK, "tokens", 10, DAY, 9);
    // A per-descriptor hits_addend larger than the request's.
    let r = s
        .check(request_hits(
            DOMAIN,
            vec![desc_hits(&[("tokens", "d")], 9)],
            1,
        ))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 1);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_hits_addend_zero_means_one_and_n_means_n() {
    let s = server().await;
    let r = s
        .check(request_hits(DOMAIN, vec![desc(&[("tokens", "zero")])], 0))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 9);
    let r = s
        .check(request_hits(DOMAIN, vec![desc(&[("tokens", "one")])], 1))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 9);
    let r = s
        .check(request_hits(DOMAIN, vec![desc(&[("tokens", "five")])], 5))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 5);
    let r = s
        .check(request_hits(DOMAIN, vec![desc(&[("tokens", "five")])], 5))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 0);
    let r = s
        .check(request_hits(DOMAIN, vec![desc(&[("tokens", "five")])], 5))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "tokens", 10, DAY, 0);
    // More hits than the limit in one request: over at once.
    let r = s
        .check(request_hits(
            DOMAIN,
            vec![desc(&[("tokens", "eleven")])],
            11,
        ))
        .await;
    assert_limited(&r.statuses[0], OVER_LIMIT, "tokens", 10, DAY, 0);
    // Request hits apply to every descriptor of the request.
    let r = s
        .check(request_hits(
            DOMAIN,
            vec![desc(&[("tokens", "m1")]), desc(&[("tokens", "m2")])],
            3,
        ))
        .await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 7);
    assert_limited(&r.statuses[1], OK, "tokens", 10, DAY, 7);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_addend_u64_max_is_over_limit_and_the_server_stays_up() {
    let s = server().await;
    let d = &[("tokens", "huge")];
    for _ in 0..2 {
        // Twice: the counter saturates instead of overflowing.
        let r = s.check(request(DOMAIN, vec![desc_hits(d, u64::MAX)])).await;
        assert_eq!(r.overall_code, OVER_LIMIT);
        assert_limited(&r.statuses[0], OVER_LIMIT, "tokens", 10, DAY, 0);
    }
    assert_eq!(s.stored_count(DOMAIN, &desc(d)), Some(u64::MAX));
    let r = s.check(request(DOMAIN, vec![desc(d)])).await;
    assert_limited(&r.statuses[0], OVER_LIMIT, "tokens", 10, DAY, 0);
    // u64::MAX on an unlimited or unmatched descriptor is harmless.
    let r = s
        .check(request(
            DOMAIN,
            vec![
                desc_hits(&[("vip", "x")], u64::MAX),
                desc_hits(&[("none", "x")], u64::MAX),
            ],
        ))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_unlimited(&r.statuses[0]);
    assert_no_limit(&r.statuses[1]);
    // The server keeps serving, on new connections too.
    let r = s.hit(DOMAIN, &[("tokens", "normal")]).await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 9);
    let mut c = s.new_client().await;
    let r = c
        .should_rate_limit(request(DOMAIN, vec![desc(&[("tokens", "normal")])]))
        .await
        .expect("server still up")
        .into_inner();
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 8);
    s.shutdown().await;
}

// ---------------------------------------------------------------- rule kinds

#[tokio::test(flavor = "multi_thread")]
async fn unlimited_is_ok_with_u32_max_remaining() {
    let s = server().await;
    for _ in 0..5 {
        let r = s.hit(DOMAIN, &[("vip", "anyone")]).await;
        assert_eq!(r.overall_code, OK);
        assert_unlimited(&r.statuses[0]);
    }
    let r = s
        .check(request_hits(
            DOMAIN,
            vec![desc(&[("vip", "anyone")])],
            u32::MAX,
        ))
        .await;
    assert_unlimited(&r.statuses[0]);
    // Never counted.
    assert_eq!(s.stored_count(DOMAIN, &desc(&[("vip", "anyone")])), None);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_per_unit_zero_is_always_over_limit() {
    let s = server().await;
    // Even the very first request, and even a peek.
    let r = s
        .check(request(DOMAIN, vec![desc_hits(&[("blocked", "x")], 0)]))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "deny", 0, DAY, 0);
    for _ in 0..3 {
        let r = s.hit(DOMAIN, &[("blocked", "x")]).await;
        assert_eq!(r.overall_code, OVER_LIMIT);
        assert_limited(&r.statuses[0], OVER_LIMIT, "deny", 0, DAY, 0);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_answers_ok_but_reports_and_counts() {
    let s = server().await;
    let d = &[("shadow", "x")];
    for remaining in [1, 0, 0, 0] {
        let r = s.hit(DOMAIN, d).await;
        assert_eq!(r.overall_code, OK);
        assert_limited(&r.statuses[0], OK, "shadow", 2, DAY, remaining);
    }
    assert_eq!(s.stored_count(DOMAIN, &desc(d)), Some(4));
    // A shadowed over-limit descriptor does not make the request over.
    let r = s
        .check(request(DOMAIN, vec![desc(d), desc(&[("model", "claude")])]))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OK, "shadow", 2, DAY, 0);
    assert_limited(&r.statuses[1], OK, "key-only", 30, DAY, 29);
    s.shutdown().await;
}

/// Upstream's quota mode: a quota-mode descriptor over its limit says
/// OVER_LIMIT in its status, but the answer is OVER_LIMIT only once every
/// quota-mode descriptor of the request is over.
#[tokio::test(flavor = "multi_thread")]
async fn quota_mode_denies_only_when_every_quota_descriptor_is_over() {
    let s = server().await;
    let a = desc(&[("backend_quota", "a")]);
    let b = desc(&[("backend_quota", "b")]);
    let c = desc(&[("backend_quota", "c")]);
    let r = s.check(request(DOMAIN, vec![a.clone(), b.clone()])).await;
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OK, "backend-quota", 1, DAY, 0);
    assert_limited(&r.statuses[1], OK, "backend-quota", 1, DAY, 0);
    // a is over, c is not: the request passes, a's status says it is over.
    let r = s.check(request(DOMAIN, vec![a.clone(), c.clone()])).await;
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OVER_LIMIT, "backend-quota", 1, DAY, 0);
    assert_limited(&r.statuses[1], OK, "backend-quota", 1, DAY, 0);
    // Both over: denied.
    let r = s.check(request(DOMAIN, vec![a.clone(), b.clone()])).await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "backend-quota", 1, DAY, 0);
    assert_limited(&r.statuses[1], OVER_LIMIT, "backend-quota", 1, DAY, 0);
    // Counted as any limit: a has been hit three times.
    assert_eq!(s.stored_count(DOMAIN, &a), Some(3));
    // With an ordinary descriptor over, quotas do not matter.
    let r = s
        .check(request(
            DOMAIN,
            vec![desc(&[("blocked", "x")]), desc(&[("backend_quota", "d")])],
        ))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[1], OK, "backend-quota", 1, DAY, 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replaces_drops_the_named_limit_without_counting_it() {
    let s = server().await;
    let free = desc(&[("plan", "free")]);
    let premium = desc(&[("upgrade", "premium")]);
    for remaining in [99, 98, 97] {
        let r = s
            .check(request(DOMAIN, vec![free.clone(), premium.clone()]))
            .await;
        assert_eq!(r.overall_code, OK);
        assert_no_limit(&r.statuses[0]);
        assert_limited(&r.statuses[1], OK, "premium-plan", 100, DAY, remaining);
    }
    // Order does not matter.
    let r = s
        .check(request(DOMAIN, vec![premium.clone(), free.clone()]))
        .await;
    assert_limited(&r.statuses[0], OK, "premium-plan", 100, DAY, 96);
    assert_no_limit(&r.statuses[1]);
    // The free limit was never counted: alone, its first hit leaves 0 (1/day),
    // and only the second is over.
    let r = s.check(request(DOMAIN, vec![free.clone()])).await;
    assert_eq!(r.overall_code, OK);
    assert_limited(&r.statuses[0], OK, "free-plan", 1, DAY, 0);
    let r = s.check(request(DOMAIN, vec![free.clone()])).await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "free-plan", 1, DAY, 0);
    // Once over, replacing it still yields OK overall.
    let r = s
        .check(request(DOMAIN, vec![free.clone(), premium.clone()]))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_no_limit(&r.statuses[0]);
    s.shutdown().await;
}

// ---------------------------------------------------------------- overrides

#[tokio::test(flavor = "multi_thread")]
async fn override_applies_for_a_known_domain_without_a_matching_rule() {
    let s = server().await;
    let d = desc_override(&[("custom", "x")], 2, DAY);
    for (code, remaining) in [(OK, 1), (OK, 0), (OVER_LIMIT, 0)] {
        let r = s.check(request(DOMAIN, vec![d.clone()])).await;
        assert_eq!(r.overall_code, code);
        assert_limited(&r.statuses[0], code, "", 2, DAY, remaining);
    }
    // It also replaces the limit of a matching rule (name not echoed).
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_override(&[("vip", "x")], 5, HOUR)],
        ))
        .await;
    assert_limited(&r.statuses[0], OK, "", 5, HOUR, 4);
    // And an override with the rule's unit shares the rule's counter.
    let r = s.hit(DOMAIN, &[("model", "claude")]).await;
    assert_limited(&r.statuses[0], OK, "key-only", 30, DAY, 29);
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_override(&[("model", "claude")], 100, DAY)],
        ))
        .await;
    assert_limited(&r.statuses[0], OK, "", 100, DAY, 98);
    // Overrides are never shadowed.
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_override(&[("shadow", "y")], 0, DAY)],
        ))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "", 0, DAY, 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn override_with_an_unknown_unit_is_invalid_argument() {
    let s = server().await;
    for unit in [0, 99, -1] {
        let st = s
            .check_err(request(
                DOMAIN,
                vec![
                    desc(&[("basic", "three")]),
                    desc_override(&[("custom", "x")], 5, unit),
                ],
            ))
            .await;
        assert_eq!(
            st.code(),
            tonic::Code::InvalidArgument,
            "unit {unit}: {st:?}"
        );
        assert!(
            st.message().contains("unit"),
            "unit {unit}: {}",
            st.message()
        );
    }
    // Nothing was counted by the rejected requests, and the server serves on.
    let r = s.hit(DOMAIN, &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, 2);
    let r = s
        .check(request(
            DOMAIN,
            vec![desc_override(&[("custom", "x")], 5, WEEK)],
        ))
        .await;
    assert_limited(&r.statuses[0], OK, "", 5, WEEK, 4);
    s.shutdown().await;
}

// ---------------------------------------------------------------- bad input

#[tokio::test(flavor = "multi_thread")]
async fn empty_domain_and_empty_descriptors_are_invalid_argument() {
    let s = server().await;
    let st = s
        .check_err(request("", vec![desc(&[("basic", "three")])]))
        .await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("domain"), "{}", st.message());

    let st = s.check_err(request(DOMAIN, vec![])).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("descriptor"), "{}", st.message());

    let r = s.hit(DOMAIN, &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, 2);
    s.shutdown().await;
}

/// A long entry value (a path with its query string, a JWT) is decided, not
/// refused: a refusal would let the call through unlimited behind an Envoy
/// with failure_mode_deny false. It is matched in full and counted under
/// its digest, one counter per distinct value.
#[tokio::test(flavor = "multi_thread")]
async fn long_values_are_decided_and_counted_per_value() {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    let s = server().await;
    let long = |c: char| "x".repeat(1500) + &c.to_string();
    let (a, b) = (long('a'), long('b'));
    // Key-only rule, 2 a day per user.
    for remaining in [1, 0] {
        let r = s.hit(DOMAIN, &[("user_id", &a)]).await;
        assert_limited(&r.statuses[0], OK, "per-user", 2, DAY, remaining);
    }
    let r = s.hit(DOMAIN, &[("user_id", &a)]).await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    // Another long value has its own counter.
    let r = s.hit(DOMAIN, &[("user_id", &b)]).await;
    assert_limited(&r.statuses[0], OK, "per-user", 2, DAY, 1);
    // A wildcard rule matches the whole long value.
    let path = format!("/v1/{}", "q".repeat(5000));
    let r = s.hit(DOMAIN, &[("route", &path)]).await;
    assert_limited(&r.statuses[0], OK, "per-route", 3, DAY, 2);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bounds_are_invalid_argument_naming_what() {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    let s = TestServer::builder()
        .config(CONFIG)
        .limits(RequestLimits {
            max_descriptors: 2,
            max_entries: 2,
            max_key_value_len: 8,
        })
        .start()
        .await;
    let cases: Vec<(&str, sluice::proto::rls::RateLimitRequest)> = vec![
        (
            "descriptors",
            request(
                DOMAIN,
                vec![
                    desc(&[("basic", "three")]),
                    desc(&[("a", "b")]),
                    desc(&[("c", "d")]),
                ],
            ),
        ),
        (
            "entries",
            request(DOMAIN, vec![desc(&[("a", "1"), ("b", "2"), ("c", "3")])]),
        ),
        ("key", request(DOMAIN, vec![desc(&[("k23456789", "v")])])),
        ("domain", request("d23456789", vec![desc(&[("k", "v")])])),
    ];
    for (what, req) in cases {
        let st = s.check_err(req).await;
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{what}: {st:?}");
        assert!(
            st.message().contains(what),
            "{what}: message {:?} should name it",
            st.message()
        );
    }
    // Nothing was counted by the rejected requests; exactly at the bounds is fine.
    let r = s
        .check(request(
            DOMAIN,
            vec![
                desc(&[("basic", "three")]),
                desc(&[("k2345678", "v2345678"), ("b", "")]),
            ],
        ))
        .await;
    assert_eq!(r.statuses.len(), 2);
    assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, 2);
    assert_no_limit(&r.statuses[1]);
    s.shutdown().await;
}

// ---------------------------------------------------------------- concurrency

/// 200 concurrent calls over several channels on one 150/hour key: exactly
/// 150 OK (each remaining value 149..=0 exactly once) and 50 OVER_LIMIT, and
/// the stored count is exactly 200.
async fn concurrent_calls_count_exactly(s: TestServer) -> TestServer {
    const CALLS: usize = 200;
    const CHANNELS: usize = 4;
    let d = desc(&[("hot", "key")]);
    let mut clients = vec![s.client()];
    for _ in 1..CHANNELS {
        clients.push(s.new_client().await);
    }
    let mut tasks = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let mut c = clients[i % CHANNELS].clone();
        let req = request(DOMAIN, vec![d.clone()]);
        tasks.push(tokio::spawn(async move {
            c.should_rate_limit(req)
                .await
                .expect("call succeeds")
                .into_inner()
        }));
    }
    let mut ok_remaining = BTreeSet::new();
    let (mut ok, mut over) = (0, 0);
    for t in tasks {
        let r = t.await.expect("task did not panic");
        assert_eq!(r.statuses.len(), 1);
        let st = &r.statuses[0];
        assert_eq!(r.overall_code, st.code);
        match st.code {
            OK => {
                ok += 1;
                assert_limited(st, OK, "hot", 150, HOUR, st.limit_remaining);
                assert!(
                    ok_remaining.insert(st.limit_remaining),
                    "duplicate remaining {st:?}"
                );
            }
            OVER_LIMIT => {
                over += 1;
                assert_limited(st, OVER_LIMIT, "hot", 150, HOUR, 0);
            }
            other => panic!("unexpected code {other}"),
        }
    }
    assert_eq!((ok, over), (150, 50));
    assert_eq!(ok_remaining, (0..150).collect::<BTreeSet<u32>>());

    // Peek over the wire: the rule says OVER with 0 left...
    let r = s
        .check(request(DOMAIN, vec![desc_hits(&[("hot", "key")], 0)]))
        .await;
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_limited(&r.statuses[0], OVER_LIMIT, "hot", 150, HOUR, 0);
    // ...and an override with the same unit shares the counter, so a peek
    // through it reveals the exact count: 1000 - 200.
    let mut peek = desc_override(&[("hot", "key")], 1000, HOUR);
    peek.hits_addend = Some(0);
    let r = s.check(request(DOMAIN, vec![peek])).await;
    assert_limited(&r.statuses[0], OK, "", 1000, HOUR, 800);
    assert_eq!(s.stored_count(DOMAIN, &d), Some(CALLS as u64));
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_count_exactly_interval_durability() {
    avoid_window_edge(HOUR_SECS, EDGE_MARGIN).await;
    let s = TestServer::start(CONFIG).await;
    let s = concurrent_calls_count_exactly(s).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_count_exactly_sync_durability_group_commit() {
    avoid_window_edge(HOUR_SECS, EDGE_MARGIN).await;
    let s = TestServer::builder().config(CONFIG).sync().start().await;
    let s = concurrent_calls_count_exactly(s).await;
    // Sync: every acknowledged hit is on disk before the answer, so the one
    // counter is already persisted without an explicit flush.
    assert_eq!(s.store.stats().on_disk, 1);
    assert_eq!(s.store.stats().in_memory, 1);
    // And it survives a restart with the exact count.
    let dir = s.shutdown().await;
    let s = TestServer::builder()
        .config(CONFIG)
        .data_dir(dir)
        .start()
        .await;
    let mut peek = desc_override(&[("hot", "key")], 1000, HOUR);
    peek.hits_addend = Some(0);
    let r = s.check(request(DOMAIN, vec![peek])).await;
    assert_limited(&r.statuses[0], OK, "", 1000, HOUR, 800);
    s.shutdown().await;
}

// ---------------------------------------------------------------- persistence

#[tokio::test(flavor = "multi_thread")]
async fn counters_survive_shutdown_and_reopen() {
    let s = server().await;
    let d = &[("tokens", "persist")];
    for remaining in [9, 8, 7] {
        let r = s.hit(DOMAIN, d).await;
        assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, remaining);
    }
    let r = s.hit(DOMAIN, &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, 2);
    let dir = s.shutdown().await;

    let s = TestServer::builder()
        .config(CONFIG)
        .data_dir(dir)
        .start()
        .await;
    assert!(s.store.stats().in_memory >= 2, "{:?}", s.store.stats());
    // A peek first: the restored count, unchanged.
    let r = s.check(request(DOMAIN, vec![desc_hits(d, 0)])).await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 7);
    for remaining in [6, 5] {
        let r = s.hit(DOMAIN, d).await;
        assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, remaining);
    }
    let r = s.hit(DOMAIN, &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, 1);
    let dir = s.shutdown().await;

    // A second restart, with Sync durability this time.
    let s = TestServer::builder()
        .config(CONFIG)
        .sync()
        .data_dir(dir)
        .start()
        .await;
    let r = s.hit(DOMAIN, d).await;
    assert_limited(&r.statuses[0], OK, "tokens", 10, DAY, 4);
    s.shutdown().await;
}

// ---------------------------------------------------------------- config files

#[tokio::test(flavor = "multi_thread")]
async fn several_config_files_serve_several_domains() {
    avoid_window_edge(DAY_SECS, EDGE_MARGIN).await;
    let s = TestServer::builder()
        .file("a.yaml", CONFIG)
        .file(
            "b.yaml",
            "domain: other\ndescriptors:\n  - key: basic\n    value: three\n    rate_limit: {unit: day, requests_per_unit: 1, name: other-basic}\n",
        )
        .start()
        .await;
    // Same descriptor, different domains: different rules and counters.
    let r = s.hit("other", &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OK, "other-basic", 1, DAY, 0);
    let r = s.hit("other", &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OVER_LIMIT, "other-basic", 1, DAY, 0);
    let r = s.hit(DOMAIN, &[("basic", "three")]).await;
    assert_limited(&r.statuses[0], OK, "basic-three", 3, DAY, 2);
    // A rule of one domain does not leak into the other.
    assert_no_limit(&s.hit("other", &[("vip", "x")]).await.statuses[0]);
    s.shutdown().await;
}
