//! Declarative usage plans and API keys: `sluice apply -f plans.yaml` and
//! `sluice export`.
//!
//! A YAML file lists usage plans and API keys (without their values) by
//! name. [`plan_changes`] compares it with what the admin API reports and
//! computes a [`ChangeSet`]; [`apply_changes`] makes those changes through the
//! admin API; [`export`] prints the server's current state in the same
//! format, so applying an export changes nothing.
//!
//! The comparison itself is the pure function [`diff`]; everything that
//! talks to the server goes through [`Client`].
//!
//! # File format
//!
//! ```yaml
//! usage_plans:
//!   - name: gold                    # required, the plan's identity
//!     description: "Paid tier"      # default ""
//!     throttle: { rate_limit: 10, burst_limit: 20 }   # default: no throttle
//!     quota:                        # default: no quota
//!       limit: 1000                 # required
//!       period: DAY                 # required: DAY, WEEK or MONTH
//!       anchor_day: 0               # default 0
//!       # offset: 4                 # AWS's offset (days after the period's natural
//!                                   # start), instead of anchor_day; export writes anchor_day
//!       time_zone: UTC              # default UTC
//!     stages:                       # default []
//!       - domain: llm-gateway       # required
//!         stage: ""                 # default ""
//!         key_entry: api_key        # default api_key
//!         method_entry: method      # default method
//!         path_entry: path          # default path
//!         default_usage: requests   # default requests; or input_tokens, output_tokens, total_tokens
//!         model_entry: model        # default model
//!         method_throttles:         # default {}
//!           "/v1/chat/completions/POST": { rate_limit: 2, burst_limit: 5 }
//!     tags: { team: platform }      # default {}
//!     limits:                       # default []; compared in order
//!       - name: tpm                 # required, unique in the plan
//!         metric: TOKENS            # required: REQUESTS, TOKENS or SPEND
//!         count: WEIGHTED           # TOKENS only: INPUT, OUTPUT, TOTAL (default) or WEIGHTED
//!         input_weight: 0.5         # WEIGHTED only, then required
//!         output_weight: 2.0        # WEIGHTED only, then required
//!         limit: 100000             # required: requests, tokens or micro-units (SPEND)
//!         window: MINUTE            # required: MINUTE, HOUR, DAY, WEEK or MONTH (CALENDAR_DAY etc. too)
//!         anchor_day: 0             # WEEK/MONTH only, as the quota's; default 0
//!         time_zone: UTC            # calendar windows; default UTC
//!         model_limits: { "gpt-4o*": 30000 }   # default {}
//!         scope: KEY                # KEY (default) or CUSTOMER
//!     prices:                       # default {}; micro-units per million tokens
//!       "gpt-4o*": { input_per_million: 2500000, output_per_million: 10000000 }
//!     header_style: OPENAI          # OPENAI (default), IETF, BOTH or NONE
//! api_keys:
//!   - name: alice                   # required, the key's identity
//!     description: ""               # default ""
//!     enabled: true                 # default true
//!     customer_id: acme             # default ""
//!     expire_time: "2027-01-01T00:00:00Z"   # RFC 3339; default: never expires
//!     tags: {}                      # default {}
//!     usage_plans: [gold]           # names of the plans it is bound to; default []
//! shared_prices:                    # optional: the server's shared price table
//!   "claude-*": { input_per_million: 3000000, output_per_million: 15000000 }
//! ```
//!
//! Both top-level lists are optional. `shared_prices`, when present (`{}`
//! included), is the whole table (set first, or last when emptied); absent,
//! the server's table is left alone. Unknown fields are errors. Each
//! resource listed is its full desired state: an omitted field means its
//! default (an omitted `throttle` removes the plan's throttle, an omitted
//! `limits` its limits, an omitted `usage_plans` unbinds the key from every
//! plan). Resources on the server
//! that the file does not list are left alone unless `prune` is set, in which
//! case they are deleted (plans with `force`, which unbinds their keys).
//!
//! Checked before anything is changed: YAML syntax and field names (errors
//! name the file, line and column), period and enum spelling, RFC 3339
//! times, empty or duplicate names (also of a plan's limits), `count` on a
//! limit that is not TOKENS, weights without `count: WEIGHTED` (or missing
//! with it), a plan listed twice in one key's `usage_plans`, and
//! every `usage_plans` entry naming a plan that is in the file or on the
//! server (and, with `prune`, in the file), every plan as the server checks
//! it on its own (time zones, rates, anchors, stages, limits: the admin
//! API's own check, [`crate::server::admin::check_plan`]), a key given two
//! plans that govern one domain and stage, and, with `prune`, a file that
//! lists nothing at all (it would delete everything), a SPEND limit in
//! a plan without prices while the server's shared price table (which a
//! file does not carry) is empty, and a named limit whose metric or count
//! differs from the server's (its counter would mix units). Anything else the server refuses is
//! reported with the resource's name, and the changes made before it stay
//! made.
//!
//! # Comparison
//!
//! Only the fields of the format are compared: ids, times and key values are
//! not. Throttle rates are compared exactly as the server returns them,
//! times as whole seconds. Stages are compared regardless of their order; an
//! empty `key_entry`/`method_entry`/`path_entry`/`model_entry` or `time_zone` from the
//! server counts as its default, a MONTH `anchor_day` of 0 as 1, and a quota
//! `offset` as the equivalent `anchor_day`. Limits are compared in order,
//! each as the server uses it: a limit's `count` only for TOKENS limits (an
//! unspecified count is TOTAL), its weights only for `count: WEIGHTED`, an
//! empty `time_zone` as UTC and a MONTH window's `anchor_day` 0 as 1; prices
//! regardless of their order.
//!
//! # Order of changes
//!
//! 1. remove stale bindings (so a key can move between two plans that
//!    govern the same domain and stage, and a plan can take a stage from
//!    one its keys leave),
//! 2. create or update plans (file order, except that an update giving a
//!    plan a stage another plan of one of its keys still governs waits for
//!    that plan's update; two plans sharing a key that trade stages are
//!    refused before any change, naming the way out),
//! 3. create or update keys (file order),
//! 4. add new bindings,
//! 5. with `prune`: delete keys, then plans, not in the file (by name).
//!
//! Errors found before the first change (a binding to a plan that exists
//! nowhere, two plans of a key for one stage, a limit whose unit changes)
//! name the file and line, as parse errors do ([`Lines::place`]).
//!
//! # Output
//!
//! One line per change (the [`Display`](std::fmt::Display) of [`Change`]):
//!
//! ```text
//! + usage plan gold
//! ~ usage plan gold: throttle, quota
//! ~ usage plan silver: limits, header_style
//! - usage plan old
//! + api key alice
//! ~ api key alice: enabled, tags
//! - api key bob
//! + bind alice -> gold
//! - bind alice -> silver
//! ```
//!
//! The `~` line lists the changed top-level fields, in the order
//! `description, throttle, quota, stages, tags, limits, prices, header_style`
//! for plans and
//! `description, enabled, customer_id, expire_time, tags` for keys. The
//! [`ChangeSet`] listing (a dry run) ends with `1 change`, `N changes` or
//! `no changes`. [`apply_changes`] prints each line once its call succeeded,
//! after a created key the line
//! `created api key alice: value slk_... (shown once; store it now)`, and
//! finally `1 change applied`, `N changes applied` or `no changes`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::proto::admin::admin_service_client::AdminServiceClient;
use crate::proto::admin::{self as pb, Period};

/// Default descriptor entry carrying the API key.
const DEFAULT_KEY_ENTRY: &str = "api_key";
/// Default descriptor entry carrying the HTTP method.
const DEFAULT_METHOD_ENTRY: &str = "method";
/// Default descriptor entry carrying the request path.
const DEFAULT_PATH_ENTRY: &str = "path";
/// Default descriptor entry carrying the model.
const DEFAULT_MODEL_ENTRY: &str = "model";
/// Default quota time zone.
const DEFAULT_TIME_ZONE: &str = "UTC";
/// Page size of list calls.
const PAGE_SIZE: i32 = 500;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why parsing, planning, applying or exporting failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not valid YAML in the declarative format. `message`
    /// names the line, column and field.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// The file parses but is inconsistent (duplicate or empty names).
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line (1-based), when known.
        line: Option<u64>,
        /// What is wrong.
        message: String,
    },
    /// The file does not fit the server's state (e.g. a key names a plan
    /// that exists nowhere). Found before any change is made.
    #[error("{0}")]
    Conflict(String),
    /// A [`Conflict`](Self::Conflict) at a place in the file;
    /// [`Lines::place`] makes it an [`Invalid`](Self::Invalid) with the
    /// file and line.
    #[error("{message}")]
    ConflictAt {
        /// Where in the file.
        at: At,
        /// What is wrong.
        message: String,
    },
    /// The admin address is not a valid URI or cannot be connected to.
    #[error("cannot connect to the admin API at {addr}: {message}")]
    Connect {
        /// The address given.
        addr: String,
        /// Why.
        message: String,
    },
    /// The admin token cannot be sent as gRPC metadata.
    #[error("the admin token is not valid in an HTTP header (printable ASCII only)")]
    Token,
    /// A gRPC call failed.
    #[error("{context}: {}: {message}", code_name(*.code))]
    Rpc {
        /// What was being done (e.g. `creating usage plan "gold"`).
        context: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The server returned something this module cannot represent.
    #[error("unexpected server response: {0}")]
    Unexpected(String),
    /// Encoding the YAML output failed.
    #[error("encoding YAML: {0}")]
    Encode(String),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// The canonical upper-case name of a gRPC code.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn rpc_error(context: impl Into<String>, status: &tonic::Status) -> Error {
    Error::Rpc {
        context: context.into(),
        code: status.code(),
        message: status.message().to_owned(),
    }
}

// ---------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------

/// A parsed declarative file: the desired plans and keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Usage plans, identified by name.
    #[serde(default)]
    pub usage_plans: Vec<PlanSpec>,
    /// API keys, identified by name.
    #[serde(default)]
    pub api_keys: Vec<KeySpec>,
    /// The server's shared price table (prices for models a plan does not
    /// price itself). Absent: the server's table is left alone; present
    /// (`{}` included): the table is made exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_prices: Option<BTreeMap<String, PriceSpec>>,
}

/// A usage plan in the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Unique name; the plan's identity.
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Plan throttle; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    /// Plan quota; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSpec>,
    /// Governed domains and stages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageSpec>,
    /// Tags.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "flow_map"
    )]
    pub tags: BTreeMap<String, String>,
    /// Request, token and spend limits, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<LimitSpec>,
    /// Model prices by glob on the model name, for SPEND limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, PriceSpec>,
    /// Rate-limit headers added to responses; default OPENAI.
    #[serde(default, skip_serializing_if = "HeaderStyleSpec::is_default")]
    pub header_style: HeaderStyleSpec,
}

/// A token bucket: `rate_limit` per second, capacity `burst_limit`.
/// Written in flow style: `{ rate_limit: 10.0, burst_limit: 20 }`.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    /// Requests per second (fractions allowed).
    pub rate_limit: f64,
    /// Bucket capacity.
    pub burst_limit: i32,
}

/// The length of a quota period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeriodSpec {
    /// A calendar day.
    #[serde(rename = "DAY")]
    Day,
    /// A week from the anchor weekday.
    #[serde(rename = "WEEK")]
    Week,
    /// A month from the anchor day of month.
    #[serde(rename = "MONTH")]
    Month,
}

/// At most `limit` requests per calendar period per key. Written in flow
/// style, with `anchor_day: 0` and `time_zone: UTC` omitted.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Requests per period.
    pub limit: i64,
    /// DAY, WEEK or MONTH.
    pub period: PeriodSpec,
    /// WEEK: 0 = Sunday .. 6 = Saturday; MONTH: 1..31 (0 means 1); DAY: 0.
    #[serde(default)]
    pub anchor_day: i32,
    /// Amazon API Gateway's `offset`, read as the same anchor: days after
    /// the natural start of the period (WEEK: after Sunday, MONTH: after the
    /// 1st). Give `anchor_day` or `offset`, not both. `export` writes
    /// `anchor_day`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i32>,
    /// IANA time zone; default UTC.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

/// A limit on requests, tokens or spend per window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Unique in the plan; reported in headers.
    pub name: String,
    /// What is counted.
    pub metric: MetricSpec,
    /// Which tokens (TOKENS limits only); absent means TOTAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<CountSpec>,
    /// Weight of an input token (`count: WEIGHTED` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_weight: Option<f64>,
    /// Weight of an output token (`count: WEIGHTED` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_weight: Option<f64>,
    /// Per window: requests, tokens, or micro-units for SPEND.
    pub limit: i64,
    /// The window.
    pub window: WindowSpec,
    /// WEEK: 0 = Sunday .. 6 = Saturday; MONTH: 1..31 (0 means 1); else 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub anchor_day: i32,
    /// IANA time zone of a calendar window; default UTC.
    #[serde(default = "default_time_zone", skip_serializing_if = "is_utc")]
    pub time_zone: String,
    /// Per-model limits by glob on the model name (`gpt-4o*`).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "flow_map"
    )]
    pub model_limits: BTreeMap<String, i64>,
    /// Whose usage is counted; default KEY.
    #[serde(default, skip_serializing_if = "ScopeSpec::is_default")]
    pub scope: ScopeSpec,
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricSpec {
    /// Requests.
    #[serde(rename = "REQUESTS")]
    Requests,
    /// Tokens, as `count` says.
    #[serde(rename = "TOKENS")]
    Tokens,
    /// Money in micro-units, from the plan's prices.
    #[serde(rename = "SPEND")]
    Spend,
}

/// Which tokens a TOKENS limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CountSpec {
    /// Input tokens.
    #[serde(rename = "INPUT")]
    Input,
    /// Output tokens.
    #[serde(rename = "OUTPUT")]
    Output,
    /// Input + output.
    #[serde(rename = "TOTAL")]
    Total,
    /// `ceil(input * input_weight + output * output_weight)`.
    #[serde(rename = "WEIGHTED")]
    Weighted,
}

/// The window of a limit: sliding (MINUTE, HOUR) or calendar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowSpec {
    /// A sliding 60 s window.
    #[serde(rename = "MINUTE")]
    Minute,
    /// A sliding 3600 s window.
    #[serde(rename = "HOUR")]
    Hour,
    /// A calendar day (the admin API's CALENDAR_DAY, also accepted here).
    #[serde(rename = "DAY", alias = "CALENDAR_DAY")]
    Day,
    /// A calendar week from the anchor weekday (CALENDAR_WEEK, also accepted).
    #[serde(rename = "WEEK", alias = "CALENDAR_WEEK")]
    Week,
    /// A calendar month from the anchor day (CALENDAR_MONTH, also accepted).
    #[serde(rename = "MONTH", alias = "CALENDAR_MONTH")]
    Month,
}

/// Whose usage a limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScopeSpec {
    /// Each key on its own.
    #[default]
    #[serde(rename = "KEY")]
    Key,
    /// All keys with the same customer_id together.
    #[serde(rename = "CUSTOMER")]
    Customer,
}

impl ScopeSpec {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_default(&self) -> bool {
        *self == ScopeSpec::default()
    }
}

/// Which rate-limit headers a plan's decisions add to responses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderStyleSpec {
    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    #[default]
    #[serde(rename = "OPENAI")]
    Openai,
    /// The IETF draft's `RateLimit-Policy` and `RateLimit`.
    #[serde(rename = "IETF")]
    Ietf,
    /// Both.
    #[serde(rename = "BOTH")]
    Both,
    /// None.
    #[serde(rename = "NONE")]
    None,
}

impl HeaderStyleSpec {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_default(&self) -> bool {
        *self == HeaderStyleSpec::default()
    }
}

