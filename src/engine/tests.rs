//! Data-driven tests of the decision engine against envoyproxy/ratelimit
//! semantics.
//!
//! Every table test is a config (YAML, exactly as envoyproxy/ratelimit reads
//! it) and a sequence of `(now, request, expected decision)` steps run against
//! one in-test counter store, so later steps see the counts of earlier ones.
//!
//! Request syntax (one descriptor per `|`-separated segment):
//!
//! ```text
//! @domain=other @hits=3 k=v,k2=v2 hits=0 limit=5/minute | k3=
//! ```
//!
//! * `@domain=NAME`, `@hits=N` (leading, optional): request domain (default
//!   `d`) and request `hits_addend` (default 0);
//! * `k=v,k2=v2`: the descriptor's entries (`k=` is an empty value);
//! * `hits=N` / `hits=max`: the descriptor's own `hits_addend`;
//! * `limit=N/unit`: a request-supplied limit override.
//!
//! Decision syntax: `OVERALL: status | status ...`, one status per request
//! descriptor, each `CODE LIMIT rem=REMAINING [reset=SECONDS] [+HITS [shadow]]`:
//!
//! * `CODE` is `OK` or `OVER`;
//! * `LIMIT` is `-` (no `current_limit`) or `N/unit`, plus `[name]` if named;
//! * `rem=max` is `u32::MAX`; `reset=` is absent when `duration_until_reset` is;
//! * `+HITS` is present only when the descriptor was counted (a
//!   [`Slot::Counted`]) and gives the hits added (`+0` = check only,
//!   `+max` = `u64::MAX`); `shadow` marks a shadow-mode limit.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::config::parse_file;

/// A `now` where the minute and second windows have just started, so resets
/// read as whole units: minute 60, second 1, hour 3000, day 85 800.
const T: u64 = 600;

/// The counter store a caller puts between [`RuleSet::plan`] and [`decide`].
#[derive(Default)]
struct Counters(HashMap<CounterKey, u64>);

impl Counters {
    /// Adds each counted slot's hits, in order; returns the values after adding.
    fn add(&mut self, slots: &[Slot]) -> Vec<u64> {
        slots
            .iter()
            .filter_map(|s| match s {
                Slot::Counted(c) => Some(c),
                _ => None,
            })
            .map(|c| {
                let v = self.0.entry(c.key.clone()).or_insert(0);
                *v = v.saturating_add(c.hits);
                *v
            })
            .collect()
    }
}

/// Rules from one YAML file plus a counter store.
struct Harness {
    rules: RuleSet,
    counters: Counters,
}

impl Harness {
    fn new(yaml: &str) -> Self {
        Self::with_files(&[yaml])
    }

    /// One domain per YAML file.
    fn with_files(files: &[&str]) -> Self {
        let domains = files
            .iter()
            .map(|yaml| {
                let (domain, _, rules) = parse_file(Path::new("test.yaml"), yaml)
                    .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
                (domain, rules)
            })
            .collect::<HashMap<_, _>>();
        assert_eq!(domains.len(), files.len(), "one domain per file");
        Harness {
            rules: RuleSet::new(domains),
            counters: Counters::default(),
        }
    }

    /// Plans, counts and decides one request at `now`.
    fn run(&mut self, now: u64, req: &Request) -> (Vec<Slot>, Decision) {
        let slots = self.rules.plan(req, now);
        assert_eq!(
            slots.len(),
            req.descriptors.len(),
            "one slot per descriptor"
        );
        for slot in &slots {
            if let Slot::Counted(c) = slot {
                assert!(
                    c.window.start <= now && now < c.window.end,
                    "window {:?} does not contain now={now}",
                    c.window
                );
                assert_eq!(c.window.end - c.window.start, c.limit.unit.seconds());
            }
        }
        let values = self.counters.add(&slots);
        let decision = decide(&slots, &values, now);
        assert_eq!(decision.statuses.len(), slots.len(), "one status per slot");
        (slots, decision)
    }
}

fn parse_request(src: &str) -> Request {
    let mut req = Request {
        domain: "d".into(),
        descriptors: Vec::new(),
        hits_addend: 0,
    };
    for (i, segment) in src.split('|').enumerate() {
        let mut desc = Descriptor::default();
        let mut has_entries = false;
        for tok in segment.split_whitespace() {
            if let Some(opt) = tok.strip_prefix('@') {
                assert!(
                    i == 0 && !has_entries,
                    "`{tok}` must lead the request: {src}"
                );
                match opt.split_once('=') {
                    Some(("domain", v)) => req.domain = v.into(),
                    Some(("hits", v)) => req.hits_addend = v.parse().expect("@hits=u32"),
                    _ => panic!("unknown request option `{tok}` in {src}"),
                }
            } else if !has_entries {
                desc.entries = tok
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv
                            .split_once('=')
                            .unwrap_or_else(|| panic!("`{kv}` in {src}"));
                        Entry::new(k, v)
                    })
                    .collect();
                has_entries = true;
            } else if let Some(v) = tok.strip_prefix("hits=") {
                desc.hits_addend = Some(match v {
                    "max" => u64::MAX,
                    _ => v.parse().expect("hits=u64"),
                });
            } else if let Some(v) = tok.strip_prefix("limit=") {
                let (n, unit) = v.split_once('/').expect("limit=N/unit");
                desc.limit = Some(LimitOverride {
                    requests_per_unit: n.parse().expect("limit=u32/unit"),
                    unit: Unit::parse(unit).expect("a unit name"),
                });
            } else {
                panic!("unknown descriptor option `{tok}` in {src}");
            }
        }
        assert!(has_entries, "descriptor without entries in {src}");
        req.descriptors.push(desc);
    }
    req
}

fn code(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::OverLimit => "OVER",
    }
}

