//! The store of plans, keys, bindings and quota grants, in sled, and the
//! admin operations on them.
//!
//! Trees: `plans` (id -> JSON [`Plan`]), `api_keys` (id -> JSON [`ApiKey`],
//! bindings included as `plan_ids`), `quota_grants` (plan id, key id, period
//! start -> extra quota). Every write runs in one sled transaction over the
//! trees it touches and is flushed to disk before the call returns, so an
//! acknowledged admin write survives a crash. Writes are serialised by one
//! async mutex; after each, a new [`Catalog`] is built and swapped in, so
//! decisions read it without waiting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::catalog::Catalog;
use super::model::{self, ApiKey, Plan, PreviousValue};
use super::Error;
use crate::storage;

const PLANS: &str = "plans";
const KEYS: &str = "api_keys";
const GRANTS: &str = "quota_grants";
const PRICES: &str = "prices";
const PRICE_TABLE: &[u8] = b"shared";
/// Longest grace period of a rotated key value.
pub const MAX_GRACE_SECS: i64 = 30 * 86_400;

/// A set of record changes written in one transaction.
#[derive(Debug, Default)]
struct Changes {
    plans_put: Vec<Plan>,
    plans_del: Vec<String>,
    keys_put: Vec<ApiKey>,
    keys_del: Vec<String>,
    grants_put: Vec<((String, String, i64), i64)>,
    grants_del: Vec<(String, String, i64)>,
    /// A new shared price table.
    prices: Option<BTreeMap<String, model::Price>>,
}

/// Plans, keys and grants: persisted in sled, served from a [`Catalog`].
#[derive(Debug)]
pub struct Registry {
    db: sled::Db,
    plans: sled::Tree,
    keys: sled::Tree,
    grants: sled::Tree,
    prices: sled::Tree,
    path: PathBuf,
    catalog: Arc<ArcSwap<Catalog>>,
    write: tokio::sync::Mutex<()>,
    /// Set while an admin write to disk runs (see [`storage::bounded`]).
    busy: Arc<std::sync::atomic::AtomicBool>,
    /// sled's database file in the data dir, when it was there at open: a
    /// write after it was removed (while running) would be lost, so it is
    /// refused.
    db_file: Option<PathBuf>,
}

