//! `sluice.admin.v1.AdminService`: usage plans, API keys, bindings, usage.
//!
//! Converts between the wire types and `plans::model`, applies field masks,
//! pages lists, and checks the bearer token (see [`AuthInterceptor`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use prost_types::{FieldMask, Timestamp};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use crate::limiter::RateLimiter;
use crate::plans::catalog::CompiledPlan;
use crate::plans::model::{self, PeriodKind};
use crate::plans::period::{self, Calendar};
use crate::plans::registry::{self, Registry};
use crate::plans::usage::ModelMetric;
use crate::plans::Error;
use crate::proto::admin as pb;
use crate::proto::admin::admin_service_server::AdminService;
use crate::storage::CounterStore;

/// The admin service name, as health checks and reflection know it.
pub const ADMIN_SERVICE: &str = "sluice.admin.v1.AdminService";
const DEFAULT_PAGE: usize = 25;
const MAX_PAGE: usize = 500;
/// Longest date range of one GetUsage call, in days.
pub const MAX_USAGE_DAYS: i32 = 366;

/// The admin gRPC service.
#[derive(Debug)]
pub struct AdminServer<S> {
    registry: Arc<Registry>,
    limiter: Arc<RateLimiter<S>>,
    retention_days: u32,
}

impl<S: CounterStore> AdminServer<S> {
    /// When an update changed a plan's quota calendar (period, anchor day or
    /// time zone) or gave it a quota, its keys' counts in the new current period are rebuilt
    /// from their daily usage and their grants moved to it
    /// ([`RateLimiter::carry_quota`]): otherwise the period would restart at
    /// 0 with calls already made in it, and an extra grant would vanish.
    async fn carry_quota(&self, before: &model::Plan, after: &model::Plan) -> Result<(), Status> {
        let calendar = |p: &model::Plan| {
            p.quota
                .as_ref()
                .map(|q| (q.period, q.anchor_day, q.time_zone.clone()))
        };
        // A quota given back (or for the first time) counts the calls made
        // without it too, as AWS counts a period's calls whatever happened
        // to the plan in it.
        if after.quota.is_none() || calendar(before) == calendar(after) {
            return Ok(());
        }
        let key_ids: Vec<String> = self
            .registry
            .catalog()
            .keys_by_name()
            .filter(|k| k.plan_ids.contains(&after.id))
            .map(|k| k.id.clone())
            .collect();
        let grants = self
            .limiter
            .carry_quota(before, after, &key_ids, now())
            .await
            .map_err(super::status::from_storage)?;
        for (key_id, start, extra) in grants {
            self.registry
                .set_grant(&after.id, &key_id, start, extra, i64::MIN)
                .await?;
        }
        Ok(())
    }
}

impl<S> AdminServer<S> {
    /// A service writing through `registry` and reading usage from `limiter`.
    pub fn new(registry: Arc<Registry>, limiter: Arc<RateLimiter<S>>, retention_days: u32) -> Self {
        AdminServer {
            registry,
            limiter,
            retention_days,
        }
    }
}

/// What a caller's token allows; put in the request extensions by
/// [`AuthInterceptor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The admin token: every operation.
    Full,
    /// The read-only token: Get, List and GetUsage.
    ReadOnly,
}

/// Checks `authorization: Bearer <token>` in constant time (both sides are
/// hashed first, so neither the content nor the length leaks) against the
/// admin token and the optional read-only token.
#[derive(Clone)]
pub struct AuthInterceptor {
    expected: [u8; 32],
    read_only: Option<[u8; 32]>,
}

impl std::fmt::Debug for AuthInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthInterceptor { .. }")
    }
}

impl AuthInterceptor {
    /// An interceptor accepting `token` for everything.
    pub fn new(token: &str) -> Self {
        AuthInterceptor {
            expected: Sha256::digest(token.as_bytes()).into(),
            read_only: None,
        }
    }

    /// Also accepts `token` for reads only (writes get PERMISSION_DENIED).
    pub fn with_read_only(mut self, token: &str) -> Self {
        self.read_only = Some(Sha256::digest(token.as_bytes()).into());
        self
    }
}

