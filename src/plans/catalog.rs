//! The immutable snapshot of plans and keys that decisions read.
//!
//! Built from the stored records after each admin write and swapped in
//! atomically (`ArcSwap` in the registry), so a decision never waits on the
//! admin path and always sees one consistent state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::decide;
use super::model::{self, ApiKey, MethodKey, Plan, Stage, Throttle, STAGE_ENTRY};
use super::period::Calendar;
use super::Error;
use crate::engine::{Entry, Limit};

/// A per-method throttle, parsed, with the limit it reports.
#[derive(Debug)]
pub struct MethodThrottle {
    /// The key as written ("/path/METHOD").
    pub key: String,
    /// The parsed key.
    pub pattern: MethodKey,
    /// The throttle.
    pub throttle: Throttle,
    /// How it is reported in `current_limit`.
    pub limit: Arc<Limit>,
}

/// How one usage limit is reported: its default limit, and per model pattern.
pub type LimitReports = (Arc<Limit>, BTreeMap<String, Arc<Limit>>);

/// A plan ready for decisions: parsed and with its reported limits built
/// once, so a decision allocates none of them.
#[derive(Debug)]
pub struct CompiledPlan {
    /// The record.
    pub plan: Plan,
    /// The quota's calendar, when the plan has a quota.
    pub calendar: Option<Calendar>,
    /// Per-method throttles, per stage (same order as `plan.stages`).
    pub method_keys: Vec<Vec<MethodThrottle>>,
    /// How the plan throttle is reported.
    pub throttle_limit: Option<Arc<Limit>>,
    /// How the quota is reported when no grant changes it.
    pub quota_limit: Option<Arc<Limit>>,
    /// The calendar of each usage limit (`None` for sliding windows), in
    /// `plan.limits` order.
    pub limit_calendars: Vec<Option<Calendar>>,
    /// How each usage limit is reported: its default limit, and each model
    /// pattern's, in `plan.limits` order.
    pub limit_reports: Vec<LimitReports>,
}

impl CompiledPlan {
    /// The reported limit of usage limit `i` for `pattern` (`None` = the
    /// default limit).
    pub fn limit_report(&self, i: usize, pattern: Option<&str>) -> Arc<Limit> {
        let (default, patterns) = &self.limit_reports[i];
        pattern
            .and_then(|p| patterns.get(p))
            .unwrap_or(default)
            .clone()
    }
}

impl CompiledPlan {
    /// Compiles a stored plan.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the record does not validate.
    pub fn new(plan: Plan) -> Result<Self, Error> {
        model::validate_plan(&plan)?;
        let calendar = plan.quota.as_ref().map(|q| q.calendar()).transpose()?;
        let method_keys = plan
            .stages
            .iter()
            .map(|s| {
                s.method_throttles
                    .iter()
                    .filter_map(|(k, t)| {
                        MethodKey::parse(k).ok().map(|pattern| MethodThrottle {
                            key: k.clone(),
                            pattern,
                            throttle: *t,
                            limit: decide::throttle_limit(&plan.name, t, Some(k)),
                        })
                    })
                    .collect()
            })
            .collect();
        let throttle_limit = plan
            .throttle
            .as_ref()
            .map(|t| decide::throttle_limit(&plan.name, t, None));
        let quota_limit = plan
            .quota
            .as_ref()
            .map(|q| decide::quota_limit(&plan.name, q, q.limit));
        let limit_calendars = plan.limits.iter().map(super::usage::calendar).collect();
        let limit_reports = plan
            .limits
            .iter()
            .map(|l| {
                let default = decide::usage_limit(&plan.name, l, None, l.limit);
                let patterns = l
                    .model_limits
                    .iter()
                    .map(|(m, v)| (m.clone(), decide::usage_limit(&plan.name, l, Some(m), *v)))
                    .collect();
                (default, patterns)
            })
            .collect();
        Ok(CompiledPlan {
            plan,
            calendar,
            method_keys,
            throttle_limit,
            quota_limit,
            limit_calendars,
            limit_reports,
        })
    }
}

/// Which entries select plan-governed descriptors in a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    stage: String,
    key_entry: String,
}

/// A key hash's owner; `until` is set for a rotated-out value.
#[derive(Debug, Clone)]
struct HashRef {
    key_id: String,
    until: Option<i64>,
}

/// Why a key was refused (for logs; the wire says `invalid-key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key has this value (or a rotated value's grace period is over).
    Unknown,
    /// The key is disabled.
    Disabled,
    /// The key's expire_time has passed.
    Expired,
    /// The key has no plan for this domain and stage.
    NoPlan,
}