fn render(slots: &[Slot], decision: &Decision) -> String {
    let statuses: Vec<String> = slots
        .iter()
        .zip(&decision.statuses)
        .map(|(slot, s)| {
            let mut out = String::from(code(s.code));
            match &s.limit {
                None => out.push_str(" -"),
                Some(l) => {
                    write!(out, " {}/{}", l.requests_per_unit, l.unit).unwrap();
                    if let Some(name) = &l.name {
                        write!(out, "[{name}]").unwrap();
                    }
                }
            }
            match s.remaining {
                u32::MAX => out.push_str(" rem=max"),
                r => write!(out, " rem={r}").unwrap(),
            }
            if let Some(r) = s.reset_in {
                write!(out, " reset={r}").unwrap();
            }
            if let Slot::Counted(c) = slot {
                match c.hits {
                    u64::MAX => out.push_str(" +max"),
                    h => write!(out, " +{h}").unwrap(),
                }
                if c.shadow_mode {
                    out.push_str(" shadow");
                }
                if c.quota_mode {
                    out.push_str(" quota");
                }
            }
            out
        })
        .collect();
    format!("{}: {}", code(decision.overall), statuses.join(" | "))
}

/// Runs `steps` in order against `yaml`'s rules and one counter store.
fn check(yaml: &str, steps: &[(u64, &str, &str)]) {
    check_files(&[yaml], steps);
}

/// [`check`] with several domains (one YAML file each).
fn check_files(files: &[&str], steps: &[(u64, &str, &str)]) {
    let mut h = Harness::with_files(files);
    let yaml = files.join("---\n");
    for (i, &(now, request, want)) in steps.iter().enumerate() {
        let (slots, decision) = h.run(now, &parse_request(request));
        let got = render(&slots, &decision);
        assert_eq!(
            got, want,
            "\nstep {i}: now={now} request `{request}`\n got: {got}\nwant: {want}\nconfig:\n{yaml}"
        );
    }
}

/// [`check`] with owned strings, for generated tables.
fn check_owned(yaml: &str, steps: &[(u64, String, String)]) {
    let steps: Vec<(u64, &str, &str)> = steps
        .iter()
        .map(|(now, req, want)| (*now, req.as_str(), want.as_str()))
        .collect();
    check(yaml, &steps);
}

// ---------------------------------------------------------------------------
// Statuses, unknown domains, no match
// ---------------------------------------------------------------------------

#[test]
fn one_status_per_descriptor_in_request_order() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: b
    rate_limit: {unlimited: true}
  - key: c
    rate_limit: {unit: minute, requests_per_unit: 5, name: c-limit}
"#;
    check(
        yaml,
        &[
            (
                T,
                "c=1 | x=1 | a=1 | b=1",
                "OK: OK 5/minute[c-limit] rem=4 reset=60 +1 | OK - rem=0 | OK 1/second rem=0 reset=1 +1 | OK - rem=max",
            ),
            (
                T,
                "b=1 | a=1 | c=1",
                "OVER: OK - rem=max | OVER 1/second rem=0 reset=1 +1 | OK 5/minute[c-limit] rem=3 reset=60 +1",
            ),
        ],
    );
}

#[test]
fn unknown_domain_or_no_matching_rule_is_ok_without_limit() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
"#;
    check(
        yaml,
        &[
            // Unknown domain: nothing matches, nothing is counted.
            (T, "@domain=other a=1", "OK: OK - rem=0"),
            (T, "@domain=other a=1 | a=2", "OK: OK - rem=0 | OK - rem=0"),
            // Domains are case-sensitive.
            (T, "@domain=D a=1", "OK: OK - rem=0"),
            // ... so the known domain's counter is untouched.
            (T, "a=1", "OK: OK 1/second rem=0 reset=1 +1"),
            // Known domain, no rule for the key or for the depth.
            (T, "zzz=1", "OK: OK - rem=0"),
            (T, "a=1,zzz=2", "OK: OK - rem=0"),
            (
                T,
                "zzz=1 | a=1",
                "OVER: OK - rem=0 | OVER 1/second rem=0 reset=1 +1",
            ),
        ],
    );
}

#[test]
fn domains_have_separate_rules_and_counters() {
    let d = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;
    let e = r#"
domain: e
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 2}
"#;
    check_files(
        &[d, e],
        &[
            (T, "a=1", "OK: OK 1/minute rem=0 reset=60 +1"),
            (T, "@domain=e a=1", "OK: OK 2/minute rem=1 reset=60 +1"),
            (T, "@domain=e a=1", "OK: OK 2/minute rem=0 reset=60 +1"),
            (T, "a=1", "OVER: OVER 1/minute rem=0 reset=60 +1"),
            (T, "@domain=e a=1", "OVER: OVER 2/minute rem=0 reset=60 +1"),
            // Overrides too are counted per domain.
            (T, "x=1 limit=1/second", "OK: OK 1/second rem=0 reset=1 +1"),
            (
                T,
                "@domain=e x=1 limit=1/second",
                "OK: OK 1/second rem=0 reset=1 +1",
            ),
        ],
    );
}

