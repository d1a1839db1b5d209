//! The application service: one config snapshot, one counter store, and the
//! engine between them. Async, but knows nothing about tonic or prost; the
//! server, tests and benches all drive it.
//!
//! ```
//! use sluice::{config, engine::{Code, Descriptor, Entry, Request}, limiter::RateLimiter,
//!              storage::memory::MemoryCounters};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let limiter = RateLimiter::new(config::embedded_default().unwrap(), MemoryCounters::default());
//! let req = Request {
//!     domain: "llm-gateway".into(),
//!     descriptors: vec![Descriptor { entries: vec![Entry::new("remote_address", "10.0.0.1")], ..Default::default() }],
//!     hits_addend: 0,
//! };
//! let decision = limiter.should_rate_limit(&req, 1_000).await.unwrap();
//! assert_eq!(decision.overall, Code::Ok);
//! assert_eq!(decision.statuses[0].remaining, 9); // 10 per second
//! # });
//! ```

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use smallvec::{smallvec, SmallVec};

use crate::config::{self, Config};
use crate::engine::{self, Code, Decision, Entry, Reason, Request, Slot, Status};
use crate::plans::catalog::{Catalog, CompiledPlan, Resolved};
use crate::plans::decide as pd;
use crate::plans::model::ApiKey;
use crate::plans::model::{Metric, UsageLimit};
use crate::plans::usage::{self, ModelMetric, Usage};
use crate::plans::{bucket, period};
use crate::storage::buckets::Buckets;
use crate::storage::{self, Cond, CounterOp, CounterStore};

/// Default days of daily usage history kept per key.
pub const DEFAULT_USAGE_RETENTION_DAYS: u32 = 90;

/// Decides requests against the current config, the plan catalog and a
/// counter store.
#[derive(Debug)]
pub struct RateLimiter<S> {
    config: ArcSwap<Config>,
    store: S,
    catalog: Arc<ArcSwap<Catalog>>,
    buckets: Buckets,
    retention_days: u32,
    reservations: std::sync::Mutex<std::collections::HashMap<String, Reservation>>,
}

/// A reservation waiting to be settled.
#[derive(Debug)]
struct Reservation {
    reserved: Vec<Reserved>,
    /// The estimate held, also in the per-model usage rows (a reservation
    /// never settled stays there at its estimate, as in the limits).
    estimate: Usage,
    /// Where the settled tokens and spend are recorded per model:
    /// (plan id, key id, model, day start, counter expiry, price).
    usage_at: Option<(
        String,
        String,
        String,
        i64,
        u64,
        Option<crate::plans::model::Price>,
    )>,
    /// Unix second from which it is settled at its estimate (dropped).
    expires_at: i64,
    /// Settled: kept (empty) until `expires_at`, so a retried Settle is
    /// told it was settled rather than that the id is unknown.
    settled: bool,
}

/// Why a usage call (ReportUsage, Reserve, Settle) cannot be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// No plan governs this domain and stage.
    #[error("no usage plan governs domain {domain:?} stage {stage:?}")]
    NotGoverned {
        /// The domain.
        domain: String,
        /// The stage.
        stage: String,
    },
    /// The key is unknown, disabled, expired or has no plan here.
    #[error("invalid API key: {0}")]
    InvalidKey(crate::plans::catalog::Refusal),
    /// No such reservation (never made, settled, or expired: an expired
    /// reservation stays charged at its estimate).
    #[error("unknown or expired reservation {0:?} (an expired reservation stays charged at its estimate)")]
    UnknownReservation(String),
    /// The reservation was settled already (a retried Settle): nothing
    /// more is counted.
    #[error("reservation {0:?} is already settled; this Settle counted nothing")]
    AlreadySettled(String),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

/// The result of ReportUsage.
#[derive(Debug)]
pub struct ReportResult {
    /// The request id was reported before: nothing was counted.
    pub duplicate: bool,
    /// The state of the plan's limits after the report.
    pub states: Vec<LimitState<'static>>,
}

/// The result of Reserve.
#[derive(Debug)]
pub struct ReserveResult {
    /// The decision.
    pub status: Status,
    /// The reservation id, when allowed.
    pub id: Option<String>,
    /// The state of the plan's limits.
    pub states: Vec<LimitState<'static>>,
    /// Headers for the client (the plan's style).
    pub headers: engine::Headers,
}

/// One day of a key's usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DayUsage {
    /// The local date.
    pub date: jiff::civil::Date,
    /// Hits allowed that day.
    pub used: u64,
    /// Quota left at the end of that day (now, for today); `None` without a
    /// quota, and for days after today.
    pub remaining: Option<u64>,
}

/// The live state of a key's quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaState {
    /// The current period.
    pub period: period::Span,
    /// Hits counted in it.
    pub used: u64,
    /// The period's limit including grants.
    pub limit: u64,
    /// The grant stored for this period.
    pub grant: i64,
}

/// The live state of a key's limits in a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveUsage {
    /// The quota, if the plan has one.
    pub quota: Option<QuotaState>,
    /// Tokens in the plan throttle's bucket and its capacity, if it has one.
    pub throttle: Option<(f64, u32)>,
}

impl<S: CounterStore> RateLimiter<S> {
    /// A limiter over `config` and `store`, with no plans.
    pub fn new(config: Config, store: S) -> Self {
        RateLimiter {
            config: ArcSwap::from_pointee(config),
            store,
            catalog: Arc::default(),
            buckets: Buckets::default(),
            retention_days: DEFAULT_USAGE_RETENTION_DAYS,
            reservations: std::sync::Mutex::default(),
        }
    }

    /// Decides plan-governed descriptors against `catalog` (the registry's
    /// handle: admin writes swap a new snapshot in).
    pub fn with_plans(mut self, catalog: Arc<ArcSwap<Catalog>>) -> Self {
        self.catalog = catalog;
        self
    }

    /// Keeps daily usage for `days` days (default 90).
    pub fn with_usage_retention(mut self, days: u32) -> Self {
        self.retention_days = days;
        self
    }

