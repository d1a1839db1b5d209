//! Plans and keys as sluice stores them, and their validation.
//!
//! These records are serialised as JSON into the sled trees `plans` and
//! `api_keys`: their field names are a compatibility contract. Validation is
//! pure; error fields are paths inside the resource (`throttle.burst_limit`,
//! `stages[0].method_throttles["/v1/chat/POST"].rate_limit`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::period::{Calendar, Period};
use super::Error;

/// Default descriptor entry carrying the API key.
pub const DEFAULT_KEY_ENTRY: &str = "api_key";

/// Descriptor entry naming the model (per-model limits and prices).
pub const MODEL_ENTRY: &str = "model";

/// Descriptor entry saying what `hits_addend` measures: absent or
/// `requests` (a request), `input_tokens`, `output_tokens`, `total_tokens`
/// (a charge of tokens after the response).
pub const USAGE_ENTRY: &str = "usage";
/// Default descriptor entry carrying the HTTP method.
pub const DEFAULT_METHOD_ENTRY: &str = "method";
/// Default descriptor entry carrying the request path.
pub const DEFAULT_PATH_ENTRY: &str = "path";
/// Descriptor entry naming the stage, for stages that have a name.
pub const STAGE_ENTRY: &str = "stage";
/// Longest plan name.
pub const MAX_PLAN_NAME: usize = 128;
/// Longest key name (as AWS).
pub const MAX_KEY_NAME: usize = 1024;
/// Shortest and longest supplied key value (as AWS).
pub const KEY_VALUE_LEN: std::ops::RangeInclusive<usize> = 20..=128;
/// Most tags on one resource.
pub const MAX_TAGS: usize = 50;
/// Longest description.
pub const MAX_DESCRIPTION: usize = 4096;

/// A token bucket: capacity `burst_limit`, refilled at `rate_limit` per second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    /// Tokens per second (fractions allowed).
    pub rate_limit: f64,
    /// Capacity.
    pub burst_limit: u32,
}

/// The quota period kind, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeriodKind {
    /// A calendar day.
    Day,
    /// A week from the anchor weekday.
    Week,
    /// A month from the anchor day of month.
    Month,
}

impl From<PeriodKind> for Period {
    fn from(p: PeriodKind) -> Period {
        match p {
            PeriodKind::Day => Period::Day,
            PeriodKind::Week => Period::Week,
            PeriodKind::Month => Period::Month,
        }
    }
}

/// At most `limit` requests per calendar period per key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Requests per period.
    pub limit: u64,
    /// Period kind.
    pub period: PeriodKind,
    /// Anchor day (see [`Calendar::new`]).
    pub anchor_day: u32,
    /// IANA time zone.
    pub time_zone: String,
}

impl Quota {
    /// The quota's calendar.
    ///
    /// # Errors
    /// An invalid anchor or time zone.
    pub fn calendar(&self) -> Result<Calendar, Error> {
        Calendar::new(self.period.into(), self.anchor_day, &self.time_zone).map_err(calendar_error)
    }
}

/// Maps a calendar error (whose message starts with its field path).
pub fn calendar_error(e: super::period::CalendarError) -> Error {
    let text = e.to_string();
    match text.split_once(": ") {
        Some((field, msg)) => Error::invalid(field, msg),
        None => Error::invalid("quota", text),
    }
}

/// A domain (and optional stage) a plan governs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// RLS domain.
    pub domain: String,
    /// Stage name; "" governs the whole domain.
    #[serde(default)]
    pub stage: String,
    /// Per-method throttles keyed "/path/METHOD".
    #[serde(default)]
    pub method_throttles: BTreeMap<String, Throttle>,
    /// Entry with the API key.
    pub key_entry: String,
    /// Entry with the HTTP method.
    pub method_entry: String,
    /// Entry with the path.
    pub path_entry: String,
    /// What hits_addend measures without a `usage` entry ("" = requests).
    #[serde(default)]
    pub default_usage: String,
    /// Entry with the model (per-model limits and prices); records written
    /// before it existed read as `model`.
    #[serde(default = "default_model_entry")]
    pub model_entry: String,
}

fn default_model_entry() -> String {
    MODEL_ENTRY.into()
}

impl Default for Stage {
    /// A whole-domain stage (domain "") with the default entry names, as the
    /// admin API fills them in: `api_key`, `method`, `path`, `model`.
    fn default() -> Self {
        Stage {
            domain: String::new(),
            stage: String::new(),
            method_throttles: BTreeMap::new(),
            key_entry: DEFAULT_KEY_ENTRY.into(),
            method_entry: DEFAULT_METHOD_ENTRY.into(),
            path_entry: DEFAULT_PATH_ENTRY.into(),
            default_usage: String::new(),
            model_entry: MODEL_ENTRY.into(),
        }
    }
}

