//! The YAML schema of envoyproxy/ratelimit config files, strict like
//! upstream's `validKeys`: unknown keys are errors.
//!
//! This is a compatibility contract: every file written for
//! envoyproxy/ratelimit must deserialize here unchanged.

use serde::Deserialize;
use serde_saphyr::Spanned;

/// One config file: one domain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileYaml {
    /// The domain name. A null (`domain:`) reads as empty, as upstream's
    /// YAML library reads it, so it gets upstream's "empty domain" error.
    pub domain: Spanned<Option<String>>,
    /// Top-level descriptors.
    #[serde(default)]
    pub descriptors: Option<Vec<DescriptorYaml>>,
}

/// One descriptor, possibly nested.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorYaml {
    /// Entry key (required, non-empty; a null reads as empty).
    pub key: Spanned<Option<String>>,
    /// Entry value; may contain `*` wildcards.
    #[serde(default)]
    pub value: Option<Spanned<String>>,
    /// The limit on this node.
    #[serde(default)]
    pub rate_limit: Option<Spanned<RateLimitYaml>>,
    /// Nested descriptors.
    #[serde(default)]
    pub descriptors: Option<Vec<DescriptorYaml>>,
    /// Count and report, but always answer OK.
    #[serde(default)]
    pub shadow_mode: bool,
    /// With a wildcard value: all matching values share one counter.
    #[serde(default)]
    pub share_threshold: bool,
    /// Accepted; metrics are not implemented yet, so it changes nothing.
    #[serde(default)]
    #[allow(dead_code)]
    pub detailed_metric: bool,
    /// Accepted; metrics are not implemented yet, so it changes nothing.
    #[serde(default)]
    #[allow(dead_code)]
    pub value_to_metric: bool,
    /// A soft limit: over it the descriptor's status is OVER_LIMIT, but the
    /// answer is OVER_LIMIT only when every quota-mode descriptor of the
    /// request is over (or an ordinary one is), as upstream.
    #[serde(default)]
    pub quota_mode: bool,
    /// Accepted (any YAML); not returned in dynamic metadata yet.
    #[serde(default)]
    #[allow(dead_code)]
    pub metadata: Option<serde::de::IgnoredAny>,
}

/// A `rate_limit` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitYaml {
    /// second|minute|hour|day|week|month|year, case-insensitive.
    #[serde(default)]
    pub unit: Option<Spanned<String>>,
    /// Allowed hits per window; 0 (or null, as upstream reads it) always denies.
    #[serde(default, deserialize_with = "requests_per_unit")]
    pub requests_per_unit: Option<u32>,
    /// Always OK, never counted; `unit` must not be set.
    #[serde(default)]
    pub unlimited: bool,
    /// Name for `replaces` and `current_limit.name`.
    #[serde(default)]
    pub name: Option<String>,
    /// Limits (by name) that this one replaces.
    #[serde(default)]
    pub replaces: Option<Spanned<Vec<ReplacesYaml>>>,
}

/// One `replaces` item.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacesYaml {
    /// The name of the replaced limit (a null reads as empty).
    pub name: Spanned<Option<String>>,
}

/// `requests_per_unit`: a whole number from 0 to 2^32-1, or null (read as 0
/// later, as upstream reads it); anything else is an error that names the
/// field and the allowed range.
fn requests_per_unit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct V;
    const WANT: &str = "requests_per_unit must be a whole number from 0 to 4294967295";
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number from 0 to 4294967295")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{WANT}, not {v}")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{WANT}, not {v}")))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            // A whole float (`1e3`) is read as its number, as upstream reads it.
            if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                Ok(Some(v as u32))
            } else {
                Err(E::custom(format!("{WANT}, not {v}")))
            }
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            // A quoted number ("7") has always loaded: keep it.
            v.trim()
                .parse::<u32>()
                .map(Some)
                .map_err(|_| E::custom(format!("{WANT}, not '{v}'")))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Err(E::custom(format!("{WANT}, not {v}")))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(V)
        }
    }
    d.deserialize_any(V)
}