    /// The plan catalog in force.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Replaces the config; the next decision uses it.
    pub fn set_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The counter store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Decides a validated request at `now` (Unix seconds).
    ///
    /// # Errors
    /// The store's error, if it could not count (durable mode only).
    pub async fn should_rate_limit(
        &self,
        req: &Request,
        now: u64,
    ) -> Result<Decision, storage::Error> {
        self.decide(
            req,
            i64::try_from(now)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000),
        )
        .await
    }

    /// Decides a validated request at `now_us` (Unix microseconds; token
    /// buckets need sub-second time). Descriptors that a usage plan governs
    /// (the domain is a plan stage and the descriptor carries the stage's key
    /// entry) are decided against the key's plan; the rest against the
    /// config rules.
    ///
    /// # Errors
    /// The store's error, if it could not count (durable mode only).
    pub async fn decide(&self, req: &Request, now_us: i64) -> Result<Decision, storage::Error> {
        let mut wrote = false;
        let decision = self.decide_now(req, now_us, &mut wrote)?;
        if wrote {
            self.store.commit().await?;
        }
        Ok(decision)
    }

    /// The whole decision without awaiting: every update is applied to the
    /// store at once and `wrote` says whether any changed a counter (the
    /// caller then commits before it answers). No await means no large
    /// future to build and move per call, and one durability wait per
    /// decision however many updates it made.
    fn decide_now(
        &self,
        req: &Request,
        now_us: i64,
        wrote: &mut bool,
    ) -> Result<Decision, storage::Error> {
        let now = u64::try_from(now_us.div_euclid(1_000_000)).unwrap_or(0);
        let cat = self.catalog.load();
        if cat.governs(&req.domain) {
            self.decide_governed(&cat, req, now_us, wrote)
        } else {
            drop(cat);
            self.decide_rules(req, now, wrote)
        }
    }

    /// [`decide_now`](Self::decide_now) for a domain a plan governs.
    fn decide_governed(
        &self,
        cat: &Catalog,
        req: &Request,
        now_us: i64,
        wrote: &mut bool,
    ) -> Result<Decision, storage::Error> {
        let now = u64::try_from(now_us.div_euclid(1_000_000)).unwrap_or(0);
        let now_s = now_us.div_euclid(1_000_000);
        let mut plan_statuses: SmallVec<[Option<Status>; 4]> =
            SmallVec::with_capacity(req.descriptors.len());
        let mut rest = Vec::new();
        // A request is decided once per key: Envoy sends one descriptor per
        // `rate_limits` entry, and several may carry the same key. Those
        // descriptors form one group: one token, one quota unit, one status.
        let mut groups: SmallVec<[Group<'_>; 2]> = SmallVec::new();
        for (i, d) in req.descriptors.iter().enumerate() {
            let status = match cat.resolve(&req.domain, &d.entries, now_s) {
                Resolved::NotGoverned => {
                    rest.push(d.clone());
                    None
                }
                Resolved::Refused(why) => {
                    tracing::debug!(?why, "API key refused");
                    Some(invalid_key())
                }
                Resolved::Governed {
                    plan,
                    stage,
                    key,
                    lapsed,
                } => {
                    let default = plan.plan.stages[stage].default_usage.as_str();
                    let kind = match d.entries.iter().find(|e| e.key == USAGE_ENTRY) {
                        Some(e) => Kind::Usage(e.value.as_str()),
                        None if default.is_empty() => Kind::Requests,
                        // A stage with a default usage kind (Envoy AI
                        // Gateway sends the same descriptor at request time
                        // with hits 0 and after the response with the
                        // tokens): hits 0 is the request-time check, which
                        // counts the request itself.
                        None if d.hits(req.hits_addend) == 0 => Kind::Check,
                        None => Kind::Usage(default),
                    };
                    // A disabled or expired key makes no new requests; the
                    // usage of one it made before still counts.
                    if let (Some(why), Kind::Requests | Kind::Check | Kind::Usage("requests")) =
                        (lapsed, kind)
                    {
                        tracing::debug!(?why, "API key refused");
                        plan_statuses.push(Some(invalid_key()));
                        continue;
                    }
                    match groups
                        .iter_mut()
                        .find(|g| g.0.plan.id == plan.plan.id && g.2.id == key.id && g.3 == kind)
                    {
                        Some(g) => g.4.push(i),
                        None => groups.push((plan, stage, key, kind, smallvec![i])),
                    }
                    None
                }
            };
            plan_statuses.push(status);
        }
        let mut states = States::new();
        let mut style = None;
        for (plan, stage, key, kind, members) in groups {
            let first = &req.descriptors[members[0]];
            let hits = first.hits(req.hits_addend);
            let call = match kind {
                Kind::Requests | Kind::Usage("requests") => Some(Call::Request { hits }),
                Kind::Check => Some(Call::Request { hits: 1 }),
                // A charge above the per-call maximum is refused as invalid
                // and counts nothing, as in ReportUsage.
                Kind::Usage(k) => Usage::from_kind(k, hits)
                    .filter(|_| hits <= usage::MAX_TOKENS_PER_CALL)
                    .map(|usage| Call::Charge {
                        usage,
                        dedupe: None,
                    }),
            };
            let mut out = CallOutcome::default();
            let status = match call {
                None => {
                    tracing::debug!(
                        ?kind,
                        hits,
                        "unknown usage kind, or a charge over the maximum"
                    );
                    Status {
                        reset_in: None,
                        ..refusal(None, 0, Reason::InvalidRequest)
                    }
                }
                Some(call) if members.len() == 1 => self.decide_plan(
                    cat,
                    plan,
                    stage,
                    key,
                    &first.entries,
                    call,
                    now_us,
                    &mut states,
                    &mut out,
                    wrote,
                )?,
                Some(call) => {
                    // The method and path may come from any descriptor of the group.
                    let entries: Vec<Entry> = members
                        .iter()
                        .flat_map(|&i| req.descriptors[i].entries.iter().cloned())
                        .collect();
                    self.decide_plan(
                        cat,
                        plan,
                        stage,
                        key,
                        &entries,
                        call,
                        now_us,
                        &mut states,
                        &mut out,
                        wrote,
                    )?
                }
            };
            style.get_or_insert(plan.plan.header_style);
            for &i in &members[1..] {
                plan_statuses[i] = Some(status.clone());
            }
            plan_statuses[members[0]] = Some(status);
        }
        // Statuses of governed descriptors are in place; the others get the
        // rule statuses, in order.
        // The rules' own overall code counts their quota-mode descriptors
        // together (engine::decide); a plan's refusal is never soft.
        let (rules_overall, rules) = if rest.is_empty() {
            (Code::Ok, Vec::new())
        } else {
            let sub = Request {
                domain: req.domain.clone(),
                descriptors: rest,
                hits_addend: req.hits_addend,
            };
            let d = self.decide_rules(&sub, now, wrote)?;
            (d.overall, d.statuses)
        };
        let plan_over = plan_statuses
            .iter()
            .flatten()
            .any(|s| s.code == Code::OverLimit);
        let mut rules = rules.into_iter();
        let statuses: Vec<Status> = plan_statuses
            .into_iter()
            .map(|s| s.or_else(|| rules.next()).unwrap_or(Status::NO_LIMIT))
            .collect();
        let overall = if plan_over || rules_overall == Code::OverLimit {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let retry_after = statuses
            .iter()
            .filter(|s| s.code == Code::OverLimit)
            .filter_map(|s| s.reset_in)
            .max();
        let headers = match style {
            Some(style) => crate::plans::headers::build(
                style,
                &states,
                overall == Code::OverLimit,
                retry_after,
            ),
            None => engine::Headers::default(),
        };
        Ok(Decision {
            overall,
            statuses,
            headers,
        })
    }

    fn decide_rules(
        &self,
        req: &Request,
        now: u64,
        wrote: &mut bool,
    ) -> Result<Decision, storage::Error> {
        let slots = self.config.load().rules.plan(req, now);
        let ops = counter_ops(&slots);
        let values = self.apply(&ops, wrote)?;
        Ok(engine::decide(&slots, &values, now))
    }

    /// Applies `ops` to the store now (nothing for none), noting in `wrote`
    /// whether any changes a counter.
    fn apply(
        &self,
        ops: &[CounterOp<'_>],
        wrote: &mut bool,
    ) -> Result<storage::Values, storage::Error> {
        if ops.is_empty() {
            return Ok(storage::Values::new());
        }
        *wrote |= ops.iter().any(|o| o.hits > 0);
        self.store.apply(ops)
    }

    /// Counts per-model usage whose counters do not exist yet (a model's
    /// first use by the key that day): the counters are created while the
    /// key has at most [`usage::MAX_MODEL_COUNTERS_PER_DAY`] that day;
    /// past it, the usage is counted under [`usage::OTHER_MODEL`] instead.
    fn count_new_models(
        &self,
        plan_id: &str,
        key_id: &str,
        day_start: i64,
        expires_at: u64,
        new: &[(&[u8], u64, ModelMetric)],
        wrote: &mut bool,
    ) -> Result<(), storage::Error> {
        let count_key = usage::model_count_key(plan_id, key_id, day_start);
        let mut ops: SmallVec<[CounterOp<'_>; 5]> = SmallVec::new();
        ops.push(
            CounterOp::new(&count_key, new.len() as u64, expires_at)
                .when(Cond::Cap(usage::MAX_MODEL_COUNTERS_PER_DAY)),
        );
        // Created only if the count took them (a chain: each applied op
        // lets the next one apply).
        ops.extend(
            new.iter()
                .map(|(key, v, _)| CounterOp::new(key, *v, expires_at).when(Cond::IfPrevApplied)),
        );
        let values = self.apply(&ops, wrote)?;
        if values[0] <= usage::MAX_MODEL_COUNTERS_PER_DAY {
            return Ok(());
        }
        let other: SmallVec<[Vec<u8>; 4]> = new
            .iter()
            .map(|(_, _, m)| {
                usage::model_usage_key(plan_id, key_id, day_start, *m, usage::OTHER_MODEL)
            })
            .collect();
        let ops: SmallVec<[CounterOp<'_>; 4]> = other
            .iter()
            .zip(new)
            .map(|(key, (_, v, _))| CounterOp::new(key, *v, expires_at))
            .collect();
        self.apply(&ops, wrote)?;
        Ok(())
    }

    /// One plan-governed group of descriptors (one key, one usage kind).
    ///
    /// A request (no `usage` entry, or `usage=requests`): the throttle
    /// (per-method, else plan), then the quota and the request limits, which
    /// count only calls they allow; token and spend limits are checked (a
    /// spent budget refuses). `hits` 0 checks everything and counts nothing.
    ///
    /// A charge (`usage` = `input_tokens`, `output_tokens`, `total_tokens`,
    /// e.g. Envoy's `apply_on_stream_done` call): the tokens are counted in
    /// every token and spend limit, whatever the limits say (they were
    /// spent); the status says whether the limits are now exceeded.
    #[allow(clippy::too_many_arguments)]
    fn decide_plan<'p>(
        &self,
        cat: &Catalog,
        plan: &'p CompiledPlan,
        stage: usize,
        key: &ApiKey,
        entries: &[Entry],
        call: Call,
        now_us: i64,
        states: &mut States<'p>,
        out: &mut CallOutcome,
        wrote: &mut bool,
    ) -> Result<Status, storage::Error> {
        let p = &plan.plan;
        let now_s = now_us.div_euclid(1_000_000);
        let entry = |name: &str| {
            entries
                .iter()
                .find(|e| e.key == name)
                .map(|e| e.value.as_str())
        };
        let model = entry(&p.stages[stage].model_entry);
        let reserve = matches!(call, Call::Reserve { .. });
        let (charge, hits, usage, dedupe) = match call {
            Call::Request { hits } => (
                false,
                hits,
                Usage {
                    requests: hits,
                    ..Usage::default()
                },
                None,
            ),
            Call::Reserve { estimate } => (
                false,
                1,
                Usage {
                    requests: 1,
                    ..estimate
                },
                None,
            ),
            Call::Charge { usage, dedupe } => (true, 0, usage, dedupe),
        };

        // Every counter and bucket key of the call, one after the other: one
        // allocation for all of them. Keys are ranges into it.
        let mut arena: Vec<u8> = Vec::with_capacity(512);

        // 1. The throttle (requests only).
        let mut throttle_state: Option<usize> = None;
        let mut throttled: Option<(
            Range<usize>,
            &crate::plans::model::Throttle,
            bucket::Outcome,
            &Arc<engine::Limit>,
        )> = None;
        if !charge {
            if let Some((t, method, limit)) = pd::select_throttle(plan, stage, entries) {
                let bkey = pd::push_key(&mut arena, |b| {
                    pd::bucket_key_into(b, &p.id, &key.id, method.map(|m| (stage, m)));
                });
                let outcome = self.buckets.update(&arena[bkey.clone()], |s| {
                    bucket::take(s, t, hits, now_us, p.update_time)
                });
                throttle_state = Some(states.len());
                states.push(LimitState::throttle(
                    limit,
                    t,
                    outcome.remaining,
                    outcome.reset_in.map(pd::ceil_secs),
                ));
                if !outcome.allowed {
                    let reset = outcome.reset_in.map_or(u64::from(u32::MAX), pd::ceil_secs);
                    return Ok(refusal(Some(limit.clone()), reset, Reason::Throttled));
                }
                throttled = Some((bkey, t, outcome, limit));
            }
        }

        // 2. Counters: quota (+ daily usage) and usage limits, in one call.
        let retention = i64::from(self.retention_days) * 86_400;
        // The quota and daily usage counters' keys.
        let mut keys: SmallVec<[Range<usize>; 2]> = SmallVec::new();
        let mut quota_at = None;
        let quota = match (&p.quota, &plan.calendar, charge) {
            (Some(q), Some(cal), false) => {
                let span = cal.containing(now_s);
                let day = cal.day_containing(now_s);
                let effective = pd::effective_quota(q.limit, cat.grant(&p.id, &key.id, span.start));
                keys.push(pd::push_key(&mut arena, |b| {
                    pd::quota_key_into(b, &p.id, &key.id, span.start);
                }));
                keys.push(pd::push_key(&mut arena, |b| {
                    pd::daily_key_into(b, &p.id, &key.id, day.start);
                }));
                Some((q, span, day, effective))
            }
            _ => None,
        };
        // A call without a model is priced as the model "": only a
        // catch-all pattern (`*`) prices it.
        let price = {
            let m = model.unwrap_or("");
            usage::price_for(&p.prices, m)
                .or_else(|| usage::price_for(cat.shared_prices(), m))
                .copied()
        };
        let price = price.as_ref();
        let mut plans: SmallVec<[LimitPlan<'_>; 4]> = SmallVec::new();
        for (i, l) in p.limits.iter().enumerate() {
            let (pattern, lim) = usage::model_limit(l, model);
            let cal = plan.limit_calendars.get(i).and_then(Option::as_ref);
            let span = usage::window(l, cal, now_s);
            let scope = usage::scope_id(l, &key.id, &key.customer_id);
            let amount = if usage::touches(l, &usage) {
                usage::amount(l, &usage, price)
            } else {
                0
            };
            let prefix = &plan.limit_key_prefixes[i];
            let counter = pd::push_key(&mut arena, |b| {
                usage::counter_key_from_prefix_into(b, prefix, scope, pattern, span.start);
            });
            let prev = l.window.sliding_secs().map(|len| {
                (
                    pd::push_key(&mut arena, |b| {
                        usage::counter_key_from_prefix_into(
                            b,
                            prefix,
                            scope,
                            pattern,
                            span.start - len,
                        );
                    }),
                    usage::previous_weight_ppm(now_s, len),
                )
            });
            plans.push(LimitPlan {
                limit: l,
                report: plan.limit_report(i, pattern),
                lim,
                span,
                amount,
                counter,
                prev,
                prev_value: 0,
                prev_share: 0,
            });
        }
        // Sliding limits need the previous window's counter: before the
        // call's own ops when one of them is capped by it (a request that
        // adds to a sliding limit), else read with them, in the same store
        // call (a request's token limits, a charge).
        let prev_idx: SmallVec<[usize; 4]> = (0..plans.len())
            .filter(|&i| plans[i].prev.is_some())
            .collect();
        let peek_first = !charge && prev_idx.iter().any(|&i| plans[i].amount > 0);
        if peek_first {
            let values = {
                let peeks: SmallVec<[CounterOp<'_>; 4]> = prev_idx
                    .iter()
                    .filter_map(|&i| {
                        plans[i]
                            .prev
                            .as_ref()
                            .map(|(k, _)| CounterOp::new(&arena[k.clone()], 0, 0))
                    })
                    .collect();
                self.apply(&peeks, wrote)?
            };
            set_previous(&mut plans, &prev_idx, &values);
        }
        // The usage day (the quota calendar's, else the UTC day) of the daily
        // and per-model usage counters that GetUsage reads.
        let (day_start, day_end) = match (&quota, &plan.calendar) {
            (Some((_, _, d, _)), _) => (d.start, d.end),
            (None, Some(c)) => {
                let d = c.day_containing(now_s);
                (d.start, d.end)
            }
            (None, None) => {
                let d = now_s - now_s.rem_euclid(86_400);
                (d, d + 86_400)
            }
        };
        // Per-model daily usage: requests when counted, tokens and spend
        // when charged.
        let model_name = match model {
            Some(m) if m.len() > usage::MAX_MODEL_NAME => usage::OTHER_MODEL,
            m => m.unwrap_or(""),
        };
        let mut model_ops: SmallVec<[(Range<usize>, u64, ModelMetric); 4]> = SmallVec::new();
        {
            let mut model_op = |m: ModelMetric, v: u64| {
                if v > 0 {
                    let r = pd::push_key(&mut arena, |b| {
                        usage::model_usage_key_into(b, &p.id, &key.id, day_start, m, model_name);
                    });
                    model_ops.push((r, v, m));
                }
            };
            let spend = |u: &Usage| price.map_or(0, |pr| usage::spend(u, pr));
            if charge {
                model_op(ModelMetric::Input, usage.input);
                model_op(ModelMetric::Output, usage.output);
                model_op(ModelMetric::Total, usage.total_only);
                model_op(ModelMetric::Spend, spend(&usage));
            } else if hits > 0 {
                model_op(ModelMetric::Requests, hits);
                if reserve {
                    // The estimate is held in the per-model rows too, as in
                    // the limits (Settle corrects both; an expired
                    // reservation stays in both at its estimate).
                    model_op(ModelMetric::Input, usage.input);
                    model_op(ModelMetric::Output, usage.output);
                    model_op(ModelMetric::Spend, spend(&usage));
                }
            }
        }
        if quota.is_none() && !charge && hits > 0 {
            // No quota: still keep daily usage for GetUsage.
            keys.push(pd::push_key(&mut arena, |b| {
                pd::daily_key_into(b, &p.id, &key.id, day_start);
            }));
        }
        // Every key is in; from here on they are read only.
        let arena: &[u8] = &arena;
        let k = |r: &Range<usize>| &arena[r.clone()];
        // Declared after what its operations borrow (keys, model_ops).
        let mut ops: SmallVec<[CounterOp<'_>; 8]> = SmallVec::new();
        if let Some((_, span, day, effective)) = &quota {
            ops.push(
                CounterOp::new(k(&keys[0]), hits, expiry(span.end)).when(Cond::Cap(*effective)),
            );
            ops.push(
                CounterOp::new(k(&keys[1]), hits, expiry(day.end.saturating_add(retention)))
                    .when(Cond::IfPrevApplied),
            );
            quota_at = Some(0);
        } else if let Some(daily) = keys.first() {
            ops.push(CounterOp::new(
                k(daily),
                hits,
                expiry(day_end.saturating_add(retention)),
            ));
        }
        let dedupe_at = dedupe.as_ref().map(|k| {
            // Remember the request id for a day; the charges below apply
            // only if this is its first report.
            ops.push(CounterOp::new(k, 1, expiry(now_s + 86_400)).when(Cond::Cap(1)));
            ops.len() - 1
        });
        let first_limit_op = ops.len();
        for lp in &plans {
            // Sliding windows live two windows (the next one reads this one).
            let len = lp.span.end - lp.span.start;
            let exp = if usage::is_sliding(lp.limit.window) {
                lp.span.end + len
            } else {
                lp.span.end
            };
            let op = CounterOp::new(k(&lp.counter), lp.amount, expiry(exp));
            ops.push(if dedupe_at.is_some() {
                op.when(Cond::IfPrevApplied)
            } else if charge || lp.amount == 0 {
                op
            } else {
                op.when(Cond::Cap(lp.lim.saturating_sub(lp.prev_share)))
            });
        }
        let model_exp = expiry(day_end.saturating_add(retention));
        // Per-model counters are added to only where they exist; a model's
        // first use of the day creates its counters under the key's daily
        // cap (count_new_models). A charge with a request id adds them once
        // its id is known to be new (below).
        let first_model_op = ops.len();
        if dedupe_at.is_none() {
            for (key, v, _) in &model_ops {
                ops.push(CounterOp::new(k(key), *v, model_exp).when(Cond::IfExists));
            }
        }
        let first_peek_op = ops.len();
        if !peek_first {
            for &i in &prev_idx {
                if let Some((key, _)) = &plans[i].prev {
                    ops.push(CounterOp::new(k(key), 0, 0));
                }
            }
        }
        let values = self.apply(&ops, wrote)?;
        if !peek_first {
            set_previous(&mut plans, &prev_idx, &values[first_peek_op..]);
        }
        if let Some(i) = dedupe_at {
            if values[i] > 1 {
                out.duplicate = true;
            }
        }
        // The model ops whose counters do not exist yet (they report 0).
        let new_models: SmallVec<[(&[u8], u64, ModelMetric); 4]> = if dedupe_at.is_none() {
            model_ops
                .iter()
                .enumerate()
                .filter(|&(j, _)| values[first_model_op + j] == 0)
                .map(|(_, (key, v, m))| (k(key), *v, *m))
                .collect()
        } else if out.duplicate {
            SmallVec::new()
        } else {
            let adds: SmallVec<[CounterOp<'_>; 4]> = model_ops
                .iter()
                .map(|(key, v, _)| CounterOp::new(k(key), *v, model_exp).when(Cond::IfExists))
                .collect();
            let added = self.apply(&adds, wrote)?;
            model_ops
                .iter()
                .zip(added)
                .filter(|(_, value)| *value == 0)
                .map(|((key, v, m), _)| (k(key), *v, *m))
                .collect()
        };
        if charge && !new_models.is_empty() {
            // A charge counts whatever the limits say.
            self.count_new_models(&p.id, &key.id, day_start, model_exp, &new_models, wrote)?;
        }

        // 3. Judge.
        let mut refused: Option<Status> = None;
        let mut rollback: SmallVec<[CounterOp<'_>; 8]> = SmallVec::new();
        // States to give back their amount if the call is refused and rolled back.
        let mut restore: SmallVec<[(usize, u64); 6]> = SmallVec::new();
        // What each allowing limit reports: (remaining, reset in, limit). The
        // answer names the one with the least left; its status is built once,
        // at the end (no reference counting for the others).
        let granted_quota;
        let mut oks: SmallVec<[(u32, u64, &Arc<engine::Limit>); 6]> = SmallVec::new();
        if let (Some(i), Some((q, span, _, effective))) = (quota_at, &quota) {
            let used = values[i];
            let limit = match &plan.quota_limit {
                Some(l) if *effective == q.limit => l,
                _ => {
                    granted_quota = pd::quota_limit(&p.name, q, *effective);
                    &granted_quota
                }
            };
            let reset_in = u64::try_from(span.end - now_s).unwrap_or(0);
            // The plan's quota name (a plan with a quota has its limit),
            // whatever grant applies.
            let name = plan.quota_limit.as_ref().and_then(|l| l.name.as_deref());
            states.push(LimitState::requests(
                limit,
                *effective,
                name.unwrap_or_default(),
                effective.saturating_sub(used.min(*effective)),
                Some(reset_in),
            ));
            if pd::quota_allows(used, hits, *effective) {
                if hits > 0 {
                    rollback.push(CounterOp::new(k(&keys[0]), hits, 0).when(Cond::Sub));
                    rollback.push(CounterOp::new(k(&keys[1]), hits, 0).when(Cond::Sub));
                    restore.push((states.len() - 1, hits));
                }
                oks.push((status_remaining(effective - used), reset_in, limit));
            } else {
                refused = Some(refusal(
                    Some(limit.clone()),
                    reset_in,
                    Reason::QuotaExceeded,
                ));
            }
        }
        for (j, lp) in plans.iter().enumerate() {
            let value = values[first_limit_op + j];
            let customer = lp.limit.scope == crate::plans::model::Scope::Customer;
            let reason = match lp.limit.metric {
                Metric::Requests => Reason::RequestLimit { customer },
                Metric::Tokens => Reason::TokenLimit { customer },
                Metric::Spend => Reason::BudgetExceeded { customer },
            };
            let reset_in = u64::try_from(lp.span.end - now_s).unwrap_or(0);
            let limit = lp.report;
            // Usage "now": the counter (after this call's add, if applied) plus the sliding share.
            let would = value.saturating_add(lp.prev_share);
            let (allowed, used_now) = if charge {
                (would <= lp.lim, would)
            } else if lp.amount > 0 {
                (
                    would <= lp.lim,
                    if would <= lp.lim {
                        would
                    } else {
                        would - lp.amount
                    },
                )
            } else {
                // A check: passes while at least one unit is left.
                (would < lp.lim, would)
            };
            let remaining = lp.lim.saturating_sub(used_now);
            // When the limit is back to full, as clients read a reset
            // (OpenAI's "time until the limit resets to its initial
            // state"): for a sliding window not the current fixed window's
            // end, but once what is counted has slid out, one window later
            // if the current window counted anything.
            let full_in = match lp.limit.window.sliding_secs() {
                Some(len) if used_now > lp.prev_share => {
                    reset_in.saturating_add(u64::try_from(len).unwrap_or(0))
                }
                Some(_) if lp.prev_share > 0 => reset_in,
                Some(_) => 0,
                None => reset_in,
            };
            states.push(LimitState {
                name: Cow::Borrowed(limit.name.as_deref().unwrap_or_default()),
                metric: lp.limit.metric,
                limit: lp.lim,
                remaining,
                reset_in: Some(full_in),
                window: lp.span.end - lp.span.start,
            });
            if allowed {
                if !charge && lp.amount > 0 {
                    rollback.push(CounterOp::new(k(&lp.counter), lp.amount, 0).when(Cond::Sub));
                    restore.push((states.len() - 1, lp.amount));
                }
                oks.push((status_remaining(remaining), reset_in, limit));
            } else if refused.is_none() {
                let retry = match lp.limit.window.sliding_secs() {
                    Some(len) => {
                        let cur = if !charge && lp.amount > 0 {
                            value - lp.amount.min(value)
                        } else {
                            value
                        };
                        let need = if charge { 1 } else { lp.amount.max(1) };
                        usage::sliding_retry_after(
                            lp.prev_value,
                            cur,
                            need,
                            lp.lim,
                            now_s - lp.span.start,
                            len,
                        )
                    }
                    None => reset_in.max(1),
                };
                // A sliding window's counter resets at its end, but usage
                // comes back as the estimate slides: the client headers
                // (x-ratelimit-reset-*, RateLimit's t) say when the call
                // fits, as retry-after does.
                if let Some(st) = states.last_mut() {
                    st.reset_in = Some(retry);
                }
                refused = Some(refusal(Some(limit.clone()), retry, reason));
            }
        }
        if let Some(r) = refused {
            if !charge {
                // (An absent counter stays absent: a refused request
                // creates no per-model counter.)
                for (key, v, _) in &model_ops {
                    rollback.push(CounterOp::new(k(key), *v, 0).when(Cond::Sub));
                }
                // Without a quota the daily usage counter was counted
                // unconditionally: a refused call was not used.
                if quota.is_none() {
                    if let Some(daily) = keys.first() {
                        rollback.push(CounterOp::new(k(daily), hits, 0).when(Cond::Sub));
                    }
                }
                // Undo what this call counted, and give back its tokens.
                self.apply(&rollback, wrote)?;
                for (i, amount) in restore {
                    let st = &mut states[i];
                    st.remaining = st.remaining.saturating_add(amount).min(st.limit);
                }
                if let Some((bkey, t, _, _)) = &throttled {
                    if hits > 0 {
                        let full_at = self.buckets.update(k(bkey), |s| {
                            let s = s.unwrap_or_else(|| {
                                bucket::take(None, t, 0, now_us, p.update_time).0
                            });
                            let s = bucket::refund(s, t, hits, now_us, p.update_time);
                            (s, s.full_at)
                        });
                        if let Some(st) = throttle_state.and_then(|i| states.get_mut(i)) {
                            st.remaining = st.remaining.saturating_add(hits).min(st.limit);
                            // When the refunded bucket is full again (the
                            // IETF header's t), not when the taken one was.
                            st.reset_in = Some(pd::ceil_secs((full_at - now_us).max(0)));
                        }
                    }
                }
            }
            return Ok(r);
        }
        if !charge && !new_models.is_empty() {
            self.count_new_models(&p.id, &key.id, day_start, model_exp, &new_models, wrote)?;
        }
        if reserve {
            out.usage_day = Some((day_start, model_exp, price.copied()));
            for lp in &plans {
                // Every token and spend limit, 0 held included: settling
                // charges what the actual usage adds to each.
                if lp.limit.metric != Metric::Requests {
                    let len = lp.span.end - lp.span.start;
                    let exp = if usage::is_sliding(lp.limit.window) {
                        lp.span.end + len
                    } else {
                        lp.span.end
                    };
                    out.reserved.push(Reserved {
                        counter: k(&lp.counter).to_vec(),
                        limit: lp.limit.clone(),
                        price: price.copied(),
                        amount: lp.amount,
                        expires_at: expiry(exp),
                    });
                }
            }
        }
        // Report the binding limit: the one with the least left; the
        // throttle first, so a tie reports it.
        let throttle_ok = throttled.as_ref().map(|(_, _, o, limit)| {
            (
                status_remaining(o.remaining),
                o.reset_in.map_or(0, pd::ceil_secs),
                *limit,
            )
        });
        Ok(throttle_ok
            .into_iter()
            .chain(oks)
            .min_by_key(|(remaining, _, _)| *remaining)
            .map_or(Status::NO_LIMIT, |(remaining, reset_in, limit)| Status {
                code: Code::Ok,
                limit: Some(limit.clone()),
                remaining,
                reset_in: Some(reset_in),
                reason: None,
            }))
    }

    /// One plan call outside `ShouldRateLimit` (a usage report, a
    /// reservation): decided, then committed. Returns the status, the limit
    /// states and the call's outcome.
    #[allow(clippy::too_many_arguments)]
    async fn plan_call<'p>(
        &self,
        cat: &Catalog,
        plan: &'p CompiledPlan,
        stage: usize,
        key: &ApiKey,
        entries: &[Entry],
        call: Call,
        now_us: i64,
    ) -> Result<(Status, States<'p>, CallOutcome), storage::Error> {
        let mut states = States::new();
        let mut out = CallOutcome::default();
        let mut wrote = false;
        let status = self.decide_plan(
            cat,
            plan,
            stage,
            key,
            entries,
            call,
            now_us,
            &mut states,
            &mut out,
            &mut wrote,
        )?;
        if wrote {
            self.store.commit().await?;
        }
        Ok((status, states, out))
    }

    /// The live state of a key's quota in a plan at `now` (Unix seconds);
    /// `None` if the plan has no quota.
    ///
    /// # Errors
    /// The store's error.
    pub async fn quota_state(
        &self,
        plan: &CompiledPlan,
        key_id: &str,
        now: i64,
    ) -> Result<Option<QuotaState>, storage::Error> {
        let (Some(q), Some(cal)) = (&plan.plan.quota, &plan.calendar) else {
            return Ok(None);
        };
        let span = cal.containing(now);
        let qkey = pd::quota_key(&plan.plan.id, key_id, span.start);
        let used = self.store.add(&[CounterOp::new(&qkey, 0, 0)]).await?[0];
        let grant = self.catalog.load().grant(&plan.plan.id, key_id, span.start);
        Ok(Some(QuotaState {
            period: span,
            used,
            limit: pd::effective_quota(q.limit, grant),
            grant,
        }))
    }

    /// After a plan's quota calendar changed (its period, anchor day or time
    /// zone), or a quota was given to a plan without one (its calls were
    /// still counted per UTC day), rebuilds each key's count in the new
    /// current period, and in
    /// the new calendar's current day, from the key's daily usage counters
    /// (days of the old calendar, summed whole where they overlap: never
    /// less than was used), so the calls already made still count; the new
    /// counters only grow. Returns the keys' old-period grants to carry to
    /// the new period: `(key id, new period start, extra)`.
    ///
    /// # Errors
    /// The store's error.
    pub async fn carry_quota(
        &self,
        old: &crate::plans::model::Plan,
        new: &crate::plans::model::Plan,
        key_ids: &[String],
        now_s: i64,
    ) -> Result<Vec<(String, i64, i64)>, storage::Error> {
        let Some(nq) = &new.quota else {
            return Ok(Vec::new());
        };
        // Without a quota, daily usage is kept on UTC days.
        let old_cal = match &old.quota {
            Some(oq) => oq.calendar().ok(),
            None => {
                crate::plans::period::Calendar::new(crate::plans::period::Period::Day, 0, "UTC")
                    .ok()
            }
        };
        let (Some(old_cal), Ok(new_cal)) = (old_cal, nq.calendar()) else {
            return Ok(Vec::new());
        };
        let (old_span, new_span) = (old_cal.containing(now_s), new_cal.containing(now_s));
        let new_day = new_cal.day_containing(now_s);
        let retention = i64::from(self.retention_days) * 86_400;
        let cat = self.catalog.load();
        let mut grants = Vec::new();
        let mut wrote = false;
        for key_id in key_ids {
            // The old calendar's days back to the new period's start (a
            // month and a few days at most).
            let mut days = Vec::new();
            let mut day = old_cal.day_containing(now_s);
            for _ in 0..40 {
                if day.end <= new_span.start {
                    break;
                }
                days.push(day);
                day = old_cal.day_containing(day.start - 1);
            }
            let daily_keys: Vec<Vec<u8>> = days
                .iter()
                .map(|d| pd::daily_key(&new.id, key_id, d.start))
                .collect();
            let peeks: Vec<CounterOp<'_>> =
                daily_keys.iter().map(|k| CounterOp::new(k, 0, 0)).collect();
            let used = self.apply(&peeks, &mut wrote)?;
            let in_period: u64 = used.iter().fold(0, |a, v| a.saturating_add(*v));
            let today: u64 = days
                .iter()
                .zip(&used)
                .filter(|(d, _)| d.end > new_day.start)
                .fold(0, |a, (_, v)| a.saturating_add(*v));
            let qkey = pd::quota_key(&new.id, key_id, new_span.start);
            let dkey = pd::daily_key(&new.id, key_id, new_day.start);
            let have = self.apply(
                &[CounterOp::new(&qkey, 0, 0), CounterOp::new(&dkey, 0, 0)],
                &mut wrote,
            )?;
            let adds = [
                CounterOp::new(
                    &qkey,
                    in_period.saturating_sub(have[0]),
                    expiry(new_span.end),
                ),
                CounterOp::new(
                    &dkey,
                    today.saturating_sub(have[1]),
                    expiry(new_day.end.saturating_add(retention)),
                ),
            ];
            self.apply(&adds, &mut wrote)?;
            let extra = cat.grant(&new.id, key_id, old_span.start);
            if extra != 0 && new_span.start != old_span.start {
                grants.push((key_id.clone(), new_span.start, extra));
            }
        }
        if wrote {
            self.store.commit().await?;
        }
        Ok(grants)
    }

    /// A key's usage in a plan: per day for `dates` (local dates in the
    /// quota's time zone, UTC without a quota), and its live state at
    /// `now_us` (Unix microseconds).
    ///
    /// # Errors
    /// The store's error.
    pub async fn usage(
        &self,
        plan: &CompiledPlan,
        key_id: &str,
        dates: &[jiff::civil::Date],
        now_us: i64,
    ) -> Result<(Vec<DayUsage>, LiveUsage), storage::Error> {
        let now = now_us.div_euclid(1_000_000);
        let p = &plan.plan;
        let utc;
        let cal = match &plan.calendar {
            Some(c) => c,
            None => {
                utc = period::Calendar::new(period::Period::Day, 0, "UTC")
                    .expect("UTC with anchor 0 is a valid day calendar");
                &utc
            }
        };
        let day_used = |start: i64| {
            let k = pd::daily_key(&p.id, key_id, start);
            async move {
                self.store
                    .add(&[CounterOp::new(&k, 0, 0)])
                    .await
                    .map(|v| v[0])
            }
        };
        let mut days = Vec::with_capacity(dates.len());
        let mut cache: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
        for &date in dates {
            let span = cal.day_span(date);
            if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(span.start) {
                e.insert(day_used(span.start).await?);
            }
            let used = cache[&span.start];
            let remaining = match (&p.quota, &plan.calendar) {
                (Some(q), Some(c)) if span.start <= now => {
                    let period = c.containing(span.start);
                    let grant = self.catalog.load().grant(&p.id, key_id, period.start);
                    let limit = pd::effective_quota(q.limit, grant);
                    let mut sum = 0u64;
                    let mut day = c.day_containing(period.start);
                    while day.start <= span.start && day.start < period.end {
                        if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(day.start)
                        {
                            e.insert(day_used(day.start).await?);
                        }
                        sum = sum.saturating_add(cache[&day.start]);
                        day = c.day_containing(day.end);
                    }
                    Some(limit.saturating_sub(sum))
                }
                _ => None,
            };
            days.push(DayUsage {
                date,
                used,
                remaining,
            });
        }
        let quota = self.quota_state(plan, key_id, now).await?;
        let throttle = p.throttle.as_ref().map(|t| {
            let s = self.buckets.get(&pd::bucket_key(&p.id, key_id, None));
            // Whole millionths of a token: the nanosecond arithmetic's last
            // digits (2.000000000455) are noise to a reader.
            let tokens = (bucket::tokens_at(s, t, now_us, p.update_time) * 1e6).floor() / 1e6;
            (tokens, t.burst_limit)
        });
        Ok((days, LiveUsage { quota, throttle }))
    }

    /// The plan, stage and key a usage call names. `spent`: the call
    /// counts usage already spent (ReportUsage), which a disabled or
    /// expired key still may; otherwise (Reserve: a new request) it is
    /// refused.
    fn governed(
        &self,
        cat: &Catalog,
        domain: &str,
        stage: &str,
        api_key: &str,
        now_s: i64,
        spent: bool,
    ) -> Result<(Arc<CompiledPlan>, usize, Arc<ApiKey>), UsageError> {
        match cat.resolve_value(domain, stage, api_key, now_s) {
            Resolved::NotGoverned => Err(UsageError::NotGoverned {
                domain: domain.to_owned(),
                stage: stage.to_owned(),
            }),
            Resolved::Refused(r) => Err(UsageError::InvalidKey(r)),
            Resolved::Governed {
                lapsed: Some(r), ..
            } if !spent => Err(UsageError::InvalidKey(r)),
            Resolved::Governed {
                plan, stage, key, ..
            } => {
                let plan = cat
                    .plan(&plan.plan.id)
                    .cloned()
                    .ok_or(UsageError::InvalidKey(
                        crate::plans::catalog::Refusal::NoPlan,
                    ))?;
                let key = cat.key(&key.id).cloned().ok_or(UsageError::InvalidKey(
                    crate::plans::catalog::Refusal::Unknown,
                ))?;
                Ok((plan, stage, key))
            }
        }
    }

    /// Counts tokens a response used (a custom gateway's report). With a
    /// `request_id`, a retried report counts once (ids are remembered for a
    /// day). The tokens count whatever the limits say: they were spent.
    ///
    /// # Errors
    /// [`UsageError`] for an ungoverned domain, an invalid key or storage.
    #[allow(clippy::too_many_arguments)]
    pub async fn report_usage(
        &self,
        domain: &str,
        stage: &str,
        api_key: &str,
        model: &str,
        usage: Usage,
        request_id: Option<&str>,
        now_us: i64,
    ) -> Result<ReportResult, UsageError> {
        let cat = self.catalog.load_full();
        let (plan, stage_i, key) = self.governed(
            &cat,
            domain,
            stage,
            api_key,
            now_us.div_euclid(1_000_000),
            true,
        )?;
        let entries = model_entries(&plan.plan.stages[stage_i].model_entry, model);
        let dedupe = request_id.map(|id| usage::report_key(&plan.plan.id, &key.id, id));
        let (_, states, out) = self
            .plan_call(
                &cat,
                &plan,
                stage_i,
                &key,
                &entries,
                Call::Charge { usage, dedupe },
                now_us,
            )
            .await?;
        Ok(ReportResult {
            duplicate: out.duplicate,
            states: states.into_iter().map(LimitState::into_owned).collect(),
        })
    }

    /// Decides a request and holds its estimated tokens and cost in every
    /// token and spend limit (refused if they do not fit), until
    /// [`RateLimiter::settle`] or `ttl_secs` (after which the estimate stays
    /// charged).
    ///
    /// # Errors
    /// [`UsageError`] for an ungoverned domain, an invalid key or storage.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        &self,
        domain: &str,
        stage: &str,
        api_key: &str,
        model: &str,
        estimate: Usage,
        ttl_secs: i64,
        now_us: i64,
    ) -> Result<ReserveResult, UsageError> {
        let cat = self.catalog.load_full();
        let now_s = now_us.div_euclid(1_000_000);
        let (plan, stage_i, key) = self.governed(&cat, domain, stage, api_key, now_s, false)?;
        let entries = model_entries(&plan.plan.stages[stage_i].model_entry, model);
        let (status, states, out) = self
            .plan_call(
                &cat,
                &plan,
                stage_i,
                &key,
                &entries,
                Call::Reserve { estimate },
                now_us,
            )
            .await?;
        let denied = status.code == Code::OverLimit;
        let headers = crate::plans::headers::build(
            plan.plan.header_style,
            &states,
            denied,
            if denied { status.reset_in } else { None },
        );
        let id = if denied {
            None
        } else {
            let mut raw = [0u8; 16];
            getrandom::fill(&mut raw)
                .map_err(|e| storage::Error::Io(format!("no randomness from the OS: {e}")))?;
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            self.reservations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    id.clone(),
                    Reservation {
                        reserved: out.reserved,
                        estimate,
                        usage_at: out.usage_day.map(|(day, exp, price)| {
                            (
                                plan.plan.id.clone(),
                                key.id.clone(),
                                model.to_owned(),
                                day,
                                exp,
                                price,
                            )
                        }),
                        expires_at: now_s.saturating_add(ttl_secs),
                        settled: false,
                    },
                );
            Some(id)
        };
        Ok(ReserveResult {
            status,
            id,
            states: states.into_iter().map(LimitState::into_owned).collect(),
            headers,
        })
    }

    /// Settles a reservation with the actual usage: each held amount is
    /// corrected (refund or extra charge) in the counter it was held in.
    /// Returns, per held limit, (limit name, held, now charged).
    ///
    /// # Errors
    /// [`UsageError::UnknownReservation`], or storage.
    pub async fn settle(
        &self,
        id: &str,
        actual: Usage,
        now_us: i64,
    ) -> Result<Vec<(String, u64, u64)>, UsageError> {
        let r = {
            let mut map = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
            match map.get_mut(id) {
                Some(r) if r.expires_at > now_us.div_euclid(1_000_000) => {
                    if r.settled {
                        return Err(UsageError::AlreadySettled(id.to_owned()));
                    }
                    // What is settled is taken out; the entry stays, empty,
                    // as a mark until the reservation would have expired.
                    r.settled = true;
                    Reservation {
                        reserved: std::mem::take(&mut r.reserved),
                        estimate: r.estimate,
                        usage_at: r.usage_at.take(),
                        expires_at: r.expires_at,
                        settled: true,
                    }
                }
                _ => return Err(UsageError::UnknownReservation(id.to_owned())),
            }
        };
        let mut ops = Vec::with_capacity(r.reserved.len());
        let mut settled = Vec::with_capacity(r.reserved.len());
        for res in &r.reserved {
            let want = usage::amount(&res.limit, &actual, res.price.as_ref());
            settled.push((res.limit.name.clone(), res.amount, want));
            if want > res.amount {
                ops.push(CounterOp::new(
                    &res.counter,
                    want - res.amount,
                    res.expires_at,
                ));
            } else if want < res.amount {
                ops.push(
                    CounterOp::new(&res.counter, res.amount - want, res.expires_at).when(Cond::Sub),
                );
            }
        }
        // The per-model rows hold the estimate since Reserve: corrected
        // by the difference, as the limits are.
        let mut usage_keys: Vec<(Vec<u8>, u64, ModelMetric)> = Vec::new();
        // (the model's row, "(other models)"'s row, amount).
        let mut refunds: Vec<(Vec<u8>, Vec<u8>, u64)> = Vec::new();
        if let Some((plan_id, key_id, model, day, _, price)) = &r.usage_at {
            let spend = |u: &Usage| price.as_ref().map_or(0, |p| usage::spend(u, p));
            let model = if model.len() > usage::MAX_MODEL_NAME {
                usage::OTHER_MODEL
            } else {
                model.as_str()
            };
            for (m, held, now) in [
                (ModelMetric::Input, r.estimate.input, actual.input),
                (ModelMetric::Output, r.estimate.output, actual.output),
                (ModelMetric::Spend, spend(&r.estimate), spend(&actual)),
            ] {
                let k = usage::model_usage_key(plan_id, key_id, *day, m, model);
                if now > held {
                    usage_keys.push((k, now - held, m));
                } else if now < held {
                    let other =
                        usage::model_usage_key(plan_id, key_id, *day, m, usage::OTHER_MODEL);
                    refunds.push((k, other, held - now));
                }
            }
        }
        let usage_exp = r.usage_at.as_ref().map_or(0, |u| u.4);
        // A refund goes where the estimate went: the model's row, or
        // "(other models)" when the key's daily cap sent it there.
        let mut wrote = false;
        let held_in_model = if refunds.is_empty() {
            storage::Values::new()
        } else {
            let peeks: Vec<CounterOp<'_>> = refunds
                .iter()
                .map(|(k, _, _)| CounterOp::new(k, 0, 0))
                .collect();
            self.apply(&peeks, &mut wrote)?
        };
        ops.extend(
            refunds
                .iter()
                .zip(&held_in_model)
                .map(|((k, other, v), held)| {
                    let row = if *held > 0 { k } else { other };
                    CounterOp::new(row, *v, usage_exp).when(Cond::Sub)
                }),
        );
        let first_usage_op = ops.len();
        // Per-model counters as in a decision: added to where they exist,
        // created under the key's daily cap.
        ops.extend(
            usage_keys
                .iter()
                .map(|(k, v, _)| CounterOp::new(k, *v, usage_exp).when(Cond::IfExists)),
        );
        let values = self.apply(&ops, &mut wrote)?;
        if let Some((plan_id, key_id, _, day, exp, _)) = &r.usage_at {
            let new: SmallVec<[(&[u8], u64, ModelMetric); 4]> = usage_keys
                .iter()
                .zip(&values[first_usage_op..])
                .filter(|(_, value)| **value == 0)
                .map(|((k, v, m), _)| (k.as_slice(), *v, *m))
                .collect();
            if !new.is_empty() {
                self.count_new_models(plan_id, key_id, *day, *exp, &new, &mut wrote)?;
            }
        }
        if wrote {
            self.store.commit().await?;
        }
        Ok(settled)
    }

    /// Drops reservations whose TTL ended (they stay charged at their
    /// estimate); returns how many.
    pub fn purge_reservations(&self, now_s: i64) -> usize {
        let mut map = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, r| r.expires_at > now_s);
        before - map.len()
    }

    /// A key's per-model usage on `dates` (local dates of the quota's time
    /// zone, UTC without a quota): (date, model, metric, value), sorted.
    /// Counters at 0 (a refused call's, rolled back) are left out.
    pub fn model_usage(
        &self,
        plan: &CompiledPlan,
        key_id: &str,
        dates: &[jiff::civil::Date],
    ) -> Vec<(jiff::civil::Date, String, ModelMetric, u64)> {
        let utc;
        let cal = match &plan.calendar {
            Some(c) => c,
            None => {
                utc = period::Calendar::new(period::Period::Day, 0, "UTC")
                    .expect("UTC with anchor 0 is a valid day calendar");
                &utc
            }
        };
        let wanted: std::collections::HashMap<i64, jiff::civil::Date> =
            dates.iter().map(|d| (cal.day_span(*d).start, *d)).collect();
        let prefix = usage::model_usage_prefix(&plan.plan.id, key_id);
        let mut out: Vec<_> = self
            .store
            .scan_prefix(&prefix)
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .filter_map(|(k, v)| {
                let (day, metric, model) = usage::decode_model_usage(&k[prefix.len()..])?;
                let date = *wanted.get(&day)?;
                Some((date, model, metric, v))
            })
            .collect();
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out
    }

    /// The state of every usage limit of `plan` for `key` at `now_s`: one
    /// entry per limit and per model pattern (the default counter first).
    ///
    /// # Errors
    /// The store's error.
    pub async fn limit_usage(
        &self,
        plan: &CompiledPlan,
        key: &ApiKey,
        now_s: i64,
    ) -> Result<Vec<(String, Metric, u64, u64, i64)>, storage::Error> {
        let p = &plan.plan;
        let mut rows = Vec::new();
        let mut keys: Vec<(Vec<u8>, Option<Vec<u8>>, u64)> = Vec::new();
        for (i, l) in p.limits.iter().enumerate() {
            let cal = plan.limit_calendars.get(i).and_then(Option::as_ref);
            let span = usage::window(l, cal, now_s);
            let scope = usage::scope_id(l, &key.id, &key.customer_id);
            let patterns = std::iter::once((None, l.limit))
                .chain(l.model_limits.iter().map(|(k, v)| (Some(k.as_str()), *v)));
            for (pattern, lim) in patterns {
                let name = plan
                    .limit_report(i, pattern)
                    .name
                    .as_deref()
                    .unwrap_or("")
                    .to_owned();
                rows.push((name, l.metric, lim, span.end));
                let prev = l.window.sliding_secs().map(|len| {
                    (
                        usage::counter_key(&p.id, &l.name, scope, pattern, span.start - len),
                        usage::previous_weight_ppm(now_s, len),
                    )
                });
                keys.push((
                    usage::counter_key(&p.id, &l.name, scope, pattern, span.start),
                    prev.as_ref().map(|(k, _)| k.clone()),
                    prev.map_or(0, |(_, w)| w),
                ));
            }
        }
        let mut ops = Vec::new();
        for (cur, prev, _) in &keys {
            ops.push(CounterOp::new(cur, 0, 0));
            if let Some(pk) = prev {
                ops.push(CounterOp::new(pk, 0, 0));
            }
        }
        let values = if ops.is_empty() {
            storage::Values::new()
        } else {
            self.store.add(&ops).await?
        };
        let mut vi = values.into_iter();
        let mut out = Vec::with_capacity(rows.len());
        for ((name, metric, lim, end), (_, prev, w)) in rows.into_iter().zip(&keys) {
            let cur = vi.next().unwrap_or(0);
            let share = if prev.is_some() {
                usage::previous_share(vi.next().unwrap_or(0), *w)
            } else {
                0
            };
            out.push((name, metric, lim, cur.saturating_add(share), end));
        }
        Ok(out)
    }

    /// Drops token buckets that are full again at `now_us`.
    pub fn purge_buckets(&self, now_us: i64) -> usize {
        self.buckets.purge_full(now_us)
    }
}

pub use crate::plans::model::{MODEL_ENTRY, USAGE_ENTRY};

/// What a plan-governed call does.
#[derive(Clone, Debug)]
pub enum Call {
    /// A request: `hits` requests (0 = check only); token and spend limits
    /// are checked.
    Request {
        /// Requests.
        hits: u64,
    },
    /// Tokens spent (after a response): counted whatever the limits say.
    Charge {
        /// The usage.
        usage: Usage,
        /// The counter key of a request id: charge only on its first report.
        dedupe: Option<Vec<u8>>,
    },
    /// A request that also holds its estimated tokens and cost until settled.
    Reserve {
        /// The estimate.
        estimate: Usage,
    },
}

/// A reserved amount in one counter, to settle later.
#[derive(Clone, Debug)]
pub struct Reserved {
    /// The counter.
    pub counter: Vec<u8>,
    /// The limit it belongs to (its definition at reservation time).
    pub limit: UsageLimit,
    /// The model's price at reservation time.
    pub price: Option<crate::plans::model::Price>,
    /// What was added.
    pub amount: u64,
    /// The counter's expiry.
    pub expires_at: u64,
}

/// Side results of a plan call.
#[derive(Debug, Default)]
pub struct CallOutcome {
    /// A charge whose request id was already reported (nothing counted).
    pub duplicate: bool,
    /// What a successful reservation holds.
    pub reserved: Vec<Reserved>,
    /// Where a reservation's settled usage is recorded per model: (day
    /// start, counter expiry, price).
    pub usage_day: Option<(i64, u64, Option<crate::plans::model::Price>)>,
}

/// Governed descriptors decided together: plan, stage index, key, usage
/// kind, and the descriptor indexes.
type Group<'a> = (
    &'a CompiledPlan,
    usize,
    &'a ApiKey,
    Kind<'a>,
    SmallVec<[usize; 2]>,
);

/// What a governed descriptor asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind<'a> {
    /// A request: its hits count in the throttle, quota and request limits.
    Requests,
    /// The request-time check of a stage with a default usage kind (hits
    /// 0): one request.
    Check,
    /// The `usage` entry's kind (or the stage's default): a charge.
    Usage(&'a str),
}

/// The limit states of one decision (throttle, quota and a few limits fit
/// without a heap allocation).
type States<'a> = SmallVec<[LimitState<'a>; 6]>;

/// One usage limit as a call sees it.
struct LimitPlan<'a> {
    limit: &'a UsageLimit,
    /// How it is reported (built once per plan).
    report: &'a Arc<engine::Limit>,
    lim: u64,
    span: period::Span,
    amount: u64,
    counter: Range<usize>,
    prev: Option<(Range<usize>, u64)>,
    prev_value: u64,
    prev_share: u64,
}

/// The state of one limit after a decision, for response headers. Within a
/// decision the name is borrowed from the plan (no reference counting on
/// the hot path); results handed out own it (`LimitState<'static>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitState<'a> {
    /// Reported name ("plan/limit").
    pub name: Cow<'a, str>,
    /// What the limit counts: requests (the throttle and the quota too),
    /// tokens, or spend.
    pub metric: Metric,
    /// The limit per window.
    pub limit: u64,
    /// What is left.
    pub remaining: u64,
    /// Seconds until it resets (or refills).
    pub reset_in: Option<u64>,
    /// Window length in seconds.
    pub window: i64,
}