/// What a usage limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Requests.
    Requests,
    /// Tokens, counted as `count` says.
    Tokens,
    /// Money, in micro-units of the plan's currency, from the plan's prices.
    Spend,
}

/// Which tokens a token limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCount {
    /// Input (prompt) tokens.
    Input,
    /// Output (completion) tokens.
    Output,
    /// Input + output.
    Total,
    /// `ceil(input * input_weight + output * output_weight)`.
    Weighted {
        /// Weight of an input token.
        input_weight: f64,
        /// Weight of an output token.
        output_weight: f64,
    },
}

/// The window of a usage limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LimitWindow {
    /// A sliding minute (two fixed windows, the previous one weighted by how
    /// much of it still overlaps the last 60 s).
    Minute,
    /// A sliding hour, likewise.
    Hour,
    /// A calendar day.
    Day,
    /// A calendar week from the anchor weekday.
    Week,
    /// A calendar month from the anchor day.
    Month,
}

impl LimitWindow {
    /// The calendar period of a calendar window; `None` for sliding ones.
    pub fn period(self) -> Option<Period> {
        match self {
            LimitWindow::Minute | LimitWindow::Hour => None,
            LimitWindow::Day => Some(Period::Day),
            LimitWindow::Week => Some(Period::Week),
            LimitWindow::Month => Some(Period::Month),
        }
    }

    /// The length of a sliding window in seconds.
    pub fn sliding_secs(self) -> Option<i64> {
        match self {
            LimitWindow::Minute => Some(60),
            LimitWindow::Hour => Some(3600),
            _ => None,
        }
    }
}

/// Whose usage a limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each key on its own.
    #[default]
    Key,
    /// All keys with the same customer_id together (a key without one is
    /// its own customer).
    Customer,
}

/// A limit on requests, tokens or spend per window, per key or per customer,
/// with optional per-model limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageLimit {
    /// Unique in the plan; reported in headers and `current_limit.name`.
    pub name: String,
    /// What is counted.
    pub metric: Metric,
    /// Which tokens (for [`Metric::Tokens`]).
    pub count: TokenCount,
    /// The limit per window (requests, tokens or micro-units).
    pub limit: u64,
    /// The window.
    pub window: LimitWindow,
    /// Anchor day of a WEEK or MONTH window (as the quota's).
    #[serde(default)]
    pub anchor_day: u32,
    /// IANA time zone of a calendar window.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// Per-model limits by glob on the descriptor entry `model`
    /// (`gpt-4o*`); models matching none use `limit`. Each pattern has its
    /// own counter, and so does the default.
    #[serde(default)]
    pub model_limits: BTreeMap<String, u64>,
    /// Per key or per customer.
    #[serde(default)]
    pub scope: Scope,
}

fn utc() -> String {
    "UTC".into()
}

/// Prices of a model per million tokens, in micro-units (2.50 per million =
/// 2_500_000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// Per million input tokens.
    pub input_per_million: u64,
    /// Per million output tokens.
    pub output_per_million: u64,
}

/// Which rate-limit headers a plan's decisions carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    #[default]
    Openai,
    /// The IETF draft's `RateLimit-Policy` and `RateLimit`.
    Ietf,
    /// Both.
    Both,
    /// None (Envoy's own x-ratelimit-* headers still come from the status).
    None,
}

/// A usage plan. The default is an empty plan (no name, stages or limits),
/// for building one field by field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Immutable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Plan throttle.
    pub throttle: Option<Throttle>,
    /// Plan quota.
    pub quota: Option<Quota>,
    /// Governed stages.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Unix seconds.
    pub create_time: i64,
    /// Unix seconds.
    pub update_time: i64,
    /// Request, token and spend limits (LLM traffic).
    #[serde(default)]
    pub limits: Vec<UsageLimit>,
    /// Model prices by glob on the model name, for spend limits.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Rate-limit headers added to responses.
    #[serde(default)]
    pub header_style: HeaderStyle,
    /// Limits an update removed, by name, while their counters may still
    /// hold counts: a limit added again under such a name must count the
    /// same unit (see [`validate_limit_units`]). Kept by the registry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retired_limits: BTreeMap<String, RetiredLimit>,
}

/// A removed limit's counters: what they count and until when they may
/// hold counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredLimit {
    /// What the counters count ([`limit_unit`]).
    pub unit: String,
    /// Unix seconds after which none of its counters is left.
    pub until: i64,
}

