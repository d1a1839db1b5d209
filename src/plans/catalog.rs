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
    /// The shared start of each usage limit's counter keys
    /// ([`super::usage::counter_key_prefix`]), in `plan.limits` order.
    pub limit_key_prefixes: Vec<Vec<u8>>,
}

impl CompiledPlan {
    /// The reported limit of usage limit `i` for `pattern` (`None` = the
    /// default limit).
    pub fn limit_report(&self, i: usize, pattern: Option<&str>) -> &Arc<Limit> {
        let (default, patterns) = &self.limit_reports[i];
        pattern.and_then(|p| patterns.get(p)).unwrap_or(default)
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
        let limit_key_prefixes = plan
            .limits
            .iter()
            .map(|l| super::usage::counter_key_prefix(&plan.id, &l.name))
            .collect();
        Ok(CompiledPlan {
            plan,
            calendar,
            method_keys,
            throttle_limit,
            quota_limit,
            limit_calendars,
            limit_reports,
            limit_key_prefixes,
        })
    }
}

/// Which entries select plan-governed descriptors in a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    stage: String,
    key_entry: String,
    /// The (domain, stage) pair's number in [`Catalog::stage_plans`].
    slot: u32,
}

/// A key hash's owner; `until` is set for a rotated-out value.
#[derive(Debug, Clone)]
struct HashRef {
    key: Arc<ApiKey>,
    /// The plan governing each (domain, stage) the key has one for.
    routes: Arc<[Route]>,
    until: Option<i64>,
}

/// Which of a key's plans governs a (domain, stage) pair, worked out once
/// when the catalog is built: a decision then finds the plan without
/// looking up the key, the stage's plan list and the plan by id.
#[derive(Debug, Clone)]
struct Route {
    /// The (domain, stage) pair's number.
    slot: u32,
    plan: Arc<CompiledPlan>,
    /// Index of the stage in the plan's stages.
    stage: usize,
}