impl<'a> LimitState<'a> {
    /// The same state, owning its name.
    pub fn into_owned(self) -> LimitState<'static> {
        LimitState {
            name: Cow::Owned(self.name.into_owned()),
            metric: self.metric,
            limit: self.limit,
            remaining: self.remaining,
            reset_in: self.reset_in,
            window: self.window,
        }
    }

    /// A throttle: its capacity is the limit; its window, the time to refill it.
    fn throttle(
        limit: &'a engine::Limit,
        t: &crate::plans::model::Throttle,
        remaining: u64,
        reset_in: Option<u64>,
    ) -> LimitState<'a> {
        let window = if t.rate_limit > 0.0 {
            (f64::from(t.burst_limit) / t.rate_limit)
                .ceil()
                .min(i64::MAX as f64) as i64
        } else {
            i64::MAX
        };
        LimitState {
            name: Cow::Borrowed(limit.name.as_deref().unwrap_or_default()),
            metric: Metric::Requests,
            limit: u64::from(t.burst_limit),
            remaining,
            reset_in,
            window: window.max(1),
        }
    }

    /// A request limit (the quota) of `cap` requests per `limit`'s window,
    /// named `name`. `cap` is the whole limit: `limit` carries the wire's
    /// `requests_per_unit`, a u32 that saturates (headers would then show
    /// a remaining count above the limit).
    fn requests(
        limit: &engine::Limit,
        cap: u64,
        name: &'a str,
        remaining: u64,
        reset_in: Option<u64>,
    ) -> LimitState<'a> {
        LimitState {
            name: Cow::Borrowed(name),
            metric: Metric::Requests,
            limit: cap,
            remaining,
            reset_in,
            window: i64::try_from(limit.unit.seconds()).unwrap_or(i64::MAX),
        }
    }
}