/// How long a removed limit's counters may live: the longest window (a
/// calendar month, in any time zone) and a day more.
pub const RETIRED_LIMIT_SECS: i64 = 33 * 86_400;

impl Default for ApiKey {
    fn default() -> Self {
        ApiKey {
            id: String::new(),
            name: String::new(),
            description: String::new(),
            enabled: true,
            customer_id: String::new(),
            create_time: 0,
            update_time: 0,
            expire_time: None,
            tags: BTreeMap::new(),
            hash: String::new(),
            previous: None,
            plan_ids: BTreeSet::new(),
        }
    }
}

/// A key's previous value, still accepted until `until` after a rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousValue {
    /// SHA-256 of the old value, hex.
    pub hash: String,
    /// Unix second from which it is refused.
    pub until: i64,
}

/// An API key; its value exists only as a hash. The default is an enabled
/// key with no name, value (hash) or plans, for building one field by field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Immutable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Disabled keys are refused.
    pub enabled: bool,
    /// The customer the key belongs to.
    #[serde(default)]
    pub customer_id: String,
    /// Unix seconds.
    pub create_time: i64,
    /// Unix seconds.
    pub update_time: i64,
    /// Refused from this Unix second on.
    pub expire_time: Option<i64>,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// SHA-256 of the value, hex.
    pub hash: String,
    /// The value before the last rotation, during its grace period.
    pub previous: Option<PreviousValue>,
    /// Ids of the plans the key is bound to.
    #[serde(default)]
    pub plan_ids: BTreeSet<String>,
}