#[test]
fn overall_is_over_limit_iff_any_descriptor_is() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 5}
"#;
    check(
        yaml,
        &[
            (
                T,
                "a=1 | b=1",
                "OK: OK 1/minute rem=0 reset=60 +1 | OK 5/minute rem=4 reset=60 +1",
            ),
            (
                T,
                "b=1 | a=1",
                "OVER: OK 5/minute rem=3 reset=60 +1 | OVER 1/minute rem=0 reset=60 +1",
            ),
            (
                T,
                "b=1 | nomatch=1",
                "OK: OK 5/minute rem=2 reset=60 +1 | OK - rem=0",
            ),
            // The same descriptor twice in one request counts twice, in order.
            (
                T,
                "a=2 | a=2",
                "OVER: OK 1/minute rem=0 reset=60 +1 | OVER 1/minute rem=0 reset=60 +1",
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// Lookup
// ---------------------------------------------------------------------------

#[test]
fn key_value_beats_wildcard_beats_key_only_on_every_level() {
    // Config order is deliberately the reverse of the precedence.
    let yaml = r#"
domain: d
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 1, name: key-only}
  - key: k
    value: "ab*"
    rate_limit: {unit: minute, requests_per_unit: 2, name: wildcard}
  - key: k
    value: abc
    rate_limit: {unit: minute, requests_per_unit: 3, name: exact}
  - key: p
    descriptors:
      - key: k
        rate_limit: {unit: hour, requests_per_unit: 4, name: nested-key-only}
      - key: k
        value: "ab*"
        rate_limit: {unit: hour, requests_per_unit: 5, name: nested-wildcard}
      - key: k
        value: abc
        rate_limit: {unit: hour, requests_per_unit: 6, name: nested-exact}
"#;
    check(
        yaml,
        &[
            (T, "k=abc", "OK: OK 3/minute[exact] rem=2 reset=60 +1"),
            (T, "k=abd", "OK: OK 2/minute[wildcard] rem=1 reset=60 +1"),
            (T, "k=ab", "OK: OK 2/minute[wildcard] rem=1 reset=60 +1"),
            (T, "k=xyz", "OK: OK 1/minute[key-only] rem=0 reset=60 +1"),
            (T, "k=", "OK: OK 1/minute[key-only] rem=0 reset=60 +1"),
            (
                T,
                "p=1,k=abc",
                "OK: OK 6/hour[nested-exact] rem=5 reset=3000 +1",
            ),
            (
                T,
                "p=1,k=abz",
                "OK: OK 5/hour[nested-wildcard] rem=4 reset=3000 +1",
            ),
            (
                T,
                "p=1,k=zz",
                "OK: OK 4/hour[nested-key-only] rem=3 reset=3000 +1",
            ),
        ],
    );
}

#[test]
fn wildcards_are_tried_in_config_order_first_match_wins() {
    let broad_first = r#"
domain: d
descriptors:
  - key: m
    value: "gpt-4*"
    rate_limit: {unit: minute, requests_per_unit: 1, name: gpt-4-family}
  - key: m
    value: "gpt-4o*"
    rate_limit: {unit: minute, requests_per_unit: 2, name: gpt-4o-family}
"#;
    check(
        broad_first,
        &[
            // The more specific pattern comes second, so it never wins.
            (
                T,
                "m=gpt-4o-mini",
                "OK: OK 1/minute[gpt-4-family] rem=0 reset=60 +1",
            ),
            (
                T,
                "m=gpt-4-turbo",
                "OK: OK 1/minute[gpt-4-family] rem=0 reset=60 +1",
            ),
        ],
    );
    let specific_first = r#"
domain: d
descriptors:
  - key: m
    value: "gpt-4o*"
    rate_limit: {unit: minute, requests_per_unit: 2, name: gpt-4o-family}
  - key: m
    value: "gpt-4*"
    rate_limit: {unit: minute, requests_per_unit: 1, name: gpt-4-family}
"#;
    check(
        specific_first,
        &[
            (
                T,
                "m=gpt-4o-mini",
                "OK: OK 2/minute[gpt-4o-family] rem=1 reset=60 +1",
            ),
            (
                T,
                "m=gpt-4-turbo",
                "OK: OK 1/minute[gpt-4-family] rem=0 reset=60 +1",
            ),
        ],
    );
}

#[test]
fn star_matches_any_run_anywhere_in_the_value() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    value: "*-prod"
    rate_limit: {unit: minute, requests_per_unit: 1, name: leading}
  - key: b
    value: "eu-*-db"
    rate_limit: {unit: minute, requests_per_unit: 1, name: middle}
  - key: c
    value: "*x*y*"
    rate_limit: {unit: minute, requests_per_unit: 1, name: several}
  - key: e
    value: "*"
    rate_limit: {unit: minute, requests_per_unit: 1, name: any}
"#;
    check(
        yaml,
        &[
            (
                T,
                "a=api-prod",
                "OK: OK 1/minute[leading] rem=0 reset=60 +1",
            ),
            (T, "a=-prod", "OK: OK 1/minute[leading] rem=0 reset=60 +1"),
            (T, "a=api-prod-2", "OK: OK - rem=0"),
            (T, "a=prod", "OK: OK - rem=0"),
            (
                T,
                "b=eu-west-db",
                "OK: OK 1/minute[middle] rem=0 reset=60 +1",
            ),
            (T, "b=eu--db", "OK: OK 1/minute[middle] rem=0 reset=60 +1"),
            (T, "b=eu-db", "OK: OK - rem=0"),
            (T, "b=us-west-db", "OK: OK - rem=0"),
            (T, "c=xy", "OK: OK 1/minute[several] rem=0 reset=60 +1"),
            (T, "c=1x2y3", "OK: OK 1/minute[several] rem=0 reset=60 +1"),
            (T, "c=yx", "OK: OK - rem=0"),
            (T, "e=", "OK: OK 1/minute[any] rem=0 reset=60 +1"),
            (T, "e=anything", "OK: OK 1/minute[any] rem=0 reset=60 +1"),
        ],
    );
}

#[test]
fn lookup_never_backtracks_to_the_key_only_branch() {
    let yaml = r#"
domain: d
descriptors:
  - key: k
    value: v
    rate_limit: {unit: minute, requests_per_unit: 1, name: exact-leaf}
  - key: k
    value: w
    descriptors:
      - key: other
        rate_limit: {unit: minute, requests_per_unit: 2}
  - key: k
    value: "x*"
  - key: k
    descriptors:
      - key: sub
        rate_limit: {unit: minute, requests_per_unit: 5, name: deep}
"#;
    check(
        yaml,
        &[
            // k=v matches a leaf: `sub` is not looked up under key-only `k`.
            (T, "k=v,sub=1", "OK: OK - rem=0"),
            // k=w has children, but not `sub`.
            (T, "k=w,sub=1", "OK: OK - rem=0"),
            // A wildcard match is just as final.
            (T, "k=xa,sub=1", "OK: OK - rem=0"),
            // Only a value matching no key_value/wildcard node takes key-only `k`.
            (T, "k=z,sub=1", "OK: OK 5/minute[deep] rem=4 reset=60 +1"),
            (T, "k=v", "OK: OK 1/minute[exact-leaf] rem=0 reset=60 +1"),
            (T, "k=w,other=1", "OK: OK 2/minute rem=1 reset=60 +1"),
            (T, "k=xa", "OK: OK - rem=0"),
            (T, "k=z", "OK: OK - rem=0"),
        ],
    );
}

#[test]
fn a_rule_applies_only_at_the_request_depth() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1, name: depth-1}
    descriptors:
      - key: b
        descriptors:
          - key: c
            rate_limit: {unit: minute, requests_per_unit: 3, name: depth-3}
  - key: solo
    rate_limit: {unit: minute, requests_per_unit: 2, name: solo}