/// Gives the sliding limits at `prev_idx` their previous window's counter
/// (`values`, in the same order) and the share of it that still counts.
fn set_previous(plans: &mut [LimitPlan<'_>], prev_idx: &[usize], values: &[u64]) {
    for (&i, &v) in prev_idx.iter().zip(values) {
        let w = plans[i].prev.as_ref().map_or(0, |(_, w)| *w);
        plans[i].prev_value = v;
        plans[i].prev_share = usage::previous_share(v, w);
    }
}

/// A plan's refusal of an API key (unknown, disabled, expired, not bound).
fn invalid_key() -> Status {
    Status {
        reset_in: None,
        ..refusal(None, 0, Reason::InvalidKey)
    }
}

fn refusal(limit: Option<Arc<engine::Limit>>, reset_in: u64, reason: Reason) -> Status {
    Status {
        code: Code::OverLimit,
        limit,
        remaining: 0,
        reset_in: Some(reset_in),
        reason: Some(reason),
    }
}

/// A status's remaining count (the wire's uint32, saturating).
fn status_remaining(remaining: u64) -> u32 {
    u32::try_from(remaining).unwrap_or(u32::MAX)
}

/// The usage API's model as the descriptor entry the stage reads it from.
fn model_entries(entry: &str, model: &str) -> Vec<Entry> {
    if model.is_empty() {
        Vec::new()
    } else {
        vec![Entry::new(entry, model)]
    }
}

fn expiry(unix: i64) -> u64 {
    u64::try_from(unix).unwrap_or(0)
}

/// The counter updates of a plan: one per [`Slot::Counted`], in slot order,
/// as [`engine::decide`] expects their values back.
pub fn counter_ops(slots: &[Slot]) -> smallvec::SmallVec<[CounterOp<'_>; 4]> {
    slots
        .iter()
        .filter_map(|s| match s {
            Slot::Counted(c) => Some(CounterOp::new(&c.key.0, c.hits, c.window.end)),
            _ => None,
        })
        .collect()
}

/// Where the config comes from: a directory watched for changes, or (for
/// the default directory only) the embedded default while it does not exist.
#[derive(Debug)]
pub struct ConfigSource {
    dir: PathBuf,
    /// Whether a missing directory means the embedded default (the default
    /// directory) rather than an error (a directory the operator named: a
    /// typo must not silently serve other rules).
    fallback: bool,
    last: Option<Vec<(PathBuf, String)>>,
    /// Whether the directory was found gone (warned once).
    missing: bool,
}

impl ConfigSource {
    /// A source for `dir`, named by the operator: it must exist at start.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ConfigSource {
            dir: dir.into(),
            fallback: false,
            last: None,
            missing: false,
        }
    }

    /// A source for the default directory `dir`: while it does not exist,
    /// the embedded default config is served.
    pub fn with_default(dir: impl Into<PathBuf>) -> Self {
        ConfigSource {
            fallback: true,
            ..ConfigSource::new(dir)
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The initial config: the directory's files, or the embedded default when
    /// the default directory does not exist.
    ///
    /// # Errors
    /// A config error naming file, line and field; [`config::Error::NoDir`]
    /// for a named directory that does not exist.
    pub fn load_initial(&mut self) -> Result<Config, config::Error> {
        if !self.dir.exists() && !self.fallback {
            return Err(config::Error::NoDir {
                path: self.dir.clone(),
            });
        }
        if !self.dir.exists() {
            tracing::info!(
                dir = %self.dir.display(),
                "config dir not found: serving the embedded default config (domain llm-gateway)"
            );
            return config::embedded_default();
        }
        let files = config::read_dir(&self.dir)?;
        let cfg = config::from_files(&files)?;
        self.last = Some(files);
        warn_ignored(&self.dir);
        warn_if_empty(&self.dir, &cfg);
        Ok(cfg)
    }

    /// Re-reads the directory; `Ok(Some(config))` when its files changed and
    /// are valid, `Ok(None)` when nothing changed (or the directory is gone,
    /// in which case the last config keeps serving).
    ///
    /// # Errors
    /// A config error; the caller keeps the last good config.
    pub fn poll(&mut self) -> Result<Option<Config>, config::Error> {
        if !self.dir.exists() {
            // Only a directory that was read is "gone" (not the default
            // directory while the embedded config serves).
            if !self.missing && self.last.is_some() {
                self.missing = true;
                tracing::warn!(
                    dir = %self.dir.display(),
                    "config dir is gone: the last config keeps serving until it is back"
                );
            }
            return Ok(None);
        }
        if std::mem::take(&mut self.missing) {
            tracing::info!(dir = %self.dir.display(), "config dir is back");
        }
        let files = config::read_dir(&self.dir)?;
        if self.last.as_ref() == Some(&files) {
            return Ok(None);
        }
        let result = config::from_files(&files);
        // Remember the files even when invalid, so one bad edit is logged once.
        self.last = Some(files);
        warn_ignored(&self.dir);
        if let Ok(cfg) = &result {
            warn_if_empty(&self.dir, cfg);
        }
        result.map(Some)
    }
}

/// Warns when the config dir holds no domain: no rule applies, so every
/// request is answered OK (an empty or wrongly mounted directory).
fn warn_if_empty(dir: &Path, cfg: &Config) {
    if cfg.sources.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            "config dir holds no config files (*.yaml, *.yml): no rule applies, every request is answered OK"
        );
    }
}