/// A model's prices per million tokens, in micro-units (2.50 = 2500000).
/// Written in flow style: `{ input_per_million: 2500000, output_per_million: 10000000 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSpec {
    /// Per million input tokens.
    pub input_per_million: i64,
    /// Per million output tokens.
    pub output_per_million: i64,
}

/// A domain (and optional stage) governed by a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// RLS domain.
    pub domain: String,
    /// Stage name; "" governs the whole domain.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stage: String,
    /// Descriptor entry with the API key; default `api_key`.
    #[serde(
        default = "default_key_entry",
        skip_serializing_if = "is_default_key_entry"
    )]
    pub key_entry: String,
    /// Descriptor entry with the HTTP method; default `method`.
    #[serde(
        default = "default_method_entry",
        skip_serializing_if = "is_default_method_entry"
    )]
    pub method_entry: String,
    /// Descriptor entry with the request path; default `path`.
    #[serde(
        default = "default_path_entry",
        skip_serializing_if = "is_default_path_entry"
    )]
    pub path_entry: String,
    /// What hits_addend measures without a `usage` entry: `requests`
    /// (default), `input_tokens`, `output_tokens` or `total_tokens`.
    #[serde(default, skip_serializing_if = "is_requests")]
    pub default_usage: String,
    /// Descriptor entry with the model; default `model`.
    #[serde(
        default = "default_model_entry",
        skip_serializing_if = "is_default_model_entry"
    )]
    pub model_entry: String,
    /// Per-method throttles keyed "/path/METHOD".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub method_throttles: BTreeMap<String, ThrottleSpec>,
}

fn is_requests(s: &str) -> bool {
    s.is_empty() || s == "requests"
}

fn norm_usage(s: &str) -> String {
    if is_requests(s) {
        String::new()
    } else {
        s.to_owned()
    }
}

/// An API key in the file (never its value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Unique name; the key's identity.
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Disabled keys are refused; default true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// The customer the key belongs to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub customer_id: String,
    /// The key is refused from this time on (RFC 3339 in the file).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_time",
        deserialize_with = "de_time"
    )]
    pub expire_time: Option<jiff::Timestamp>,
    /// Tags.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "flow_map"
    )]
    pub tags: BTreeMap<String, String>,
    /// Names of the plans the key is bound to.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "flow_seq"
    )]
    pub usage_plans: Vec<String>,
}

fn default_time_zone() -> String {
    DEFAULT_TIME_ZONE.to_owned()
}
fn default_key_entry() -> String {
    DEFAULT_KEY_ENTRY.to_owned()
}
fn default_method_entry() -> String {
    DEFAULT_METHOD_ENTRY.to_owned()
}
fn default_path_entry() -> String {
    DEFAULT_PATH_ENTRY.to_owned()
}
fn is_utc(s: &str) -> bool {
    s == DEFAULT_TIME_ZONE
}
fn is_default_key_entry(s: &str) -> bool {
    s == DEFAULT_KEY_ENTRY
}
fn is_default_method_entry(s: &str) -> bool {
    s == DEFAULT_METHOD_ENTRY
}
fn is_default_path_entry(s: &str) -> bool {
    s == DEFAULT_PATH_ENTRY
}
fn default_model_entry() -> String {
    DEFAULT_MODEL_ENTRY.to_owned()
}
fn is_default_model_entry(s: &str) -> bool {
    s == DEFAULT_MODEL_ENTRY
}
fn yes() -> bool {
    true
}
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_true(b: &bool) -> bool {
    *b
}

fn flow_map<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    serde_saphyr::FlowMap(v).serialize(s)
}

fn flow_seq<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    serde_saphyr::FlowSeq(v).serialize(s)
}

#[allow(clippy::ref_option)] // serde's serialize_with passes a reference
fn ser_time<S: Serializer>(t: &Option<jiff::Timestamp>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&t.to_string()),
        None => s.serialize_none(),
    }
}

fn de_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<jiff::Timestamp>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<jiff::Timestamp>().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "expire_time {text:?} is not an RFC 3339 time like \"2027-01-01T00:00:00Z\": {e}"
        ))
    })
}

/// The flow-style form of [`ThrottleSpec`].
#[derive(Serialize)]
struct ThrottleOut {
    rate_limit: f64,
    burst_limit: i32,
}

impl Serialize for ThrottleSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_saphyr::FlowMap(ThrottleOut {
            rate_limit: self.rate_limit,
            burst_limit: self.burst_limit,
        })
        .serialize(s)
    }
}

/// The flow-style form of [`QuotaSpec`], defaults omitted.
#[derive(Serialize)]
struct QuotaOut<'a> {
    limit: i64,
    period: PeriodSpec,
    #[serde(skip_serializing_if = "is_zero")]
    anchor_day: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i32>,
    #[serde(skip_serializing_if = "is_default_time_zone")]
    time_zone: &'a str,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &i32) -> bool {
    *n == 0
}
fn is_default_time_zone(s: &&str) -> bool {
    *s == DEFAULT_TIME_ZONE
}

impl Serialize for QuotaSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_saphyr::FlowMap(QuotaOut {
            limit: self.limit,
            period: self.period,
            anchor_day: self.anchor_day,
            offset: self.offset,
            time_zone: &self.time_zone,
        })
        .serialize(s)
    }
}

/// The flow-style form of [`PriceSpec`].
#[derive(Serialize)]
struct PriceOut {
    input_per_million: i64,
    output_per_million: i64,
}

impl Serialize for PriceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_saphyr::FlowMap(PriceOut {
            input_per_million: self.input_per_million,
            output_per_million: self.output_per_million,
        })
        .serialize(s)
    }
}

/// A place in a declarative file, for the line of an error found after
/// parsing (see [`Lines::place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// `usage_plans[i]`.
    Plan(usize),
    /// `usage_plans[i].limits[j]`.
    Limit(usize, usize),
    /// `api_keys[i]`.
    Key(usize),
    /// `api_keys[i].usage_plans[j]`.
    Binding(usize, usize),
}

/// The lines of a declarative file's plans, limits, keys and bindings, for
/// error messages.
#[derive(Debug, Default)]
pub struct Lines {
    path: PathBuf,
    names: Option<NamesOnly>,
}

impl Lines {
    /// The lines of `text`, read from `path`. A text that does not parse
    /// gives no lines (its errors come from [`parse_spec`]).
    pub fn of(path: &Path, text: &str) -> Lines {
        Lines {
            path: path.to_owned(),
            // It parsed once, so this only fails on something exotic, and
            // then the messages lack a line.
            names: one_document(path, text).ok().flatten(),
        }
    }

    /// The line of a place in the file.
    pub fn line(&self, at: At) -> Option<u64> {
        let n = self.names.as_ref()?;
        Some(match at {
            At::Plan(i) => n.usage_plans.get(i)?.name.referenced.line(),
            At::Limit(i, j) => n.usage_plans.get(i)?.limits.get(j)?.name.referenced.line(),
            At::Key(i) => n.api_keys.get(i)?.name.referenced.line(),
            At::Binding(i, j) => n.api_keys.get(i)?.usage_plans.get(j)?.referenced.line(),
        })
    }

    /// `e` with its file and line when it is a [`Error::ConflictAt`]; any
    /// other error as it is.
    pub fn place(&self, e: Error) -> Error {
        match e {
            Error::ConflictAt { at, message } => Error::Invalid {
                path: self.path.clone(),
                line: self.line(at),
                message,
            },
            e => e,
        }
    }
}

/// Only the names of a file, with their lines, for error messages.
#[derive(Debug, Deserialize)]
struct NamesOnly {
    #[serde(default)]
    usage_plans: Vec<NamedOnly>,
    #[serde(default)]
    api_keys: Vec<NamedOnly>,
}

#[derive(Debug, Deserialize)]
struct NamedOnly {
    name: serde_saphyr::Spanned<String>,
    #[serde(default)]
    usage_plans: Vec<serde_saphyr::Spanned<String>>,
    #[serde(default)]
    limits: Vec<LimitNameOnly>,
}

#[derive(Debug, Deserialize)]
struct LimitNameOnly {
    name: serde_saphyr::Spanned<String>,
}

/// Parses and checks a declarative file. `path` is only used in messages.
///
/// # Errors
/// [`Error::Parse`] for invalid YAML, unknown fields, wrong types, a bad
/// period or time (naming the file, line and column); [`Error::Invalid`]
/// for an empty or duplicate plan, limit or key name, a `count` on a limit
/// that is not TOKENS, weights without `count: WEIGHTED` (or missing with
/// it), or a plan listed twice in one key's `usage_plans`.
pub fn parse_spec(path: &Path, text: &str) -> Result<Spec, Error> {
    // A file of comments, blank lines and `---` holds no document.
    let Some(spec) = one_document::<Spec>(path, text)? else {
        return Ok(Spec::default());
    };
    let lines = Lines::of(path, text);
    let line_of_plan = |i: usize| lines.line(At::Plan(i));
    let line_of_key = |i: usize| lines.line(At::Key(i));
    let line_of_limit = |i: usize, j: usize| lines.line(At::Limit(i, j));
    let line_of_binding = |i: usize, j: usize| lines.line(At::Binding(i, j));
    let invalid = |line: Option<u64>, message: String| Error::Invalid {
        path: path.to_owned(),
        line,
        message,
    };
    let at = |line: Option<u64>| line.map(|l| format!(" at line {l}")).unwrap_or_default();

    let mut plans: HashMap<&str, usize> = HashMap::new();
    for (i, p) in spec.usage_plans.iter().enumerate() {
        if p.name.trim().is_empty() {
            return Err(invalid(
                line_of_plan(i),
                format!("usage_plans[{i}].name: must not be empty"),
            ));
        }
        if let Some(first) = plans.insert(&p.name, i) {
            return Err(invalid(
                line_of_plan(i),
                format!(
                    "usage_plans[{i}].name: usage plan {:?} is listed twice (first{})",
                    p.name,
                    at(line_of_plan(first))
                ),
            ));
        }
        let mut limits: HashMap<&str, usize> = HashMap::new();
        for (j, l) in p.limits.iter().enumerate() {
            let line = line_of_limit(i, j);
            let field = |f: &str| format!("usage_plans[{i}].limits[{j}].{f}");
            if l.name.trim().is_empty() {
                return Err(invalid(
                    line,
                    format!("{}: must not be empty", field("name")),
                ));
            }
            if let Some(first) = limits.insert(&l.name, j) {
                return Err(invalid(
                    line,
                    format!(
                        "{}: usage plan {:?} lists limit {:?} twice (first{})",
                        field("name"),
                        p.name,
                        l.name,
                        at(line_of_limit(i, first))
                    ),
                ));
            }
            if l.count.is_some() && l.metric != MetricSpec::Tokens {
                return Err(invalid(
                    line,
                    format!(
                        "{}: limit {:?} is not a TOKENS limit, so it has no count",
                        field("count"),
                        l.name
                    ),
                ));
            }
            let weighted = l.count == Some(CountSpec::Weighted);
            for (name, w) in [
                ("input_weight", l.input_weight),
                ("output_weight", l.output_weight),
            ] {
                if weighted && w.is_none() {
                    return Err(invalid(
                        line,
                        format!(
                            "{}: limit {:?} counts WEIGHTED tokens, so it needs {name}",
                            field(name),
                            l.name
                        ),
                    ));
                }
                if !weighted && w.is_some() {
                    return Err(invalid(
                        line,
                        format!(
                            "{}: only a limit with count: WEIGHTED has weights (limit {:?})",
                            field(name),
                            l.name
                        ),
                    ));
                }
            }
        }
    }
    // The shared price table as the server checks it.
    if let Some(prices) = &spec.shared_prices {
        let line = text
            .lines()
            .position(|l| l.starts_with("shared_prices"))
            .map(|i| i as u64 + 1);
        let table = prices
            .iter()
            .map(|(k, p)| (k.clone(), price_to_proto(p)))
            .collect();
        crate::server::admin::check_prices(&table)
            .map_err(|e| invalid(line, format!("shared_prices: {e}")))?;
    }
    // Everything the server checks in a plan on its own, checked now: a
    // dry run reports it, and a real run stops before its first change.
    for (i, p) in spec.usage_plans.iter().enumerate() {
        crate::server::admin::check_plan(&plan_to_proto(p)).map_err(|e| {
            let message = e.to_string();
            invalid(
                field_line(text, &lines, At::Plan(i), &message),
                format!("usage_plans[{i}] ({:?}): {message}", p.name),
            )
        })?;
    }
    let mut keys: HashMap<&str, usize> = HashMap::new();
    for (i, k) in spec.api_keys.iter().enumerate() {
        if k.name.trim().is_empty() {
            return Err(invalid(
                line_of_key(i),
                format!("api_keys[{i}].name: must not be empty"),
            ));
        }
        if let Some(first) = keys.insert(&k.name, i) {
            return Err(invalid(
                line_of_key(i),
                format!(
                    "api_keys[{i}].name: api key {:?} is listed twice (first{})",
                    k.name,
                    at(line_of_key(first))
                ),
            ));
        }
        // What the server checks in a key on its own (lengths, control
        // characters, tags, the expire time's range), checked now.
        crate::server::admin::check_key(&key_to_proto(k)).map_err(|e| {
            let message = e.to_string();
            invalid(
                field_line(text, &lines, At::Key(i), &message),
                format!("api_keys[{i}] ({:?}): {message}", k.name),
            )
        })?;
        let mut bound = HashSet::new();
        for (j, p) in k.usage_plans.iter().enumerate() {
            if !bound.insert(p.as_str()) {
                return Err(invalid(
                    line_of_binding(i, j),
                    format!(
                        "api_keys[{i}].usage_plans[{j}]: api key {:?} lists usage plan {p:?} twice",
                        k.name
                    ),
                ));
            }
        }
    }
    Ok(spec)
}

/// The line of the field that a check's message about a plan or key
/// starts with (`quota.time_zone: ...`, `limits[1].window: ...`), looked
/// for among its own lines; the plan's or key's line when the message names
/// no field, the nearest enclosing field's when the field is not found
/// (e.g. a flow list on one line).
fn field_line(text: &str, lines: &Lines, at: At, message: &str) -> Option<u64> {
    let plan = lines.line(at)?;
    let (i, next) = match at {
        At::Plan(i) => (i, At::Plan(i + 1)),
        At::Key(i) => (usize::MAX, At::Key(i + 1)),
        At::Limit(..) | At::Binding(..) => return Some(plan),
    };
    let end = lines.line(next).unwrap_or(u64::MAX);
    let Some((path, _)) = message.split_once(": ") else {
        return Some(plan);
    };
    if path.is_empty() || path.contains(char::is_whitespace) {
        return Some(plan);
    }
    let mut from = plan;
    // Which match of the next field to take: the index of the list item
    // the previous segment named.
    let mut nth = 0;
    for seg in path.split('.') {
        let (key, index, map_key) = match seg.split_once('[') {
            Some((k, rest)) => {
                let inner = rest.trim_end_matches(']');
                // `tags["a"]`, `method_throttles["/x/GET"]`: a map's key,
                // looked for after the map's own line.
                let quoted = inner
                    .strip_prefix('"')
                    .and_then(|q| q.strip_suffix('"'))
                    .filter(|q| !q.is_empty());
                (k, inner.parse::<usize>().ok(), quoted)
            }
            None => (seg, None, None),
        };
        if let ("limits", Some(j)) = (key, index) {
            match lines.line(At::Limit(i, j)) {
                Some(l) => from = l,
                None => return Some(from),
            }
            nth = 0;
            continue;
        }
        let find = |key: &str, from: u64, nth: usize| {
            let matches = || {
                text.lines()
                    .zip(1u64..)
                    .skip(usize::try_from(from - 1).unwrap_or(usize::MAX))
                    .take_while(|(_, n)| *n < end)
                    .filter(|(l, _)| has_key(l, key))
            };
            // The nth (the list item's own), else the last one there is
            // (an item that sets the field while earlier ones do not).
            matches()
                .nth(nth)
                .or_else(|| matches().last())
                .map(|(_, n)| n)
        };
        match find(key, from, nth) {
            Some(n) => from = n,
            None => return Some(from),
        }
        if let Some(k) = map_key {
            let quoted = format!("\"{k}\"");
            match find(&quoted, from, 0).or_else(|| find(k, from, 0)) {
                Some(n) => from = n,
                None => return Some(from),
            }
        }
        nth = index.unwrap_or(0);
    }
    Some(from)
}