"#;
    check(
        yaml,
        &[
            (T, "a=1", "OK: OK 1/minute[depth-1] rem=0 reset=60 +1"),
            // The parent's limit does not apply to deeper requests ...
            (T, "a=1,b=2", "OK: OK - rem=0"),
            (
                T,
                "a=1,b=2,c=3",
                "OK: OK 3/minute[depth-3] rem=2 reset=60 +1",
            ),
            // ... nor does a rule shallower than the request.
            (T, "a=1,b=2,c=3,d=4", "OK: OK - rem=0"),
            (T, "solo=1,x=2", "OK: OK - rem=0"),
            // Nested rules are not reachable from the top level.
            (T, "b=2", "OK: OK - rem=0"),
            (T, "b=2,c=3", "OK: OK - rem=0"),
            (T, "c=3", "OK: OK - rem=0"),
            (T, "solo=1", "OK: OK 2/minute[solo] rem=1 reset=60 +1"),
            // None of the deeper requests counted against `a=1`.
            (T, "a=1", "OVER: OVER 1/minute[depth-1] rem=0 reset=60 +1"),
        ],
    );
}

#[test]
fn a_descriptor_without_rate_limit_is_allowlisted() {
    let yaml = r#"
domain: d
descriptors:
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: ip
    value: 10.0.0.1
  - key: internal
"#;
    check(
        yaml,
        &[
            (T, "ip=10.0.0.1", "OK: OK - rem=0"),
            (T, "ip=10.0.0.1", "OK: OK - rem=0"),
            (T, "ip=10.0.0.2", "OK: OK 1/second rem=0 reset=1 +1"),
            (T, "ip=10.0.0.2", "OVER: OVER 1/second rem=0 reset=1 +1"),
            (T, "internal=x", "OK: OK - rem=0"),
            (T, "internal=x", "OK: OK - rem=0"),
        ],
    );
}

#[test]
fn composite_keys_collide_like_upstream() {
    // Upstream keys nodes by `key + "_" + value`, so key `a_b` (no value) is
    // also what entry `a=b` looks up first.
    let yaml = r#"
domain: d
descriptors:
  - key: a_b
    rate_limit: {unit: minute, requests_per_unit: 1, name: a_b}
"#;
    check(
        yaml,
        &[
            (T, "a=b", "OK: OK 1/minute[a_b] rem=0 reset=60 +1"),
            (T, "a_b=x", "OK: OK 1/minute[a_b] rem=0 reset=60 +1"),
            (T, "a=c", "OK: OK - rem=0"),
        ],
    );
}

// ---------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------

#[test]
fn key_only_rules_count_each_value_separately() {
    let yaml = r#"
domain: d
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;
    check(
        yaml,
        &[
            (T, "user=a", "OK: OK 1/minute rem=0 reset=60 +1"),
            (T, "user=b", "OK: OK 1/minute rem=0 reset=60 +1"),
            (T, "user=a", "OVER: OVER 1/minute rem=0 reset=60 +1"),
            (T, "user=b", "OVER: OVER 1/minute rem=0 reset=60 +1"),
            (T, "user=c", "OK: OK 1/minute rem=0 reset=60 +1"),
        ],
    );
}

#[test]
fn share_threshold_makes_matching_values_share_one_counter() {
    let yaml = r#"
domain: d
descriptors:
  - key: file
    value: "docs/*"
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 3, name: shared}
  - key: path
    value: "docs/*"
    rate_limit: {unit: minute, requests_per_unit: 3, name: separate}
  - key: tenant
    value: "acme-*"
    share_threshold: true
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 2, name: per-user}
"#;
    check(
        yaml,
        &[
            (
                T,
                "file=docs/a",
                "OK: OK 3/minute[shared] rem=2 reset=60 +1",
            ),
            (
                T,
                "file=docs/b",
                "OK: OK 3/minute[shared] rem=1 reset=60 +1",
            ),
            (
                T,
                "file=docs/c",
                "OK: OK 3/minute[shared] rem=0 reset=60 +1",
            ),
            (
                T,
                "file=docs/a",
                "OVER: OVER 3/minute[shared] rem=0 reset=60 +1",
            ),
            // The pattern itself, sent literally, is the same counter.
            (
                T,
                "file=docs/*",
                "OVER: OVER 3/minute[shared] rem=0 reset=60 +1",
            ),
            // Without share_threshold each value has its own counter.
            (
                T,
                "path=docs/a",
                "OK: OK 3/minute[separate] rem=2 reset=60 +1",
            ),
            (
                T,
                "path=docs/b",
                "OK: OK 3/minute[separate] rem=2 reset=60 +1",
            ),
            (
                T,
                "path=docs/a",
                "OK: OK 3/minute[separate] rem=1 reset=60 +1",
            ),
            // Sharing applies to the wildcard entry only, at any depth.
            (
                T,
                "tenant=acme-1,user=u",
                "OK: OK 2/minute[per-user] rem=1 reset=60 +1",
            ),
            (
                T,
                "tenant=acme-2,user=u",
                "OK: OK 2/minute[per-user] rem=0 reset=60 +1",
            ),
            (
                T,
                "tenant=acme-3,user=u",
                "OVER: OVER 2/minute[per-user] rem=0 reset=60 +1",
            ),
            (
                T,
                "tenant=acme-1,user=v",
                "OK: OK 2/minute[per-user] rem=1 reset=60 +1",
            ),
        ],
    );
}