/// Warns about files in the config dir that are not read (not `.yaml` or
/// `.yml`): upstream's loader reads every file, so rules kept in, say,
/// `limits.conf` would otherwise vanish without a word.
fn warn_ignored(dir: &Path) {
    let Ok(ignored) = config::ignored_files(dir) else {
        return;
    };
    if ignored.is_empty() {
        return;
    }
    tracing::warn!(
        dir = %dir.display(),
        "config dir: not reading {} (only .yaml and .yml files hold config, and a link must lead to one)",
        crate::telemetry::first_five(ignored.iter().map(|p| p.display().to_string()))
    );
}

/// Polls `source` every `every` and swaps valid changes into `limiter`;
/// an invalid change is logged and the last good config keeps serving.
/// Runs until the task is dropped or aborted.
pub async fn watch_config<S: CounterStore>(
    limiter: Arc<RateLimiter<S>>,
    mut source: ConfigSource,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // The last rejection logged: a directory or file that cannot be read
    // fails every poll the same way, and is said once (and its end too).
    let mut last_error: Option<(String, bool)> = None;
    loop {
        tick.tick().await;
        let dir = source.dir().to_owned();
        match tokio::task::spawn_blocking(move || {
            let r = source.poll();
            (source, r)
        })
        .await
        {
            Ok((s, result)) => {
                source = s;
                match result {
                    Ok(found) => {
                        if let Some((e, true)) = last_error.take() {
                            tracing::info!(dir = %dir.display(), was = %e, "config dir can be read again");
                        }
                        if let Some(cfg) = found {
                            let domains: Vec<&String> = cfg.sources.keys().collect();
                            tracing::info!(dir = %dir.display(), ?domains, "config reloaded");
                            limiter.set_config(cfg);
                        }
                    }
                    Err(e) => {
                        let message = e.to_string();
                        if last_error.as_ref().map(|(m, _)| m) != Some(&message) {
                            tracing::warn!(error = %message, "config reload rejected; the last good config keeps serving");
                        }
                        let unreadable = matches!(e, config::Error::Read { .. });
                        last_error = Some((message, unreadable));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload task failed");
                return;
            }
        }
    }
}