fn grant_key(plan: &str, key: &str, start: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(plan.len() + key.len() + 10);
    k.extend_from_slice(plan.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k.extend_from_slice(&start.to_be_bytes());
    k
}

fn decode_grant_key(k: &[u8]) -> Option<(String, String, i64)> {
    let (head, start) = k.split_at(k.len().checked_sub(8)?);
    let start = i64::from_be_bytes(start.try_into().ok()?);
    let mut parts = head.split(|b| *b == 0);
    let plan = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let key = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    Some((plan, key, start))
}

/// Random text from the OS CSPRNG: `bytes` random bytes, base64url.
fn random_text(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| storage::Error::Io(format!("no randomness from the OS: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

/// A new resource id: 12 characters of [a-z0-9].
fn new_id() -> Result<String, Error> {
    let mut buf = [0u8; 12];
    getrandom::fill(&mut buf)
        .map_err(|e| storage::Error::Io(format!("no randomness from the OS: {e}")))?;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    Ok(buf
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

/// A new key value: `slk_` and 192 random bits.
pub fn new_key_value() -> Result<String, Error> {
    Ok(format!("slk_{}", random_text(24)?))
}

impl Registry {
    /// Opens the trees in `db` (the data dir's database) and loads them.
    ///
    /// # Errors
    /// [`storage::Error::Corrupt`] if a record does not decode or validate.
    pub fn open(db: sled::Db, path: PathBuf) -> Result<Registry, Error> {
        let open = |name: &str| {
            db.open_tree(name).map_err(|e| storage::Error::Open {
                path: path.clone(),
                detail: e.to_string(),
            })
        };
        let (plans, keys, grants) = (open(PLANS)?, open(KEYS)?, open(GRANTS)?);
        let prices = open(PRICES)?;
        let corrupt = |detail: String| storage::Error::Corrupt {
            path: path.clone(),
            detail,
        };
        let io = |e: sled::Error| storage::Error::Io(e.to_string());
        let mut plan_list = Vec::new();
        for item in plans.iter() {
            let (k, v) = item.map_err(io)?;
            let p: Plan = serde_json::from_slice(&v).map_err(|e| {
                corrupt(format!(
                    "plan record {:?}: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            plan_list.push(p);
        }
        let mut key_list = Vec::new();
        for item in keys.iter() {
            let (k, v) = item.map_err(io)?;
            let key: ApiKey = serde_json::from_slice(&v).map_err(|e| {
                corrupt(format!(
                    "API key record {:?}: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            key_list.push(key);
        }
        let mut grant_list = Vec::new();
        for item in grants.iter() {
            let (k, v) = item.map_err(io)?;
            let id = decode_grant_key(&k)
                .ok_or_else(|| corrupt("undecodable quota grant key".into()))?;
            let v: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| corrupt("undecodable quota grant value".into()))?;
            grant_list.push((id, i64::from_be_bytes(v)));
        }
        let (np, nk) = (plan_list.len(), key_list.len());
        let mut catalog = Catalog::build(plan_list, key_list, grant_list)
            .map_err(|e| corrupt(format!("stored plans or keys are invalid: {e}")))?;
        if let Some(v) = prices.get(PRICE_TABLE).map_err(io)? {
            let table = serde_json::from_slice(&v)
                .map_err(|e| corrupt(format!("shared price table: {e}")))?;
            catalog.set_shared_prices(table);
        }
        tracing::info!(plans = np, keys = nk, "plans and keys loaded");
        let db_file = Some(path.join("sled").join("db")).filter(|f| f.exists());
        Ok(Registry {
            db,
            plans,
            keys,
            grants,
            path,
            catalog: Arc::new(ArcSwap::from_pointee(catalog)),
            prices,
            write: tokio::sync::Mutex::new(()),
            busy: Arc::default(),
            db_file,
        })
    }

    /// The shared handle to the current catalog, for the limiter.
    pub fn handle(&self) -> Arc<ArcSwap<Catalog>> {
        self.catalog.clone()
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// The data dir.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes `changes` in one transaction, flushes, and swaps in a new catalog.
    async fn commit(&self, changes: Changes) -> Result<(), Error> {
        if let Some(f) = self.db_file.as_ref().filter(|f| !f.exists()) {
            return Err(storage::Error::Io(format!(
                "the database file {} was removed while sluice runs",
                f.display()
            ))
            .into());
        }
        let encode_plans: Vec<(String, Vec<u8>)> = changes
            .plans_put
            .iter()
            .map(|p| Ok((p.id.clone(), serde_json::to_vec(p)?)))
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| storage::Error::Io(format!("encoding a plan: {e}")))?;
        let encode_keys: Vec<(String, Vec<u8>)> = changes
            .keys_put
            .iter()
            .map(|k| Ok((k.id.clone(), serde_json::to_vec(k)?)))
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| storage::Error::Io(format!("encoding a key: {e}")))?;
        let prices = changes
            .prices
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| storage::Error::Io(format!("encoding the price table: {e}")))?;
        // Off the async workers and bounded in time: a stalled disk fails
        // the call instead of hanging it (and every admin call after it).
        let trees = (
            self.plans.clone(),
            self.keys.clone(),
            self.grants.clone(),
            self.prices.clone(),
            self.db.clone(),
        );
        let dels = (
            changes.plans_del.clone(),
            changes.keys_del.clone(),
            changes.grants_put.clone(),
            changes.grants_del.clone(),
        );
        storage::bounded(&self.busy, "admin write", move || {
            let (plans, keys, grants, price_tree, db) = trees;
            let (plans_del, keys_del, grants_put, grants_del) = dels;
            let result: Result<(), TransactionError<()>> =
                (&plans, &keys, &grants).transaction(|(p, k, g)| {
                    for (id, v) in &encode_plans {
                        p.insert(id.as_bytes(), v.as_slice())?;
                    }
                    for id in &plans_del {
                        p.remove(id.as_bytes())?;
                    }
                    for (id, v) in &encode_keys {
                        k.insert(id.as_bytes(), v.as_slice())?;
                    }
                    for id in &keys_del {
                        k.remove(id.as_bytes())?;
                    }
                    for ((plan, key, start), extra) in &grants_put {
                        g.insert(grant_key(plan, key, *start), &extra.to_be_bytes())?;
                    }
                    for (plan, key, start) in &grants_del {
                        g.remove(grant_key(plan, key, *start))?;
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                });
            result.map_err(|e| storage::Error::Io(format!("admin write failed: {e:?}")))?;
            if let Some(v) = prices {
                price_tree
                    .insert(PRICE_TABLE, v)
                    .map_err(|e| storage::Error::Io(format!("admin write failed: {e}")))?;
            }
            db.flush()
                .map(|_| ())
                .map_err(|e| storage::Error::Io(format!("admin write not flushed: {e}")))
        })
        .await?;

        // The new catalog: the old records with the changes applied.
        let old = self.catalog.load();
        let mut plans: BTreeMap<String, Plan> = old
            .plans_by_name()
            .map(|p| (p.plan.id.clone(), p.plan.clone()))
            .collect();
        let mut keys: BTreeMap<String, ApiKey> = old
            .keys_by_name()
            .map(|k| (k.id.clone(), (**k).clone()))
            .collect();
        let mut grants = old.grants().clone();
        for id in &changes.plans_del {
            plans.remove(id);
        }
        for p in changes.plans_put {
            plans.insert(p.id.clone(), p);
        }
        for id in &changes.keys_del {
            keys.remove(id);
        }
        for k in changes.keys_put {
            keys.insert(k.id.clone(), k);
        }
        for g in &changes.grants_del {
            grants.remove(g);
        }
        grants.extend(changes.grants_put);
        // Records were validated before the write, so this cannot fail; if
        // it did, keep serving the old catalog and report it.
        let mut catalog = Catalog::build(plans.into_values(), keys.into_values(), grants)?;
        catalog.set_shared_prices(match changes.prices {
            Some(p) => p,
            None => old.shared_prices().clone(),
        });
        self.catalog.store(Arc::new(catalog));
        Ok(())
    }

    fn find_plan(cat: &Catalog, plan: &str) -> Result<Plan, Error> {
        model::reference("plan", plan)?;
        cat.plan(plan)
            .map(|p| p.plan.clone())
            .ok_or_else(|| Error::NotFound {
                kind: "usage plan",
                id: plan.to_owned(),
            })
    }

    fn find_key(cat: &Catalog, key: &str) -> Result<ApiKey, Error> {
        model::reference("key", key)?;
        cat.key(key)
            .map(|k| (**k).clone())
            .ok_or_else(|| Error::NotFound {
                kind: "API key",
                id: key.to_owned(),
            })
    }

    /// A plan by id or name.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn get_plan(&self, plan: &str) -> Result<Plan, Error> {
        Self::find_plan(&self.catalog.load(), plan)
    }

    /// A key by id or name.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn get_key(&self, key: &str) -> Result<ApiKey, Error> {
        Self::find_key(&self.catalog.load(), key)
    }

    /// Creates a plan from `plan` (its id and times are set here).
    ///
    /// # Errors
    /// [`Error::Invalid`], [`Error::AlreadyExists`] for a taken name, or a storage error.
    pub async fn create_plan(&self, mut plan: Plan, now: i64) -> Result<Plan, Error> {
        let _w = self.write.lock().await;
        plan.id = new_id()?;
        plan.create_time = now;
        plan.update_time = now;
        model::validate_new_plan(&plan)?;
        model::validate_spend_prices(&plan, self.catalog.load().shared_prices())?;
        if let Some(other) = self.catalog.load().plan(&plan.name) {
            return Err(name_taken("usage plan", &plan.name, &other.plan.id));
        }
        self.commit(Changes {
            plans_put: vec![plan.clone()],
            ..Changes::default()
        })
        .await?;
        Ok(plan)
    }

    /// Applies `edit` to a plan and stores it.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Invalid`] (from `edit` or validation),
    /// [`Error::AlreadyExists`] for a taken name, [`Error::FailedPrecondition`]
    /// when a bound key would get two plans for one stage.
    pub async fn update_plan(
        &self,
        plan: &str,
        edit: impl FnOnce(&mut Plan) -> Result<(), Error>,
        now: i64,
    ) -> Result<Plan, Error> {
        self.update_plan_or_check(plan, edit, now, true).await
    }

    /// Runs every check of [`update_plan`](Self::update_plan) that needs
    /// only the plan and its history (its fields, its limits' units, also
    /// those of limits removed within 33 days, its name), not its keys'
    /// bindings (which other changes may move first), and changes nothing;
    /// returns the plan as the update would make it.
    ///
    /// # Errors
    /// As for `update_plan`, less the binding conflicts.
    pub async fn check_plan_update(
        &self,
        plan: &str,
        edit: impl FnOnce(&mut Plan) -> Result<(), Error>,
        now: i64,
    ) -> Result<Plan, Error> {
        self.update_plan_or_check(plan, edit, now, false).await
    }

    async fn update_plan_or_check(
        &self,
        plan: &str,
        edit: impl FnOnce(&mut Plan) -> Result<(), Error>,
        now: i64,
        write: bool,
    ) -> Result<Plan, Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let mut p = Self::find_plan(&cat, plan)?;
        let mut old = p.clone();
        // Removed limits whose counters are all gone by now are forgotten.
        old.retired_limits.retain(|_, r| r.until > now);
        let (id, created) = (p.id.clone(), p.create_time);
        edit(&mut p)?;
        p.id = id;
        p.create_time = created;
        p.update_time = now;
        model::validate_new_plan(&p)?;
        model::validate_spend_prices(&p, cat.shared_prices())?;
        model::validate_limit_units(&old, &p)?;
        // The limits this update removes are remembered while their
        // counters may hold counts; one added again is live again.
        let mut retired = old.retired_limits.clone();
        for l in old
            .limits
            .iter()
            .filter(|l| !p.limits.iter().any(|n| n.name == l.name))
        {
            retired.insert(
                l.name.clone(),
                model::RetiredLimit {
                    unit: model::limit_unit(l).to_owned(),
                    until: now.saturating_add(model::RETIRED_LIMIT_SECS),
                },
            );
        }
        retired.retain(|name, _| !p.limits.iter().any(|l| &l.name == name));
        p.retired_limits = retired;
        if let Some(other) = cat.plan(&p.name) {
            if other.plan.id != p.id {
                return Err(name_taken("usage plan", &p.name, &other.plan.id));
            }
        }
        if !write {
            return Ok(p);
        }
        for k in cat.keys_by_name().filter(|k| k.plan_ids.contains(&p.id)) {
            if let Some((other, domain, stage)) = cat.conflicting_plan(k, &p.stages, &p.id) {
                return Err(Error::FailedPrecondition(format!(
                    "key {:?} is bound to this plan and to plan {:?}, which already governs domain {domain:?} stage {stage:?}",
                    k.name, other.name
                )));
            }
        }
        self.commit(Changes {
            plans_put: vec![p.clone()],
            ..Changes::default()
        })
        .await?;
        Ok(p)
    }

    /// Deletes a plan; with `force`, unbinds its keys first.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::FailedPrecondition`] while keys are bound
    /// and `force` is false.
    pub async fn delete_plan(&self, plan: &str, force: bool) -> Result<(), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let p = Self::find_plan(&cat, plan)?;
        let bound: Vec<ApiKey> = cat
            .keys_by_name()
            .filter(|k| k.plan_ids.contains(&p.id))
            .map(|k| (**k).clone())
            .collect();
        if !bound.is_empty() && !force {
            return Err(Error::FailedPrecondition(format!(
                "usage plan {:?} has {} bound key(s); remove them or delete with force",
                p.name,
                bound.len()
            )));
        }
        let keys_put = bound
            .into_iter()
            .map(|mut k| {
                k.plan_ids.remove(&p.id);
                k
            })
            .collect();
        let grants_del = cat
            .grants()
            .keys()
            .filter(|(plan, _, _)| *plan == p.id)
            .cloned()
            .collect();
        self.commit(Changes {
            plans_del: vec![p.id],
            keys_put,
            grants_del,
            ..Changes::default()
        })
        .await
    }

    /// Creates a key. `value` is used if given (after validation), else one
    /// is generated. Returns the key and its value (the only time it is shown).
    ///
    /// # Errors
    /// [`Error::Invalid`], [`Error::AlreadyExists`] for a taken name or value.
    pub async fn create_key(
        &self,
        mut key: ApiKey,
        value: Option<String>,
        now: i64,
    ) -> Result<(ApiKey, String), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let value = match value {
            Some(v) => {
                model::validate_key_value("value", &v)?;
                v
            }
            None => new_key_value()?,
        };
        let hash = model::hash_value(&value);
        key.id = new_id()?;
        key.create_time = now;
        key.update_time = now;
        key.hash = model::hex(&hash);
        key.previous = None;
        key.plan_ids.clear();
        model::validate_key(&key)?;
        if let Some(other) = cat.key(&key.name) {
            return Err(name_taken("API key", &key.name, &other.id));
        }
        if cat.key_by_hash(&hash).is_some() {
            return Err(Error::AlreadyExists(
                "another API key already has this value".into(),
            ));
        }
        if let Some(k) = cat.key_by_grace_hash(&hash, now) {
            return Err(Error::AlreadyExists(format!(
                "this value is API key {:?}'s previous value, which still works in its rotation grace period",
                k.name
            )));
        }
        self.commit(Changes {
            keys_put: vec![key.clone()],
            ..Changes::default()
        })
        .await?;
        Ok((key, value))
    }

    /// Applies `edit` to a key's own fields and stores it (its id, hash,
    /// bindings and times are kept).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Invalid`], [`Error::AlreadyExists`].
    pub async fn update_key(
        &self,
        key: &str,
        edit: impl FnOnce(&mut ApiKey) -> Result<(), Error>,
        now: i64,
    ) -> Result<ApiKey, Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let old = Self::find_key(&cat, key)?;
        let mut k = old.clone();
        edit(&mut k)?;
        k.id = old.id.clone();
        k.create_time = old.create_time;
        k.hash = old.hash.clone();
        k.previous = old.previous.clone();
        k.plan_ids = old.plan_ids.clone();
        k.update_time = now;
        model::validate_key(&k)?;
        if let Some(other) = cat.key(&k.name) {
            if other.id != k.id {
                return Err(name_taken("API key", &k.name, &other.id));
            }
        }
        self.commit(Changes {
            keys_put: vec![k.clone()],
            ..Changes::default()
        })
        .await?;
        Ok(k)
    }

    /// Deletes a key (and so its bindings and grants).
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub async fn delete_key(&self, key: &str) -> Result<(), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let k = Self::find_key(&cat, key)?;
        let grants_del = cat
            .grants()
            .keys()
            .filter(|(_, key, _)| *key == k.id)
            .cloned()
            .collect();
        self.commit(Changes {
            keys_del: vec![k.id],
            grants_del,
            ..Changes::default()
        })
        .await
    }

    /// Gives a key a new value; the old one keeps working for `grace_secs`
    /// (0 revokes it now). Returns the key and the new value.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Invalid`] for a bad grace period or value,
    /// [`Error::AlreadyExists`] if the value belongs to another key.
    pub async fn rotate_key(
        &self,
        key: &str,
        grace_secs: i64,
        value: Option<String>,
        now: i64,
    ) -> Result<(ApiKey, String), Error> {
        if !(0..=MAX_GRACE_SECS).contains(&grace_secs) {
            return Err(Error::invalid(
                "grace_period",
                format!("must be between 0 and {MAX_GRACE_SECS} seconds (30 days)"),
            ));
        }
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let mut k = Self::find_key(&cat, key)?;
        let value = match value {
            Some(v) => {
                model::validate_key_value("value", &v)?;
                v
            }
            None => new_key_value()?,
        };
        let hash = model::hash_value(&value);
        if cat.key_by_hash(&hash).is_some() {
            return Err(Error::AlreadyExists(
                "an API key already has this value".into(),
            ));
        }
        if let Some(other) = cat.key_by_grace_hash(&hash, now) {
            if other.id != k.id {
                return Err(Error::AlreadyExists(format!(
                    "this value is API key {:?}'s previous value, which still works in its rotation grace period",
                    other.name
                )));
            }
        }
        k.previous = (grace_secs > 0).then(|| PreviousValue {
            hash: k.hash.clone(),
            until: now.saturating_add(grace_secs),
        });
        k.hash = model::hex(&hash);
        k.update_time = now;
        self.commit(Changes {
            keys_put: vec![k.clone()],
            ..Changes::default()
        })
        .await?;
        Ok((k, value))
    }

    /// Binds a key to a plan. Returns (plan, key).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::AlreadyExists`] if already bound,
    /// [`Error::FailedPrecondition`] if the key has another plan for one of
    /// this plan's stages.
    pub async fn bind(&self, plan: &str, key: &str, now: i64) -> Result<(Plan, ApiKey), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let p = Self::find_plan(&cat, plan)?;
        let mut k = Self::find_key(&cat, key)?;
        if k.plan_ids.contains(&p.id) {
            return Err(Error::AlreadyExists(format!(
                "key {:?} is already bound to usage plan {:?}",
                k.name, p.name
            )));
        }
        if let Some((other, domain, stage)) = cat.conflicting_plan(&k, &p.stages, &p.id) {
            return Err(Error::FailedPrecondition(format!(
                "key {:?} is already bound to usage plan {:?} for domain {domain:?} stage {stage:?}; a key may have one plan per domain and stage",
                k.name, other.name
            )));
        }
        k.plan_ids.insert(p.id.clone());
        k.update_time = now;
        self.commit(Changes {
            keys_put: vec![k.clone()],
            ..Changes::default()
        })
        .await?;
        Ok((p, k))
    }

    /// Unbinds a key from a plan.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown plan or key, or one not bound.
    pub async fn unbind(&self, plan: &str, key: &str, now: i64) -> Result<(), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let p = Self::find_plan(&cat, plan)?;
        let mut k = Self::find_key(&cat, key)?;
        if !k.plan_ids.remove(&p.id) {
            return Err(Error::NotFound {
                kind: "usage plan key",
                id: format!("{}/{}", p.name, k.name),
            });
        }
        k.update_time = now;
        let grants_del = cat
            .grants()
            .keys()
            .filter(|(pl, key, _)| *pl == p.id && *key == k.id)
            .cloned()
            .collect();
        self.commit(Changes {
            keys_put: vec![k],
            grants_del,
            ..Changes::default()
        })
        .await
    }

    /// Replaces the shared price table (prices for models a plan does not
    /// price itself). Refused if it would leave a SPEND limit without prices.
    ///
    /// # Errors
    /// [`Error::Invalid`], [`Error::FailedPrecondition`], or storage.
    pub async fn set_shared_prices(
        &self,
        prices: BTreeMap<String, model::Price>,
    ) -> Result<BTreeMap<String, model::Price>, Error> {
        model::validate_prices(&prices)?;
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        for p in cat.plans_by_name() {
            if model::validate_spend_prices(&p.plan, &prices).is_err() {
                return Err(Error::FailedPrecondition(format!(
                    "usage plan {:?} has a SPEND limit and no prices of its own: the shared price table cannot be emptied",
                    p.plan.name
                )));
            }
        }
        self.commit(Changes {
            prices: Some(prices.clone()),
            ..Changes::default()
        })
        .await?;
        Ok(prices)
    }

    /// Stores the extra quota of a key's period starting at `start`, and
    /// drops grants of periods that ended before `prune_before`.
    ///
    /// # Errors
    /// A storage error.
    pub async fn set_grant(
        &self,
        plan_id: &str,
        key_id: &str,
        start: i64,
        extra: i64,
        prune_before: i64,
    ) -> Result<(), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let grants_del = cat
            .grants()
            .keys()
            .filter(|(_, _, s)| *s < prune_before)
            .cloned()
            .collect();
        self.commit(Changes {
            grants_put: vec![((plan_id.to_owned(), key_id.to_owned(), start), extra)],
            grants_del,
            ..Changes::default()
        })
        .await
    }

    /// Imports keys: each row's value creates a key, or updates the key that
    /// already has it (name, description, enabled), and binds it to the
    /// listed plans. All rows are written in one transaction.
    ///
    /// # Errors
    /// [`Error::Invalid`] if a row is invalid and `fail_on_warnings`;
    /// rows with problems are skipped (with a warning) otherwise.
    pub async fn import_keys(
        &self,
        rows: Vec<ImportRow>,
        mut warnings: Vec<String>,
        fail_on_warnings: bool,
        now: i64,
    ) -> Result<(Vec<String>, Vec<String>), Error> {
        let _w = self.write.lock().await;
        let cat = self.catalog.load_full();
        let mut by_id: BTreeMap<String, ApiKey> = BTreeMap::new();
        let mut names: BTreeMap<String, String> = cat
            .keys_by_name()
            .map(|k| (k.name.clone(), k.id.clone()))
            .collect();
        let mut hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
        let mut ids = Vec::new();
        'rows: for row in rows {
            let line = row.line;
            let warn = |w: &mut Vec<String>, msg: String| w.push(format!("line {line}: {msg}"));
            if let Err(e) = model::validate_key_value("Key", &row.value) {
                warn(&mut warnings, e.to_string());
                continue;
            }
            let hash = model::hash_value(&row.value);
            if let Some(other) = cat.key_by_grace_hash(&hash, now) {
                warn(
                    &mut warnings,
                    format!(
                        "Key: API key {:?}'s previous value, still working in its rotation grace period",
                        other.name
                    ),
                );
                continue;
            }
            let existing = hashes
                .get(&hash)
                .and_then(|id| by_id.get(id).cloned())
                .or_else(|| cat.key_by_hash(&hash).map(|k| (**k).clone()));
            let mut k = match existing {
                Some(k) => k,
                None => ApiKey {
                    id: new_id()?,
                    name: String::new(),
                    description: String::new(),
                    enabled: true,
                    customer_id: String::new(),
                    create_time: now,
                    update_time: now,
                    expire_time: None,
                    tags: BTreeMap::new(),
                    hash: model::hex(&hash),
                    previous: None,
                    plan_ids: Default::default(),
                },
            };
            if let Some(owner) = names.get(&row.name) {
                if *owner != k.id {
                    warn(
                        &mut warnings,
                        format!("an API key named {:?} already exists", row.name),
                    );
                    continue;
                }
            }
            names.retain(|_, id| *id != k.id);
            k.name = row.name.clone();
            if let Some(d) = row.description {
                k.description = d;
            }
            if let Some(e) = row.enabled {
                k.enabled = e;
            }
            k.update_time = now;
            if let Err(e) = model::validate_key(&k) {
                warn(&mut warnings, e.to_string());
                continue;
            }
            let mut k2 = k.clone();
            for plan in &row.plan_ids {
                let Some(p) = cat.plan(plan) else {
                    warn(&mut warnings, format!("usage plan {plan:?} not found"));
                    continue 'rows;
                };
                if k2.plan_ids.contains(&p.plan.id) {
                    continue;
                }
                if let Some((other, domain, stage)) =
                    cat.conflicting_plan(&k2, &p.plan.stages, &p.plan.id)
                {
                    warn(&mut warnings, format!(
                        "key {:?} already has usage plan {:?} for domain {domain:?} stage {stage:?}",
                        k2.name, other.name
                    ));
                    continue 'rows;
                }
                k2.plan_ids.insert(p.plan.id.clone());
            }
            names.insert(k2.name.clone(), k2.id.clone());
            hashes.insert(hash, k2.id.clone());
            ids.push(k2.id.clone());
            by_id.insert(k2.id.clone(), k2);
        }
        if fail_on_warnings && !warnings.is_empty() {
            return Err(Error::invalid(
                "csv",
                format!(
                    "nothing imported (fail_on_warnings): {}",
                    warnings.join("; ")
                ),
            ));
        }
        if !by_id.is_empty() {
            self.commit(Changes {
                keys_put: by_id.into_values().collect(),
                ..Changes::default()
            })
            .await?;
        }
        Ok((ids, warnings))
    }
}

/// One row of an API key import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    /// The CSV line number (1 = header).
    pub line: usize,
    /// `Name`.
    pub name: String,
    /// `Key`.
    pub value: String,
    /// `Description`, if the column is there.
    pub description: Option<String>,
    /// `Enabled`, if the column is there and the cell is not empty.
    pub enabled: Option<bool>,
    /// `UsagePlanIds` (ids or names).
    pub plan_ids: Vec<String>,
}