#[test]
fn windows_are_epoch_aligned_and_reset_at_the_boundary() {
    let yaml = r#"
domain: d
descriptors:
  - key: m
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: s
    rate_limit: {unit: second, requests_per_unit: 1}
"#;
    check(
        yaml,
        &[
            (100, "m=1", "OK: OK 2/minute rem=1 reset=20 +1"),
            (119, "m=1", "OK: OK 2/minute rem=0 reset=1 +1"),
            (119, "m=1", "OVER: OVER 2/minute rem=0 reset=1 +1"),
            (120, "m=1", "OK: OK 2/minute rem=1 reset=60 +1"),
            (179, "m=1", "OK: OK 2/minute rem=0 reset=1 +1"),
            (179, "m=1", "OVER: OVER 2/minute rem=0 reset=1 +1"),
            (180, "m=1", "OK: OK 2/minute rem=1 reset=60 +1"),
            (5, "s=1", "OK: OK 1/second rem=0 reset=1 +1"),
            (5, "s=1", "OVER: OVER 1/second rem=0 reset=1 +1"),
            (6, "s=1", "OK: OK 1/second rem=0 reset=1 +1"),
        ],
    );
}

#[test]
fn long_units_are_fixed_lengths_month_30_days_year_365_days() {
    let units = [
        ("hour", 3_600u64),
        ("day", 86_400),
        ("week", 7 * 86_400),
        ("month", 30 * 86_400),
        ("year", 365 * 86_400),
    ];
    for (unit, len) in units {
        let yaml = format!(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: {unit}, requests_per_unit: 1}}\n"
        );
        // An arbitrary epoch-aligned boundary: multiples of the fixed length.
        let b = 7 * len;
        let half = len / 2;
        let ok = |reset: u64| format!("OK: OK 1/{unit} rem=0 reset={reset} +1");
        let over = |reset: u64| format!("OVER: OVER 1/{unit} rem=0 reset={reset} +1");
        check_owned(
            &yaml,
            &[
                (b - 1, "k=1".into(), ok(1)),
                (b - 1, "k=1".into(), over(1)),
                (b, "k=1".into(), ok(len)),
                (b + half, "k=1".into(), over(len - half)),
                (b + len - 1, "k=1".into(), over(1)),
                (b + len, "k=1".into(), ok(len)),
            ],
        );
    }
}

#[test]
fn limited_statuses_carry_limit_and_reset_over_limit_included() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: hour, requests_per_unit: 3, name: hourly}
"#;
    check(
        yaml,
        &[
            // OK: remaining = limit - count.
            (
                T,
                "@hits=2 a=1",
                "OK: OK 3/hour[hourly] rem=1 reset=3000 +2",
            ),
            // OVER: remaining 0, limit and reset still set.
            (
                T,
                "@hits=2 a=1",
                "OVER: OVER 3/hour[hourly] rem=0 reset=3000 +2",
            ),
            (3_599, "a=1", "OVER: OVER 3/hour[hourly] rem=0 reset=1 +1"),
            (3_600, "a=1", "OK: OK 3/hour[hourly] rem=2 reset=3600 +1"),
        ],
    );
}

// ---------------------------------------------------------------------------
// Hits
// ---------------------------------------------------------------------------

#[test]
fn hits_come_from_the_descriptor_else_the_request_at_least_one() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 10}
"#;
    check(
        yaml,
        &[
            // Request hits_addend 0 means 1.
            (T, "@hits=0 a=1", "OK: OK 10/minute rem=9 reset=60 +1"),
            (T, "@hits=3 a=1", "OK: OK 10/minute rem=6 reset=60 +3"),
            // The descriptor's own hits_addend wins, 0 included.
            (
                T,
                "@hits=3 a=1 hits=2",
                "OK: OK 10/minute rem=4 reset=60 +2",
            ),
            (
                T,
                "@hits=3 a=1 hits=0",
                "OK: OK 10/minute rem=4 reset=60 +0",
            ),
            (
                T,
                "a=1 hits=1 | a=1",
                "OK: OK 10/minute rem=3 reset=60 +1 | OK 10/minute rem=2 reset=60 +1",
            ),
            (
                T,
                "@hits=5 a=1 hits=0 | a=1",
                "OVER: OK 10/minute rem=2 reset=60 +0 | OVER 10/minute rem=0 reset=60 +5",
            ),
        ],
    );
}

#[test]
fn zero_hits_checks_without_counting() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;
    check(
        yaml,
        &[
            (T, "a=1 hits=0", "OK: OK 1/minute rem=1 reset=60 +0"),
            (T, "a=1 hits=0", "OK: OK 1/minute rem=1 reset=60 +0"),
            (T, "a=1", "OK: OK 1/minute rem=0 reset=60 +1"),
            (T, "a=1 hits=0", "OK: OK 1/minute rem=0 reset=60 +0"),
            (T, "a=1", "OVER: OVER 1/minute rem=0 reset=60 +1"),
            // A check reports the current state, over limit included.
            (T, "a=1 hits=0", "OVER: OVER 1/minute rem=0 reset=60 +0"),
        ],
    );
}

#[test]
fn huge_hits_saturate_without_panicking() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: big
    rate_limit: {unit: minute, requests_per_unit: 4294967295}
"#;
    check(
        yaml,
        &[
            (T, "a=1 hits=max", "OVER: OVER 5/minute rem=0 reset=60 +max"),
            (T, "a=1 hits=max", "OVER: OVER 5/minute rem=0 reset=60 +max"),
            (T, "a=1", "OVER: OVER 5/minute rem=0 reset=60 +1"),
            (T, "a=1 hits=0", "OVER: OVER 5/minute rem=0 reset=60 +0"),
            (
                T,
                "big=2 hits=0",
                "OK: OK 4294967295/minute rem=max reset=60 +0",
            ),
            (
                T,
                "@hits=4294967295 big=1",
                "OK: OK 4294967295/minute rem=0 reset=60 +4294967295",
            ),
            (
                T,
                "big=1 hits=0",
                "OK: OK 4294967295/minute rem=0 reset=60 +0",
            ),
            (T, "big=1", "OVER: OVER 4294967295/minute rem=0 reset=60 +1"),
            (
                T,
                "big=1 hits=max",
                "OVER: OVER 4294967295/minute rem=0 reset=60 +max",
            ),
        ],
    );
}