/// The plans of a (domain, stage) pair, in the order they claim a key.
#[derive(Debug, Clone)]
struct StagePlans {
    slot: u32,
    plan_ids: Vec<String>,
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

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Unknown => "no key has this value",
            Refusal::Disabled => "the key is disabled",
            Refusal::Expired => "the key has expired",
            Refusal::NoPlan => "the key has no usage plan for this domain and stage",
        })
    }
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
        /// Why the key may make no new requests (disabled or expired), if
        /// so: a request is refused for it, while usage it reports is
        /// still counted (the tokens of a request allowed before were
        /// spent).
        lapsed: Option<Refusal>,
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
    stage_plans: Map<String, Map<String, StagePlans>>,
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
        let mut next_slot: u32 = 0;
        for p in plans {
            let compiled = CompiledPlan::new(p)?;
            let p = &compiled.plan;
            c.plan_names.insert(p.name.clone(), p.id.clone());
            for s in &p.stages {
                let sp = c
                    .stage_plans
                    .entry(s.domain.clone())
                    .or_default()
                    .entry(s.stage.clone())
                    .or_insert_with(|| {
                        next_slot += 1;
                        StagePlans {
                            slot: next_slot - 1,
                            plan_ids: Vec::new(),
                        }
                    });
                sp.plan_ids.push(p.id.clone());
                let sel = Selector {
                    stage: s.stage.clone(),
                    key_entry: s.key_entry.clone(),
                    slot: sp.slot,
                };
                let list = c.selectors.entry(s.domain.clone()).or_default();
                if !list.contains(&sel) {
                    list.push(sel);
                }
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
            let previous = match &k.previous {
                Some(prev) => Some((
                    model::unhex(&prev.hash).ok_or_else(|| bad("previous hash"))?,
                    prev.until,
                )),
                None => None,
            };
            let routes: Arc<[Route]> = c.routes(&k).into();
            let key = Arc::new(k);
            c.by_hash.insert(
                hash,
                HashRef {
                    key: key.clone(),
                    routes: routes.clone(),
                    until: None,
                },
            );
            if let Some((h, until)) = previous {
                c.by_hash.entry(h).or_insert(HashRef {
                    key: key.clone(),
                    routes,
                    until: Some(until),
                });
            }
            c.key_names.insert(key.name.clone(), key.id.clone());
            c.keys.insert(key.id.clone(), key);
        }
        c.grants = grants.into_iter().collect();
        Ok(c)
    }

    /// For each (domain, stage) of `key`'s plans, the plan that governs it
    /// for this key: the first of the stage's plans (in catalog order) that
    /// the key is bound to.
    fn routes(&self, key: &ApiKey) -> Vec<Route> {
        let mut routes: Vec<Route> = Vec::new();
        for id in &key.plan_ids {
            let Some(plan) = self.plans.get(id) else {
                continue;
            };
            for st in &plan.plan.stages {
                let Some(sp) = self
                    .stage_plans
                    .get(&st.domain)
                    .and_then(|m| m.get(&st.stage))
                else {
                    continue;
                };
                if routes.iter().any(|r| r.slot == sp.slot) {
                    continue;
                }
                let first = sp
                    .plan_ids
                    .iter()
                    .filter(|pid| key.plan_ids.contains(*pid))
                    .find_map(|pid| self.plans.get(pid));
                let Some(first) = first else {
                    continue;
                };
                if let Some(stage) = first
                    .plan
                    .stages
                    .iter()
                    .position(|s| s.domain == st.domain && s.stage == st.stage)
                {
                    routes.push(Route {
                        slot: sp.slot,
                        plan: first.clone(),
                        stage,
                    });
                }
            }
        }
        routes
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
            return self.resolve_key(sel.slot, value, now);
        }
        Resolved::NotGoverned
    }

    /// Matches an API key value for `domain` and `stage` ("" for the whole
    /// domain), as a gateway names them outside a descriptor (ReportUsage,
    /// Reserve). `NotGoverned` if no plan governs that domain and stage.
    pub fn resolve_value(&self, domain: &str, stage: &str, value: &str, now: i64) -> Resolved<'_> {
        match self.stage_plans.get(domain).and_then(|m| m.get(stage)) {
            Some(sp) => self.resolve_key(sp.slot, value, now),
            None => Resolved::NotGoverned,
        }
    }

    /// Matches an API key value for the (domain, stage) pair numbered `slot`.
    fn resolve_key(&self, slot: u32, value: &str, now: i64) -> Resolved<'_> {
        let hash = model::hash_value(value);
        let Some(r) = self.by_hash.get(&hash) else {
            return Resolved::Refused(Refusal::Unknown);
        };
        if r.until.is_some_and(|until| now >= until) {
            return Resolved::Refused(Refusal::Unknown);
        }
        let key = &*r.key;
        let lapsed = if !key.enabled {
            Some(Refusal::Disabled)
        } else if key.expire_time.is_some_and(|t| now >= t) {
            Some(Refusal::Expired)
        } else {
            None
        };
        match r.routes.iter().find(|route| route.slot == slot) {
            Some(route) => Resolved::Governed {
                plan: &route.plan,
                stage: route.stage,
                key,
                lapsed,
            },
            None => Resolved::Refused(lapsed.unwrap_or(Refusal::NoPlan)),
        }
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
            .map(|r| &r.key)
    }

    /// The key whose previous value (rotated away, still in its grace
    /// period at `now`) hashes to `hash`: that value must not be given to
    /// another key while it still works.
    pub fn key_by_grace_hash(&self, hash: &[u8; 32], now: i64) -> Option<&Arc<ApiKey>> {
        self.by_hash
            .get(hash)
            .filter(|r| r.until.is_some_and(|u| u > now))
            .map(|r| &r.key)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn stage(domain: &str, stage: &str) -> Stage {
        Stage {
            domain: domain.into(),
            stage: stage.into(),
            ..Stage::default()
        }
    }

    fn plan(id: &str, stages: Vec<Stage>) -> Plan {
        Plan {
            id: id.into(),
            name: format!("{id}-name"),
            stages,
            ..Plan::default()
        }
    }

    fn key(id: &str, value: &str, plans: &[&str]) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: format!("{id}-name"),
            hash: model::hex(&model::hash_value(value)),
            plan_ids: plans
                .iter()
                .map(|p| (*p).to_owned())
                .collect::<BTreeSet<_>>(),
            ..ApiKey::default()
        }
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
        pairs
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect()
    }

    /// "plan-id/stage index", or the refusal, or "-" for not governed.
    fn outcome(r: Resolved<'_>) -> String {
        match r {
            Resolved::NotGoverned => "-".into(),
            Resolved::Refused(why) => format!("{why:?}"),
            Resolved::Governed {
                lapsed: Some(why), ..
            } => format!("{why:?}"),
            Resolved::Governed {
                plan, stage, key, ..
            } => {
                format!("{}/{stage}/{}", plan.plan.id, key.id)
            }
        }
    }

    /// Plans `a` (domain d: whole domain and stage "beta") and `b` (domain d
    /// stage "gamma", domain e); keys bound to a, to b, to both, to none,
    /// disabled, expired, and one rotated with a grace period.
    fn catalog() -> Catalog {
        let plans = vec![
            plan("a", vec![stage("d", ""), stage("d", "beta")]),
            plan("b", vec![stage("d", "gamma"), stage("e", "")]),
        ];
        let mut disabled = key("k-off", "v-off", &["a"]);
        disabled.enabled = false;
        let mut expired = key("k-exp", "v-exp", &["a"]);
        expired.expire_time = Some(100);
        let mut rotated = key("k-rot", "v-new", &["b"]);
        rotated.previous = Some(model::PreviousValue {
            hash: model::hex(&model::hash_value("v-old")),
            until: 100,
        });
        let keys = vec![
            key("k-a", "v-a", &["a"]),
            key("k-b", "v-b", &["b"]),
            key("k-ab", "v-ab", &["a", "b"]),
            key("k-none", "v-none", &[]),
            disabled,
            expired,
            rotated,
        ];
        Catalog::build(plans, keys, Vec::new()).expect("valid catalog")
    }

    #[test]
    fn a_descriptor_resolves_to_the_plan_of_its_domain_and_stage() {
        let c = catalog();
        let at = |domain: &str, pairs: &[(&str, &str)], now: i64| {
            outcome(c.resolve(domain, &entries(pairs), now))
        };
        // Whole domain d: plan a, its stage 0.
        assert_eq!(at("d", &[("api_key", "v-a")], 0), "a/0/k-a");
        // A named stage: a's stage 1, b's stage 0.
        assert_eq!(
            at("d", &[("stage", "beta"), ("api_key", "v-a")], 0),
            "a/1/k-a"
        );
        assert_eq!(
            at("d", &[("stage", "gamma"), ("api_key", "v-b")], 0),
            "b/0/k-b"
        );
        assert_eq!(at("e", &[("api_key", "v-b")], 0), "b/1/k-b");
        // A key bound to both gets each stage's own plan.
        assert_eq!(at("d", &[("api_key", "v-ab")], 0), "a/0/k-ab");
        assert_eq!(
            at("d", &[("stage", "gamma"), ("api_key", "v-ab")], 0),
            "b/0/k-ab"
        );
        assert_eq!(at("e", &[("api_key", "v-ab")], 0), "b/1/k-ab");
        // A key without a plan for the stage.
        assert_eq!(at("d", &[("api_key", "v-b")], 0), "NoPlan");
        assert_eq!(at("e", &[("api_key", "v-a")], 0), "NoPlan");
        assert_eq!(at("d", &[("api_key", "v-none")], 0), "NoPlan");
        // Refusals.
        assert_eq!(at("d", &[("api_key", "nope")], 0), "Unknown");
        assert_eq!(at("d", &[("api_key", "v-off")], 0), "Disabled");
        assert_eq!(at("d", &[("api_key", "v-exp")], 99), "a/0/k-exp");
        assert_eq!(at("d", &[("api_key", "v-exp")], 100), "Expired");
        // A rotated-out value works until its grace period ends.
        assert_eq!(at("e", &[("api_key", "v-old")], 99), "b/1/k-rot");
        assert_eq!(at("e", &[("api_key", "v-old")], 100), "Unknown");
        assert_eq!(at("e", &[("api_key", "v-new")], 100), "b/1/k-rot");
        // Not governed: another domain, no key entry.
        assert_eq!(at("x", &[("api_key", "v-a")], 0), "-");
        assert_eq!(at("d", &[("user", "v-a")], 0), "-");
    }

    #[test]
    fn a_value_resolves_for_a_named_domain_and_stage() {
        let c = catalog();
        let at = |domain: &str, stage: &str, value: &str| {
            outcome(c.resolve_value(domain, stage, value, 0))
        };
        assert_eq!(at("d", "", "v-a"), "a/0/k-a");
        assert_eq!(at("d", "beta", "v-ab"), "a/1/k-ab");
        assert_eq!(at("d", "gamma", "v-ab"), "b/0/k-ab");
        assert_eq!(at("d", "gamma", "v-a"), "NoPlan");
        assert_eq!(at("d", "delta", "v-a"), "-");
        assert_eq!(at("x", "", "v-a"), "-");
        assert_eq!(
            c.key_by_hash(&model::hash_value("v-new"))
                .map(|k| k.id.as_str()),
            Some("k-rot")
        );
        assert!(c.key_by_hash(&model::hash_value("v-old")).is_none());
    }
}