/// Whether a YAML line has `key` as a mapping key (`key:` at the start,
/// after `- `, or in a flow mapping after `{` or `,`).
fn has_key(line: &str, key: &str) -> bool {
    let mut rest = line;
    while let Some(at) = rest.find(key) {
        let before = rest[..at].trim_end().chars().last();
        let after = rest[at + key.len()..].trim_start();
        if matches!(before, None | Some('-' | '{' | ',')) && after.starts_with(':') {
            return true;
        }
        rest = &rest[at + key.len()..];
    }
    false
}

/// The mapping key on line `line` (1-based) before column `column`: the
/// field a value at that place belongs to.
fn key_before(text: &str, line: usize, column: usize) -> Option<&str> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let upto = l.get(..column.saturating_sub(1).min(l.len()))?;
    let colon = upto.trim_end().strip_suffix(':')?;
    let start = colon
        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map_or(0, |p| p + 1);
    let key = &colon[start..];
    (!key.is_empty()).then_some(key)
}

/// The one YAML document of `text` (none if every document is empty:
/// leading and trailing `---` markers, as Kubernetes and Helm write them,
/// are fine). A second document is an error rather than silently ignored.
fn one_document<'de, T: serde::Deserialize<'de>>(
    path: &Path,
    text: &'de str,
) -> Result<Option<T>, Error> {
    let mut docs: Vec<T> =
        serde_saphyr::from_str_multiple(text).map_err(|e| parse_error(path, text, &e))?;
    if docs.len() > 1 {
        return Err(Error::Parse {
            path: path.to_owned(),
            message: format!(
                "{} YAML documents (separated by `---`): put everything in one document",
                docs.len()
            ),
        });
    }
    Ok(docs.pop())
}

fn parse_error(path: &Path, text: &str, e: &serde_saphyr::Error) -> Error {
    let options = serde_saphyr::render_options! {
        snippets: serde_saphyr::SnippetMode::Off,
    };
    let mut message = e.render_with_options(options);
    if let Some(loc) = e.location() {
        let marker = format!("line {}", loc.line());
        if !message.contains(&marker) {
            message = format!("line {} column {}: {message}", loc.line(), loc.column());
        }
        // A bad value ("invalid i32") says where, not which field.
        let (line, column) = (loc.line(), loc.column());
        let key = usize::try_from(line)
            .ok()
            .zip(usize::try_from(column).ok())
            .and_then(|(l, c)| key_before(text, l, c));
        if let Some(key) = key.filter(|k| !message.contains(k)) {
            message = format!("{message} (field {key})");
        }
    }
    Error::Parse {
        path: path.to_owned(),
        message,
    }
}

// ---------------------------------------------------------------------------
// Conversions and normal forms
// ---------------------------------------------------------------------------

fn period_to_proto(p: PeriodSpec) -> Period {
    match p {
        PeriodSpec::Day => Period::Day,
        PeriodSpec::Week => Period::Week,
        PeriodSpec::Month => Period::Month,
    }
}

fn throttle_to_proto(t: &ThrottleSpec) -> pb::Throttle {
    pb::Throttle {
        rate_limit: t.rate_limit,
        burst_limit: t.burst_limit,
    }
}

fn metric_to_proto(m: MetricSpec) -> pb::Metric {
    match m {
        MetricSpec::Requests => pb::Metric::Requests,
        MetricSpec::Tokens => pb::Metric::Tokens,
        MetricSpec::Spend => pb::Metric::Spend,
    }
}

fn count_to_proto(c: CountSpec) -> pb::TokenCount {
    match c {
        CountSpec::Input => pb::TokenCount::Input,
        CountSpec::Output => pb::TokenCount::Output,
        CountSpec::Total => pb::TokenCount::Total,
        CountSpec::Weighted => pb::TokenCount::Weighted,
    }
}

fn window_to_proto(w: WindowSpec) -> pb::LimitWindow {
    match w {
        WindowSpec::Minute => pb::LimitWindow::Minute,
        WindowSpec::Hour => pb::LimitWindow::Hour,
        WindowSpec::Day => pb::LimitWindow::CalendarDay,
        WindowSpec::Week => pb::LimitWindow::CalendarWeek,
        WindowSpec::Month => pb::LimitWindow::CalendarMonth,
    }
}

fn scope_to_proto(s: ScopeSpec) -> pb::Scope {
    match s {
        ScopeSpec::Key => pb::Scope::Key,
        ScopeSpec::Customer => pb::Scope::Customer,
    }
}

fn header_style_to_proto(h: HeaderStyleSpec) -> pb::HeaderStyle {
    match h {
        HeaderStyleSpec::Openai => pb::HeaderStyle::Openai,
        HeaderStyleSpec::Ietf => pb::HeaderStyle::Ietf,
        HeaderStyleSpec::Both => pb::HeaderStyle::Both,
        HeaderStyleSpec::None => pb::HeaderStyle::None,
    }
}

fn limit_to_proto(l: &LimitSpec) -> pb::UsageLimit {
    pb::UsageLimit {
        name: l.name.clone(),
        metric: metric_to_proto(l.metric) as i32,
        count: count_to_proto(l.count.unwrap_or(CountSpec::Total)) as i32,
        input_weight: l.input_weight.unwrap_or(0.0),
        output_weight: l.output_weight.unwrap_or(0.0),
        limit: l.limit,
        window: window_to_proto(l.window) as i32,
        anchor_day: l.anchor_day,
        time_zone: l.time_zone.clone(),
        model_limits: l
            .model_limits
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        scope: scope_to_proto(l.scope) as i32,
    }
}

/// The plan the file asks for, as a proto message (no id or times).
fn plan_to_proto(p: &PlanSpec) -> pb::UsagePlan {
    pb::UsagePlan {
        name: p.name.clone(),
        description: p.description.clone(),
        throttle: p.throttle.as_ref().map(throttle_to_proto),
        quota: p.quota.as_ref().map(|q| pb::Quota {
            limit: q.limit,
            period: period_to_proto(q.period) as i32,
            anchor_day: q.anchor_day,
            offset: q.offset,
            time_zone: q.time_zone.clone(),
        }),
        stages: p
            .stages
            .iter()
            .map(|s| pb::ApiStage {
                domain: s.domain.clone(),
                stage: s.stage.clone(),
                method_throttles: s
                    .method_throttles
                    .iter()
                    .map(|(k, t)| (k.clone(), throttle_to_proto(t)))
                    .collect(),
                key_entry: s.key_entry.clone(),
                method_entry: s.method_entry.clone(),
                path_entry: s.path_entry.clone(),
                default_usage: norm_usage(&s.default_usage),
                model_entry: s.model_entry.clone(),
            })
            .collect(),
        tags: p.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        limits: p.limits.iter().map(limit_to_proto).collect(),
        prices: p
            .prices
            .iter()
            .map(|(k, v)| (k.clone(), price_to_proto(v)))
            .collect(),
        header_style: header_style_to_proto(p.header_style) as i32,
        ..pb::UsagePlan::default()
    }
}

fn time_to_proto(t: jiff::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: 0,
    }
}

/// The key the file asks for, as a proto message (no id, times or bindings).
fn key_to_proto(k: &KeySpec) -> pb::ApiKey {
    pb::ApiKey {
        name: k.name.clone(),
        description: k.description.clone(),
        enabled: k.enabled,
        customer_id: k.customer_id.clone(),
        expire_time: k.expire_time.map(time_to_proto),
        tags: k.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ..pb::ApiKey::default()
    }
}

fn or_default(s: &str, default: &'static str) -> String {
    if s.is_empty() {
        default.to_owned()
    } else {
        s.to_owned()
    }
}

/// A quota in the form the comparison uses: equal iff the server treats the
/// two alike.
#[derive(Debug, PartialEq, Eq)]
struct QuotaNorm {
    limit: i64,
    period: i32,
    anchor_day: i32,
    time_zone: String,
}

fn norm_quota(q: &pb::Quota) -> QuotaNorm {
    let mut anchor = q.anchor_day;
    if let (0, Some(offset)) = (anchor, q.offset) {
        anchor = if q.period == Period::Month as i32 {
            offset + 1
        } else {
            offset
        };
    }
    if q.period == Period::Month as i32 && anchor == 0 {
        anchor = 1;
    }
    QuotaNorm {
        limit: q.limit,
        period: q.period,
        anchor_day: anchor,
        time_zone: or_default(&q.time_zone, DEFAULT_TIME_ZONE),
    }
}

/// A stage in the form the comparison uses.
#[derive(Debug, PartialEq)]
struct StageNorm {
    domain: String,
    stage: String,
    key_entry: String,
    method_entry: String,
    path_entry: String,
    default_usage: String,
    model_entry: String,
    method_throttles: BTreeMap<String, (f64, i32)>,
}

fn norm_stages(stages: &[pb::ApiStage]) -> Vec<StageNorm> {
    let mut out: Vec<StageNorm> = stages
        .iter()
        .map(|s| StageNorm {
            domain: s.domain.clone(),
            stage: s.stage.clone(),
            key_entry: or_default(&s.key_entry, DEFAULT_KEY_ENTRY),
            method_entry: or_default(&s.method_entry, DEFAULT_METHOD_ENTRY),
            path_entry: or_default(&s.path_entry, DEFAULT_PATH_ENTRY),
            default_usage: norm_usage(&s.default_usage),
            model_entry: or_default(&s.model_entry, DEFAULT_MODEL_ENTRY),
            method_throttles: s
                .method_throttles
                .iter()
                .map(|(k, t)| (k.clone(), (t.rate_limit, t.burst_limit)))
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| (&a.domain, &a.stage).cmp(&(&b.domain, &b.stage)));
    out
}

/// A usage limit in the form the comparison uses: equal iff the server
/// treats the two alike.
#[derive(Debug, PartialEq)]
struct LimitNorm {
    name: String,
    metric: i32,
    /// TOKENS limits only; unspecified is TOTAL.
    count: Option<i32>,
    /// WEIGHTED TOKENS limits only.
    weights: Option<(f64, f64)>,
    limit: i64,
    window: i32,
    anchor_day: i32,
    time_zone: String,
    model_limits: BTreeMap<String, i64>,
    scope: i32,
}

fn norm_limit(l: &pb::UsageLimit) -> LimitNorm {
    let tokens = l.metric == pb::Metric::Tokens as i32;
    let count = if l.count == pb::TokenCount::Unspecified as i32 {
        pb::TokenCount::Total as i32
    } else {
        l.count
    };
    let weighted = tokens && count == pb::TokenCount::Weighted as i32;
    let anchor_day = if l.window == pb::LimitWindow::CalendarMonth as i32 && l.anchor_day == 0 {
        1
    } else {
        l.anchor_day
    };
    LimitNorm {
        name: l.name.clone(),
        metric: l.metric,
        count: tokens.then_some(count),
        weights: weighted.then_some((l.input_weight, l.output_weight)),
        limit: l.limit,
        window: l.window,
        anchor_day,
        time_zone: or_default(&l.time_zone, DEFAULT_TIME_ZONE),
        model_limits: l
            .model_limits
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        scope: l.scope,
    }
}

fn norm_limits(limits: &[pb::UsageLimit]) -> Vec<LimitNorm> {
    limits.iter().map(norm_limit).collect()
}

fn norm_throttle(t: Option<&pb::Throttle>) -> Option<(f64, i32)> {
    t.map(|t| (t.rate_limit, t.burst_limit))
}

fn seconds(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds)
}

/// The top-level plan fields whose values differ, in mask order.
fn plan_fields_changed(want: &pb::UsagePlan, have: &pb::UsagePlan) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if want.description != have.description {
        fields.push("description");
    }
    if norm_throttle(want.throttle.as_ref()) != norm_throttle(have.throttle.as_ref()) {
        fields.push("throttle");
    }
    if want.quota.as_ref().map(norm_quota) != have.quota.as_ref().map(norm_quota) {
        fields.push("quota");
    }
    if norm_stages(&want.stages) != norm_stages(&have.stages) {
        fields.push("stages");
    }
    if want.tags != have.tags {
        fields.push("tags");
    }
    if norm_limits(&want.limits) != norm_limits(&have.limits) {
        fields.push("limits");
    }
    if want.prices != have.prices {
        fields.push("prices");
    }
    if want.header_style != have.header_style {
        fields.push("header_style");
    }
    fields
}

/// The top-level key fields whose values differ, in mask order.
fn key_fields_changed(want: &pb::ApiKey, have: &pb::ApiKey) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if want.description != have.description {
        fields.push("description");
    }
    if want.enabled != have.enabled {
        fields.push("enabled");
    }
    if want.customer_id != have.customer_id {
        fields.push("customer_id");
    }
    if seconds(want.expire_time.as_ref()) != seconds(have.expire_time.as_ref()) {
        fields.push("expire_time");
    }
    if want.tags != have.tags {
        fields.push("tags");
    }
    fields
}

// ---------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------

/// One change to the server's state.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// `+ usage plan NAME`: CreateUsagePlan.
    CreatePlan {
        /// The plan to create.
        plan: pb::UsagePlan,
    },
    /// `~ usage plan NAME: FIELD, ...`: UpdateUsagePlan with `fields` as the mask.
    UpdatePlan {
        /// The desired plan (its `id` is the plan's name).
        plan: pb::UsagePlan,
        /// The changed top-level fields.
        fields: Vec<&'static str>,
    },
    /// `- usage plan NAME`: DeleteUsagePlan with force.
    DeletePlan {
        /// The plan's name.
        name: String,
    },
    /// `+ api key NAME`: CreateApiKey (the value is generated by the server).
    CreateKey {
        /// The key to create.
        key: pb::ApiKey,
    },
    /// `~ api key NAME: FIELD, ...`: UpdateApiKey with `fields` as the mask.
    UpdateKey {
        /// The desired key (its `id` is the key's name).
        key: pb::ApiKey,
        /// The changed top-level fields.
        fields: Vec<&'static str>,
    },
    /// `- api key NAME`: DeleteApiKey.
    DeleteKey {
        /// The key's name.
        name: String,
    },
    /// `+ bind KEY -> PLAN`: CreateUsagePlanKey.
    Bind {
        /// The key's name.
        key: String,
        /// The plan's name.
        plan: String,
    },
    /// `~ shared price table`: UpdatePriceTable.
    SetSharedPrices {
        /// The whole new table.
        prices: BTreeMap<String, pb::ModelPrice>,
    },
    /// `- bind KEY -> PLAN`: DeleteUsagePlanKey.
    Unbind {
        /// The key's name.
        key: String,
        /// The plan's name (or id, for a plan the server did not list).
        plan: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreatePlan { plan } => write!(f, "+ usage plan {}", plan.name),
            Change::UpdatePlan { plan, fields } => {
                write!(f, "~ usage plan {}: {}", plan.name, fields.join(", "))
            }
            Change::DeletePlan { name } => write!(f, "- usage plan {name}"),
            Change::CreateKey { key } => write!(f, "+ api key {}", key.name),
            Change::UpdateKey { key, fields } => {
                write!(f, "~ api key {}: {}", key.name, fields.join(", "))
            }
            Change::DeleteKey { name } => write!(f, "- api key {name}"),
            Change::Bind { key, plan } => write!(f, "+ bind {key} -> {plan}"),
            Change::Unbind { key, plan } => write!(f, "- bind {key} -> {plan}"),
            Change::SetSharedPrices { .. } => write!(f, "~ shared price table"),
        }
    }
}