#[test]
fn over_limit_hits_are_still_counted() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 2}
"#;
    check(
        yaml,
        &[
            (T, "a=1", "OK: OK 2/minute rem=1 reset=60 +1"),
            (T, "a=1", "OK: OK 2/minute rem=0 reset=60 +1"),
            (T, "a=1", "OVER: OVER 2/minute rem=0 reset=60 +1"),
            (T, "a=1", "OVER: OVER 2/minute rem=0 reset=60 +1"),
            // A bigger limit on the same counter sees all 4 earlier hits + 1.
            (
                T,
                "a=1 limit=10/minute",
                "OK: OK 10/minute rem=5 reset=60 +1",
            ),
            (
                T,
                "a=1 hits=0 limit=10/minute",
                "OK: OK 10/minute rem=5 reset=60 +0",
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// Rule modifiers
// ---------------------------------------------------------------------------

#[test]
fn unlimited_is_ok_with_max_remaining_and_never_counted() {
    let yaml = r#"
domain: d
descriptors:
  - key: u
    rate_limit: {unlimited: true}
"#;
    check(
        yaml,
        &[
            (T, "u=1", "OK: OK - rem=max"),
            (T, "u=1", "OK: OK - rem=max"),
            (T, "@hits=100 u=1 hits=7", "OK: OK - rem=max"),
            // A request-supplied limit is looked at before the rules.
            (T, "u=1 limit=1/minute", "OK: OK 1/minute rem=0 reset=60 +1"),
            (
                T,
                "u=1 limit=1/minute",
                "OVER: OVER 1/minute rem=0 reset=60 +1",
            ),
        ],
    );
    let h = Harness::new(yaml);
    assert_eq!(
        h.rules.plan(&parse_request("u=1"), T),
        vec![Slot::Unlimited]
    );
}

#[test]
fn zero_requests_per_unit_always_denies() {
    let yaml = r#"
domain: d
descriptors:
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: ip
    value: 50.0.0.5
    rate_limit: {unit: second, requests_per_unit: 0, name: blocked}
"#;
    check(
        yaml,
        &[
            (
                T,
                "ip=50.0.0.5",
                "OVER: OVER 0/second[blocked] rem=0 reset=1 +1",
            ),
            (T, "ip=50.0.0.1", "OK: OK 10/second rem=9 reset=1 +1"),
            (
                T,
                "x=1 limit=0/hour",
                "OVER: OVER 0/hour rem=0 reset=3000 +1",
            ),
        ],
    );
}

#[test]
fn zero_requests_per_unit_denies_a_check_only_request_too() {
    // As specified for sluice; see the report: upstream computes
    // `after > limit`, which is `0 > 0` (OK) on an untouched counter.
    let yaml = r#"
domain: d
descriptors:
  - key: ip
    value: 50.0.0.5
    rate_limit: {unit: second, requests_per_unit: 0, name: blocked}
"#;
    check(
        yaml,
        &[
            (
                T,
                "ip=50.0.0.5 hits=0",
                "OVER: OVER 0/second[blocked] rem=0 reset=1 +0",
            ),
            (
                T,
                "y=1 limit=0/hour hits=0",
                "OVER: OVER 0/hour rem=0 reset=3000 +0",
            ),
        ],
    );
}

#[test]
fn shadow_mode_counts_and_reports_but_answers_ok() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2, name: soft}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;
    check(
        yaml,
        &[
            (T, "a=1", "OK: OK 2/minute[soft] rem=1 reset=60 +1 shadow"),
            (T, "a=1", "OK: OK 2/minute[soft] rem=0 reset=60 +1 shadow"),
            // Over the limit: OK, remaining 0, limit and reset still reported.
            (T, "a=1", "OK: OK 2/minute[soft] rem=0 reset=60 +1 shadow"),
            (
                T,
                "a=1 | b=1",
                "OK: OK 2/minute[soft] rem=0 reset=60 +1 shadow | OK 1/minute rem=0 reset=60 +1",
            ),
            // Shadow mode hides only its own descriptor.
            (
                T,
                "a=1 | b=1",
                "OVER: OK 2/minute[soft] rem=0 reset=60 +1 shadow | OVER 1/minute rem=0 reset=60 +1",
            ),
            // The counter kept counting (5 so far); an override shares it and
            // is never shadowed.
            (T, "a=1 limit=10/minute", "OK: OK 10/minute rem=4 reset=60 +1"),
            (T, "a=1 limit=6/minute", "OVER: OVER 6/minute rem=0 reset=60 +1"),
        ],
    );
}

/// Upstream's quota mode (envoyproxy/ratelimit #1045, #1059): a quota-mode
/// descriptor over its limit says OVER_LIMIT in its own status, but the
/// answer is OVER_LIMIT only when every quota-mode descriptor of the request
/// is over, or when an ordinary descriptor is.
#[test]
fn quota_mode_denies_only_when_every_quota_descriptor_is_over() {
    let yaml = r#"
domain: d
descriptors:
  - key: q1
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: q2
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: r
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: s
    quota_mode: true
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 0}
"#;
    check(
        yaml,
        &[
            (T, "q1=a | q2=a", "OK: OK 1/minute rem=0 reset=60 +1 quota | OK 2/minute rem=1 reset=60 +1 quota"),
            // q1 over, q2 not: a soft refusal, the answer is OK.
            (T, "q1=a | q2=a", "OK: OVER 1/minute rem=0 reset=60 +1 quota | OK 2/minute rem=0 reset=60 +1 quota"),
            // Both over: denied.
            (T, "q1=a | q2=a", "OVER: OVER 1/minute rem=0 reset=60 +1 quota | OVER 2/minute rem=0 reset=60 +1 quota"),
            // A lone quota-mode descriptor over its limit is every one of them.
            (T, "q1=a", "OVER: OVER 1/minute rem=0 reset=60 +1 quota"),
            // An ordinary descriptor over denies, whatever the quotas say.
            (T, "q2=b | r=x", "OK: OK 2/minute rem=1 reset=60 +1 quota | OK 1/minute rem=0 reset=60 +1"),
            (T, "q2=b | r=x", "OVER: OK 2/minute rem=0 reset=60 +1 quota | OVER 1/minute rem=0 reset=60 +1"),
            // A shadow-mode quota descriptor is never over, so not every
            // quota descriptor is: q1 alone over does not deny.
            (T, "q1=a | s=x", "OK: OVER 1/minute rem=0 reset=60 +1 quota | OK 0/minute rem=0 reset=60 +1 shadow quota"),
            // An unmatched descriptor is neither ordinary-over nor quota.
            (T, "q1=a | zzz=1", "OVER: OVER 1/minute rem=0 reset=60 +1 quota | OK - rem=0"),
            // An override is never in quota mode (as never in shadow mode).
            (T, "q1=a limit=1/minute | q2=c", "OVER: OVER 1/minute rem=0 reset=60 +1 | OK 2/minute rem=1 reset=60 +1 quota"),
        ],
    );
}