/// The outcome of matching one descriptor against the catalog.
#[derive(Debug)]
pub enum Resolved<'a> {
    /// No plan governs this descriptor: config rules decide it.
    NotGoverned,
    /// A plan governs it but the key is refused.
    Refused(Refusal),
    /// Decide it against this plan, stage and key.
    Governed {
        /// The key's plan for this domain/stage.
        plan: &'a CompiledPlan,
        /// Index of the stage in `plan.plan.stages`.
        stage: usize,
        /// The key.
        key: &'a ApiKey,
    },
}

/// A hash map with foldhash's seeded hasher (the decision path's maps).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// All plans and keys, indexed for decisions and admin reads.
#[derive(Debug, Default)]
pub struct Catalog {
    plans: Map<String, Arc<CompiledPlan>>,
    plan_names: BTreeMap<String, String>,
    keys: Map<String, Arc<ApiKey>>,
    key_names: BTreeMap<String, String>,
    by_hash: Map<[u8; 32], HashRef>,
    selectors: Map<String, Vec<Selector>>,
    stage_plans: Map<String, Map<String, Vec<String>>>,
    grants: HashMap<(String, String, i64), i64>,
    shared_prices: BTreeMap<String, super::model::Price>,
}

impl Catalog {
    /// Indexes plans, keys and quota grants `((plan id, key id, period start), extra)`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a record that does not validate or a stored
    /// hash that does not decode.
    pub fn build(
        plans: impl IntoIterator<Item = Plan>,
        keys: impl IntoIterator<Item = ApiKey>,
        grants: impl IntoIterator<Item = ((String, String, i64), i64)>,
    ) -> Result<Catalog, Error> {
        let mut c = Catalog::default();
        for p in plans {
            let compiled = CompiledPlan::new(p)?;
            let p = &compiled.plan;
            c.plan_names.insert(p.name.clone(), p.id.clone());
            for s in &p.stages {
                let sel = Selector {
                    stage: s.stage.clone(),
                    key_entry: s.key_entry.clone(),
                };
                let list = c.selectors.entry(s.domain.clone()).or_default();
                if !list.contains(&sel) {
                    list.push(sel);
                }
                c.stage_plans
                    .entry(s.domain.clone())
                    .or_default()
                    .entry(s.stage.clone())
                    .or_default()
                    .push(p.id.clone());
            }
            c.plans.insert(p.id.clone(), Arc::new(compiled));
        }
        // Named stages first: a descriptor naming its stage is matched by it.
        for list in c.selectors.values_mut() {
            list.sort_by(|a, b| {
                (a.stage.is_empty(), &a.stage, &a.key_entry).cmp(&(
                    b.stage.is_empty(),
                    &b.stage,
                    &b.key_entry,
                ))
            });
        }
        for k in keys {
            let bad = |what: &str| {
                Error::invalid(
                    "hash",
                    format!("stored {what} of key {} does not decode", k.id),
                )
            };
            let hash = model::unhex(&k.hash).ok_or_else(|| bad("hash"))?;
            c.by_hash.insert(
                hash,
                HashRef {
                    key_id: k.id.clone(),
                    until: None,
                },
            );
            if let Some(prev) = &k.previous {
                let h = model::unhex(&prev.hash).ok_or_else(|| bad("previous hash"))?;
                c.by_hash.entry(h).or_insert(HashRef {
                    key_id: k.id.clone(),
                    until: Some(prev.until),
                });
            }
            c.key_names.insert(k.name.clone(), k.id.clone());
            c.keys.insert(k.id.clone(), Arc::new(k));
        }
        c.grants = grants.into_iter().collect();
        Ok(c)
    }

    /// Whether any plan governs `domain` (a fast pre-check per request).
    pub fn governs(&self, domain: &str) -> bool {
        self.selectors.contains_key(domain)
    }