/// SHA-256 of a key value. Generated values carry 192 random bits, so a fast
/// hash is enough to make the stored form useless to whoever reads the disk.
pub fn hash_value(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// Hex form of a hash, as stored.
pub fn hex(hash: &[u8; 32]) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses a stored hex hash.
pub fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Checks a supplied key value.
///
/// # Errors
/// [`Error::Invalid`] on `field` when the length or characters are wrong.
pub fn validate_key_value(field: &str, value: &str) -> Result<(), Error> {
    if !KEY_VALUE_LEN.contains(&value.len()) {
        return Err(Error::invalid(
            field,
            format!(
                "must be {} to {} characters, got {}",
                KEY_VALUE_LEN.start(),
                KEY_VALUE_LEN.end(),
                value.len()
            ),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

fn validate_name(field: &str, name: &str, max: usize) -> Result<(), Error> {
    if name.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if name.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn validate_common(description: &str, tags: &BTreeMap<String, String>) -> Result<(), Error> {
    if description.len() > MAX_DESCRIPTION {
        return Err(Error::invalid(
            "description",
            format!("must be at most {MAX_DESCRIPTION} bytes"),
        ));
    }
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid("tags", format!("at most {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > 128 {
            return Err(Error::invalid(
                "tags",
                format!("tag key {k:?} must be 1 to 128 bytes"),
            ));
        }
        if v.len() > 256 {
            return Err(Error::invalid(
                format!("tags[{k:?}]"),
                "must be at most 256 bytes",
            ));
        }
    }
    Ok(())
}

/// The smallest non-zero throttle rate: one request per 10^9 seconds.
pub const MIN_RATE: f64 = 1e-9;

/// Checks a throttle; `field` is its path.
///
/// # Errors
/// [`Error::Invalid`] naming the bad sub-field.
pub fn validate_throttle(field: &str, t: &Throttle) -> Result<(), Error> {
    if !t.rate_limit.is_finite() || t.rate_limit < 0.0 {
        return Err(Error::invalid(
            format!("{field}.rate_limit"),
            format!("must be a number >= 0, got {}", t.rate_limit),
        ));
    }
    if t.rate_limit > 1e9 {
        return Err(Error::invalid(
            format!("{field}.rate_limit"),
            "must be at most 1e9 per second",
        ));
    }
    // Below one token per ~31.7 years the bucket's arithmetic leaves the
    // range of its waits (and of a protobuf Duration); 0 never refills.
    if t.rate_limit > 0.0 && t.rate_limit < MIN_RATE {
        return Err(Error::invalid(
            format!("{field}.rate_limit"),
            format!(
                "must be 0 (no refill: burst_limit calls, then none) or at least {MIN_RATE:e} per second, got {:e}",
                t.rate_limit
            ),
        ));
    }
    if t.rate_limit > 0.0 && t.burst_limit < 1 {
        return Err(Error::invalid(
            format!("{field}.burst_limit"),
            "must be >= 1 when rate_limit > 0",
        ));
    }
    Ok(())
}

/// A per-method throttle key "/path/METHOD" split into (path segments, method).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodKey {
    /// Path segments; `None` is a `{param}` segment matching any one segment.
    pub segments: Vec<Option<String>>,
    /// Upper-case method, or `None` for `*`.
    pub method: Option<String>,
}

impl MethodKey {
    /// Parses "/path/METHOD" (AWS's resource path + method form).
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(key: &str) -> Result<MethodKey, String> {
        let Some(rest) = key.strip_prefix('/') else {
            return Err("must look like \"/path/METHOD\" (start with '/')".into());
        };
        let (path, method) = match rest.rsplit_once('/') {
            Some((p, m)) => (p, m),
            None => ("", rest),
        };
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.to_owned()),
            m => {
                return Err(format!(
                    "must end with an upper-case HTTP method or *, got {m:?}"
                ))
            }
        };
        let mut segments = Vec::new();
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            if seg.starts_with('{') && seg.ends_with('}') && seg.len() > 2 {
                segments.push(None);
            } else if seg.contains(['{', '}', '?', '#']) || seg.chars().any(char::is_control) {
                return Err(format!("bad path segment {seg:?}"));
            } else {
                segments.push(Some(seg.to_owned()));
            }
        }
        Ok(MethodKey { segments, method })
    }

    /// Whether a request path (without query) and method match; returns a
    /// specificity score (higher is more specific) when they do.
    pub fn matches(&self, path: &str, method: &str) -> Option<usize> {
        if let Some(m) = &self.method {
            if !m.eq_ignore_ascii_case(method) {
                return None;
            }
        }
        let path = path.split(['?', '#']).next().unwrap_or("");
        let mut literal = 0;
        let mut segs = path.split('/').filter(|s| !s.is_empty());
        for want in &self.segments {
            let got = segs.next()?;
            match want {
                Some(w) if w == got => literal += 1,
                Some(_) => return None,
                None => {}
            }
        }
        if segs.next().is_some() {
            return None;
        }
        Some(literal * 2 + usize::from(self.method.is_some()))
    }
}

/// Checks a plan before it is written (created or updated; not the
/// uniqueness of its name, which needs the store): [`validate_plan`] and
/// the checks added since plans were first stored, which a stored plan
/// need not pass to load (a data dir written by an earlier version starts).
///
/// # Errors
/// [`Error::Invalid`] naming the first bad field.
pub fn validate_new_plan(p: &Plan) -> Result<(), Error> {
    validate_plan(p)?;
    untrimmed("name", &p.name)?;
    for (i, s) in p.stages.iter().enumerate() {
        // Requests refuse domains over 1024 bytes (--max-key-value-len's
        // default): a plan for a longer one could never decide a call.
        if s.domain.len() > 1024 {
            return Err(Error::invalid(
                format!("stages[{i}].domain"),
                format!("must be at most 1024 bytes, got {}", s.domain.len()),
            ));
        }
    }
    Ok(())
}

/// Checks a plan record, as it is stored and loaded.
///
/// # Errors
/// [`Error::Invalid`] naming the first bad field.
pub fn validate_plan(p: &Plan) -> Result<(), Error> {
    validate_name("name", &p.name, MAX_PLAN_NAME)?;
    validate_common(&p.description, &p.tags)?;
    if let Some(t) = &p.throttle {
        validate_throttle("throttle", t)?;
    }
    if let Some(q) = &p.quota {
        q.calendar()?;
    }
    let mut seen = BTreeSet::new();
    for (i, s) in p.stages.iter().enumerate() {
        let f = |sub: &str| format!("stages[{i}].{sub}");
        if s.domain.is_empty() {
            return Err(Error::invalid(f("domain"), "must not be empty"));
        }

        if !seen.insert((&s.domain, &s.stage)) {
            return Err(Error::invalid(
                f("domain"),
                format!("domain {:?} stage {:?} is listed twice", s.domain, s.stage),
            ));
        }
        // Entry names: a descriptor entry key (requests refuse keys over
        // 1024 bytes), each with its own role.
        let entries = [
            ("key_entry", &s.key_entry),
            ("method_entry", &s.method_entry),
            ("path_entry", &s.path_entry),
            ("model_entry", &s.model_entry),
        ];
        for (i, (name, v)) in entries.iter().enumerate() {
            if v.trim().is_empty() || v.len() > 1024 || v.chars().any(char::is_control) {
                return Err(Error::invalid(
                    f(name),
                    format!("must be a descriptor entry key (1 to 1024 bytes, no control characters), got {v:?}"),
                ));
            }
            if *v == USAGE_ENTRY || *v == "stage" {
                return Err(Error::invalid(
                    f(name),
                    format!("{v:?} is the entry that names the usage kind or the stage; choose another entry"),
                ));
            }
            if *name != "model_entry" && *v == MODEL_ENTRY {
                return Err(Error::invalid(
                    f(name),
                    format!("{v:?} is the entry that names the model; choose another entry"),
                ));
            }
            if let Some((other, _)) = entries[..i].iter().find(|(_, w)| w == v) {
                return Err(Error::invalid(
                    f(name),
                    format!("{v:?} is already the stage's {other}; each entry has one role"),
                ));
            }
        }
        if ![
            "",
            "requests",
            "input_tokens",
            "output_tokens",
            "total_tokens",
        ]
        .contains(&s.default_usage.as_str())
        {
            return Err(Error::invalid(
                f("default_usage"),
                format!(
                    "must be requests, input_tokens, output_tokens or total_tokens, got {:?}",
                    s.default_usage
                ),
            ));
        }
        for (k, t) in &s.method_throttles {
            let field = f(&format!("method_throttles[{k:?}]"));
            MethodKey::parse(k).map_err(|m| Error::invalid(field.clone(), m))?;
            validate_throttle(&field, t)?;
        }
    }
    validate_limits(p)
}

/// Checks a plan's usage limits and prices.
///
/// # Errors
/// [`Error::Invalid`] naming the first bad field.
pub fn validate_limits(p: &Plan) -> Result<(), Error> {
    let mut names = BTreeSet::new();
    for (i, l) in p.limits.iter().enumerate() {
        let f = |sub: &str| format!("limits[{i}].{sub}");
        validate_name(&f("name"), &l.name, 64)?;
        if !l
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::invalid(
                f("name"),
                "use letters, digits, '-', '_' and '.' only",
            ));
        }
        if !names.insert(&l.name) {
            return Err(Error::invalid(
                f("name"),
                format!("{:?} is used twice", l.name),
            ));
        }
        if let (
            Metric::Tokens,
            TokenCount::Weighted {
                input_weight,
                output_weight,
            },
        ) = (l.metric, l.count)
        {
            for (name, w) in [
                ("input_weight", input_weight),
                ("output_weight", output_weight),
            ] {
                if !w.is_finite() || !(0.0..=1e6).contains(&w) {
                    return Err(Error::invalid(
                        f(name),
                        format!("must be between 0 and 1e6, got {w}"),
                    ));
                }
            }
            if input_weight == 0.0 && output_weight == 0.0 {
                return Err(Error::invalid(
                    f("input_weight"),
                    "a WEIGHTED count needs input_weight or output_weight above 0 (with both 0 it counts nothing)",
                ));
            }
        }
        if let Some(period) = l.window.period() {
            Calendar::new(period, l.anchor_day, &l.time_zone).map_err(|e| {
                let e = calendar_error(e);
                match e {
                    Error::Invalid { field, message } => {
                        Error::invalid(f(field.strip_prefix("quota.").unwrap_or(&field)), message)
                    }
                    other => other,
                }
            })?;
        } else {
            if l.anchor_day != 0 {
                return Err(Error::invalid(
                    f("anchor_day"),
                    "only WEEK and MONTH windows have an anchor day",
                ));
            }
            // A sliding window has no calendar, but a zone given is still
            // checked: a typo must not be stored (and exported) silently.
            if !l.time_zone.is_empty() {
                Calendar::new(Period::Day, 0, &l.time_zone).map_err(|_| {
                    Error::invalid(
                        f("time_zone"),
                        format!(
                            "unknown time zone {:?} (an IANA name such as Europe/Paris)",
                            l.time_zone
                        ),
                    )
                })?;
            }
        }
        for pattern in l.model_limits.keys() {
            if pattern.is_empty() || pattern.len() > 256 {
                return Err(Error::invalid(
                    f("model_limits"),
                    "model patterns must be 1 to 256 bytes",
                ));
            }
        }
    }
    for k in p.prices.keys() {
        if k.is_empty() || k.len() > 256 {
            return Err(Error::invalid(
                "prices",
                "model patterns must be 1 to 256 bytes",
            ));
        }
    }
    Ok(())
}