/// PERMISSION_DENIED unless the caller has the admin token.
fn require_write<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    match req.extensions().get::<Access>() {
        Some(Access::Full) => Ok(()),
        _ => Err(Status::permission_denied(format!(
            "{what} needs the admin token; this token is read-only"
        ))),
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing authorization metadata: send `authorization: Bearer <admin token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110, 11.1).
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest)
            })
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("authorization metadata must be `Bearer <admin token>`")
            })?;
        let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let full = bool::from(got.ct_eq(&self.expected));
        let read = self.read_only.is_some_and(|r| bool::from(got.ct_eq(&r)));
        let access = if full {
            Access::Full
        } else if read {
            Access::ReadOnly
        } else {
            return Err(Status::unauthenticated("invalid admin token"));
        };
        req.extensions_mut().insert(access);
        Ok(req)
    }
}

/// Most per-model usage rows in one key's GetUsage answer.
const MAX_MODEL_ROWS: usize = 1000;

fn now() -> i64 {
    i64::try_from(crate::storage::unix_now()).unwrap_or(i64::MAX)
}

fn now_us() -> i64 {
    crate::storage::unix_now_us()
}

fn ts(secs: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn required<T>(field: &str, v: Option<T>) -> Result<T, Error> {
    v.ok_or_else(|| Error::invalid(field, "is required"))
}

// ---- conversions -------------------------------------------------------

fn throttle_from(field: &str, t: &pb::Throttle) -> Result<model::Throttle, Error> {
    let burst = u32::try_from(t.burst_limit).map_err(|_| {
        Error::invalid(
            format!("{field}.burst_limit"),
            format!("must be >= 0, got {}", t.burst_limit),
        )
    })?;
    Ok(model::Throttle {
        rate_limit: t.rate_limit,
        burst_limit: burst,
    })
}

fn throttle_to(t: &model::Throttle) -> pb::Throttle {
    pb::Throttle {
        rate_limit: t.rate_limit,
        burst_limit: i32::try_from(t.burst_limit).unwrap_or(i32::MAX),
    }
}

fn quota_from(q: &pb::Quota) -> Result<model::Quota, Error> {
    let limit = u64::try_from(q.limit)
        .map_err(|_| Error::invalid("quota.limit", format!("must be >= 0, got {}", q.limit)))?;
    let (period, kind) = match pb::Period::try_from(q.period) {
        Ok(pb::Period::Day) => (period::Period::Day, PeriodKind::Day),
        Ok(pb::Period::Week) => (period::Period::Week, PeriodKind::Week),
        Ok(pb::Period::Month) => (period::Period::Month, PeriodKind::Month),
        _ => {
            return Err(Error::invalid(
                "quota.period",
                format!("must be DAY, WEEK or MONTH, got {}", q.period),
            ))
        }
    };
    let cal = match q.offset {
        Some(offset) => {
            if q.anchor_day != 0 {
                return Err(Error::invalid(
                    "quota.offset",
                    "set anchor_day or offset, not both",
                ));
            }
            let offset = u32::try_from(offset).map_err(|_| {
                Error::invalid("quota.offset", format!("must be >= 0, got {offset}"))
            })?;
            Calendar::from_offset(period, offset, &q.time_zone)
        }
        None => {
            let anchor = u32::try_from(q.anchor_day).map_err(|_| {
                Error::invalid(
                    "quota.anchor_day",
                    format!("must be >= 0, got {}", q.anchor_day),
                )
            })?;
            Calendar::new(period, anchor, &q.time_zone)
        }
    }
    .map_err(model::calendar_error)?;
    Ok(model::Quota {
        limit,
        period: kind,
        anchor_day: cal.anchor(),
        time_zone: cal.time_zone().to_owned(),
    })
}

fn quota_to(q: &model::Quota) -> pb::Quota {
    pb::Quota {
        limit: i64::try_from(q.limit).unwrap_or(i64::MAX),
        period: match q.period {
            PeriodKind::Day => pb::Period::Day,
            PeriodKind::Week => pb::Period::Week,
            PeriodKind::Month => pb::Period::Month,
        } as i32,
        anchor_day: i32::try_from(q.anchor_day).unwrap_or(0),
        offset: None,
        time_zone: q.time_zone.clone(),
    }
}

fn or_default(s: &str, d: &str) -> String {
    if s.is_empty() {
        d.to_owned()
    } else {
        s.to_owned()
    }
}

fn stage_from(i: usize, s: &pb::ApiStage) -> Result<model::Stage, Error> {
    let mut method_throttles = BTreeMap::new();
    for (k, t) in &s.method_throttles {
        method_throttles.insert(
            k.clone(),
            throttle_from(&format!("stages[{i}].method_throttles[{k:?}]"), t)?,
        );
    }
    Ok(model::Stage {
        domain: s.domain.clone(),
        stage: s.stage.clone(),
        method_throttles,
        key_entry: or_default(&s.key_entry, model::DEFAULT_KEY_ENTRY),
        method_entry: or_default(&s.method_entry, model::DEFAULT_METHOD_ENTRY),
        path_entry: or_default(&s.path_entry, model::DEFAULT_PATH_ENTRY),
        default_usage: if s.default_usage == "requests" {
            String::new()
        } else {
            s.default_usage.clone()
        },
        model_entry: or_default(&s.model_entry, model::MODEL_ENTRY),
    })
}

fn stage_to(s: &model::Stage) -> pb::ApiStage {
    pb::ApiStage {
        domain: s.domain.clone(),
        stage: s.stage.clone(),
        method_throttles: s
            .method_throttles
            .iter()
            .map(|(k, t)| (k.clone(), throttle_to(t)))
            .collect(),
        key_entry: s.key_entry.clone(),
        method_entry: s.method_entry.clone(),
        path_entry: s.path_entry.clone(),
        default_usage: s.default_usage.clone(),
        model_entry: s.model_entry.clone(),
    }
}

fn limit_from(i: usize, l: &pb::UsageLimit) -> Result<model::UsageLimit, Error> {
    let f = |sub: &str| format!("limits[{i}].{sub}");
    let metric = match pb::Metric::try_from(l.metric) {
        Ok(pb::Metric::Requests) => model::Metric::Requests,
        Ok(pb::Metric::Tokens) => model::Metric::Tokens,
        Ok(pb::Metric::Spend) => model::Metric::Spend,
        _ => {
            return Err(Error::invalid(
                f("metric"),
                format!("must be REQUESTS, TOKENS or SPEND, got {}", l.metric),
            ))
        }
    };
    let count = match pb::TokenCount::try_from(l.count) {
        Ok(pb::TokenCount::Input) => model::TokenCount::Input,
        Ok(pb::TokenCount::Output) => model::TokenCount::Output,
        Ok(pb::TokenCount::Total | pb::TokenCount::Unspecified) => model::TokenCount::Total,
        Ok(pb::TokenCount::Weighted) => model::TokenCount::Weighted {
            input_weight: l.input_weight,
            output_weight: l.output_weight,
        },
        Err(_) => {
            return Err(Error::invalid(
                f("count"),
                format!("unknown value {}", l.count),
            ))
        }
    };
    // What a limit does not use is refused, not silently dropped.
    if metric != model::Metric::Tokens && !matches!(count, model::TokenCount::Total) {
        return Err(Error::invalid(
            f("count"),
            "only a TOKENS limit counts INPUT, OUTPUT or WEIGHTED tokens",
        ));
    }
    if !matches!(count, model::TokenCount::Weighted { .. })
        && (l.input_weight != 0.0 || l.output_weight != 0.0)
    {
        return Err(Error::invalid(
            f(if l.input_weight != 0.0 {
                "input_weight"
            } else {
                "output_weight"
            }),
            "only a limit with count WEIGHTED has weights",
        ));
    }
    let window = match pb::LimitWindow::try_from(l.window) {
        Ok(pb::LimitWindow::Minute) => model::LimitWindow::Minute,
        Ok(pb::LimitWindow::Hour) => model::LimitWindow::Hour,
        Ok(pb::LimitWindow::CalendarDay) => model::LimitWindow::Day,
        Ok(pb::LimitWindow::CalendarWeek) => model::LimitWindow::Week,
        Ok(pb::LimitWindow::CalendarMonth) => model::LimitWindow::Month,
        _ => {
            return Err(Error::invalid(
                f("window"),
                format!(
                    "must be MINUTE, HOUR, CALENDAR_DAY, CALENDAR_WEEK or CALENDAR_MONTH, got {}",
                    l.window
                ),
            ))
        }
    };
    let scope = match pb::Scope::try_from(l.scope) {
        Ok(pb::Scope::Key) => model::Scope::Key,
        Ok(pb::Scope::Customer) => model::Scope::Customer,
        Err(_) => {
            return Err(Error::invalid(
                f("scope"),
                format!("unknown value {}", l.scope),
            ))
        }
    };
    let non_negative = |field: String, v: i64| {
        u64::try_from(v).map_err(|_| Error::invalid(field, format!("must be >= 0, got {v}")))
    };
    let anchor_day = u32::try_from(l.anchor_day).map_err(|_| {
        Error::invalid(
            f("anchor_day"),
            format!("must be >= 0, got {}", l.anchor_day),
        )
    })?;
    let mut model_limits = BTreeMap::new();
    for (m, v) in &l.model_limits {
        model_limits.insert(
            m.clone(),
            non_negative(f(&format!("model_limits[{m:?}]")), *v)?,
        );
    }
    Ok(model::UsageLimit {
        name: l.name.clone(),
        metric,
        count,
        limit: non_negative(f("limit"), l.limit)?,
        window,
        anchor_day,
        time_zone: if l.time_zone.is_empty() {
            "UTC".into()
        } else {
            l.time_zone.clone()
        },
        model_limits,
        scope,
    })
}

fn limit_to(l: &model::UsageLimit) -> pb::UsageLimit {
    let (count, input_weight, output_weight) = match l.count {
        model::TokenCount::Input => (pb::TokenCount::Input, 0.0, 0.0),
        model::TokenCount::Output => (pb::TokenCount::Output, 0.0, 0.0),
        model::TokenCount::Total => (pb::TokenCount::Total, 0.0, 0.0),
        model::TokenCount::Weighted {
            input_weight,
            output_weight,
        } => (pb::TokenCount::Weighted, input_weight, output_weight),
    };
    pb::UsageLimit {
        name: l.name.clone(),
        metric: match l.metric {
            model::Metric::Requests => pb::Metric::Requests,
            model::Metric::Tokens => pb::Metric::Tokens,
            model::Metric::Spend => pb::Metric::Spend,
        } as i32,
        count: count as i32,
        input_weight,
        output_weight,
        limit: i64::try_from(l.limit).unwrap_or(i64::MAX),
        window: match l.window {
            model::LimitWindow::Minute => pb::LimitWindow::Minute,
            model::LimitWindow::Hour => pb::LimitWindow::Hour,
            model::LimitWindow::Day => pb::LimitWindow::CalendarDay,
            model::LimitWindow::Week => pb::LimitWindow::CalendarWeek,
            model::LimitWindow::Month => pb::LimitWindow::CalendarMonth,
        } as i32,
        anchor_day: i32::try_from(l.anchor_day).unwrap_or(0),
        time_zone: l.time_zone.clone(),
        model_limits: l
            .model_limits
            .iter()
            .map(|(k, v)| (k.clone(), i64::try_from(*v).unwrap_or(i64::MAX)))
            .collect(),
        scope: match l.scope {
            model::Scope::Key => pb::Scope::Key,
            model::Scope::Customer => pb::Scope::Customer,
        } as i32,
    }
}

fn prices_from(
    p: &std::collections::HashMap<String, pb::ModelPrice>,
) -> Result<BTreeMap<String, model::Price>, Error> {
    let mut out = BTreeMap::new();
    for (m, v) in p {
        let f = |sub: &str| format!("prices[{m:?}].{sub}");
        let get = |sub: &str, x: i64| {
            u64::try_from(x).map_err(|_| Error::invalid(f(sub), format!("must be >= 0, got {x}")))
        };
        out.insert(
            m.clone(),
            model::Price {
                input_per_million: get("input_per_million", v.input_per_million)?,
                output_per_million: get("output_per_million", v.output_per_million)?,
            },
        );
    }
    Ok(out)
}

fn price_table_to(prices: &BTreeMap<String, model::Price>) -> pb::PriceTable {
    pb::PriceTable {
        prices: prices
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelPrice {
                        input_per_million: i64::try_from(v.input_per_million).unwrap_or(i64::MAX),
                        output_per_million: i64::try_from(v.output_per_million).unwrap_or(i64::MAX),
                    },
                )
            })
            .collect(),
    }
}

fn header_style_from(v: i32) -> Result<model::HeaderStyle, Error> {
    match pb::HeaderStyle::try_from(v) {
        Ok(pb::HeaderStyle::Openai) => Ok(model::HeaderStyle::Openai),
        Ok(pb::HeaderStyle::Ietf) => Ok(model::HeaderStyle::Ietf),
        Ok(pb::HeaderStyle::Both) => Ok(model::HeaderStyle::Both),
        Ok(pb::HeaderStyle::None) => Ok(model::HeaderStyle::None),
        Err(_) => Err(Error::invalid("header_style", format!("unknown value {v}"))),
    }
}

/// Checks a wire plan as `CreateUsagePlan` and `UpdateUsagePlan` do, without
/// the checks that need the server's state (a taken name, the shared price
/// table, bound keys): `sluice apply` runs it on every plan of its file
/// before it changes anything.
///
/// # Errors
/// [`Error::Invalid`] naming the first bad field, as the server would.
pub fn check_plan(p: &pb::UsagePlan) -> Result<(), Error> {
    model::validate_new_plan(&plan_from(p)?)
}

/// The checks `CreateApiKey` runs on a key's own fields (for `sluice
/// apply`, before its first change).
///
/// # Errors
/// [`Error::Invalid`] naming the bad field.
pub fn check_key(k: &pb::ApiKey) -> Result<(), Error> {
    model::validate_key(&model::ApiKey {
        name: k.name.clone(),
        description: k.description.clone(),
        customer_id: k.customer_id.clone(),
        expire_time: expire_from(&k.expire_time),
        tags: k.tags.clone().into_iter().collect(),
        ..model::ApiKey::default()
    })
}

/// The check `UpdatePriceTable` runs on a table (for `sluice apply`, before
/// its first change).
///
/// # Errors
/// [`Error::Invalid`] naming the bad entry.
pub fn check_prices(
    prices: &std::collections::HashMap<String, pb::ModelPrice>,
) -> Result<(), Error> {
    model::validate_prices(&prices_from(prices)?)
}

/// The update check that compares a plan with what it replaces (the unit
/// each named limit counts in), as `UpdateUsagePlan` runs it; for `sluice
/// apply`, before its first change.
///
/// # Errors
/// [`Error::FailedPrecondition`] (or [`Error::Invalid`] if either plan
/// does not convert).
pub fn check_plan_update(old: &pb::UsagePlan, new: &pb::UsagePlan) -> Result<(), Error> {
    model::validate_limit_units(&plan_from(old)?, &plan_from(new)?)
}

/// The model fields of a wire plan (id and times are not taken).
fn plan_from(p: &pb::UsagePlan) -> Result<model::Plan, Error> {
    Ok(model::Plan {
        id: String::new(),
        name: p.name.clone(),
        description: p.description.clone(),
        throttle: p
            .throttle
            .as_ref()
            .map(|t| throttle_from("throttle", t))
            .transpose()?,
        quota: p.quota.as_ref().map(quota_from).transpose()?,
        stages: p
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| stage_from(i, s))
            .collect::<Result<_, _>>()?,
        tags: p.tags.clone().into_iter().collect(),
        create_time: 0,
        update_time: 0,
        limits: p
            .limits
            .iter()
            .enumerate()
            .map(|(i, l)| limit_from(i, l))
            .collect::<Result<_, _>>()?,
        prices: prices_from(&p.prices)?,
        header_style: header_style_from(p.header_style)?,
        // Not on the wire: the registry keeps it across updates.
        retired_limits: BTreeMap::new(),
    })
}

