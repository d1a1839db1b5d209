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
    /// The domain name.
    pub domain: Spanned<String>,
    /// Top-level descriptors.
    #[serde(default)]
    pub descriptors: Option<Vec<DescriptorYaml>>,
}

/// One descriptor, possibly nested.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorYaml {
    /// Entry key (required, non-empty).
    pub key: Spanned<String>,
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
    /// Accepted; quota mode is not implemented yet, so it changes nothing.
    #[serde(default)]
    #[allow(dead_code)]
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
    /// Allowed hits per window; 0 always denies.
    #[serde(default)]
    pub requests_per_unit: u32,
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
    /// The name of the replaced limit.
    pub name: Spanned<String>,
}