/// What a limit's counter counts: its metric, and for TOKENS which tokens
/// (weights aside). A counter's value is in this unit.
fn counted_unit(l: &UsageLimit) -> (Metric, Option<std::mem::Discriminant<TokenCount>>) {
    let count = (l.metric == Metric::Tokens).then(|| std::mem::discriminant(&l.count));
    (l.metric, count)
}

/// Checks that an update keeps the unit of every limit it keeps by name: a
/// limit's counter is found by the plan and the limit's name, so a limit
/// whose metric or token count changes would read the counts so far (say
/// 23 tokens) in the new unit (23 micro-units of money).
///
/// # Errors
/// [`Error::FailedPrecondition`] naming the limit and the way out.
pub fn validate_limit_units(old: &Plan, new: &Plan) -> Result<(), Error> {
    for (i, l) in new.limits.iter().enumerate() {
        if let Some(r) = old.retired_limits.get(&l.name) {
            if r.unit != limit_unit(l) {
                return Err(Error::FailedPrecondition(format!(
                    "limits[{i}] ({:?}): a removed limit of that name counted {} and its counters may \
                     still hold counts (until {}); counting {} in them would mix the two. Give the \
                     limit a new name instead",
                    l.name,
                    r.unit,
                    jiff::Timestamp::from_second(r.until).map_or_else(|_| r.until.to_string(), |t| t.to_string()),
                    limit_unit(l)
                )));
            }
        }
        let Some(o) = old.limits.iter().find(|o| o.name == l.name) else {
            continue;
        };
        if counted_unit(o) != counted_unit(l) {
            return Err(Error::FailedPrecondition(format!(
                "limits[{i}] ({:?}): its counter holds {}; counting {} in it would mix the two. \
                 Give the limit a new name (a new counter, starting at 0) instead",
                l.name,
                limit_unit(o),
                limit_unit(l)
            )));
        }
    }
    Ok(())
}