fn plan_to(p: &model::Plan) -> pb::UsagePlan {
    pb::UsagePlan {
        id: p.id.clone(),
        name: p.name.clone(),
        description: p.description.clone(),
        throttle: p.throttle.as_ref().map(throttle_to),
        quota: p.quota.as_ref().map(quota_to),
        stages: p.stages.iter().map(stage_to).collect(),
        tags: p.tags.clone().into_iter().collect(),
        create_time: ts(p.create_time),
        update_time: ts(p.update_time),
        limits: p.limits.iter().map(limit_to).collect(),
        prices: p
            .prices
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelPrice {
                        input_per_million: i64::try_from(v.input_per_million).unwrap_or(i64::MAX),
                        output_per_million: i64::try_from(v.output_per_million).unwrap_or(i64::MAX),
                    },
                )
            })
            .collect(),
        header_style: match p.header_style {
            model::HeaderStyle::Openai => pb::HeaderStyle::Openai,
            model::HeaderStyle::Ietf => pb::HeaderStyle::Ietf,
            model::HeaderStyle::Both => pb::HeaderStyle::Both,
            model::HeaderStyle::None => pb::HeaderStyle::None,
        } as i32,
    }
}

fn key_to(k: &model::ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.clone(),
        name: k.name.clone(),
        description: k.description.clone(),
        enabled: k.enabled,
        customer_id: k.customer_id.clone(),
        create_time: ts(k.create_time),
        update_time: ts(k.update_time),
        expire_time: k.expire_time.and_then(ts),
        tags: k.tags.clone().into_iter().collect(),
        usage_plan_ids: k.plan_ids.iter().cloned().collect(),
        previous_value_expire_time: k.previous.as_ref().and_then(|p| ts(p.until)),
    }
}