impl Change {
    /// What the change does, for error messages (`creating usage plan "gold"`).
    fn context(&self) -> String {
        match self {
            Change::CreatePlan { plan } => format!("creating usage plan {:?}", plan.name),
            Change::UpdatePlan { plan, .. } => format!("updating usage plan {:?}", plan.name),
            Change::DeletePlan { name } => format!("deleting usage plan {name:?}"),
            Change::CreateKey { key } => format!("creating api key {:?}", key.name),
            Change::UpdateKey { key, .. } => format!("updating api key {:?}", key.name),
            Change::DeleteKey { name } => format!("deleting api key {name:?}"),
            Change::Bind { key, plan } => {
                format!("binding api key {key:?} to usage plan {plan:?}")
            }
            Change::Unbind { key, plan } => {
                format!("unbinding api key {key:?} from usage plan {plan:?}")
            }
            Change::SetSharedPrices { .. } => "replacing the shared price table".into(),
        }
    }
}

/// The changes that make the server match a [`Spec`], in the order they are
/// made. Its [`Display`](fmt::Display) is the dry-run listing: one line per
/// change, then `1 change`, `N changes` or `no changes`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeSet {
    /// The changes, in order.
    pub changes: Vec<Change>,
}

impl ChangeSet {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The number of changes.
    pub fn len(&self) -> usize {
        self.changes.len()
    }
}

fn summary(n: usize) -> String {
    match n {
        0 => "no changes".to_owned(),
        1 => "1 change".to_owned(),
        n => format!("{n} changes"),
    }
}

impl fmt::Display for ChangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.changes {
            writeln!(f, "{c}")?;
        }
        writeln!(f, "{}", summary(self.changes.len()))
    }
}

/// Computes the changes that make the server state (`plans`, `keys`, as
/// listed by the admin API) match `spec`. Pure.
///
/// With `prune`, plans and keys the file does not list are deleted.
///
/// # Errors
/// [`Error::Conflict`] when a key's `usage_plans` names a plan that is
/// neither in the file nor on the server (or, with `prune`, not in the file),
/// and, with `prune`, when the file lists nothing at all while the server
/// has plans or keys (an empty or truncated file, e.g. a failed `export`
/// redirected into it, must not delete everything).
pub fn diff(
    spec: &Spec,
    plans: &[pb::UsagePlan],
    keys: &[pb::ApiKey],
    prune: bool,
) -> Result<ChangeSet, Error> {
    if prune
        && spec.usage_plans.is_empty()
        && spec.api_keys.is_empty()
        && !(plans.is_empty() && keys.is_empty())
    {
        return Err(Error::Conflict(format!(
            "the file lists no usage plans and no API keys: with --prune that would delete \
             all {} usage plans and {} API keys on the server; refusing (delete them \
             through the admin API if that is what you want)",
            plans.len(),
            keys.len()
        )));
    }
    let server_plans: HashMap<&str, &pb::UsagePlan> =
        plans.iter().map(|p| (p.name.as_str(), p)).collect();
    let plan_names: HashMap<&str, &str> = plans
        .iter()
        .map(|p| (p.id.as_str(), p.name.as_str()))
        .collect();
    let server_keys: HashMap<&str, &pb::ApiKey> =
        keys.iter().map(|k| (k.name.as_str(), k)).collect();
    let file_plans: HashSet<&str> = spec.usage_plans.iter().map(|p| p.name.as_str()).collect();
    let file_keys: HashSet<&str> = spec.api_keys.iter().map(|k| k.name.as_str()).collect();

    // Check every binding before computing anything.
    for (i, k) in spec.api_keys.iter().enumerate() {
        for (j, p) in k.usage_plans.iter().enumerate() {
            if file_plans.contains(p.as_str()) {
                continue;
            }
            let conflict = |message: String| Error::ConflictAt {
                at: At::Binding(i, j),
                message,
            };
            if !server_plans.contains_key(p.as_str()) {
                return Err(conflict(format!(
                    "api key {:?}: usage_plans names usage plan {p:?}, which is neither in the file nor on the server",
                    k.name
                )));
            }
            if prune {
                return Err(conflict(format!(
                    "api key {:?}: usage_plans names usage plan {p:?}, which is not in the file, so pruning would delete it",
                    k.name
                )));
            }
        }
    }

    // A key may have one plan per domain and stage (the server refuses the
    // second binding): check the file's bindings against the plans as they
    // will be, before anything is changed.
    let file_stages: HashMap<&str, Vec<pb::ApiStage>> = spec
        .usage_plans
        .iter()
        .map(|p| (p.name.as_str(), plan_to_proto(p).stages))
        .collect();
    let stages_of = |name: &str| -> &[pb::ApiStage] {
        match file_stages.get(name) {
            Some(s) => s,
            None => server_plans.get(name).map_or(&[], |p| &p.stages),
        }
    };
    for (ki, k) in spec.api_keys.iter().enumerate() {
        for (i, a) in k.usage_plans.iter().enumerate() {
            for (j, b) in k.usage_plans.iter().enumerate().skip(i + 1) {
                if let Some((domain, stage)) = shared_stage(stages_of(a), stages_of(b)) {
                    return Err(Error::ConflictAt {
                        at: At::Binding(ki, j),
                        message: format!(
                            "api key {:?}: usage plans {a:?} and {b:?} both govern domain {domain:?} stage {stage:?}; a key may have one plan per domain and stage",
                            k.name
                        ),
                    });
                }
            }
        }
    }

    // Stale bindings go first: a plan update may give a plan a stage that
    // another plan of the key has until the key leaves it.
    let mut unbinds = Vec::new();
    let mut binds = Vec::new();
    let mut bound: HashMap<&str, Vec<&str>> = HashMap::new();
    for k in &spec.api_keys {
        let have: BTreeSet<&str> = server_keys
            .get(k.name.as_str())
            .map(|key| {
                key.usage_plan_ids
                    .iter()
                    .map(|id| plan_names.get(id.as_str()).copied().unwrap_or(id.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let want: BTreeSet<&str> = k.usage_plans.iter().map(String::as_str).collect();
        for plan in have.difference(&want) {
            unbinds.push(Change::Unbind {
                key: k.name.clone(),
                plan: (*plan).to_owned(),
            });
        }
        for plan in want.difference(&have) {
            binds.push(Change::Bind {
                key: k.name.clone(),
                plan: (*plan).to_owned(),
            });
        }
        bound.insert(&k.name, have.intersection(&want).copied().collect());
    }
    for k in keys.iter().filter(|k| !file_keys.contains(k.name.as_str())) {
        let plans = k
            .usage_plan_ids
            .iter()
            .map(|id| plan_names.get(id.as_str()).copied().unwrap_or(id.as_str()))
            .collect();
        bound.insert(&k.name, plans);
    }

    let mut plan_changes = Vec::new();
    for (i, p) in spec.usage_plans.iter().enumerate() {
        let want = plan_to_proto(p);
        match server_plans.get(p.name.as_str()) {
            None => plan_changes.push((i, Change::CreatePlan { plan: want })),
            Some(have) => {
                let fields = plan_fields_changed(&want, have);
                if !fields.is_empty() {
                    let plan = pb::UsagePlan {
                        id: p.name.clone(),
                        ..want
                    };
                    plan_changes.push((i, Change::UpdatePlan { plan, fields }));
                }
            }
        }
    }
    let mut changes = unbinds;
    changes.extend(order_plan_changes(plan_changes, &server_plans, &bound)?);
    for k in &spec.api_keys {
        let want = key_to_proto(k);
        match server_keys.get(k.name.as_str()) {
            None => changes.push(Change::CreateKey { key: want }),
            Some(have) => {
                let fields = key_fields_changed(&want, have);
                if !fields.is_empty() {
                    let key = pb::ApiKey {
                        id: k.name.clone(),
                        ..want
                    };
                    changes.push(Change::UpdateKey { key, fields });
                }
            }
        }
    }
    changes.extend(binds);
    if prune {
        let mut gone: Vec<&str> = keys
            .iter()
            .map(|k| k.name.as_str())
            .filter(|n| !file_keys.contains(n))
            .collect();
        gone.sort_unstable();
        changes.extend(gone.into_iter().map(|name| Change::DeleteKey {
            name: name.to_owned(),
        }));
        let mut gone: Vec<&str> = plans
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| !file_plans.contains(n))
            .collect();
        gone.sort_unstable();
        changes.extend(gone.into_iter().map(|name| Change::DeletePlan {
            name: name.to_owned(),
        }));
    }
    Ok(ChangeSet { changes })
}

/// The domain and stage two plans' stages share, if any.
fn shared_stage<'a>(a: &'a [pb::ApiStage], b: &[pb::ApiStage]) -> Option<(&'a str, &'a str)> {
    a.iter()
        .find(|sa| {
            b.iter()
                .any(|sb| sa.domain == sb.domain && sa.stage == sb.stage)
        })
        .map(|s| (s.domain.as_str(), s.stage.as_str()))
}

/// The plan creations and updates (with their `usage_plans` index) in an
/// order the server accepts one by one: an update must not give a plan a
/// domain and stage that another plan of one of its keys governs at that
/// moment (`bound`: each key's plans that stay bound throughout). Updates
/// are kept in file order where they can be; one that must wait for
/// another goes after it.
///
/// # Errors
/// [`Error::ConflictAt`] when no order works: two plans that share a key
/// trade a domain and stage.
fn order_plan_changes(
    mut pending: Vec<(usize, Change)>,
    server_plans: &HashMap<&str, &pb::UsagePlan>,
    bound: &HashMap<&str, Vec<&str>>,
) -> Result<Vec<Change>, Error> {
    let mut stages: HashMap<String, Vec<pb::ApiStage>> = server_plans
        .iter()
        .map(|(name, p)| ((*name).to_owned(), p.stages.clone()))
        .collect();
    // The key and other plan an update would clash with now, if any.
    let clash = |stages: &HashMap<String, Vec<pb::ApiStage>>, plan: &pb::UsagePlan| {
        bound
            .iter()
            .filter(|(_, plans)| plans.contains(&plan.name.as_str()))
            .find_map(|(key, plans)| {
                plans.iter().filter(|o| **o != plan.name).find_map(|other| {
                    let theirs = stages.get(*other)?;
                    let (d, s) = shared_stage(&plan.stages, theirs)?;
                    Some((*key, *other, d.to_owned(), s.to_owned()))
                })
            })
    };
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let next = pending.iter().position(|(_, c)| match c {
            Change::UpdatePlan { plan, .. } => clash(&stages, plan).is_none(),
            _ => true,
        });
        let Some(n) = next else {
            let (i, Change::UpdatePlan { plan, .. }) = &pending[0] else {
                unreachable!("only updates wait");
            };
            let (key, other, domain, stage) =
                clash(&stages, plan).expect("a waiting update clashes");
            let waits = pending
                .iter()
                .any(|(_, c)| matches!(c, Change::UpdatePlan { plan, .. } if plan.name == other));
            let why = if waits {
                format!(
                    "which usage plan {other:?} governs until its own update, and api key {key:?} is bound to both; \
                     the server refuses a key two plans for one domain and stage at any moment, and no \
                     order of the updates avoids that (the plans trade stages). Apply in two steps: \
                     first a file where {key:?} is bound to only one of them, then this file"
                )
            } else {
                format!(
                    "which usage plan {other:?} governs (and keeps: the file does not change its stages), \
                     and api key {key:?} is bound to both; a key may have one plan per domain and stage: \
                     unbind {key:?} from one of them"
                )
            };
            return Err(Error::ConflictAt {
                at: At::Plan(*i),
                message: format!(
                    "usage plan {:?}: its new stages include domain {domain:?} stage {stage:?}, {why}",
                    plan.name
                ),
            });
        };
        let (_, change) = pending.remove(n);
        if let Change::CreatePlan { plan } | Change::UpdatePlan { plan, .. } = &change {
            stages.insert(plan.name.clone(), plan.stages.clone());
        }
        out.push(change);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------

fn throttle_from_proto(t: &pb::Throttle) -> ThrottleSpec {
    ThrottleSpec {
        rate_limit: t.rate_limit,
        burst_limit: t.burst_limit,
    }
}

fn period_from_proto(plan: &str, p: i32) -> Result<PeriodSpec, Error> {
    match Period::try_from(p) {
        Ok(Period::Day) => Ok(PeriodSpec::Day),
        Ok(Period::Week) => Ok(PeriodSpec::Week),
        Ok(Period::Month) => Ok(PeriodSpec::Month),
        _ => Err(Error::Unexpected(format!(
            "usage plan {plan:?} has a quota with period {p}, which is not DAY, WEEK or MONTH"
        ))),
    }
}

fn limit_from_proto(plan: &str, l: &pb::UsageLimit) -> Result<LimitSpec, Error> {
    let bad = |field: &str, value: i32| {
        Error::Unexpected(format!(
            "usage plan {plan:?} has a limit {:?} with {field} {value}, which the file format cannot express",
            l.name
        ))
    };
    let metric = match pb::Metric::try_from(l.metric) {
        Ok(pb::Metric::Requests) => MetricSpec::Requests,
        Ok(pb::Metric::Tokens) => MetricSpec::Tokens,
        Ok(pb::Metric::Spend) => MetricSpec::Spend,
        _ => return Err(bad("metric", l.metric)),
    };
    let (count, input_weight, output_weight) = if metric == MetricSpec::Tokens {
        match pb::TokenCount::try_from(l.count) {
            Ok(pb::TokenCount::Unspecified | pb::TokenCount::Total) => (None, None, None),
            Ok(pb::TokenCount::Input) => (Some(CountSpec::Input), None, None),
            Ok(pb::TokenCount::Output) => (Some(CountSpec::Output), None, None),
            Ok(pb::TokenCount::Weighted) => (
                Some(CountSpec::Weighted),
                Some(l.input_weight),
                Some(l.output_weight),
            ),
            Err(_) => return Err(bad("count", l.count)),
        }
    } else {
        (None, None, None)
    };
    let window = match pb::LimitWindow::try_from(l.window) {
        Ok(pb::LimitWindow::Minute) => WindowSpec::Minute,
        Ok(pb::LimitWindow::Hour) => WindowSpec::Hour,
        Ok(pb::LimitWindow::CalendarDay) => WindowSpec::Day,
        Ok(pb::LimitWindow::CalendarWeek) => WindowSpec::Week,
        Ok(pb::LimitWindow::CalendarMonth) => WindowSpec::Month,
        _ => return Err(bad("window", l.window)),
    };
    let scope = match pb::Scope::try_from(l.scope) {
        Ok(pb::Scope::Key) => ScopeSpec::Key,
        Ok(pb::Scope::Customer) => ScopeSpec::Customer,
        Err(_) => return Err(bad("scope", l.scope)),
    };
    Ok(LimitSpec {
        name: l.name.clone(),
        metric,
        count,
        input_weight,
        output_weight,
        limit: l.limit,
        window,
        anchor_day: l.anchor_day,
        time_zone: or_default(&l.time_zone, DEFAULT_TIME_ZONE),
        model_limits: sorted(&l.model_limits),
        scope,
    })
}

fn header_style_from_proto(plan: &str, h: i32) -> Result<HeaderStyleSpec, Error> {
    match pb::HeaderStyle::try_from(h) {
        Ok(pb::HeaderStyle::Openai) => Ok(HeaderStyleSpec::Openai),
        Ok(pb::HeaderStyle::Ietf) => Ok(HeaderStyleSpec::Ietf),
        Ok(pb::HeaderStyle::Both) => Ok(HeaderStyleSpec::Both),
        Ok(pb::HeaderStyle::None) => Ok(HeaderStyleSpec::None),
        Err(_) => Err(Error::Unexpected(format!(
            "usage plan {plan:?} has header_style {h}, which is not OPENAI, IETF, BOTH or NONE"
        ))),
    }
}

fn sorted<K: Ord + Clone, V: Clone>(m: &HashMap<K, V>) -> BTreeMap<K, V> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The server state as a [`Spec`]: plans and keys sorted by name, key
/// bindings as plan names (sorted), output-only fields dropped. Pure.
///
/// # Errors
/// [`Error::Unexpected`] for a quota period, limit enum value or header
/// style the format cannot express, or an expire time out of range.
pub fn export_spec(plans: &[pb::UsagePlan], keys: &[pb::ApiKey]) -> Result<Spec, Error> {
    let plan_names: HashMap<&str, &str> = plans
        .iter()
        .map(|p| (p.id.as_str(), p.name.as_str()))
        .collect();
    let mut usage_plans = Vec::with_capacity(plans.len());
    for p in plans {
        let quota = match &p.quota {
            None => None,
            Some(q) => {
                let n = norm_quota(q);
                Some(QuotaSpec {
                    limit: n.limit,
                    period: period_from_proto(&p.name, n.period)?,
                    anchor_day: n.anchor_day,
                    offset: None,
                    time_zone: n.time_zone,
                })
            }
        };
        usage_plans.push(PlanSpec {
            name: p.name.clone(),
            description: p.description.clone(),
            throttle: p.throttle.as_ref().map(throttle_from_proto),
            quota,
            stages: p
                .stages
                .iter()
                .map(|s| StageSpec {
                    domain: s.domain.clone(),
                    stage: s.stage.clone(),
                    key_entry: or_default(&s.key_entry, DEFAULT_KEY_ENTRY),
                    method_entry: or_default(&s.method_entry, DEFAULT_METHOD_ENTRY),
                    path_entry: or_default(&s.path_entry, DEFAULT_PATH_ENTRY),
                    default_usage: norm_usage(&s.default_usage),
                    model_entry: or_default(&s.model_entry, DEFAULT_MODEL_ENTRY),
                    method_throttles: s
                        .method_throttles
                        .iter()
                        .map(|(k, t)| (k.clone(), throttle_from_proto(t)))
                        .collect(),
                })
                .collect(),
            tags: sorted(&p.tags),
            limits: p
                .limits
                .iter()
                .map(|l| limit_from_proto(&p.name, l))
                .collect::<Result<_, _>>()?,
            prices: p
                .prices
                .iter()
                .map(|(k, v)| (k.clone(), price_from_proto(v)))
                .collect(),
            header_style: header_style_from_proto(&p.name, p.header_style)?,
        });
    }
    usage_plans.sort_by(|a, b| a.name.cmp(&b.name));

    let mut api_keys = Vec::with_capacity(keys.len());
    for k in keys {
        let expire_time = match &k.expire_time {
            None => None,
            Some(t) => Some(jiff::Timestamp::from_second(t.seconds).map_err(|e| {
                Error::Unexpected(format!(
                    "api key {:?} has an expire time out of range: {e}",
                    k.name
                ))
            })?),
        };
        // A plan id the server did not list (deleted meanwhile) is dropped.
        let mut usage_plans: Vec<String> = k
            .usage_plan_ids
            .iter()
            .filter_map(|id| plan_names.get(id.as_str()).map(|n| (*n).to_owned()))
            .collect();
        usage_plans.sort();
        usage_plans.dedup();
        api_keys.push(KeySpec {
            name: k.name.clone(),
            description: k.description.clone(),
            enabled: k.enabled,
            customer_id: k.customer_id.clone(),
            expire_time,
            tags: sorted(&k.tags),
            usage_plans,
        });
    }
    api_keys.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Spec {
        usage_plans,
        api_keys,
        shared_prices: None,
    })
}

/// The first lines of an exported file.
const EXPORT_HEADER: &str =
    "# sluice usage plans and API keys (key values are not exported).\n# Apply with `sluice apply -f <this file>`.\n";

/// A [`Spec`] as YAML in the declarative format, defaults omitted.
///
/// # Errors
/// [`Error::Encode`] if the serializer fails.
pub fn to_yaml(spec: &Spec) -> Result<String, Error> {
    let body = serde_saphyr::to_string(spec).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(format!("{EXPORT_HEADER}{body}"))
}

// ---------------------------------------------------------------------------
// The admin client
// ---------------------------------------------------------------------------

/// An admin API client that sends the bearer token with every call.
#[derive(Clone, Debug)]
pub struct Client {
    inner: AdminServiceClient<Channel>,
    auth: MetadataValue<Ascii>,
}

impl Client {
    /// Connects to the admin API at `addr` (`http://127.0.0.1:8082`, or
    /// `127.0.0.1:8082` meaning plain HTTP/2).
    ///
    /// # Errors
    /// [`Error::Token`] for a token that cannot be a header value,
    /// [`Error::Connect`] for a bad address or a failed connection.
    pub async fn connect(addr: &str, token: &str) -> Result<Client, Error> {
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let connect_error = |message: String| Error::Connect {
            addr: addr.to_owned(),
            message,
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| connect_error(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(60));
        let auth = bearer(token)?;
        let channel = endpoint.connect().await.map_err(|e| {
            use std::error::Error as _;
            // The chain of causes, each once (hyper's errors repeat their
            // cause's text in their own: "tcp connect error: tcp connect
            // error: Connection refused").
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                let text = s.to_string();
                if !message.ends_with(&text) {
                    if let Some(rest) = text.strip_prefix(message.rsplit(": ").next().unwrap_or(""))
                    {
                        message.push_str(rest);
                    } else {
                        message = format!("{message}: {text}");
                    }
                }
                source = s.source();
            }
            connect_error(message)
        })?;
        Ok(Client {
            inner: AdminServiceClient::new(channel),
            auth,
        })
    }

    /// A client over an existing channel (for tests and embedding).
    ///
    /// # Errors
    /// [`Error::Token`] for a token that cannot be a header value.
    pub fn from_channel(channel: Channel, token: &str) -> Result<Client, Error> {
        Ok(Client {
            inner: AdminServiceClient::new(channel),
            auth: bearer(token)?,
        })
    }

    /// `msg` with the authorization metadata.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }

    /// Every usage plan, all pages.
    ///
    /// # Errors
    /// [`Error::Rpc`] if a call fails.
    pub async fn list_usage_plans(&mut self) -> Result<Vec<pb::UsagePlan>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = self.req(pb::ListUsagePlansRequest {
                page_size: PAGE_SIZE,
                page_token: token.clone(),
            });
            let resp = self
                .inner
                .list_usage_plans(req)
                .await
                .map_err(|s| rpc_error("listing usage plans", &s))?
                .into_inner();
            out.extend(resp.usage_plans);
            if resp.next_page_token.is_empty() {
                return Ok(out);
            }
            if resp.next_page_token == token {
                return Err(Error::Unexpected(
                    "ListUsagePlans returned the same page token twice".into(),
                ));
            }
            token = resp.next_page_token;
        }
    }

    /// The server's shared price table.
    ///
    /// # Errors
    /// [`Error::Rpc`] if the call fails.
    pub async fn shared_prices(&mut self) -> Result<BTreeMap<String, pb::ModelPrice>, Error> {
        let req = self.req(pb::GetPriceTableRequest {});
        let table = self
            .inner
            .get_price_table(req)
            .await
            .map_err(|s| rpc_error("reading the shared price table", &s))?
            .into_inner();
        Ok(table.prices.into_iter().collect())
    }

    /// Every API key, all pages.
    ///
    /// # Errors
    /// [`Error::Rpc`] if a call fails.
    pub async fn list_api_keys(&mut self) -> Result<Vec<pb::ApiKey>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = self.req(pb::ListApiKeysRequest {
                page_size: PAGE_SIZE,
                page_token: token.clone(),
                ..pb::ListApiKeysRequest::default()
            });
            let resp = self
                .inner
                .list_api_keys(req)
                .await
                .map_err(|s| rpc_error("listing api keys", &s))?
                .into_inner();
            out.extend(resp.api_keys);
            if resp.next_page_token.is_empty() {
                return Ok(out);
            }
            if resp.next_page_token == token {
                return Err(Error::Unexpected(
                    "ListApiKeys returned the same page token twice".into(),
                ));
            }
            token = resp.next_page_token;
        }
    }

    /// Makes one change; returns the new key value for a created key.
    async fn apply(&mut self, change: &Change) -> Result<Option<String>, tonic::Status> {
        match change {
            Change::CreatePlan { plan } => {
                let r = self.req(pb::CreateUsagePlanRequest {
                    usage_plan: Some(plan.clone()),
                });
                self.inner.create_usage_plan(r).await?;
            }
            Change::UpdatePlan { plan, fields } => {
                let r = self.req(pb::UpdateUsagePlanRequest {
                    usage_plan: Some(plan.clone()),
                    update_mask: Some(mask(fields)),
                    validate_only: false,
                });
                self.inner.update_usage_plan(r).await?;
            }
            Change::DeletePlan { name } => {
                let r = self.req(pb::DeleteUsagePlanRequest {
                    plan: name.clone(),
                    force: true,
                });
                self.inner.delete_usage_plan(r).await?;
            }
            Change::CreateKey { key } => {
                let r = self.req(pb::CreateApiKeyRequest {
                    api_key: Some(key.clone()),
                    value: String::new(),
                    disabled: !key.enabled,
                });
                let resp = self.inner.create_api_key(r).await?.into_inner();
                return Ok(Some(resp.value));
            }
            Change::UpdateKey { key, fields } => {
                let r = self.req(pb::UpdateApiKeyRequest {
                    api_key: Some(key.clone()),
                    update_mask: Some(mask(fields)),
                });
                self.inner.update_api_key(r).await?;
            }
            Change::DeleteKey { name } => {
                let r = self.req(pb::DeleteApiKeyRequest { key: name.clone() });
                self.inner.delete_api_key(r).await?;
            }
            Change::Bind { key, plan } => {
                let r = self.req(pb::CreateUsagePlanKeyRequest {
                    plan: plan.clone(),
                    key: key.clone(),
                });
                self.inner.create_usage_plan_key(r).await?;
            }
            Change::SetSharedPrices { prices } => {
                let r = self.req(pb::UpdatePriceTableRequest {
                    price_table: Some(pb::PriceTable {
                        prices: prices.clone().into_iter().collect(),
                    }),
                });
                self.inner.update_price_table(r).await?;
            }
            Change::Unbind { key, plan } => {
                let r = self.req(pb::DeleteUsagePlanKeyRequest {
                    plan: plan.clone(),
                    key: key.clone(),
                });
                self.inner.delete_usage_plan_key(r).await?;
            }
        }
        Ok(None)
    }
}

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, Error> {
    format!("Bearer {token}")
        .parse::<MetadataValue<Ascii>>()
        .map_err(|_| Error::Token)
}