#[test]
fn replaces_drops_the_named_limit_and_leaves_its_counter_alone() {
    // envoyproxy/ratelimit README, example 7.
    let yaml = r#"
domain: d
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
"#;
    check(
        yaml,
        &[
            (
                T,
                "key_1=value_1,user=bkthomps",
                "OK: OK 5/second[specific_limit] rem=4 reset=1 +1",
            ),
            (
                T,
                "key_1=value_1,user=bkthomps | key_2=value_2,user=bkthomps",
                "OK: OK - rem=0 | OK 10/second rem=9 reset=1 +1",
            ),
            (
                T,
                "key_2=value_2,user=bkthomps | key_1=value_1,user=bkthomps",
                "OK: OK 10/second rem=8 reset=1 +1 | OK - rem=0",
            ),
            // The replaced limit's counter was not incremented meanwhile.
            (
                T,
                "key_1=value_1,user=bkthomps",
                "OK: OK 5/second[specific_limit] rem=3 reset=1 +1",
            ),
            (
                T,
                "key_2=value_2,user=bkthomps",
                "OK: OK 10/second rem=7 reset=1 +1",
            ),
        ],
    );
}

#[test]
fn replaces_edge_cases() {
    let yaml = r#"
domain: d
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1, name: per-user}
  - key: vip
    rate_limit:
      unit: minute
      requests_per_unit: 100
      replaces: [{name: per-user}]
  - key: x
    rate_limit: {unit: minute, requests_per_unit: 1, name: x, replaces: [{name: y}]}
  - key: y
    rate_limit: {unit: minute, requests_per_unit: 1, name: y, replaces: [{name: x}]}
  - key: soft
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, replaces: [{name: per-user}]}
"#;
    check(
        yaml,
        &[
            (T, "user=u", "OK: OK 1/minute[per-user] rem=0 reset=60 +1"),
            (
                T,
                "user=u",
                "OVER: OVER 1/minute[per-user] rem=0 reset=60 +1",
            ),
            // A replaced limit is dropped even when it would be over.
            (
                T,
                "user=u | vip=1",
                "OK: OK - rem=0 | OK 100/minute rem=99 reset=60 +1",
            ),
            // Every descriptor whose limit carries the name is dropped.
            (
                T,
                "user=w | user=u | vip=1",
                "OK: OK - rem=0 | OK - rem=0 | OK 100/minute rem=98 reset=60 +1",
            ),
            // user=w was never counted.
            (T, "user=w", "OK: OK 1/minute[per-user] rem=0 reset=60 +1"),
            // Replaced limits still replace: both go.
            (T, "x=1 | y=1", "OK: OK - rem=0 | OK - rem=0"),
            // Shadow-mode limits replace too.
            (
                T,
                "user=s | soft=1",
                "OK: OK - rem=0 | OK 1/minute rem=0 reset=60 +1 shadow",
            ),
            // A request-supplied limit has no name and no replaces.
            (
                T,
                "user=q limit=5/minute | vip=1",
                "OK: OK 5/minute rem=4 reset=60 +1 | OK 100/minute rem=97 reset=60 +1",
            ),
            (
                T,
                "user=z | vip=1 limit=5/minute",
                "OK: OK 1/minute[per-user] rem=0 reset=60 +1 | OK 5/minute rem=1 reset=60 +1",
            ),
        ],
    );
}

#[test]
fn an_unlimited_rule_replaces_named_limits_too() {
    let yaml = r#"
domain: d
descriptors:
  - key: plan
    value: enterprise
    rate_limit:
      unlimited: true
      replaces: [{name: per-user}]
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1, name: per-user}
"#;
    check(
        yaml,
        &[
            (
                T,
                "plan=enterprise | user=u",
                "OK: OK - rem=max | OK - rem=0",
            ),
            (
                T,
                "plan=enterprise | user=u",
                "OK: OK - rem=max | OK - rem=0",
            ),
            (T, "user=u", "OK: OK 1/minute[per-user] rem=0 reset=60 +1"),
        ],
    );
}

// ---------------------------------------------------------------------------
// Request-supplied limits
// ---------------------------------------------------------------------------

#[test]
fn request_override_applies_for_a_known_domain_and_shares_counters() {
    let yaml = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 3, name: a-rule}