fn expire_from(t: &Option<Timestamp>) -> Option<i64> {
    t.as_ref().map(|t| t.seconds)
}

// ---- field masks -------------------------------------------------------

const PLAN_PATHS: [&str; 16] = [
    "name",
    "description",
    "throttle",
    "throttle.rate_limit",
    "throttle.burst_limit",
    "quota",
    "quota.limit",
    "quota.period",
    "quota.anchor_day",
    "quota.offset",
    "quota.time_zone",
    "stages",
    "tags",
    "limits",
    "prices",
    "header_style",
];

const KEY_PATHS: [&str; 6] = [
    "name",
    "description",
    "enabled",
    "customer_id",
    "expire_time",
    "tags",
];

fn mask_paths(mask: &Option<FieldMask>, all: &[&str]) -> Result<Vec<String>, Error> {
    let paths: Vec<String> = mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Ok(all
            .iter()
            .filter(|p| !p.contains('.'))
            .map(|p| (*p).to_owned())
            .collect());
    }
    for p in &paths {
        if !all.contains(&p.as_str()) {
            return Err(Error::invalid(
                "update_mask",
                format!(
                    "unknown or immutable field path {p:?} (allowed: {})",
                    all.join(", ")
                ),
            ));
        }
    }
    Ok(paths)
}