    /// Matches one descriptor of a request in `domain` at `now` (Unix seconds).
    pub fn resolve(&self, domain: &str, entries: &[Entry], now: i64) -> Resolved<'_> {
        let Some(selectors) = self.selectors.get(domain) else {
            return Resolved::NotGoverned;
        };
        let entry = |name: &str| {
            entries
                .iter()
                .find(|e| e.key == name)
                .map(|e| e.value.as_str())
        };
        for sel in selectors {
            if !sel.stage.is_empty() && entry(STAGE_ENTRY) != Some(sel.stage.as_str()) {
                continue;
            }
            let Some(value) = entry(&sel.key_entry) else {
                continue;
            };
            return self.resolve_key(domain, &sel.stage, value, now);
        }
        Resolved::NotGoverned
    }

    /// Matches an API key value for `domain` and `stage` ("" for the whole
    /// domain), as a gateway names them outside a descriptor (ReportUsage,
    /// Reserve). `NotGoverned` if no plan governs that domain and stage.
    pub fn resolve_value(&self, domain: &str, stage: &str, value: &str, now: i64) -> Resolved<'_> {
        if self
            .stage_plans
            .get(domain)
            .and_then(|m| m.get(stage))
            .is_none()
        {
            return Resolved::NotGoverned;
        }
        self.resolve_key(domain, stage, value, now)
    }

    fn resolve_key(&self, domain: &str, stage: &str, value: &str, now: i64) -> Resolved<'_> {
        let hash = model::hash_value(value);
        let Some(r) = self.by_hash.get(&hash) else {
            return Resolved::Refused(Refusal::Unknown);
        };
        if r.until.is_some_and(|until| now >= until) {
            return Resolved::Refused(Refusal::Unknown);
        }
        let Some(key) = self.keys.get(&r.key_id) else {
            return Resolved::Refused(Refusal::Unknown);
        };
        if !key.enabled {
            return Resolved::Refused(Refusal::Disabled);
        }
        if key.expire_time.is_some_and(|t| now >= t) {
            return Resolved::Refused(Refusal::Expired);
        }
        let Some(plan_ids) = self.stage_plans.get(domain).and_then(|m| m.get(stage)) else {
            return Resolved::Refused(Refusal::NoPlan);
        };
        for id in plan_ids {
            if key.plan_ids.contains(id) {
                if let Some(plan) = self.plans.get(id) {
                    if let Some(i) = plan
                        .plan
                        .stages
                        .iter()
                        .position(|s| s.domain == domain && s.stage == stage)
                    {
                        return Resolved::Governed {
                            plan,
                            stage: i,
                            key,
                        };
                    }
                }
            }
        }
        Resolved::Refused(Refusal::NoPlan)
    }

    /// A plan by id, or else by name.
    pub fn plan(&self, id_or_name: &str) -> Option<&Arc<CompiledPlan>> {
        self.plans.get(id_or_name).or_else(|| {
            self.plan_names
                .get(id_or_name)
                .and_then(|id| self.plans.get(id))
        })
    }

    /// A key by id, or else by name.
    pub fn key(&self, id_or_name: &str) -> Option<&Arc<ApiKey>> {
        self.keys.get(id_or_name).or_else(|| {
            self.key_names
                .get(id_or_name)
                .and_then(|id| self.keys.get(id))
        })
    }

    /// The id of the key whose current value hashes to `hash`.
    pub fn key_by_hash(&self, hash: &[u8; 32]) -> Option<&Arc<ApiKey>> {
        self.by_hash
            .get(hash)
            .filter(|r| r.until.is_none())
            .and_then(|r| self.keys.get(&r.key_id))
    }

    /// Plans ordered by name.
    pub fn plans_by_name(&self) -> impl Iterator<Item = &Arc<CompiledPlan>> {
        self.plan_names.values().filter_map(|id| self.plans.get(id))
    }

    /// Keys ordered by name.
    pub fn keys_by_name(&self) -> impl Iterator<Item = &Arc<ApiKey>> {
        self.key_names.values().filter_map(|id| self.keys.get(id))
    }

    /// Extra quota granted by UpdateUsage for a key's period starting at `start`.
    pub fn grant(&self, plan_id: &str, key_id: &str, start: i64) -> i64 {
        // Allocation-free lookup is not possible with a tuple of Strings as
        // the key; grants are rare, so skip the lookup when there are none.
        if self.grants.is_empty() {
            return 0;
        }
        self.grants
            .get(&(plan_id.to_owned(), key_id.to_owned(), start))
            .copied()
            .unwrap_or(0)
    }

    /// Sets the shared price table (used for models a plan has no price for).
    pub fn set_shared_prices(&mut self, prices: BTreeMap<String, super::model::Price>) {
        self.shared_prices = prices;
    }

    /// The shared price table.
    pub fn shared_prices(&self) -> &BTreeMap<String, super::model::Price> {
        &self.shared_prices
    }

    /// Every stored grant.
    pub fn grants(&self) -> &HashMap<(String, String, i64), i64> {
        &self.grants
    }

    /// The plan (other than `except`) that already governs one of `stages` for a key.
    pub fn conflicting_plan(
        &self,
        key: &ApiKey,
        stages: &[Stage],
        except: &str,
    ) -> Option<(&Plan, String, String)> {
        for id in key.plan_ids.iter().filter(|id| id.as_str() != except) {
            let Some(other) = self.plans.get(id) else {
                continue;
            };
            for s in stages {
                if other
                    .plan
                    .stages
                    .iter()
                    .any(|o| o.domain == s.domain && o.stage == s.stage)
                {
                    return Some((&other.plan, s.domain.clone(), s.stage.clone()));
                }
            }
        }
        None
    }
}