// ---------------------------------------------------------------------------
// The operations main.rs calls
// ---------------------------------------------------------------------------

/// Lists the server's plans and keys and computes the changes that make
/// them match `spec` (see [`diff`]). Makes no write call.
///
/// # Errors
/// [`Error::Rpc`] if listing fails, [`Error::Conflict`] from [`diff`].
pub async fn plan_changes(
    client: &mut Client,
    spec: &Spec,
    prune: bool,
) -> Result<ChangeSet, Error> {
    let plans = client.list_usage_plans().await?;
    let keys = client.list_api_keys().await?;
    let mut changes = diff(spec, &plans, &keys, prune)?;
    let have_prices = client.shared_prices().await?;
    if let Some(change) = shared_prices_change(spec, &have_prices) {
        // A table with prices goes in first (plans may rely on it); an
        // emptied one last (after plans got prices of their own).
        if matches!(&change, Change::SetSharedPrices { prices } if prices.is_empty()) {
            changes.changes.push(change);
        } else {
            changes.changes.insert(0, change);
        }
    }
    let shared = match &spec.shared_prices {
        Some(want) => !want.is_empty(),
        None => !have_prices.is_empty(),
    };
    check_spend_prices(spec, shared)?;
    if spec.shared_prices.as_ref().is_some_and(BTreeMap::is_empty) && !have_prices.is_empty() {
        // Emptying the table: no plan left on the server may need it.
        if let Some(p) = plans.iter().find(|p| {
            p.prices.is_empty()
                && !spec.usage_plans.iter().any(|f| f.name == p.name)
                && !prune
                && p.limits
                    .iter()
                    .any(|l| l.metric == pb::Metric::Spend as i32)
        }) {
            return Err(Error::Conflict(format!(
                "shared_prices empties the server's shared price table, but usage plan {:?} (not in \
                 the file) has a SPEND limit and no prices of its own; give it prices first",
                p.name
            )));
        }
    }
    for (i, p) in spec.usage_plans.iter().enumerate() {
        if let Some(have) = plans.iter().find(|h| h.name == p.name) {
            crate::server::admin::check_plan_update(have, &plan_to_proto(p)).map_err(|e| {
                Error::ConflictAt {
                    at: At::Plan(i),
                    message: format!("usage plan {:?}: {e}", p.name),
                }
            })?;
        }
    }
    // What only the server knows (the units of limits removed within 33
    // days): each update checked by the server itself, changing nothing.
    for c in &changes.changes {
        if let Change::UpdatePlan { plan, fields } = c {
            let r = client.req(pb::UpdateUsagePlanRequest {
                usage_plan: Some(plan.clone()),
                update_mask: Some(mask(fields)),
                validate_only: true,
            });
            if let Err(status) = client.inner.update_usage_plan(r).await {
                let i = spec
                    .usage_plans
                    .iter()
                    .position(|p| p.name == plan.name)
                    .unwrap_or_default();
                return Err(match status.code() {
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                        Error::ConflictAt {
                            at: At::Plan(i),
                            message: format!("usage plan {:?}: {}", plan.name, status.message()),
                        }
                    }
                    _ => rpc_error(
                        format!("checking the update of usage plan {:?}", plan.name),
                        &status,
                    ),
                });
            }
        }
    }
    Ok(changes)
}

fn price_to_proto(p: &PriceSpec) -> pb::ModelPrice {
    pb::ModelPrice {
        input_per_million: p.input_per_million,
        output_per_million: p.output_per_million,
    }
}

fn price_from_proto(p: &pb::ModelPrice) -> PriceSpec {
    PriceSpec {
        input_per_million: p.input_per_million,
        output_per_million: p.output_per_million,
    }
}

/// The change that makes the server's shared price table the file's, if
/// the file has one and it differs.
pub fn shared_prices_change(
    spec: &Spec,
    have: &BTreeMap<String, pb::ModelPrice>,
) -> Option<Change> {
    let want: BTreeMap<String, pb::ModelPrice> = spec
        .shared_prices
        .as_ref()?
        .iter()
        .map(|(k, p)| (k.clone(), price_to_proto(p)))
        .collect();
    (&want != have).then_some(Change::SetSharedPrices { prices: want })
}

/// The one plan check that needs the server's state: a SPEND limit needs
/// prices, the plan's own or the shared price table's (which a file does
/// not carry). Checked before the first change, and in a dry run.
///
/// # Errors
/// [`Error::Conflict`] naming the plan and the limit.
pub fn check_spend_prices(spec: &Spec, shared_prices: bool) -> Result<(), Error> {
    if shared_prices {
        return Ok(());
    }
    for (i, p) in spec.usage_plans.iter().enumerate() {
        if !p.prices.is_empty() {
            continue;
        }
        if let Some((j, l)) = p
            .limits
            .iter()
            .enumerate()
            .find(|(_, l)| l.metric == MetricSpec::Spend)
        {
            return Err(Error::ConflictAt {
                at: At::Limit(i, j),
                message: format!(
                    "usage plan {:?}: limit {:?} is a SPEND limit, but the plan has no prices and the \
                     shared price table would be empty (the server's, or the file's shared_prices); \
                     give the plan prices, or give the table prices (shared_prices in the file)",
                    p.name, l.name
                ),
            });
        }
    }
    Ok(())
}