/// Copies the masked fields of `req` into `cur` (both wire plans).
fn apply_plan_mask(cur: &mut pb::UsagePlan, req: &pb::UsagePlan, paths: &[String]) {
    for p in paths {
        match p.as_str() {
            "name" => cur.name = req.name.clone(),
            "description" => cur.description = req.description.clone(),
            "throttle" => cur.throttle = req.throttle,
            "throttle.rate_limit" => {
                cur.throttle.get_or_insert_with(Default::default).rate_limit =
                    req.throttle.as_ref().map_or(0.0, |t| t.rate_limit);
            }
            "throttle.burst_limit" => {
                cur.throttle
                    .get_or_insert_with(Default::default)
                    .burst_limit = req.throttle.as_ref().map_or(0, |t| t.burst_limit);
            }
            "quota" => cur.quota = req.quota.clone(),
            "stages" => cur.stages = req.stages.clone(),
            "tags" => cur.tags = req.tags.clone(),
            "limits" => cur.limits = req.limits.clone(),
            "prices" => cur.prices = req.prices.clone(),
            "header_style" => cur.header_style = req.header_style,
            sub => {
                let q = cur.quota.get_or_insert_with(|| pb::Quota {
                    time_zone: "UTC".into(),
                    ..Default::default()
                });
                let r = req.quota.clone().unwrap_or_default();
                match sub {
                    "quota.limit" => q.limit = r.limit,
                    "quota.period" => q.period = r.period,
                    "quota.anchor_day" => {
                        q.anchor_day = r.anchor_day;
                        q.offset = None;
                    }
                    "quota.offset" => {
                        q.offset = r.offset;
                        q.anchor_day = 0;
                    }
                    "quota.time_zone" => q.time_zone = r.time_zone,
                    _ => {}
                }
            }
        }
    }
}

// ---- paging ------------------------------------------------------------

fn page_size(n: i32) -> Result<usize, Error> {
    match n {
        0 => Ok(DEFAULT_PAGE),
        n if n < 0 => Err(Error::invalid(
            "page_size",
            format!("must be >= 0, got {n}"),
        )),
        n => Ok(usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE)),
    }
}

/// Separates a page token's request scope from the last name (names hold
/// no control characters).
const TOKEN_SEP: char = '\u{1e}';

/// Decodes a page token: the request it was made for (`scope`: the method
/// and its filters) and the name of the last item of the previous page. A
/// token of another request, or with other filters, is refused (AIP-158):
/// it would page through something else.
fn page_after(token: &str, scope: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = |m: &str| Error::invalid("page_token", m.to_owned());
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("not a token from a previous page"))?;
    let (made_for, last) = text
        .rsplit_once(TOKEN_SEP)
        .ok_or_else(|| bad("not a token from a previous page"))?;
    if made_for != scope {
        return Err(bad(
            "made for another request or other filters: page on with the request that gave it",
        ));
    }
    Ok(Some(last.to_owned()))
}

/// One page of `items` (sorted by name) after `token`. `scope` names the
/// request (method and filters) that page tokens are tied to.
fn page<T>(
    items: impl Iterator<Item = T>,
    name: impl Fn(&T) -> &str,
    size: i32,
    token: &str,
    scope: &[&str],
) -> Result<(Vec<T>, String), Error> {
    let size = page_size(size)?;
    let scope = scope.join("\u{1f}");
    let after = page_after(token, &scope)?;
    let mut out: Vec<T> = items
        .filter(|i| after.as_deref().is_none_or(|a| name(i) > a))
        .take(size + 1)
        .collect();
    let next = if out.len() > size {
        out.truncate(size);
        out.last()
            .map(|i| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(format!("{scope}{TOKEN_SEP}{}", name(i)))
            })
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((out, next))
}

// ---- the service -------------------------------------------------------

type Res<T> = Result<Response<T>, Status>;

impl<S: CounterStore> AdminServer<S> {
    async fn key_usage(
        &self,
        plan: &CompiledPlan,
        key: &model::ApiKey,
        dates: &[jiff::civil::Date],
    ) -> Result<pb::KeyUsage, Status> {
        let (days, live) = self
            .limiter
            .usage(plan, &key.id, dates, now_us())
            .await
            .map_err(super::status::from_storage)?;
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let limits = self
            .limiter
            .limit_usage(plan, key, now())
            .await
            .map_err(super::status::from_storage)?
            .into_iter()
            .map(|(name, metric, limit, used, end)| pb::LimitUsage {
                name,
                metric: match metric {
                    model::Metric::Requests => pb::Metric::Requests,
                    model::Metric::Tokens => pb::Metric::Tokens,
                    model::Metric::Spend => pb::Metric::Spend,
                } as i32,
                limit: to_i64(limit),
                used: to_i64(used),
                remaining: to_i64(limit.saturating_sub(used)),
                window_end: ts(end),
            })
            .collect();
        let mut models: Vec<pb::ModelUsage> = Vec::new();
        for (date, model, metric, v) in self.limiter.model_usage(plan, &key.id, dates) {
            let date = date.to_string();
            let row = match models.last_mut() {
                Some(m) if m.date == date && m.model == model => m,
                _ => {
                    models.push(pb::ModelUsage {
                        date,
                        model,
                        ..Default::default()
                    });
                    models.last_mut().expect("just pushed")
                }
            };
            let v = to_i64(v);
            match metric {
                ModelMetric::Requests => row.requests = v,
                ModelMetric::Input => row.input_tokens = v,
                ModelMetric::Output => row.output_tokens = v,
                ModelMetric::Total => row.total_tokens = v,
                ModelMetric::Spend => row.spend = v,
            }
        }
        // A key sending many distinct model names must not make the answer
        // too large for clients (4 MiB by default): the most used rows stay.
        let mut models_omitted = 0;
        if models.len() > MAX_MODEL_ROWS {
            let weight = |m: &pb::ModelUsage| {
                [m.requests, m.input_tokens, m.output_tokens, m.total_tokens]
                    .iter()
                    .fold(0i64, |a, v| a.saturating_add(*v))
            };
            models.sort_by_key(|m| std::cmp::Reverse(weight(m)));
            models_omitted = i32::try_from(models.len() - MAX_MODEL_ROWS).unwrap_or(i32::MAX);
            models.truncate(MAX_MODEL_ROWS);
            models.sort_by(|a, b| (&a.date, &a.model).cmp(&(&b.date, &b.model)));
        }
        Ok(pb::KeyUsage {
            key_id: key.id.clone(),
            key_name: key.name.clone(),
            models,
            models_omitted,
            days: days
                .into_iter()
                .map(|d| pb::DailyUsage {
                    date: d.date.to_string(),
                    used: to_i64(d.used),
                    remaining: d.remaining.map_or(-1, to_i64),
                })
                .collect(),
            live: Some(pb::LiveUsage {
                quota_used: live.quota.as_ref().map_or(0, |q| to_i64(q.used)),
                quota_remaining: live
                    .quota
                    .as_ref()
                    .map_or(-1, |q| to_i64(q.limit.saturating_sub(q.used))),
                quota_limit: live.quota.as_ref().map_or(-1, |q| to_i64(q.limit)),
                period_start: live.quota.as_ref().and_then(|q| ts(q.period.start)),
                period_end: live.quota.as_ref().and_then(|q| ts(q.period.end)),
                throttle_tokens: live.throttle.map_or(0.0, |t| t.0),
                throttle_burst: live
                    .throttle
                    .map_or(0, |t| i32::try_from(t.1).unwrap_or(i32::MAX)),
                limits,
            }),
        })
    }