/// Parses AWS's API key CSV: a header with `Name` and `Key` (any case, any
/// order), optional `Description`, `Enabled`, `UsagePlanIds`; other columns
/// are ignored. Returns rows and per-row warnings.
///
/// # Errors
/// [`Error::Invalid`] on field `csv` when the header lacks a required column
/// or the text is not CSV.
///
/// A quote never closed is an error for the whole text (every row after
/// it would be read into one field).
pub fn parse_import_csv(text: &str) -> Result<(Vec<ImportRow>, Vec<String>), Error> {
    // The csv reader ends a quoted field left open at the end of the text
    // quietly (and swallows the rows after its quote into it): refuse it.
    if let Some(line) = unclosed_quote_line(text) {
        return Err(Error::invalid(
            "csv",
            format!("line {line}: a quote opened here is never closed"),
        ));
    }
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| Error::invalid("csv", format!("cannot read the header row: {e}")))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(name_col), Some(key_col)) = (col("name"), col("key")) else {
        return Err(Error::invalid(
            "csv",
            "the header row must have the columns Name and Key",
        ));
    };
    let (desc_col, enabled_col, plans_col) =
        (col("description"), col("enabled"), col("usageplanids"));
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        // The record's own first line (a quoted field may span lines).
        let line = match &rec {
            Ok(r) => r.position().map_or(i + 2, |p| p.line() as usize),
            Err(e) => e.position().map_or(i + 2, |p| p.line() as usize),
        };
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                warnings.push(format!("line {line}: not valid CSV: {e}"));
                continue;
            }
        };
        let cell = |c: Option<usize>| c.and_then(|c| rec.get(c)).map(str::to_owned);
        let name = cell(Some(name_col)).unwrap_or_default();
        let value = cell(Some(key_col)).unwrap_or_default();
        if name.is_empty() || value.is_empty() {
            let spans = rec.iter().map(|c| c.matches('\n').count()).sum::<usize>();
            warnings.push(if spans > 0 {
                format!(
                    "line {line}: a quoted field runs on to line {} (a quote not closed?), so this row has no Name or Key",
                    line + spans
                )
            } else {
                format!("line {line}: Name and Key must not be empty")
            });
            continue;
        }
        let enabled = match cell(enabled_col).as_deref() {
            None | Some("") => None,
            Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
            Some(v) => {
                warnings.push(format!(
                    "line {line}: Enabled must be true or false, got {v:?}"
                ));
                continue;
            }
        };
        let plan_ids = cell(plans_col)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        rows.push(ImportRow {
            line,
            name,
            value,
            description: cell(desc_col),
            enabled,
            plan_ids,
        });
    }
    Ok((rows, warnings))
}