/// What a limit's counters count, in words: `requests`, `spend`, or which
/// tokens.
pub fn limit_unit(l: &UsageLimit) -> &'static str {
    match (l.metric, l.count) {
        (Metric::Requests, _) => "requests",
        (Metric::Spend, _) => "spend",
        (Metric::Tokens, TokenCount::Input) => "input tokens",
        (Metric::Tokens, TokenCount::Output) => "output tokens",
        (Metric::Tokens, TokenCount::Total) => "total tokens",
        (Metric::Tokens, TokenCount::Weighted { .. }) => "weighted tokens",
    }
}

/// Checks that a plan with a SPEND limit has prices: its own, or the
/// shared price table's.
///
/// # Errors
/// [`Error::Invalid`] naming the SPEND limit.
pub fn validate_spend_prices(
    p: &Plan,
    shared_prices: &BTreeMap<String, Price>,
) -> Result<(), Error> {
    if p.prices.is_empty() && shared_prices.is_empty() {
        if let Some(i) = p.limits.iter().position(|l| l.metric == Metric::Spend) {
            return Err(Error::invalid(
                format!("limits[{i}].metric"),
                "a SPEND limit needs prices, in the plan or in the shared price table",
            ));
        }
    }
    Ok(())
}

/// Checks a shared price table.
///
/// # Errors
/// [`Error::Invalid`] naming the bad entry.
pub fn validate_prices(prices: &BTreeMap<String, Price>) -> Result<(), Error> {
    for k in prices.keys() {
        if k.is_empty() || k.len() > 256 {
            return Err(Error::invalid(
                "prices",
                "model patterns must be 1 to 256 bytes",
            ));
        }
    }
    Ok(())
}

/// A name with spaces around it is refused when written: " gold " and
/// "gold" would be two names that read alike (a name of spaces only is
/// refused as empty).
fn untrimmed(field: &str, name: &str) -> Result<(), Error> {
    if name.trim() != name {
        return Err(Error::invalid(
            field,
            format!("must not start or end with whitespace, got {name:?}"),
        ));
    }
    Ok(())
}

/// Checks that a request names a plan or key (by id or name): an empty
/// reference is [`Error::Invalid`] naming `field`, not a plan or key ""
/// not found.
///
/// # Errors
/// [`Error::Invalid`] when `v` is empty.
pub fn reference(field: &str, v: &str) -> Result<(), Error> {
    if v.is_empty() {
        return Err(Error::invalid(field, "is required: an id or a name"));
    }
    Ok(())
}

