//! The pure decision engine: request descriptors + rules + `now` in, counter
//! operations out; counter values in, a [`Decision`] out.
//!
//! **Invariant:** nothing here does I/O, reads a clock, or knows about tokio,
//! tonic, prost or sled. The engine cannot fail: bad input is rejected at the
//! edge (the server) before a [`Request`] exists.
//!
//! A decision is two pure steps around one storage call:
//! 1. [`RuleSet::plan`] matches each descriptor and yields a [`Slot`] per
//!    descriptor, the counted ones carrying a [`CounterKey`] and hits;
//! 2. the caller adds the hits in a counter store;
//! 3. [`decide`] turns the counter values into statuses.

mod rules;
mod window;

use std::collections::HashMap;
use std::sync::Arc;

pub use rules::{wildcard_match, DomainRules, DuplicateKey, Level, Limit, Match, Node, RuleLimit};
pub use window::{Unit, Window};

/// One `key=value` descriptor entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Entry key.
    pub key: String,
    /// Entry value.
    pub value: String,
}

impl Entry {
    /// Builds an entry.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Entry {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// A limit supplied in the request (`descriptor.limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitOverride {
    /// Requests per unit.
    pub requests_per_unit: u32,
    /// Window unit (already validated at the edge).
    pub unit: Unit,
}

/// One request descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Entries, in order.
    pub entries: Vec<Entry>,
    /// Optional request-supplied limit.
    pub limit: Option<LimitOverride>,
    /// Per-descriptor hits; when `Some` (0 included) it replaces the request's.
    pub hits_addend: Option<u64>,
}

/// A decision request, already validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The domain (never empty once validated).
    pub domain: String,
    /// Descriptors (never empty once validated).
    pub descriptors: Vec<Descriptor>,
    /// Request-level hits; 0 means 1.
    pub hits_addend: u32,
}

impl Descriptor {
    /// Hits for this descriptor: its own `hits_addend` if set, else
    /// `max(1, request hits_addend)` (upstream `GetHitsAddends`).
    pub fn hits(&self, request_hits: u32) -> u64 {
        self.hits_addend
            .unwrap_or_else(|| u64::from(request_hits.max(1)))
    }
}

/// An opaque counter identity: domain, entries (values or shared patterns),
/// window length and window start, length-prefixed so no two differ only by
/// where a separator falls.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey(pub Vec<u8>);

/// Entry values longer than this many bytes go into counter keys as their
/// SHA-256 digest: a long value (a path with its query string, a token)
/// then costs a counter 32 bytes, whatever its length. Values up to it go
/// in as they are, as they always did.
pub const LONG_VALUE: usize = 1024;

impl CounterKey {
    fn build<'a>(
        domain: &str,
        parts: impl Iterator<Item = (&'a str, &'a str)>,
        window: Window,
    ) -> CounterKey {
        fn put(buf: &mut Vec<u8>, s: &str) {
            // Lengths are bounded by the request limits, far below u32::MAX.
            buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
        fn put_value(buf: &mut Vec<u8>, s: &str) {
            if s.len() > LONG_VALUE {
                // u32::MAX as the length marks a digest: no value that long
                // fits a request.
                use sha2::Digest;
                buf.extend_from_slice(&u32::MAX.to_be_bytes());
                buf.extend_from_slice(&sha2::Sha256::digest(s.as_bytes()));
            } else {
                put(buf, s);
            }
        }
        let mut buf = Vec::with_capacity(64);
        put(&mut buf, domain);
        for (k, v) in parts {
            put(&mut buf, k);
            put_value(&mut buf, v);
        }
        buf.extend_from_slice(&(window.end - window.start).to_be_bytes());
        buf.extend_from_slice(&window.start.to_be_bytes());
        CounterKey(buf)
    }
}

/// A counted limit for one descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counted {
    /// The counter to add to.
    pub key: CounterKey,
    /// Hits to add (0 = check only).
    pub hits: u64,
    /// The limit to compare against.
    pub limit: Arc<Limit>,
    /// The window the counter belongs to; the counter expires at its end.
    pub window: Window,
    /// Report, but never deny.
    pub shadow_mode: bool,
    /// A soft limit: denies only together with every other quota-mode
    /// descriptor of the request (see [`decide`]).
    pub quota_mode: bool,
}

/// What the engine decided for one descriptor before counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Unknown domain, no matching rule, an allowlisted rule, or a replaced limit.
    NoLimit,
    /// An `unlimited` rule.
    Unlimited,
    /// A limit to count.
    Counted(Counted),
}

/// Response code, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// Under the limit.
    Ok,
    /// Over the limit.
    OverLimit,
}