/// The error for a name already in use: by another resource's name, or as
/// another resource's id (names and ids address plans and keys alike, so a
/// name may not be an id either).
fn name_taken(what: &str, name: &str, other_id: &str) -> Error {
    let article = if what.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    };
    if name == other_id {
        Error::AlreadyExists(format!(
            "{name:?} is the id of an existing {what}: names and ids address {what}s alike, so it cannot be a name"
        ))
    } else {
        Error::AlreadyExists(format!("{article} {what} named {name:?} already exists"))
    }
}

/// The line of a quote that opens a quoted field and is never closed (a
/// doubled quote inside a quoted field is an escaped one).
fn unclosed_quote_line(text: &str) -> Option<usize> {
    let (mut line, mut open) = (1, None);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '"' if open.is_some() && chars.peek() == Some(&'"') => {
                chars.next();
            }
            '"' => open = if open.is_some() { None } else { Some(line) },
            _ => {}
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_in_aws_format_parses_with_warnings_per_row() {
        let text = "key,NAME,Enabled,UsagePlanIds,Extra\n\
                    abcdefghijklmnopqrstu,alice,true,\"p1,p2\",x\n\
                    bcdefghijklmnopqrstuv,bob,maybe,,\n\
                    ,carol,,,\n\
                    cdefghijklmnopqrstuvw,dave,,,\n";
        let (rows, warnings) = parse_import_csv(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "alice");
        assert_eq!(rows[0].plan_ids, vec!["p1", "p2"]);
        assert_eq!(rows[0].enabled, Some(true));
        assert_eq!(rows[1].name, "dave");
        assert_eq!(rows[1].enabled, None);
        assert_eq!(rows[1].description, None);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("line 3:"), "{warnings:?}");
        assert!(warnings[1].starts_with("line 4:"), "{warnings:?}");
        assert!(parse_import_csv("Name,Value\na,b\n").is_err());
    }

    /// An unclosed quote would swallow the rows after it (or, on the last
    /// row, end quietly): the import is refused, naming the quote's line.
    /// Quoted fields over several lines and doubled quotes are fine.
    #[test]
    fn an_unclosed_quote_is_refused_naming_its_line() {
        let good = "Name,Key,Description\n\
                    alice,abcdefghijklmnopqrstu,\"multi\nline, \"\"quoted\"\"\"\n\
                    bob,bcdefghijklmnopqrstuv,ok\n";
        let (rows, warnings) = parse_import_csv(good).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(rows[1].line, 4, "bob's row starts on line 4");
        for (text, line) in [
            (
                "Name,Key,Description\nbob,bcdefghijklmnopqrstuv,ok\n\"carol,cdefghijklmnopqrstuvw,x\ndave,defghijklmnopqrstuvwx,y\n",
                3,
            ),
            ("Name,Key\nq1,\"qkey1-aaaaaaaaaaaaaaaaaaaaa\n", 2),
        ] {
            let e = parse_import_csv(text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("line {line}: a quote opened here is never closed")),
                "{e}"
            );
        }
    }

    #[test]
    fn grant_keys_round_trip() {
        let k = grant_key("plan1", "key1", -5);
        assert_eq!(
            decode_grant_key(&k),
            Some(("plan1".into(), "key1".into(), -5))
        );
    }

    #[test]
    fn generated_values_and_ids_look_right() {
        let v = new_key_value().unwrap();
        assert!(v.starts_with("slk_") && v.len() == 36, "{v}");
        model::validate_key_value("value", &v).unwrap();
        assert_ne!(v, new_key_value().unwrap());
        let id = new_id().unwrap();
        assert_eq!(id.len(), 12);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }
}