    fn plan_key(
        &self,
        plan: &str,
        key: &str,
    ) -> Result<(Arc<CompiledPlan>, Arc<model::ApiKey>), Error> {
        model::reference("plan", plan)?;
        model::reference("key", key)?;
        let cat = self.registry.catalog();
        let p = cat.plan(plan).cloned().ok_or_else(|| Error::NotFound {
            kind: "usage plan",
            id: plan.to_owned(),
        })?;
        let k = cat.key(key).cloned().ok_or_else(|| Error::NotFound {
            kind: "API key",
            id: key.to_owned(),
        })?;
        if !k.plan_ids.contains(&p.plan.id) {
            return Err(Error::NotFound {
                kind: "usage plan key",
                id: format!("{}/{}", p.plan.name, k.name),
            });
        }
        Ok((p, k))
    }
}

#[tonic::async_trait]
impl<S: CounterStore> AdminService for AdminServer<S> {
    async fn create_usage_plan(
        &self,
        req: Request<pb::CreateUsagePlanRequest>,
    ) -> Res<pb::UsagePlan> {
        require_write(&req, "CreateUsagePlan")?;
        let req = req.into_inner();
        let p = required("usage_plan", req.usage_plan.as_ref())?;
        let plan = self.registry.create_plan(plan_from(p)?, now()).await?;
        tracing::info!(plan = %plan.name, id = %plan.id, "usage plan created");
        Ok(Response::new(plan_to(&plan)))
    }

    async fn get_usage_plan(&self, req: Request<pb::GetUsagePlanRequest>) -> Res<pb::UsagePlan> {
        let plan = self.registry.get_plan(&req.into_inner().plan)?;
        Ok(Response::new(plan_to(&plan)))
    }

    async fn list_usage_plans(
        &self,
        req: Request<pb::ListUsagePlansRequest>,
    ) -> Res<pb::ListUsagePlansResponse> {
        let req = req.into_inner();
        let cat = self.registry.catalog();
        let (items, next) = page(
            cat.plans_by_name(),
            |p| p.plan.name.as_str(),
            req.page_size,
            &req.page_token,
            &["ListUsagePlans"],
        )?;
        Ok(Response::new(pb::ListUsagePlansResponse {
            usage_plans: items.iter().map(|p| plan_to(&p.plan)).collect(),
            next_page_token: next,
        }))
    }

    async fn update_usage_plan(
        &self,
        req: Request<pb::UpdateUsagePlanRequest>,
    ) -> Res<pb::UsagePlan> {
        if !req.get_ref().validate_only {
            require_write(&req, "UpdateUsagePlan")?;
        }
        let req = req.into_inner();
        let want = required("usage_plan", req.usage_plan)?;
        if want.id.is_empty() {
            return Err(
                Error::invalid("usage_plan.id", "is required (the plan's id or name)").into(),
            );
        }
        let paths = mask_paths(&req.update_mask, &PLAN_PATHS)?;
        let before = self.registry.get_plan(&want.id)?;
        let edit = |p: &mut model::Plan| {
            let mut cur = plan_to(p);
            apply_plan_mask(&mut cur, &want, &paths);
            let new = plan_from(&cur)?;
            *p = model::Plan {
                id: p.id.clone(),
                create_time: p.create_time,
                ..new
            };
            Ok(())
        };
        if req.validate_only {
            let plan = self
                .registry
                .check_plan_update(&want.id, edit, now())
                .await?;
            return Ok(Response::new(plan_to(&plan)));
        }
        let plan = self.registry.update_plan(&want.id, edit, now()).await?;
        tracing::info!(plan = %plan.name, fields = ?paths, "usage plan updated");
        self.carry_quota(&before, &plan).await?;
        Ok(Response::new(plan_to(&plan)))
    }