/// Checks a key's own fields.
///
/// # Errors
/// [`Error::Invalid`] naming the first bad field.
pub fn validate_key(k: &ApiKey) -> Result<(), Error> {
    validate_name("name", &k.name, MAX_KEY_NAME)?;
    untrimmed("name", &k.name)?;
    validate_common(&k.description, &k.tags)?;
    if k.customer_id.len() > 1024 {
        return Err(Error::invalid("customer_id", "must be at most 1024 bytes"));
    }
    if k.customer_id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "customer_id",
            "must not contain control characters",
        ));
    }
    if let Some(t) = k.expire_time {
        if jiff::Timestamp::from_second(t).is_err() {
            return Err(Error::invalid(
                "expire_time",
                format!(
                    "must be between {} and {}, got {t} seconds since 1970",
                    jiff::Timestamp::MIN.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    jiff::Timestamp::MAX.strftime("%Y-%m-%dT%H:%M:%SZ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            id: "p".into(),
            name: "gold".into(),
            throttle: Some(Throttle {
                rate_limit: 10.0,
                burst_limit: 20,
            }),
            quota: Some(Quota {
                limit: 1000,
                period: PeriodKind::Day,
                anchor_day: 0,
                time_zone: "UTC".into(),
            }),
            stages: vec![Stage {
                domain: "llm".into(),
                ..Stage::default()
            }],
            ..Plan::default()
        }
    }

    /// Names with spaces around them are refused when written (a stored
    /// one still loads).
    #[test]
    fn padded_names_are_refused_when_written() {
        let mut p = plan();
        p.name = " gold ".into();
        assert!(validate_plan(&p).is_ok());
        assert!(
            matches!(validate_new_plan(&p), Err(Error::Invalid { field, .. }) if field == "name")
        );
        let k = ApiKey {
            name: "alice ".into(),
            ..ApiKey::default()
        };
        assert!(matches!(validate_key(&k), Err(Error::Invalid { field, .. }) if field == "name"));
    }

    /// A key's customer id takes no control characters, and its expire
    /// time must be one a timestamp can show (an export of a key expiring
    /// in the year 10000 failed for the whole server).
    #[test]
    fn a_key_needs_a_printable_customer_and_a_showable_expire_time() {
        let key = |customer: &str, expire: Option<i64>| ApiKey {
            name: "k".into(),
            customer_id: customer.into(),
            expire_time: expire,
            ..ApiKey::default()
        };
        assert!(validate_key(&key("acme", Some(253_402_207_200))).is_ok());
        for (k, want) in [
            (key("a\nb", None), "customer_id"),
            (key("acme", Some(253_402_207_201)), "expire_time"),
            (key("acme", Some(i64::MIN)), "expire_time"),
        ] {
            match validate_key(&k) {
                Err(Error::Invalid { field, .. }) => assert_eq!(field, want),
                other => panic!("{k:?}: {other:?}"),
            }
        }
    }

    fn field_of(p: &Plan) -> String {
        match validate_plan(p) {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_plan_passes() {
        validate_plan(&plan()).unwrap();
    }

    fn tokens_limit(window: LimitWindow, count: TokenCount, time_zone: &str) -> UsageLimit {
        UsageLimit {
            name: "tpm".into(),
            metric: Metric::Tokens,
            count,
            limit: 100,
            window,
            anchor_day: 0,
            time_zone: time_zone.into(),
            model_limits: BTreeMap::new(),
            scope: Scope::Key,
        }
    }

    /// Settings that would be stored but do nothing, or break every call,
    /// are refused naming the field.
    #[test]
    fn useless_or_breaking_settings_are_refused() {
        // An unknown zone on a sliding window (no calendar, but a typo
        // must not be stored); a known one and none are fine.
        let mut p = plan();
        p.limits = vec![tokens_limit(
            LimitWindow::Minute,
            TokenCount::Total,
            "Mars/Base",
        )];
        assert_eq!(field_of(&p), "limits[0].time_zone");
        for zone in ["", "UTC", "Asia/Tokyo"] {
            p.limits = vec![tokens_limit(LimitWindow::Hour, TokenCount::Total, zone)];
            validate_plan(&p).unwrap();
        }
        // WEIGHTED with both weights 0 counts nothing.
        let zero = TokenCount::Weighted {
            input_weight: 0.0,
            output_weight: 0.0,
        };
        p.limits = vec![tokens_limit(LimitWindow::Minute, zero, "")];
        assert_eq!(field_of(&p), "limits[0].input_weight");
        p.limits = vec![tokens_limit(
            LimitWindow::Minute,
            TokenCount::Weighted {
                input_weight: 0.0,
                output_weight: 1.5,
            },
            "",
        )];
        validate_plan(&p).unwrap();
        // The key entry cannot be the usage or model entry.
        for reserved in [USAGE_ENTRY, MODEL_ENTRY] {
            let mut p = plan();
            p.stages[0].key_entry = reserved.into();
            assert_eq!(field_of(&p), "stages[0].key_entry");
        }
        let mut p = plan();
        p.stages[0].model_entry = "x-model".into();
        p.stages[0].path_entry = "x-model".into();
        assert_eq!(
            field_of(&p),
            "stages[0].model_entry",
            "the later role is named"
        );
        let long = "m".repeat(1025);
        for bad in [
            "",
            " ",
            USAGE_ENTRY,
            "stage",
            "x\u{0}y",
            DEFAULT_KEY_ENTRY,
            long.as_str(),
        ] {
            let mut p = plan();
            p.stages[0].model_entry = bad.into();
            assert_eq!(field_of(&p), "stages[0].model_entry", "{bad:?}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut p = plan();
        p.name = " ".into();
        assert_eq!(field_of(&p), "name");
        let mut p = plan();
        p.throttle.as_mut().unwrap().rate_limit = -1.0;
        assert_eq!(field_of(&p), "throttle.rate_limit");
        let mut p = plan();
        p.throttle.as_mut().unwrap().rate_limit = f64::NAN;
        assert_eq!(field_of(&p), "throttle.rate_limit");
        let mut p = plan();
        p.throttle.as_mut().unwrap().burst_limit = 0;
        assert_eq!(field_of(&p), "throttle.burst_limit");
        let mut p = plan();
        p.quota.as_mut().unwrap().time_zone = "Mars/Olympus".into();
        assert_eq!(field_of(&p), "quota.time_zone");
        let mut p = plan();
        p.quota.as_mut().unwrap().period = PeriodKind::Week;
        p.quota.as_mut().unwrap().anchor_day = 7;
        assert_eq!(field_of(&p), "quota.anchor_day");
        let mut p = plan();
        p.stages[0].domain.clear();
        assert_eq!(field_of(&p), "stages[0].domain");
        // Too long for a request: refused for a new write, loaded if stored.
        p.stages[0].domain = "d".repeat(1025);
        assert!(
            matches!(validate_new_plan(&p), Err(Error::Invalid { field, .. }) if field == "stages[0].domain")
        );
        assert!(validate_plan(&p).is_ok());
        p.stages[0].domain = "d".repeat(1024);
        assert!(validate_new_plan(&p).is_ok(), "{p:?}");
        let mut p = plan();
        p.stages.push(p.stages[0].clone());
        assert_eq!(field_of(&p), "stages[1].domain");
        let mut p = plan();
        p.stages[0].method_throttles.insert(
            "v1/chat/POST".into(),
            Throttle {
                rate_limit: 1.0,
                burst_limit: 1,
            },
        );
        assert_eq!(field_of(&p), "stages[0].method_throttles[\"v1/chat/POST\"]");
        let mut p = plan();
        p.stages[0].method_throttles.insert(
            "/v1/chat/POST".into(),
            Throttle {
                rate_limit: 1.0,
                burst_limit: 0,
            },
        );
        assert_eq!(
            field_of(&p),
            "stages[0].method_throttles[\"/v1/chat/POST\"].burst_limit"
        );
    }

    #[test]
    fn zero_rate_with_zero_burst_is_a_valid_kill_switch() {
        let mut p = plan();
        p.throttle = Some(Throttle {
            rate_limit: 0.0,
            burst_limit: 0,
        });
        validate_plan(&p).unwrap();
    }

    #[test]
    fn method_keys_parse_and_match_by_specificity() {
        let exact = MethodKey::parse("/v1/chat/completions/POST").unwrap();
        let param = MethodKey::parse("/v1/{kind}/completions/POST").unwrap();
        let any = MethodKey::parse("/v1/chat/completions/*").unwrap();
        let root = MethodKey::parse("//GET").unwrap();
        assert_eq!(root.segments, Vec::<Option<String>>::new());
        assert!(root.matches("/", "GET").is_some());
        let (p, m) = ("/v1/chat/completions?stream=true", "POST");
        let e = exact.matches(p, m).unwrap();
        let pa = param.matches(p, m).unwrap();
        let a = any.matches(p, m).unwrap();
        assert!(e > pa && e > a, "{e} {pa} {a}");
        assert!(exact.matches("/v1/chat/completions", "GET").is_none());
        assert!(any.matches("/v1/chat/completions", "GET").is_some());
        assert!(exact.matches("/v1/chat/completions/x", "POST").is_none());
        assert!(exact.matches("/v1/chat", "POST").is_none());
        for bad in ["v1/POST", "/v1/post", "/v1/", "/v1/{x/POST"] {
            assert!(MethodKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let h = hash_value("abc");
        assert_eq!(
            hex(&h),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn key_values_are_checked() {
        validate_key_value("value", "abcdefghijklmnopqrst").unwrap();
        assert!(validate_key_value("value", "short").is_err());
        assert!(validate_key_value("value", "abcdefghij klmnopqrst").is_err());
    }
}