"#;
    check(
        yaml,
        &[
            // No rule matches: the override applies anyway.
            (
                T,
                "nomatch=1 limit=2/minute",
                "OK: OK 2/minute rem=1 reset=60 +1",
            ),
            (
                T,
                "nomatch=1 limit=2/minute",
                "OK: OK 2/minute rem=0 reset=60 +1",
            ),
            (
                T,
                "nomatch=1 limit=2/minute",
                "OVER: OVER 2/minute rem=0 reset=60 +1",
            ),
            (
                T,
                "a=1,b=2 limit=1/second",
                "OK: OK 1/second rem=0 reset=1 +1",
            ),
            // Same entries and unit as a rule: one counter.
            (T, "a=1", "OK: OK 3/minute[a-rule] rem=2 reset=60 +1"),
            (
                T,
                "a=1 limit=10/minute",
                "OK: OK 10/minute rem=8 reset=60 +1",
            ),
            (T, "a=1", "OK: OK 3/minute[a-rule] rem=0 reset=60 +1"),
            (T, "a=1", "OVER: OVER 3/minute[a-rule] rem=0 reset=60 +1"),
            // Another unit is another counter ...
            (T, "a=1 limit=10/hour", "OK: OK 10/hour rem=9 reset=3000 +1"),
            // ... even when both windows start at the same second.
            (3_600, "a=1", "OK: OK 3/minute[a-rule] rem=2 reset=60 +1"),
            (
                3_600,
                "a=1 limit=10/hour",
                "OK: OK 10/hour rem=9 reset=3600 +1",
            ),
            (
                3_600,
                "a=1 limit=10/minute",
                "OK: OK 10/minute rem=8 reset=60 +1",
            ),
            // Unknown domain: no limit at all.
            (T, "@domain=other a=1 limit=1/second", "OK: OK - rem=0"),
            (T, "@domain=other a=1 limit=0/second", "OK: OK - rem=0"),
        ],
    );
    // A domain without descriptors is still a known domain.
    check(
        "domain: d\n",
        &[
            (T, "x=1 limit=1/second", "OK: OK 1/second rem=0 reset=1 +1"),
            (
                T,
                "x=1 limit=1/second",
                "OVER: OVER 1/second rem=0 reset=1 +1",
            ),
            (T, "x=1", "OK: OK - rem=0"),
        ],
    );
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn one_rule(unit: Unit, n: u32) -> String {
    format!(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: {}, requests_per_unit: {n}}}\n",
        unit.name()
    )
}

proptest! {
    /// Within one window, with limit N and 1 hit each, exactly the first
    /// min(k, N) of k requests per counter are OK, whatever the order of
    /// `now`s inside the window and however requests for another counter
    /// are interleaved.
    #[test]
    fn exactly_min_k_n_requests_pass_within_a_window(
        n in 0u32..16,
        unit in prop::sample::select(Unit::ALL.to_vec()),
        window in 0u64..1_000_000,
        steps in prop::collection::vec((any::<u64>(), any::<bool>()), 0..48),
    ) {
        let len = unit.seconds();
        let start = window * len;
        let mut h = Harness::new(&one_rule(unit, n));
        let (mine, other) = (parse_request("k=mine"), parse_request("k=other"));
        let mut seen = [0u64; 2];
        let mut passed = [0u64; 2];
        for &(offset, is_other) in &steps {
            let now = start + offset % len;
            let i = usize::from(is_other);
            let (_, d) = h.run(now, if is_other { &other } else { &mine });
            let s = &d.statuses[0];
            seen[i] += 1;
            let ok = s.code == Code::Ok;
            // The k-th request passes iff k <= N: the OK ones are a prefix.
            prop_assert_eq!(ok, seen[i] <= u64::from(n));
            passed[i] += u64::from(ok);
            prop_assert_eq!(d.overall, s.code);
            prop_assert_eq!(s.limit.as_ref().map(|l| (l.requests_per_unit, l.unit)), Some((n, unit)));
            let want_rem = u64::from(n).saturating_sub(seen[i]);
            prop_assert_eq!(u64::from(s.remaining), want_rem);
            prop_assert_eq!(s.reset_in, Some(start + len - now));
        }
        for i in 0..2 {
            prop_assert_eq!(passed[i], seen[i].min(u64::from(n)));
        }
    }

    /// `reset_in` is always 1..=unit seconds (upstream: `divider - now % divider`),
    /// for config rules and request-supplied limits alike.
    #[test]
    fn reset_in_is_between_one_second_and_one_unit(
        unit in prop::sample::select(Unit::ALL.to_vec()),
        now in 0u64..=(i64::MAX as u64),
        n in any::<u32>(),
    ) {
        let len = unit.seconds();
        let mut h = Harness::new(&one_rule(unit, n));
        let req = parse_request(&format!("k=1 | x=1 limit={n}/{}", unit.name()));
        let (_, d) = h.run(now, &req);
        for s in &d.statuses {
            let reset = s.reset_in.expect("a limited status has a reset");
            prop_assert!((1..=len).contains(&reset), "reset {} for {} at {}", reset, unit, now);
            prop_assert_eq!(reset, len - now % len);
        }
    }
}

#[test]
fn headers_keep_order_and_values_including_empty_ones() {
    let mut h = Headers::default();
    assert!(h.is_empty());
    h.push("a", "1");
    h.push("b", "");
    h.push_with("c", |s| s.push_str("xyz"));
    h.push("a", "second");
    assert_eq!(h.len(), 4);
    assert_eq!(
        h.to_vec(),
        vec![
            ("a", "1".to_owned()),
            ("b", String::new()),
            ("c", "xyz".to_owned()),
            ("a", "second".to_owned()),
        ]
    );
    assert_eq!(h.get("a"), Some("1"), "the first of a name");
    assert_eq!(h.get("b"), Some(""));
    assert_eq!(h.get("d"), None);
    let same: Headers = h.to_vec().into_iter().collect();
    assert_eq!(same, h);
}

/// Values up to LONG_VALUE bytes go into counter keys as they are (keys
/// written before stay the same); longer ones as a marked SHA-256 digest,
/// so a counter's key stays small and distinct values stay distinct.
#[test]
fn long_values_are_keyed_by_digest() {
    let w = Window::containing(Unit::Minute, 600);
    let key = |v: &str| CounterKey::build("d", [("k", v)].into_iter(), w).0;
    let edge = "v".repeat(LONG_VALUE);
    assert!(key(&edge).windows(edge.len()).any(|s| s == edge.as_bytes()));
    let (a, b) = ("v".repeat(LONG_VALUE + 1), "w".repeat(LONG_VALUE + 1));
    let (ka, kb) = (key(&a), key(&b));
    assert_ne!(ka, kb);
    assert_eq!(ka, key(&a));
    // domain (4 + 1), key (4 + 1), marker and digest (4 + 32), window (16).
    assert_eq!(ka.len(), 5 + 5 + 36 + 16);
    assert!(ka.windows(4).any(|s| s == u32::MAX.to_be_bytes()));
}