/// Why a plan-governed descriptor was refused; gateways see it in the
/// `x-sluice-reason` response header and map it to 403 or 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Unknown, disabled or expired key, or a key with no plan for this domain/stage.
    InvalidKey,
    /// The throttle (token bucket) is empty.
    Throttled,
    /// The period's quota is used up.
    QuotaExceeded,
    /// A request limit of the plan is reached.
    RequestLimit {
        /// The customer-level limit (shared by the customer's keys) refused.
        customer: bool,
    },
    /// A token limit of the plan is used up.
    TokenLimit {
        /// The customer-level limit refused.
        customer: bool,
    },
    /// A spend budget of the plan is used up.
    BudgetExceeded {
        /// The customer-level budget refused.
        customer: bool,
    },
    /// The descriptor is malformed for a plan (e.g. an unknown `usage` kind).
    InvalidRequest,
}

impl Reason {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidKey => "invalid-key",
            Reason::Throttled => "throttled",
            Reason::QuotaExceeded => "quota-exceeded",
            Reason::RequestLimit { .. } => "request-limit",
            Reason::TokenLimit { .. } => "token-limit",
            Reason::BudgetExceeded { .. } => "budget-exceeded",
            Reason::InvalidRequest => "invalid-request",
        }
    }

    /// Which level refused: "customer" for customer-level limits, else "key".
    pub fn level(self) -> &'static str {
        match self {
            Reason::RequestLimit { customer: true }
            | Reason::TokenLimit { customer: true }
            | Reason::BudgetExceeded { customer: true } => "customer",
            _ => "key",
        }
    }
}

/// The answer for one descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// OK or OVER_LIMIT.
    pub code: Code,
    /// The limit that applied; `None` when none did.
    pub limit: Option<Arc<Limit>>,
    /// Hits left in the window (`u32::MAX` for unlimited).
    pub remaining: u32,
    /// Seconds until the window resets, set whenever `limit` is.
    pub reset_in: Option<u64>,
    /// Why a plan refused the descriptor (`None` for config rules).
    pub reason: Option<Reason>,
}

impl Status {
    /// OK with no limit applied (a descriptor no rule matched).
    pub const NO_LIMIT: Status = Status {
        code: Code::Ok,
        limit: None,
        remaining: 0,
        reset_in: None,
        reason: None,
    };
}

/// The answer for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// OVER_LIMIT if any descriptor is.
    pub overall: Code,
    /// One status per request descriptor, in request order.
    pub statuses: Vec<Status>,
    /// Rate-limit headers for the client (usage plans only).
    pub headers: Headers,
}

/// Response headers for the client: (name, value) pairs in order. The
/// values share one string, so a plan answer's six `x-ratelimit-*` headers
/// cost two allocations, not seven (six values and a vector). Small (48
/// bytes) and allocation-free when empty, as for every config-rule answer:
/// a [`Decision`] is moved several times on its way to the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    /// Every value, one after the other.
    values: String,
    /// Each header's name and the end of its value in `values`.
    entries: Vec<(&'static str, u32)>,
}

impl Headers {
    /// Adds a header whose value `write` appends to the string it is given
    /// (which holds the earlier values: append only).
    pub fn push_with(&mut self, name: &'static str, write: impl FnOnce(&mut String)) {
        if self.values.capacity() == 0 {
            self.values.reserve(128);
            self.entries.reserve(8);
        }
        write(&mut self.values);
        // Header values are far below 4 GiB; saturate rather than wrap.
        let end = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.entries.push((name, end));
    }

    /// Adds a header.
    pub fn push(&mut self, name: &'static str, value: &str) {
        self.push_with(name, |s| s.push_str(value));
    }

    /// The headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        let mut start = 0;
        self.entries.iter().map(move |&(name, end)| {
            let end = end as usize;
            let value = &self.values[start..end];
            start = end;
            (name, value)
        })
    }

    /// The value of the first header named `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Owned (name, value) pairs.
    pub fn to_vec(&self) -> Vec<(&'static str, String)> {
        self.iter().map(|(n, v)| (n, v.to_owned())).collect()
    }
}

impl FromIterator<(&'static str, String)> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'static str, String)>>(iter: I) -> Self {
        let mut h = Headers::default();
        for (name, value) in iter {
            h.push(name, &value);
        }
        h
    }
}

/// All domains' rules: one immutable snapshot of the config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    domains: HashMap<String, DomainRules, foldhash::fast::RandomState>,
}

impl RuleSet {
    /// A rule set from domains.
    pub fn new(domains: HashMap<String, DomainRules>) -> Self {
        RuleSet {
            domains: domains.into_iter().collect(),
        }
    }

    /// The domains, by name.
    pub fn domains(&self) -> &HashMap<String, DomainRules, foldhash::fast::RandomState> {
        &self.domains
    }