    async fn delete_usage_plan(&self, req: Request<pb::DeleteUsagePlanRequest>) -> Res<()> {
        require_write(&req, "DeleteUsagePlan")?;
        let req = req.into_inner();
        self.registry.delete_plan(&req.plan, req.force).await?;
        tracing::info!(plan = %req.plan, "usage plan deleted");
        Ok(Response::new(()))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Res<pb::CreateApiKeyResponse> {
        require_write(&req, "CreateApiKey")?;
        let req = req.into_inner();
        let k = required("api_key", req.api_key.as_ref())?;
        let key = model::ApiKey {
            id: String::new(),
            name: k.name.clone(),
            description: k.description.clone(),
            enabled: !req.disabled,
            customer_id: k.customer_id.clone(),
            create_time: 0,
            update_time: 0,
            expire_time: expire_from(&k.expire_time),
            tags: k.tags.clone().into_iter().collect(),
            hash: String::new(),
            previous: None,
            plan_ids: Default::default(),
        };
        let value = (!req.value.is_empty()).then_some(req.value);
        let (key, value) = self.registry.create_key(key, value, now()).await?;
        tracing::info!(key = %key.name, id = %key.id, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(key_to(&key)),
            value,
        }))
    }

    async fn get_api_key(&self, req: Request<pb::GetApiKeyRequest>) -> Res<pb::ApiKey> {
        let key = self.registry.get_key(&req.into_inner().key)?;
        Ok(Response::new(key_to(&key)))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Res<pb::ListApiKeysResponse> {
        let req = req.into_inner();
        let cat = self.registry.catalog();
        let items = cat.keys_by_name().filter(|k| {
            (req.customer_id.is_empty() || k.customer_id == req.customer_id)
                && k.name.starts_with(&req.name_prefix)
        });
        let (items, next) = page(
            items,
            |k| k.name.as_str(),
            req.page_size,
            &req.page_token,
            &["ListApiKeys", &req.customer_id, &req.name_prefix],
        )?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: items.iter().map(|k| key_to(k)).collect(),
            next_page_token: next,
        }))
    }

    async fn update_api_key(&self, req: Request<pb::UpdateApiKeyRequest>) -> Res<pb::ApiKey> {
        require_write(&req, "UpdateApiKey")?;
        let req = req.into_inner();
        let want = required("api_key", req.api_key)?;
        if want.id.is_empty() {
            return Err(Error::invalid("api_key.id", "is required (the key's id or name)").into());
        }
        let paths = mask_paths(&req.update_mask, &KEY_PATHS)?;
        let key = self
            .registry
            .update_key(
                &want.id,
                |k| {
                    for p in &paths {
                        match p.as_str() {
                            "name" => k.name = want.name.clone(),
                            "description" => k.description = want.description.clone(),
                            "enabled" => k.enabled = want.enabled,
                            "customer_id" => k.customer_id = want.customer_id.clone(),
                            "expire_time" => k.expire_time = expire_from(&want.expire_time),
                            "tags" => k.tags = want.tags.clone().into_iter().collect(),
                            _ => {}
                        }
                    }
                    Ok(())
                },
                now(),
            )
            .await?;
        tracing::info!(key = %key.name, fields = ?paths, "API key updated");
        Ok(Response::new(key_to(&key)))
    }

    async fn delete_api_key(&self, req: Request<pb::DeleteApiKeyRequest>) -> Res<()> {
        require_write(&req, "DeleteApiKey")?;
        let req = req.into_inner();
        self.registry.delete_key(&req.key).await?;
        tracing::info!(key = %req.key, "API key deleted");
        Ok(Response::new(()))
    }

    async fn rotate_api_key(
        &self,
        req: Request<pb::RotateApiKeyRequest>,
    ) -> Res<pb::CreateApiKeyResponse> {
        require_write(&req, "RotateApiKey")?;
        let req = req.into_inner();
        let grace = match req.grace_period {
            None => 0,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Error::invalid("grace_period", "must not be negative").into())
            }
            Some(d) => d.seconds + i64::from(d.nanos > 0),
        };
        let value = (!req.value.is_empty()).then_some(req.value);
        let (key, value) = self
            .registry
            .rotate_key(&req.key, grace, value, now())
            .await?;
        tracing::info!(key = %key.name, grace_secs = grace, "API key rotated");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(key_to(&key)),
            value,
        }))
    }

    async fn import_api_keys(
        &self,
        req: Request<pb::ImportApiKeysRequest>,
    ) -> Res<pb::ImportApiKeysResponse> {
        require_write(&req, "ImportApiKeys")?;
        let req = req.into_inner();
        let (rows, warnings) = registry::parse_import_csv(&req.csv)?;
        let (ids, warnings) = self
            .registry
            .import_keys(rows, warnings, req.fail_on_warnings, now())
            .await?;
        tracing::info!(
            imported = ids.len(),
            warnings = warnings.len(),
            "API keys imported"
        );
        Ok(Response::new(pb::ImportApiKeysResponse { ids, warnings }))
    }

    async fn create_usage_plan_key(
        &self,
        req: Request<pb::CreateUsagePlanKeyRequest>,
    ) -> Res<pb::UsagePlanKey> {
        require_write(&req, "CreateUsagePlanKey")?;
        let req = req.into_inner();
        let (p, k) = self.registry.bind(&req.plan, &req.key, now()).await?;
        tracing::info!(plan = %p.name, key = %k.name, "key bound to plan");
        Ok(Response::new(pb::UsagePlanKey {
            usage_plan_id: p.id,
            key_id: k.id,
            key_name: k.name,
        }))
    }

    async fn delete_usage_plan_key(&self, req: Request<pb::DeleteUsagePlanKeyRequest>) -> Res<()> {
        require_write(&req, "DeleteUsagePlanKey")?;
        let req = req.into_inner();
        self.registry.unbind(&req.plan, &req.key, now()).await?;
        tracing::info!(plan = %req.plan, key = %req.key, "key unbound from plan");
        Ok(Response::new(()))
    }

    async fn list_usage_plan_keys(
        &self,
        req: Request<pb::ListUsagePlanKeysRequest>,
    ) -> Res<pb::ListUsagePlanKeysResponse> {
        let req = req.into_inner();
        model::reference("plan", &req.plan)?;
        let cat = self.registry.catalog();
        let p = cat.plan(&req.plan).ok_or_else(|| Error::NotFound {
            kind: "usage plan",
            id: req.plan.clone(),
        })?;
        let id = p.plan.id.clone();
        let items = cat.keys_by_name().filter(|k| k.plan_ids.contains(&id));
        let (items, next) = page(
            items,
            |k| k.name.as_str(),
            req.page_size,
            &req.page_token,
            &["ListUsagePlanKeys", &id],
        )?;
        Ok(Response::new(pb::ListUsagePlanKeysResponse {
            keys: items
                .iter()
                .map(|k| pb::UsagePlanKey {
                    usage_plan_id: id.clone(),
                    key_id: k.id.clone(),
                    key_name: k.name.clone(),
                })
                .collect(),
            next_page_token: next,
        }))
    }

    async fn get_usage(&self, req: Request<pb::GetUsageRequest>) -> Res<pb::Usage> {
        let req = req.into_inner();
        let start = period::parse_date("start_date", &req.start_date)
            .map_err(|m| invalid_msg("start_date", m))?;
        let end = period::parse_date("end_date", &req.end_date)
            .map_err(|m| invalid_msg("end_date", m))?;
        if end < start {
            return Err(Error::invalid("end_date", "must not be before start_date").into());
        }
        let span_days = (end - start).get_days() + 1;
        if span_days > MAX_USAGE_DAYS {
            return Err(Error::invalid(
                "end_date",
                format!("at most {MAX_USAGE_DAYS} days per call"),
            )
            .into());
        }
        let dates: Vec<jiff::civil::Date> = start
            .series(jiff::Span::new().days(1))
            .take_while(|d| *d <= end)
            .collect();
        model::reference("plan", &req.plan)?;
        let cat = self.registry.catalog();
        let plan = cat
            .plan(&req.plan)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "usage plan",
                id: req.plan.clone(),
            })?;
        let keys: Vec<Arc<model::ApiKey>> = if req.key.is_empty() {
            cat.keys_by_name()
                .filter(|k| k.plan_ids.contains(&plan.plan.id))
                .cloned()
                .collect()
        } else {
            vec![self.plan_key(&req.plan, &req.key)?.1]
        };
        let (keys, next) = page(
            keys.into_iter(),
            |k| k.name.as_str(),
            req.page_size,
            &req.page_token,
            &[
                "GetUsage",
                &plan.plan.id,
                &req.key,
                &req.start_date,
                &req.end_date,
            ],
        )?;
        let mut items = Vec::with_capacity(keys.len());
        for k in &keys {
            items.push(self.key_usage(&plan, k, &dates).await?);
        }
        Ok(Response::new(pb::Usage {
            usage_plan_id: plan.plan.id.clone(),
            start_date: start.to_string(),
            end_date: end.to_string(),
            items,
            next_page_token: next,
        }))
    }

    async fn get_price_table(
        &self,
        _req: Request<pb::GetPriceTableRequest>,
    ) -> Res<pb::PriceTable> {
        let cat = self.registry.catalog();
        Ok(Response::new(price_table_to(cat.shared_prices())))
    }

    async fn update_price_table(
        &self,
        req: Request<pb::UpdatePriceTableRequest>,
    ) -> Res<pb::PriceTable> {
        require_write(&req, "UpdatePriceTable")?;
        let req = req.into_inner();
        let table = required("price_table", req.price_table.as_ref())?;
        let prices = prices_from(&table.prices)?;
        let prices = self.registry.set_shared_prices(prices).await?;
        tracing::info!(models = prices.len(), "shared price table updated");
        Ok(Response::new(price_table_to(&prices)))
    }

    async fn update_usage(&self, req: Request<pb::UpdateUsageRequest>) -> Res<pb::KeyUsage> {
        require_write(&req, "UpdateUsage")?;
        let req = req.into_inner();
        if req.remaining < 0 {
            return Err(Error::invalid(
                "remaining",
                format!("must be >= 0, got {}", req.remaining),
            )
            .into());
        }
        let (plan, key) = self.plan_key(&req.plan, &req.key)?;
        let Some(q) = &plan.plan.quota else {
            return Err(Error::FailedPrecondition(format!(
                "usage plan {:?} has no quota",
                plan.plan.name
            ))
            .into());
        };
        let t = now();
        let state = self
            .limiter
            .quota_state(&plan, &key.id, t)
            .await
            .map_err(super::status::from_storage)?
            .ok_or_else(|| Error::FailedPrecondition("usage plan has no quota".into()))?;
        // remaining = limit + extra - used  =>  extra = remaining + used - limit
        let extra = i128::from(req.remaining) + i128::from(state.used) - i128::from(q.limit);
        let extra =
            i64::try_from(extra).map_err(|_| Error::invalid("remaining", "out of range"))?;
        let prune_before = t - i64::from(self.retention_days) * 86_400 - 31 * 86_400;
        self.registry
            .set_grant(
                &plan.plan.id,
                &key.id,
                state.period.start,
                extra,
                prune_before,
            )
            .await?;
        tracing::info!(plan = %plan.plan.name, key = %key.name, remaining = req.remaining, "quota remaining set");
        let cal = plan.calendar.as_ref().map(|c| c.date_of(t));
        let dates: Vec<jiff::civil::Date> = cal.into_iter().collect();
        let plan = self
            .registry
            .catalog()
            .plan(&plan.plan.id)
            .cloned()
            .unwrap_or(plan);
        Ok(Response::new(self.key_usage(&plan, &key, &dates).await?))
    }
}

fn invalid_msg(field: &str, msg: String) -> Error {
    // parse_date's message already starts with the field name.
    let msg = msg
        .strip_prefix(&format!("{field}: "))
        .map(str::to_owned)
        .unwrap_or(msg);
    Error::invalid(field, msg)
}