/// The update mask of a change's fields.
fn mask(fields: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: fields.iter().map(|f| (*f).to_owned()).collect(),
    }
}

/// Makes `changes` in order, writing each change's line to `out` once it
/// succeeded, the value of each created key, and a final summary line.
/// Stops at the first failure (the changes before it stay made).
///
/// # Errors
/// [`Error::Rpc`] naming the resource whose change failed, [`Error::Io`] if
/// writing to `out` fails.
pub async fn apply_changes(
    client: &mut Client,
    changes: &ChangeSet,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    for change in &changes.changes {
        let value = client
            .apply(change)
            .await
            .map_err(|s| rpc_error(change.context(), &s))?;
        writeln!(out, "{change}")?;
        if let (Change::CreateKey { key }, Some(value)) = (change, value) {
            writeln!(
                out,
                "created api key {}: value {value} (shown once; store it now)",
                key.name
            )?;
        }
        out.flush()?;
    }
    match changes.len() {
        0 => writeln!(out, "no changes")?,
        n => writeln!(out, "{} applied", summary(n))?,
    }
    out.flush()?;
    Ok(())
}

/// The server's plans and keys as YAML in the declarative format (see
/// [`export_spec`] and [`to_yaml`]).
///
/// # Errors
/// [`Error::Rpc`] if listing fails, [`Error::Unexpected`] or
/// [`Error::Encode`] from the conversion.
pub async fn export(client: &mut Client) -> Result<String, Error> {
    let plans = client.list_usage_plans().await?;
    let keys = client.list_api_keys().await?;
    let prices = client.shared_prices().await?;
    let mut spec = export_spec(&plans, &keys)?;
    if !prices.is_empty() {
        spec.shared_prices = Some(
            prices
                .iter()
                .map(|(k, p)| (k.clone(), price_from_proto(p)))
                .collect(),
        );
    }
    to_yaml(&spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("plans.yaml")
    }

    fn parse(text: &str) -> Spec {
        parse_spec(path(), text).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse_spec(path(), text).unwrap_err().to_string()
    }

    const EXAMPLE: &str = include_str!("../examples/plans.yaml");

    /// The server's view of a plan created from `spec`: defaults as the
    /// server might fill them, with an id.
    fn server_plan(id: &str, spec: &PlanSpec) -> pb::UsagePlan {
        pb::UsagePlan {
            id: id.to_owned(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..plan_to_proto(spec)
        }
    }

    fn server_key(id: &str, spec: &KeySpec, plan_ids: &[&str]) -> pb::ApiKey {
        pb::ApiKey {
            id: id.to_owned(),
            usage_plan_ids: plan_ids.iter().map(|s| (*s).to_owned()).collect(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..key_to_proto(spec)
        }
    }

    fn lines(c: &ChangeSet) -> Vec<String> {
        c.changes.iter().map(ToString::to_string).collect()
    }

    fn plan_spec(name: &str) -> PlanSpec {
        PlanSpec {
            name: name.to_owned(),
            description: String::new(),
            throttle: None,
            quota: None,
            stages: vec![StageSpec {
                domain: "llm".into(),
                stage: String::new(),
                key_entry: default_key_entry(),
                method_entry: default_method_entry(),
                path_entry: default_path_entry(),
                default_usage: String::new(),
                model_entry: default_model_entry(),
                method_throttles: BTreeMap::new(),
            }],
            tags: BTreeMap::new(),
            limits: Vec::new(),
            prices: BTreeMap::new(),
            header_style: HeaderStyleSpec::Openai,
        }
    }

    fn key_spec(name: &str, plans: &[&str]) -> KeySpec {
        KeySpec {
            name: name.to_owned(),
            description: String::new(),
            enabled: true,
            customer_id: String::new(),
            expire_time: None,
            tags: BTreeMap::new(),
            usage_plans: plans.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    // --- parsing -----------------------------------------------------------

    #[test]
    fn the_example_parses_with_defaults_filled() {
        let s = parse(EXAMPLE);
        let gold = &s.usage_plans[0];
        assert_eq!(gold.name, "gold");
        assert_eq!(
            gold.throttle,
            Some(ThrottleSpec {
                rate_limit: 10.0,
                burst_limit: 20
            })
        );
        let q = gold.quota.as_ref().unwrap();
        assert_eq!(q.period, PeriodSpec::Day);
        assert_eq!(q.time_zone, "UTC");
        assert_eq!(gold.stages[0].key_entry, "api_key");
        assert_eq!(gold.stages[0].method_entry, "method");
        assert_eq!(
            gold.stages[0].method_throttles["/v1/chat/completions/POST"].burst_limit,
            5
        );
        let alice = s.api_keys.iter().find(|k| k.name == "alice").unwrap();
        assert!(alice.enabled);
        assert_eq!(alice.usage_plans, ["gold"]);
        assert_eq!(
            alice.expire_time.unwrap().as_second(),
            "2027-01-01T00:00:00Z"
                .parse::<jiff::Timestamp>()
                .unwrap()
                .as_second()
        );
    }

    #[test]
    fn document_markers_are_fine_and_a_second_document_is_an_error() {
        for text in [format!("---\n{EXAMPLE}"), format!("{EXAMPLE}\n---\n")] {
            assert_eq!(parse(&text), parse(EXAMPLE));
        }
        let e = parse_spec(
            Path::new("plans.yaml"),
            "usage_plans: []\n---\napi_keys: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("plans.yaml"), "{e}");
        assert!(e.contains("2 YAML documents"), "{e}");
    }

    #[test]
    fn the_example_limits_parse_with_defaults_filled() {
        let s = parse(EXAMPLE);
        let gold = &s.usage_plans[0];
        let names: Vec<&str> = gold.limits.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["tpm", "monthly-budget"]);
        let tpm = &gold.limits[0];
        assert_eq!(tpm.metric, MetricSpec::Tokens);
        assert_eq!(tpm.count, Some(CountSpec::Total));
        assert_eq!(tpm.window, WindowSpec::Minute);
        assert_eq!(tpm.time_zone, "UTC");
        assert_eq!(tpm.model_limits["gpt-4o*"], 30_000);
        assert_eq!(tpm.scope, ScopeSpec::Key);
        let budget = &gold.limits[1];
        assert_eq!(budget.metric, MetricSpec::Spend);
        assert_eq!(budget.count, None);
        assert_eq!(
            (budget.window, budget.anchor_day, budget.time_zone.as_str()),
            (WindowSpec::Month, 1, "Europe/Paris")
        );
        assert_eq!(
            gold.prices["gpt-4o*"],
            PriceSpec {
                input_per_million: 2_500_000,
                output_per_million: 10_000_000
            }
        );
        assert_eq!(gold.header_style, HeaderStyleSpec::Openai);
        let silver = &s.usage_plans[1];
        let daily = &silver.limits[0];
        assert_eq!(daily.count, Some(CountSpec::Weighted));
        assert_eq!(
            (daily.input_weight, daily.output_weight),
            (Some(1.0), Some(4.0))
        );
        assert_eq!(daily.window, WindowSpec::Day);
        assert_eq!(daily.scope, ScopeSpec::Customer);
        assert!(silver.prices.is_empty());
        assert_eq!(silver.header_style, HeaderStyleSpec::Ietf);

        // Everything omitted: the defaults.
        let s = parse(
            "usage_plans:\n  - name: p\n    limits:\n      - { name: rpm, metric: REQUESTS, limit: 5, window: MINUTE }\n",
        );
        let p = &s.usage_plans[0];
        let l = &p.limits[0];
        assert_eq!(
            (l.count, l.input_weight, l.anchor_day, l.time_zone.as_str()),
            (None, None, 0, "UTC")
        );
        assert!(l.model_limits.is_empty());
        assert_eq!(l.scope, ScopeSpec::Key);
        assert_eq!(p.header_style, HeaderStyleSpec::Openai);
    }

    #[test]
    fn bad_limits_are_errors_with_their_lines() {
        let plan =
            |limit: &str| format!("usage_plans:\n  - name: p\n    limits:\n      - {limit}\n");
        let e = parse_err(&plan(
            "{ name: a, metric: TOKENS, limit: 1, window: MINUTE, scope: key }",
        ));
        assert!(e.contains("key") && e.contains("line 4"), "{e}");
        let e = parse_err(&plan("{ name: a, metric: TOKENS, limit: 1, window: DAYS }"));
        assert!(e.contains("DAYS") && e.contains("line 4"), "{e}");
        let e = parse_err(&plan(
            "{ name: a, metric: TOKENS, limit: 1, window: DAY, windw: DAY }",
        ));
        assert!(e.contains("windw"), "{e}");
        let e = parse_err(&plan("{ name: a, metric: TOKENS, window: DAY }"));
        assert!(e.contains("limit"), "{e}");
        let e = parse_err(&plan(
            "{ name: a, metric: REQUESTS, count: INPUT, limit: 1, window: DAY }",
        ));
        assert_eq!(
            e,
            "plans.yaml:4: usage_plans[0].limits[0].count: limit \"a\" is not a TOKENS limit, so it has no count"
        );
        let e = parse_err(&plan(
            "{ name: a, metric: TOKENS, input_weight: 2, limit: 1, window: DAY }",
        ));
        assert!(
            e.contains("limits[0].input_weight") && e.contains("WEIGHTED"),
            "{e}"
        );
        let e = parse_err(&plan(
            "{ name: a, metric: TOKENS, count: WEIGHTED, input_weight: 2, limit: 1, window: DAY }",
        ));
        assert!(e.contains("limits[0].output_weight"), "{e}");
        let e = parse_err(
            "usage_plans:\n  - name: p\n    limits:\n      - { name: a, metric: REQUESTS, limit: 1, window: DAY }\n      - { name: a, metric: TOKENS, limit: 1, window: DAY }\n",
        );
        assert_eq!(
            e,
            "plans.yaml:5: usage_plans[0].limits[1].name: usage plan \"p\" lists limit \"a\" twice (first at line 4)"
        );
        let e = parse_err("usage_plans:\n  - name: p\n    header_style: openai\n");
        assert!(e.contains("openai") && e.contains("line 3"), "{e}");
        let e = parse_err(
            "usage_plans:\n  - name: p\n    prices:\n      m: { input_per_million: 1 }\n",
        );
        assert!(e.contains("output_per_million"), "{e}");
    }

    #[test]
    fn empty_files_are_empty_specs() {
        assert_eq!(parse(""), Spec::default());
        assert_eq!(parse("# nothing yet\n\n"), Spec::default());
        assert_eq!(parse("usage_plans: []\n"), Spec::default());
    }

    #[test]
    fn unknown_fields_name_file_line_and_field() {
        let text = "usage_plans:\n  - name: gold\n    throtle: { rate_limit: 1, burst_limit: 1 }\n";
        let e = parse_err(text);
        assert!(e.starts_with("plans.yaml: "), "{e}");
        assert!(e.contains("throtle"), "{e}");
        assert!(e.contains("line 3"), "{e}");

        let text = "api_keys:\n  - name: alice\n    enabled: true\n    usage_plan: [gold]\n";
        let e = parse_err(text);
        assert!(e.contains("usage_plan"), "{e}");
        assert!(e.contains("line 4"), "{e}");

        let text = "usage_plans: []\nkeys: []\n";
        let e = parse_err(text);
        assert!(e.contains("keys") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn a_misspelt_period_is_an_error_with_its_line() {
        let text = "usage_plans:\n  - name: gold\n    quota: { limit: 5, period: DAYS }\n";
        let e = parse_err(text);
        assert!(e.contains("DAYS"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let text = "usage_plans:\n  - name: gold\n    quota: { limit: 5, period: day }\n";
        assert!(parse_err(text).contains("day"));
    }

    #[test]
    fn a_bad_expire_time_is_an_error_with_its_line() {
        let text = "api_keys:\n  - name: alice\n    expire_time: 2027-01-01\n";
        let e = parse_err(text);
        assert!(e.contains("RFC 3339"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn missing_required_fields_are_errors() {
        let e = parse_err("usage_plans:\n  - description: x\n");
        assert!(e.contains("name"), "{e}");
        let e = parse_err("usage_plans:\n  - name: a\n    throttle: { rate_limit: 1 }\n");
        assert!(e.contains("burst_limit"), "{e}");
    }

    #[test]
    fn duplicate_names_are_errors_with_both_lines() {
        let text = "usage_plans:\n  - name: gold\n  - name: silver\n  - name: gold\n";
        let e = parse_err(text);
        assert_eq!(
            e,
            "plans.yaml:4: usage_plans[2].name: usage plan \"gold\" is listed twice (first at line 2)"
        );
        let text = "api_keys:\n  - name: alice\n  - name: alice\n";
        let e = parse_err(text);
        assert!(e.starts_with("plans.yaml:3: api_keys[1].name"), "{e}");
        let text = "api_keys:\n  - name: alice\n    usage_plans: [gold, gold]\n";
        let e = parse_err(text);
        assert!(
            e.starts_with("plans.yaml:3: api_keys[0].usage_plans[1]"),
            "{e}"
        );
        let e = parse_err("usage_plans:\n  - name: \" \"\n");
        assert!(e.contains("must not be empty"), "{e}");
    }

    // --- diff --------------------------------------------------------------

    #[test]
    fn everything_new_is_created_in_order() {
        let spec = parse(EXAMPLE);
        let c = diff(&spec, &[], &[], false).unwrap();
        assert_eq!(
            lines(&c),
            [
                "+ usage plan gold",
                "+ usage plan silver",
                "+ api key alice",
                "+ api key bob",
                "+ bind alice -> gold",
                "+ bind bob -> silver",
            ]
        );
        let listing = c.to_string();
        assert!(listing.ends_with("\n6 changes\n"), "{listing}");
        // A disabled key is created disabled.
        let spec = Spec {
            api_keys: vec![KeySpec {
                enabled: false,
                ..key_spec("carol", &[])
            }],
            ..Spec::default()
        };
        let c = diff(&spec, &[], &[], false).unwrap();
        assert!(matches!(&c.changes[0], Change::CreateKey { key } if !key.enabled));
    }

    /// The server's state after applying `spec` from scratch.
    fn applied(spec: &Spec) -> (Vec<pb::UsagePlan>, Vec<pb::ApiKey>) {
        let plans: Vec<pb::UsagePlan> = spec
            .usage_plans
            .iter()
            .enumerate()
            .map(|(i, p)| server_plan(&format!("p{i}"), p))
            .collect();
        let id_of = |name: &str| {
            plans
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.id.clone())
                .unwrap()
        };
        let keys = spec
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let ids: Vec<String> = k.usage_plans.iter().map(|n| id_of(n)).collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                server_key(&format!("k{i}"), k, &ids)
            })
            .collect();
        (plans, keys)
    }

    #[test]
    fn an_applied_spec_is_a_no_op() {
        let spec = parse(EXAMPLE);
        let (plans, keys) = applied(&spec);
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert!(c.is_empty(), "{c}");
        assert_eq!(c.to_string(), "no changes\n");
        let c = diff(&spec, &plans, &keys, true).unwrap();
        assert!(c.is_empty(), "{c}");
    }

    #[test]
    fn server_defaults_compare_equal_to_file_defaults() {
        let spec = parse(EXAMPLE);
        let (mut plans, keys) = applied(&spec);
        for p in &mut plans {
            for s in &mut p.stages {
                s.key_entry.clear();
                s.method_entry.clear();
                s.path_entry.clear();
            }
            if let Some(q) = p.quota.as_mut().filter(|q| q.time_zone == "UTC") {
                q.time_zone.clear();
            }
            p.stages.reverse();
        }
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert!(c.is_empty(), "{c}");

        // MONTH anchor 0 is 1; offset 4 is anchor 5.
        let spec = parse(
            "usage_plans:\n  - name: m\n    quota: { limit: 1, period: MONTH }\n  - name: n\n    quota: { limit: 1, period: MONTH, anchor_day: 5 }\n",
        );
        let (mut plans, keys) = applied(&spec);
        plans[0].quota.as_mut().unwrap().anchor_day = 1;
        let q = plans[1].quota.as_mut().unwrap();
        q.anchor_day = 0;
        q.offset = Some(4);
        assert!(diff(&spec, &plans, &keys, false).unwrap().is_empty());
    }

    #[test]
    fn one_changed_field_is_one_update_with_that_path() {
        let spec = parse(EXAMPLE);
        let (mut plans, mut keys) = applied(&spec);
        plans[0].throttle.as_mut().unwrap().rate_limit = 10.000_000_1;
        keys[0].enabled = false;
        keys[1].expire_time = Some(prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        });
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert_eq!(
            lines(&c),
            [
                "~ usage plan gold: throttle",
                "~ api key alice: enabled",
                "~ api key bob: expire_time"
            ]
        );
        match &c.changes[0] {
            Change::UpdatePlan { plan, fields } => {
                assert_eq!(plan.id, "gold");
                assert_eq!(fields, &["throttle"]);
                assert_eq!(plan.throttle.as_ref().unwrap().rate_limit, 10.0);
            }
            other => panic!("{other:?}"),
        }
        match &c.changes[2] {
            // The file has no expire_time: the mask path with no value removes it.
            Change::UpdateKey { key, fields } => {
                assert_eq!(key.id, "bob");
                assert_eq!(fields, &["expire_time"]);
                assert!(key.expire_time.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn omitted_fields_are_removed_and_several_fields_are_listed() {
        let spec = parse(EXAMPLE);
        let (plans, keys) = applied(&spec);
        let mut spec2 = spec.clone();
        spec2.usage_plans[0].throttle = None;
        spec2.usage_plans[0].tags.clear();
        spec2.usage_plans[0].description = "new".into();
        let c = diff(&spec2, &plans, &keys, false).unwrap();
        assert_eq!(
            lines(&c),
            ["~ usage plan gold: description, throttle, tags"]
        );
        match &c.changes[0] {
            Change::UpdatePlan { plan, .. } => assert!(plan.throttle.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limits_are_created_as_the_server_expects() {
        let spec = parse(EXAMPLE);
        let c = diff(&spec, &[], &[], false).unwrap();
        let Change::CreatePlan { plan } = &c.changes[0] else {
            panic!("{c}")
        };
        assert_eq!(plan.limits.len(), 2);
        let tpm = &plan.limits[0];
        assert_eq!(tpm.metric, pb::Metric::Tokens as i32);
        assert_eq!(tpm.count, pb::TokenCount::Total as i32);
        assert_eq!(tpm.window, pb::LimitWindow::Minute as i32);
        assert_eq!(tpm.model_limits["gpt-4o*"], 30_000);
        let budget = &plan.limits[1];
        assert_eq!(budget.metric, pb::Metric::Spend as i32);
        assert_eq!(budget.window, pb::LimitWindow::CalendarMonth as i32);
        assert_eq!(budget.limit, 50_000_000);
        assert_eq!(plan.prices["gpt-4o*"].output_per_million, 10_000_000);
        assert_eq!(plan.header_style, pb::HeaderStyle::Openai as i32);
        let Change::CreatePlan { plan } = &c.changes[1] else {
            panic!("{c}")
        };
        let daily = &plan.limits[0];
        assert_eq!(daily.count, pb::TokenCount::Weighted as i32);
        assert_eq!((daily.input_weight, daily.output_weight), (1.0, 4.0));
        assert_eq!(daily.window, pb::LimitWindow::CalendarDay as i32);
        assert_eq!(daily.scope, pb::Scope::Customer as i32);
        assert_eq!(plan.header_style, pb::HeaderStyle::Ietf as i32);
    }

    #[test]
    fn server_limit_defaults_compare_equal_to_file_defaults() {
        let spec = parse(
            "usage_plans:
  - name: p
    limits:
      - { name: rpm, metric: REQUESTS, limit: 5, window: MINUTE }
      - { name: tpd, metric: TOKENS, limit: 5, window: DAY }
      - { name: w, metric: TOKENS, count: WEIGHTED, input_weight: 0.5, output_weight: 2, limit: 5, window: MONTH }
      - { name: spend, metric: SPEND, limit: 5, window: WEEK, anchor_day: 3, time_zone: Asia/Tokyo }
    prices: { m: { input_per_million: 1, output_per_million: 2 } }
",
        );
        let (mut plans, keys) = applied(&spec);
        let l = &mut plans[0].limits;
        // Unspecified count is TOTAL; counts and weights of other metrics
        // and weights of other counts do not matter.
        l[0].count = pb::TokenCount::Input as i32;
        l[0].input_weight = 3.0;
        l[1].count = pb::TokenCount::Unspecified as i32;
        l[1].output_weight = 7.0;
        // "" is UTC; a MONTH anchor 0 is 1.
        l[1].time_zone.clear();
        l[2].anchor_day = 1;
        l[3].count = pb::TokenCount::Weighted as i32;
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert!(c.is_empty(), "{c}");

        // What the server does use is compared.
        for change in [
            |l: &mut pb::UsageLimit| l.input_weight = 0.25,
            |l: &mut pb::UsageLimit| l.count = pb::TokenCount::Total as i32,
            |l: &mut pb::UsageLimit| l.scope = pb::Scope::Customer as i32,
            |l: &mut pb::UsageLimit| l.time_zone = "Europe/Paris".into(),
            |l: &mut pb::UsageLimit| {
                l.model_limits.insert("x".into(), 1);
            },
        ] {
            let (mut plans, keys) = applied(&spec);
            change(&mut plans[0].limits[2]);
            let c = diff(&spec, &plans, &keys, false).unwrap();
            assert_eq!(lines(&c), ["~ usage plan p: limits"]);
        }
        // Order matters.
        let (mut plans, keys) = applied(&spec);
        plans[0].limits.swap(0, 1);
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert_eq!(lines(&c), ["~ usage plan p: limits"]);
    }

    #[test]
    fn one_changed_limit_is_one_update_of_limits() {
        let spec = parse(EXAMPLE);
        let (plans, keys) = applied(&spec);
        let mut spec2 = spec.clone();
        spec2.usage_plans[0].limits[0].limit = 120_000;
        let c = diff(&spec2, &plans, &keys, false).unwrap();
        assert_eq!(lines(&c), ["~ usage plan gold: limits"]);
        match &c.changes[0] {
            Change::UpdatePlan { plan, fields } => {
                assert_eq!(plan.id, "gold");
                assert_eq!(fields, &["limits"]);
                // The whole list is sent, the other limit unchanged.
                assert_eq!(plan.limits.len(), 2);
                assert_eq!(plan.limits[0].limit, 120_000);
                assert_eq!(plan.limits[1], plans[0].limits[1]);
            }
            other => panic!("{other:?}"),
        }

        // Prices and header style are their own paths, after limits.
        let mut spec3 = spec2.clone();
        spec3.usage_plans[0]
            .prices
            .get_mut("gpt-4o*")
            .unwrap()
            .input_per_million = 1;
        spec3.usage_plans[0].header_style = HeaderStyleSpec::None;
        spec3.usage_plans[0].tags.clear();
        let c = diff(&spec3, &plans, &keys, false).unwrap();
        assert_eq!(
            lines(&c),
            ["~ usage plan gold: tags, limits, prices, header_style"]
        );

        // Omitting them removes them.
        let mut spec4 = spec.clone();
        spec4.usage_plans[1].limits.clear();
        spec4.usage_plans[1].header_style = HeaderStyleSpec::default();
        let c = diff(&spec4, &plans, &keys, false).unwrap();
        assert_eq!(lines(&c), ["~ usage plan silver: limits, header_style"]);
        match &c.changes[0] {
            Change::UpdatePlan { plan, .. } => {
                assert!(plan.limits.is_empty());
                assert_eq!(plan.header_style, pb::HeaderStyle::Openai as i32);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn times_compare_as_seconds() {
        let spec = parse(EXAMPLE);
        let (plans, mut keys) = applied(&spec);
        let alice = keys.iter_mut().find(|k| k.name == "alice").unwrap();
        alice.expire_time.as_mut().unwrap().nanos = 500;
        assert!(diff(&spec, &plans, &keys, false).unwrap().is_empty());
    }

    #[test]
    fn a_key_moves_between_plans_unbinding_first() {
        let mut spec = Spec {
            usage_plans: vec![plan_spec("a"), plan_spec("b")],
            api_keys: vec![key_spec("k", &["a"])],
            shared_prices: None,
        };
        let (plans, keys) = applied(&spec);
        spec.api_keys[0].usage_plans = vec!["b".into()];
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert_eq!(lines(&c), ["- bind k -> a", "+ bind k -> b"]);

        // Unbinds of every key come before any bind.
        let mut spec = Spec {
            usage_plans: vec![plan_spec("a"), plan_spec("b")],
            api_keys: vec![key_spec("k", &["a"]), key_spec("l", &["b"])],
            shared_prices: None,
        };
        let (plans, keys) = applied(&spec);
        spec.api_keys[0].usage_plans = vec!["b".into()];
        spec.api_keys[1].usage_plans = vec!["a".into()];
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert_eq!(
            lines(&c),
            [
                "- bind k -> a",
                "- bind l -> b",
                "+ bind k -> b",
                "+ bind l -> a"
            ]
        );
    }

    /// A plan taking a stage from another plan of one of its keys waits for
    /// that plan's update; plans trading stages are refused (at the first
    /// one's place in the file); a key leaving a plan is unbound first.
    #[test]
    fn plan_updates_are_ordered_so_no_key_has_two_plans_for_a_stage() {
        let with_domain = |name: &str, domain: &str| {
            let mut p = plan_spec(name);
            p.stages[0].domain = domain.into();
            p
        };
        let spec = Spec {
            usage_plans: vec![with_domain("a", "d1"), with_domain("b", "d2")],
            api_keys: vec![key_spec("k", &["a", "b"])],
            shared_prices: None,
        };
        let (plans, keys) = applied(&spec);

        let mut chain = spec.clone();
        chain.usage_plans = vec![with_domain("a", "d2"), with_domain("b", "d3")];
        let c = diff(&chain, &plans, &keys, false).unwrap();
        assert_eq!(
            lines(&c),
            ["~ usage plan b: stages", "~ usage plan a: stages"]
        );

        let mut swap = spec.clone();
        swap.usage_plans = vec![with_domain("a", "d2"), with_domain("b", "d1")];
        let e = diff(&swap, &plans, &keys, false).unwrap_err();
        assert!(
            matches!(&e, Error::ConflictAt { at: At::Plan(0), message } if message.contains("trade stages")),
            "{e:?}"
        );
        // Placed, it names the file and the plan's line.
        let text = "usage_plans:\n  - name: a\n  - name: b\n";
        let placed = Lines::of(Path::new("f.yaml"), text).place(e).to_string();
        assert!(placed.starts_with("f.yaml:2: usage plan \"a\""), "{placed}");

        // Without the key on b, the same stages apply: unbind, then update.
        swap.api_keys[0].usage_plans = vec!["a".into()];
        let c = diff(&swap, &plans, &keys, false).unwrap();
        assert_eq!(
            lines(&c),
            [
                "- bind k -> b",
                "~ usage plan a: stages",
                "~ usage plan b: stages"
            ]
        );

        // A key the file does not list stays bound throughout: it counts.
        let mut unlisted = swap.clone();
        unlisted.api_keys.clear();
        assert!(diff(&unlisted, &plans, &keys, false).is_err());
    }

    /// What the server checks in a key on its own is checked while parsing,
    /// with the field's line: a dry run reports it, and a real run stops
    /// before its first change (it used to create the plans before it).
    #[test]
    fn keys_are_checked_as_the_server_checks_them() {
        let long = "x".repeat(5000);
        for (yaml, want) in [
            (
                "api_keys:\n  - name: \"k\\abell\"\n".to_owned(),
                "p.yaml:2: api_keys[0] (\"k\\u{7}bell\"): name: must not contain control characters",
            ),
            (
                format!("api_keys:\n  - name: ok\n  - name: k\n    description: {long}\n"),
                "p.yaml:4: api_keys[1] (\"k\"): description",
            ),
            (
                "api_keys:\n  - name: k\n    tags: { \"\": v }\n".to_owned(),
                "p.yaml:3: api_keys[0] (\"k\"): tags",
            ),
            (
                "api_keys:\n  - name: k\n    enabled: true\n    customer_id: \"a\\nb\"\n".to_owned(),
                "p.yaml:4: api_keys[0] (\"k\"): customer_id: must not contain control characters",
            ),
        ] {
            let e = parse_spec(Path::new("p.yaml"), &yaml).unwrap_err().to_string();
            assert!(e.starts_with(want), "want `{want}`\ngot  `{e}`");
        }
    }

    /// A binding to a plan that exists nowhere is placed at the binding.
    #[test]
    fn a_binding_to_no_plan_is_placed_at_its_line() {
        let text = "api_keys:\n  - name: k\n    usage_plans:\n      - x\n      - nowhere\n";
        let spec = parse(text);
        let plans = vec![server_plan("p0", &plan_spec("x"))];
        let e = diff(&spec, &plans, &[], false).unwrap_err();
        let placed = Lines::of(Path::new("f.yaml"), text).place(e).to_string();
        assert!(
            placed.starts_with("f.yaml:5: api key \"k\": usage_plans names usage plan \"nowhere\""),
            "{placed}"
        );
    }

    /// AWS's quota `offset` is read as the same anchor the server reads it
    /// as; with `anchor_day` too it is refused, naming the field.
    #[test]
    fn a_quota_offset_is_taken_as_the_server_takes_it() {
        let spec = parse(
            "usage_plans:\n  - name: m\n    quota: { limit: 10, period: MONTH, offset: 4 }\n",
        );
        let q = plan_to_proto(&spec.usage_plans[0]).quota.unwrap();
        assert_eq!((q.anchor_day, q.offset), (0, Some(4)));
        // The server stores it as anchor 5: no change on a second apply.
        let mut have = server_plan("p0", &spec.usage_plans[0]);
        have.quota = Some(pb::Quota {
            anchor_day: 5,
            offset: None,
            ..q
        });
        assert!(diff(&spec, &[have], &[], false).unwrap().is_empty());
        let e = parse_err("usage_plans:\n  - name: m\n    quota: { limit: 10, period: MONTH, anchor_day: 2, offset: 4 }\n");
        assert!(e.contains(":3:") && e.contains("quota.offset"), "{e}");
    }

    #[test]
    fn unlisted_resources_are_kept_unless_pruned() {
        let spec = parse(EXAMPLE);
        let (mut plans, mut keys) = applied(&spec);
        plans.push(server_plan("old", &plan_spec("old")));
        keys.push(server_key("kz", &key_spec("zed", &[]), &["old"]));
        // alice is also bound to the old plan.
        keys[0].usage_plan_ids.push("old".into());
        let c = diff(&spec, &plans, &keys, false).unwrap();
        assert_eq!(lines(&c), ["- bind alice -> old"]);
        let c = diff(&spec, &plans, &keys, true).unwrap();
        assert_eq!(
            lines(&c),
            ["- bind alice -> old", "- api key zed", "- usage plan old"]
        );
    }

    /// What the server checks in a plan is checked while parsing, with the
    /// plan's line: a dry run reports it, a real run makes no change.
    #[test]
    fn plans_are_checked_as_the_server_checks_them() {
        for (yaml, want) in [
            (
                "usage_plans:\n  - name: ok\n  - name: bad\n    quota: { limit: 10, period: DAY, time_zone: Mars/Base }\n",
                "p.yaml:4: usage_plans[1] (\"bad\"): quota.time_zone: unknown IANA time zone \"Mars/Base\"",
            ),
            (
                "usage_plans:\n  - name: neg\n    throttle: { rate_limit: -1, burst_limit: 2 }\n",
                "p.yaml:3: usage_plans[0] (\"neg\"): throttle.rate_limit",
            ),
            (
                "usage_plans:\n  - name: wk\n    quota: { limit: 10, period: WEEK, anchor_day: 9 }\n",
                "p.yaml:3: usage_plans[0] (\"wk\"): quota.anchor_day",
            ),
            // The field's own line, in block style, not the next plan's.
            (
                "usage_plans:\n  - name: z\n    quota:\n      limit: 10\n      period: DAY\n      time_zone: Mars/Base\n  - name: y\n    quota: { limit: 1, period: DAY, time_zone: UTC }\n",
                "p.yaml:6: usage_plans[0] (\"z\"): quota.time_zone",
            ),
            // A limit's field: the limit's lines, not the first limit's.
            (
                "usage_plans:\n  - name: l\n    limits:\n      - name: a\n        metric: TOKENS\n        limit: 5\n        window: MINUTE\n      - name: b\n        metric: TOKENS\n        limit: -5\n        window: MINUTE\n",
                "p.yaml:10: usage_plans[0] (\"l\"): limits[1].limit",
            ),
            // The second stage of a flow list on one line: that line.
            (
                "usage_plans:\n  - name: s\n    description: x\n    stages: [{ domain: a }, { domain: '' }]\n",
                "p.yaml:4: usage_plans[0] (\"s\"): stages[1].domain",
            ),
            // A field set by a later list item only: that item's line.
            (
                "usage_plans:\n  - name: s\n    stages:\n      - domain: a\n      - domain: b\n        key_entry: usage\n",
                "p.yaml:6: usage_plans[0] (\"s\"): stages[1].key_entry",
            ),
            // A value of the wrong type: its line and field.
            (
                "usage_plans:\n  - name: t\n    throttle: { rate_limit: 1, burst_limit: 3000000000 }\n",
                "p.yaml: invalid i32 at line 3, column 45 (field burst_limit)",
            ),
        ] {
            let e = parse_spec(Path::new("p.yaml"), yaml).unwrap_err().to_string();
            assert!(e.starts_with(want), "want `{want}`\ngot  `{e}`");
        }
        // A map's entry: its own line.
        let yaml = format!(
            "usage_plans:\n  - name: t\n    tags:\n      ok: fine\n      a: {}\n",
            "x".repeat(300)
        );
        let e = parse_spec(Path::new("p.yaml"), &yaml)
            .unwrap_err()
            .to_string();
        let want = "p.yaml:5: usage_plans[0] (\"t\"): tags[\"a\"]";
        assert!(e.starts_with(want), "want `{want}`\ngot  `{e}`");
    }

    /// A key bound to two plans that govern one domain and stage is refused
    /// before any change (the server would refuse the second binding after
    /// the first was made), whether the plans are in the file or on the
    /// server.
    #[test]
    fn a_key_may_not_get_two_plans_for_one_stage() {
        let spec = parse(
            "usage_plans:\n  - name: gold\n    stages: [{ domain: d }]\n  - name: llm\n    stages: [{ domain: d }, { domain: e }]\n  - name: other\n    stages: [{ domain: d, stage: beta }]\napi_keys:\n  - name: k\n    usage_plans: [gold, other]\n  - name: j\n    usage_plans: [other, gold, llm]\n",
        );
        let e = diff(&spec, &[], &[], false).unwrap_err().to_string();
        assert_eq!(
            e,
            "api key \"j\": usage plans \"gold\" and \"llm\" both govern domain \"d\" stage \"\"; a key may have one plan per domain and stage"
        );
        // The same with the second plan only on the server.
        let mut llm = plan_spec("llm");
        llm.stages[0].domain = "d".into();
        let server = [server_plan("p9", &llm)];
        let spec = parse("api_keys:\n  - name: j\n    usage_plans: [llm]\n");
        assert!(diff(&spec, &server, &[], false).is_ok());
        let spec = parse(
            "usage_plans:\n  - name: gold\n    stages: [{ domain: d }]\napi_keys:\n  - name: j\n    usage_plans: [gold, llm]\n",
        );
        let e = diff(&spec, &server, &[], false).unwrap_err().to_string();
        assert!(e.contains("both govern domain \"d\""), "{e}");
    }

    /// The admin API's window names load too: a file written from the API's
    /// documentation is the same plan as one written with the short names.
    #[test]
    fn api_window_names_are_accepted() {
        let long = parse(
            "usage_plans:\n  - name: p\n    limits:\n      - { name: a, metric: TOKENS, limit: 1, window: CALENDAR_DAY }\n      - { name: b, metric: TOKENS, limit: 1, window: CALENDAR_WEEK }\n      - { name: c, metric: TOKENS, limit: 1, window: CALENDAR_MONTH }\n",
        );
        let short = parse(
            "usage_plans:\n  - name: p\n    limits:\n      - { name: a, metric: TOKENS, limit: 1, window: DAY }\n      - { name: b, metric: TOKENS, limit: 1, window: WEEK }\n      - { name: c, metric: TOKENS, limit: 1, window: MONTH }\n",
        );
        assert_eq!(long, short);
    }

    #[test]
    fn an_empty_file_never_prunes_everything() {
        let spec = parse(EXAMPLE);
        let (plans, keys) = applied(&spec);
        for text in ["", "# nothing\n", "usage_plans: []\napi_keys: []\n"] {
            let empty = parse_spec(Path::new("e.yaml"), text).unwrap();
            let e = diff(&empty, &plans, &keys, true).unwrap_err().to_string();
            assert!(e.contains("refusing"), "{text:?}: {e}");
            // Without prune it is no change; on an empty server, nothing to do.
            assert!(diff(&empty, &plans, &keys, false).unwrap().is_empty());
            assert!(diff(&empty, &[], &[], true).unwrap().is_empty());
        }
    }

    #[test]
    fn bindings_must_name_known_plans() {
        let spec = Spec {
            api_keys: vec![key_spec("k", &["nowhere"])],
            ..Spec::default()
        };
        let e = diff(&spec, &[], &[], false).unwrap_err().to_string();
        assert!(e.contains("\"k\"") && e.contains("\"nowhere\""), "{e}");
        // A plan only on the server is fine, unless pruning would delete it.
        let plans = [server_plan("p", &plan_spec("server-only"))];
        let spec = Spec {
            api_keys: vec![key_spec("k", &["server-only"])],
            ..Spec::default()
        };
        let c = diff(&spec, &plans, &[], false).unwrap();
        assert_eq!(lines(&c), ["+ api key k", "+ bind k -> server-only"]);
        let e = diff(&spec, &plans, &[], true).unwrap_err().to_string();
        assert!(e.contains("prun"), "{e}");
    }

    // --- export ------------------------------------------------------------

    #[test]
    fn an_export_applied_is_no_change() {
        let spec = parse(EXAMPLE);
        let (plans, keys) = applied(&spec);
        let yaml = to_yaml(&export_spec(&plans, &keys).unwrap()).unwrap();
        let back = parse_spec(Path::new("export.yaml"), &yaml).unwrap();
        let c = diff(&back, &plans, &keys, true).unwrap();
        assert!(c.is_empty(), "{c}\n{yaml}");
    }

    #[test]
    fn awkward_values_survive_an_export() {
        let mut p = plan_spec("yes");
        p.description = "line one\nline two: \"quoted\" # not a comment".into();
        p.throttle = Some(ThrottleSpec {
            rate_limit: 1.0 / 3.0,
            burst_limit: 1,
        });
        p.quota = Some(QuotaSpec {
            limit: i64::MAX,
            period: PeriodSpec::Week,
            anchor_day: 6,
            offset: None,
            time_zone: "America/New_York".into(),
        });
        p.stages[0].stage = "123".into();
        p.stages[0].key_entry = "x-api-key".into();
        p.stages[0].model_entry = "rule-0-match-1".into();
        p.stages[0].method_throttles.insert(
            "/v1/{model}/POST".into(),
            ThrottleSpec {
                rate_limit: 0.1,
                burst_limit: 1,
            },
        );
        p.tags.insert("null".into(), "~".into());
        p.tags.insert("k: v".into(), "- x".into());
        let mut q = plan_spec("1.5");
        q.throttle = Some(ThrottleSpec {
            rate_limit: 1e-7,
            burst_limit: 3,
        });
        q.stages.clear();
        let mut k = key_spec("#hash", &["yes", "1.5"]);
        k.enabled = false;
        k.customer_id = "true".into();
        k.description = " leading space".into();
        k.expire_time = Some("2030-06-01T12:34:56Z".parse().unwrap());
        k.tags.insert("é".into(), "ü".into());
        let spec = Spec {
            usage_plans: vec![p, q],
            api_keys: vec![k, key_spec("plain", &[])],
            shared_prices: None,
        };
        let (plans, keys) = applied(&spec);
        let exported = export_spec(&plans, &keys).unwrap();
        let yaml = to_yaml(&exported).unwrap();
        let back = parse_spec(Path::new("export.yaml"), &yaml).unwrap();
        assert_eq!(back, exported, "{yaml}");
        let c = diff(&back, &plans, &keys, true).unwrap();
        assert!(c.is_empty(), "{c}\n{yaml}");
    }

    #[test]
    fn limits_survive_an_export_and_omit_defaults() {
        let mut p = plan_spec("p");
        p.limits = vec![
            LimitSpec {
                name: "w".into(),
                metric: MetricSpec::Tokens,
                count: Some(CountSpec::Weighted),
                input_weight: Some(1.0 / 3.0),
                output_weight: Some(0.0),
                limit: i64::MAX,
                window: WindowSpec::Week,
                anchor_day: 6,
                time_zone: "America/New_York".into(),
                model_limits: [("gpt-4o*".to_owned(), 7), ("null".to_owned(), 0)].into(),
                scope: ScopeSpec::Customer,
            },
            LimitSpec {
                name: "rpm".into(),
                metric: MetricSpec::Requests,
                count: None,
                input_weight: None,
                output_weight: None,
                limit: 60,
                window: WindowSpec::Minute,
                anchor_day: 0,
                time_zone: "UTC".into(),
                model_limits: BTreeMap::new(),
                scope: ScopeSpec::Key,
            },
        ];
        p.prices.insert(
            "claude-*: #x".into(),
            PriceSpec {
                input_per_million: 3_000_000,
                output_per_million: 15_000_000,
            },
        );
        p.header_style = HeaderStyleSpec::None;
        let spec = Spec {
            usage_plans: vec![p],
            ..Spec::default()
        };
        let (plans, keys) = applied(&spec);
        let exported = export_spec(&plans, &keys).unwrap();
        assert_eq!(exported, spec);
        let yaml = to_yaml(&exported).unwrap();
        let back = parse_spec(Path::new("export.yaml"), &yaml).unwrap();
        assert_eq!(back, exported, "{yaml}");
        let c = diff(&back, &plans, &keys, true).unwrap();
        assert!(c.is_empty(), "{c}\n{yaml}");
        assert!(yaml.contains("header_style: NONE"), "{yaml}");
        assert!(yaml.contains("model_limits: {"), "{yaml}");
        assert!(
            yaml.contains("{input_per_million: 3000000, output_per_million: 15000000}"),
            "{yaml}"
        );
        let rpm: Vec<&str> = yaml
            .lines()
            .skip_while(|l| !l.contains("name: rpm"))
            .take_while(|l| !l.contains("prices"))
            .map(str::trim)
            .collect();
        assert_eq!(
            rpm,
            [
                "- name: rpm",
                "metric: REQUESTS",
                "limit: 60",
                "window: MINUTE"
            ],
            "{yaml}"
        );

        // What the server fills in is exported as the file's defaults.
        let (mut plans, keys) = applied(&spec);
        let l = &mut plans[0].limits[1];
        l.count = pb::TokenCount::Unspecified as i32;
        l.time_zone.clear();
        let exported = export_spec(&plans, &keys).unwrap();
        assert_eq!(exported, spec);

        // A value the format cannot express is an error, not a silent drop.
        plans[0].limits[1].window = 99;
        let e = export_spec(&plans, &keys).unwrap_err().to_string();
        assert!(e.contains("\"rpm\"") && e.contains("window 99"), "{e}");
    }

    #[test]
    fn a_bad_shared_price_table_is_refused_with_its_line() {
        for (yaml, want) in [
            (
                "usage_plans: []\nshared_prices:\n  m: { input_per_million: -1, output_per_million: 2 }\n",
                "plans.yaml:2: shared_prices: prices[\"m\"].input_per_million: must be >= 0, got -1",
            ),
            (
                "shared_prices:\n  \"\": { input_per_million: 1, output_per_million: 2 }\n",
                "plans.yaml:1: shared_prices: prices: model patterns must be 1 to 256 bytes",
            ),
        ] {
            let e = parse_spec(path(), yaml).unwrap_err().to_string();
            assert_eq!(e, want);
        }
    }

    #[test]
    fn the_shared_price_table_changes_only_when_the_file_has_a_different_one() {
        let table = |n: i64| -> BTreeMap<String, PriceSpec> {
            [(
                "*".to_owned(),
                PriceSpec {
                    input_per_million: n,
                    output_per_million: n,
                },
            )]
            .into()
        };
        let server: BTreeMap<String, pb::ModelPrice> = table(1)
            .iter()
            .map(|(k, p)| (k.clone(), price_to_proto(p)))
            .collect();
        let mut spec = parse("usage_plans: []\n");
        assert_eq!(spec.shared_prices, None);
        assert!(
            shared_prices_change(&spec, &server).is_none(),
            "absent: left alone"
        );
        spec.shared_prices = Some(table(1));
        assert!(shared_prices_change(&spec, &server).is_none(), "the same");
        spec.shared_prices = Some(table(2));
        assert_eq!(
            shared_prices_change(&spec, &server).map(|c| c.to_string()),
            Some("~ shared price table".into())
        );
        spec.shared_prices = Some(BTreeMap::new());
        assert!(
            matches!(shared_prices_change(&spec, &server), Some(Change::SetSharedPrices { prices }) if prices.is_empty()),
            "emptied"
        );
        let yaml = "shared_prices:\n  m: { input_per_million: 1, output_per_million: 2 }\n";
        assert_eq!(
            parse(yaml).shared_prices.unwrap()["m"].output_per_million,
            2
        );
    }

    #[test]
    fn exports_are_sorted_and_omit_defaults() {
        let spec = Spec {
            usage_plans: vec![plan_spec("b"), plan_spec("a")],
            api_keys: vec![key_spec("z", &["b", "a"]), key_spec("y", &[])],
            shared_prices: None,
        };
        let (plans, keys) = applied(&spec);
        let yaml = to_yaml(&export_spec(&plans, &keys).unwrap()).unwrap();
        let body: Vec<&str> = yaml.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "usage_plans:",
                "- name: a",
                "  stages:",
                "  - domain: llm",
                "- name: b",
                "  stages:",
                "  - domain: llm",
                "api_keys:",
                "- name: \"y\"",
                "- name: z",
                "  usage_plans: [a, b]",
            ],
            "{yaml}"
        );
        let empty = to_yaml(&export_spec(&[], &[]).unwrap()).unwrap();
        assert_eq!(parse(&empty), Spec::default(), "{empty}");
    }

    #[test]
    fn errors_show_code_and_message() {
        let e = rpc_error(
            "creating usage plan \"gold\"",
            &tonic::Status::invalid_argument("throttle.burst_limit: must be >= 1"),
        );
        assert_eq!(
            e.to_string(),
            "creating usage plan \"gold\": INVALID_ARGUMENT: throttle.burst_limit: must be >= 1"
        );
    }
}