    /// Step 1: matches every descriptor at `now` (Unix seconds).
    pub fn plan(&self, req: &Request, now: u64) -> Vec<Slot> {
        let Some(rules) = self.domains.get(&req.domain) else {
            return vec![Slot::NoLimit; req.descriptors.len()];
        };
        thread_local! {
            /// Scratch space for lookups' `key_value` strings, so the hot
            /// path allocates nothing for them.
            static SCRATCH: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(128));
        }
        // Names of limits replaced by a matched rule: rare and few, so a Vec.
        let mut replaced: Vec<&str> = Vec::new();
        let slots: Vec<Slot> = SCRATCH.with_borrow_mut(|scratch| {
            req.descriptors
                .iter()
                .map(|d| {
                    let (limit, shadow_mode, quota_mode, shares) = if let Some(o) = d.limit {
                        // Upstream: an override applies for a known domain whether or
                        // not a rule matches, never in shadow mode.
                        let limit = Arc::new(Limit {
                            requests_per_unit: o.requests_per_unit,
                            unit: o.unit,
                            name: None,
                        });
                        (limit, false, false, Vec::new())
                    } else {
                        match rules.lookup_with(&d.entries, scratch) {
                            None => return Slot::NoLimit,
                            Some(Match {
                                limit: RuleLimit::Unlimited { replaces },
                                ..
                            }) => {
                                replaced.extend(replaces.iter().map(|r| &**r));
                                return Slot::Unlimited;
                            }
                            Some(Match {
                                limit:
                                    RuleLimit::Limited {
                                        limit,
                                        shadow_mode,
                                        quota_mode,
                                        replaces,
                                    },
                                share_patterns,
                            }) => {
                                replaced.extend(replaces.iter().map(|r| &**r));
                                (limit.clone(), *shadow_mode, *quota_mode, share_patterns)
                            }
                        }
                    };
                    let window = Window::containing(limit.unit, now);
                    let parts = d.entries.iter().enumerate().map(|(i, e)| {
                        let v = shares.get(i).copied().flatten().unwrap_or(&e.value);
                        (e.key.as_str(), v)
                    });
                    Slot::Counted(Counted {
                        key: CounterKey::build(&req.domain, parts, window),
                        hits: d.hits(req.hits_addend),
                        limit,
                        window,
                        shadow_mode,
                        quota_mode,
                    })
                })
                .collect()
        });
        if replaced.is_empty() {
            return slots;
        }
        // A limit named by another matched rule's `replaces` does not apply.
        slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Counted(c)
                    if c.limit
                        .name
                        .as_deref()
                        .is_some_and(|n| replaced.contains(&n)) =>
                {
                    Slot::NoLimit
                }
                other => other,
            })
            .collect()
    }
}

/// Step 3: turns counter values into a decision. `values[i]` is the counter
/// value after adding the hits of the `i`-th [`Slot::Counted`] in `slots`.
///
/// # Panics
/// If `values` has fewer entries than `slots` has counted slots (a caller bug).
pub fn decide(slots: &[Slot], values: &[u64], now: u64) -> Decision {
    let mut values = values.iter().copied();
    let statuses: Vec<Status> = slots
        .iter()
        .map(|slot| match slot {
            Slot::NoLimit => Status::NO_LIMIT,
            Slot::Unlimited => Status {
                code: Code::Ok,
                limit: None,
                remaining: u32::MAX,
                reset_in: None,
                reason: None,
            },
            Slot::Counted(c) => {
                let after = values
                    .next()
                    .expect("one counter value per counted slot (caller contract)");
                let max = u64::from(c.limit.requests_per_unit);
                let (mut code, remaining) = if max == 0 || after > max {
                    (Code::OverLimit, 0)
                } else {
                    // after <= max <= u32::MAX
                    (Code::Ok, (max - after) as u32)
                };
                if c.shadow_mode {
                    code = Code::Ok;
                }
                Status {
                    code,
                    limit: Some(c.limit.clone()),
                    remaining,
                    reset_in: Some(c.window.until_end(now)),
                    reason: None,
                }
            }
        })
        .collect();
    Decision {
        overall: overall(slots, &statuses),
        statuses,
        headers: Headers::default(),
    }
}

/// The answer's code, as upstream decides it: OVER_LIMIT when an ordinary
/// descriptor is over, or when the request has quota-mode descriptors and
/// every one of them is over (a shadow-mode one never is); else OK.
fn overall(slots: &[Slot], statuses: &[Status]) -> Code {
    let mut quota = 0usize;
    let mut quota_over = 0usize;
    for (slot, status) in slots.iter().zip(statuses) {
        let over = status.code == Code::OverLimit;
        match slot {
            Slot::Counted(c) if c.quota_mode => {
                quota += 1;
                quota_over += usize::from(over);
            }
            _ if over => return Code::OverLimit,
            _ => {}
        }
    }
    if quota > 0 && quota_over == quota {
        Code::OverLimit
    } else {
        Code::Ok
    }
}

#[cfg(test)]
mod tests;
