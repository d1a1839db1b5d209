//! Rate-limit headers for clients (pure): OpenAI's
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` and the IETF
//! draft's `RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-headers),
//! plus `retry-after` on refusals.

use std::fmt::Write;

use super::model::{HeaderStyle, Metric};
use crate::engine::Headers;
use crate::limiter::LimitState;

/// OpenAI's duration format: `1s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(secs: u64) -> String {
    let mut out = String::with_capacity(12);
    write_openai_duration(&mut out, secs);
    out
}

/// Appends `secs` in OpenAI's duration format to `out`.
fn write_openai_duration(out: &mut String, secs: u64) {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut buf = itoa::Buffer::new();
    if h > 0 {
        out.push_str(buf.format(h));
        out.push('h');
    }
    if h > 0 || m > 0 {
        out.push_str(buf.format(m));
        out.push('m');
    }
    out.push_str(buf.format(s));
    out.push('s');
}

/// A number as a header value (itoa: no `fmt` machinery on the hot path).
fn push_num(h: &mut Headers, name: &'static str, n: u64) {
    h.push_with(name, |s| s.push_str(itoa::Buffer::new().format(n)));
}

/// Appends a structured-field string: quotes and backslashes escaped,
/// anything but printable ASCII replaced.
fn write_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

/// The headers for a decision's limit states.
pub fn build(
    style: HeaderStyle,
    states: &[LimitState<'_>],
    denied: bool,
    retry_after: Option<u64>,
) -> Headers {
    let mut h = Headers::default();
    if style == HeaderStyle::None {
        return h;
    }
    if matches!(style, HeaderStyle::Openai | HeaderStyle::Both) {
        // Spend limits have no OpenAI header: `-tokens` carries tokens only.
        const NAMES: [(Metric, [&str; 3]); 2] = [
            (
                Metric::Requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                Metric::Tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ];
        for (metric, [limit, remaining, reset]) in NAMES {
            let binding = states
                .iter()
                .filter(|s| s.metric == metric)
                .min_by_key(|s| s.remaining);
            if let Some(s) = binding {
                push_num(&mut h, limit, s.limit);
                push_num(&mut h, remaining, s.remaining);
                if let Some(r) = s.reset_in {
                    h.push_with(reset, |out| write_openai_duration(out, r));
                }
            }
        }
    }
    if matches!(style, HeaderStyle::Ietf | HeaderStyle::Both) && !states.is_empty() {
        h.push_with("ratelimit-policy", |out| {
            for (i, s) in states.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_sf_string(out, &s.name);
                let unit = match s.metric {
                    Metric::Requests => "",
                    Metric::Tokens => ";sluice-unit=\"tokens\"",
                    Metric::Spend => ";sluice-unit=\"spend\"",
                };
                let _ = write!(out, ";q={};w={}{unit}", s.limit, s.window.max(1));
            }
        });
        h.push_with("ratelimit", |out| {
            for (i, s) in states.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_sf_string(out, &s.name);
                let _ = write!(out, ";r={}", s.remaining);
                if let Some(t) = s.reset_in {
                    let _ = write!(out, ";t={t}");
                }
            }
        });
    }
    if denied {
        if let Some(r) = retry_after {
            push_num(&mut h, "retry-after", r.max(1));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(
        name: &'static str,
        metric: Metric,
        limit: u64,
        remaining: u64,
        reset: u64,
    ) -> LimitState<'static> {
        LimitState {
            name: name.into(),
            metric,
            limit,
            remaining,
            reset_in: Some(reset),
            window: 60,
        }
    }

    #[test]
    fn openai_style_reports_the_binding_limit_per_kind() {
        let states = [
            st("p/throttle", Metric::Requests, 10, 19, 1),
            st("p/rpm", Metric::Requests, 100, 7, 30),
            st("p/tpm", Metric::Tokens, 1000, 400, 42),
            st("p/tpd", Metric::Tokens, 100000, 90000, 3600),
            // A spent budget is no token limit: it shows in no OpenAI header.
            st("p/budget", Metric::Spend, 5_000_000, 0, 86400),
        ];
        let h = build(HeaderStyle::Openai, &states, false, None);
        let get = |k: &str| h.get(k);
        assert_eq!(get("x-ratelimit-limit-requests"), Some("100"));
        assert_eq!(get("x-ratelimit-remaining-requests"), Some("7"));
        assert_eq!(get("x-ratelimit-reset-requests"), Some("30s"));
        assert_eq!(get("x-ratelimit-limit-tokens"), Some("1000"));
        assert_eq!(get("x-ratelimit-remaining-tokens"), Some("400"));
        assert_eq!(get("x-ratelimit-reset-tokens"), Some("42s"));
        assert_eq!(get("retry-after"), None);
        let h = build(HeaderStyle::Openai, &states, true, Some(0));
        assert_eq!(h.get("retry-after"), Some("1"));
        assert!(build(HeaderStyle::None, &states, true, Some(5)).is_empty());
    }

    #[test]
    fn ietf_style_lists_every_policy() {
        let states = [
            st("p/rpm", Metric::Requests, 100, 7, 30),
            st("p/\"x\"", Metric::Tokens, 5, 0, 2),
            st("p/b", Metric::Spend, 9, 4, 3),
        ];
        let h = build(HeaderStyle::Ietf, &states, false, None);
        assert_eq!(
            h.to_vec(),
            vec![
                (
                    "ratelimit-policy",
                    "\"p/rpm\";q=100;w=60, \"p/\\\"x\\\"\";q=5;w=60;sluice-unit=\"tokens\", \"p/b\";q=9;w=60;sluice-unit=\"spend\""
                        .to_owned()
                ),
                (
                    "ratelimit",
                    "\"p/rpm\";r=7;t=30, \"p/\\\"x\\\"\";r=0;t=2, \"p/b\";r=4;t=3".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn durations_in_openai_format() {
        assert_eq!(openai_duration(0), "0s");
        assert_eq!(openai_duration(59), "59s");
        assert_eq!(openai_duration(360), "6m0s");
        assert_eq!(openai_duration(3723), "1h2m3s");
        assert_eq!(openai_duration(3600), "1h0m0s");
        assert_eq!(openai_duration(3605), "1h0m5s");
    }
}
