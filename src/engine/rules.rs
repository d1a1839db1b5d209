//! The per-domain rule tree and the lookup walk of envoyproxy/ratelimit's
//! `GetLimit`: per level try `key_value`, then wildcard patterns in config
//! order, then the bare `key`; no backtracking; a limit applies only on the
//! node matched by the request's last entry.

use std::collections::HashMap;
use std::sync::Arc;

use super::window::Unit;
use super::Entry;

/// A limit as reported in `current_limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Requests (or hits) allowed per window.
    pub requests_per_unit: u32,
    /// Window unit.
    pub unit: Unit,
    /// Optional name, echoed in `current_limit.name` and targeted by `replaces`.
    pub name: Option<Arc<str>>,
}

/// The limit part of a rule, with its modifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleLimit {
    /// `unlimited: true`: always OK, never counted.
    Unlimited {
        /// Names of limits this one replaces (upstream honours them too).
        replaces: Vec<Arc<str>>,
    },
    /// A counted limit.
    Limited {
        /// The limit itself.
        limit: Arc<Limit>,
        /// `shadow_mode`: count and report, but answer OK.
        shadow_mode: bool,
        /// `quota_mode`: a soft limit. Its status says OVER_LIMIT when over,
        /// but the answer is OVER_LIMIT only when every quota-mode
        /// descriptor of the request is over (or an ordinary one is).
        quota_mode: bool,
        /// Names of limits this one replaces.
        replaces: Vec<Arc<str>>,
    },
}

/// One node of the rule tree: a `key` or `key` + `value` descriptor entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// The limit on this node, if any.
    pub limit: Option<RuleLimit>,
    /// Nested descriptors.
    pub children: Level,
    /// With `share_threshold`, the wildcard value pattern that replaces the
    /// request value in the counter key, so all matching values share one counter.
    pub share_pattern: Option<Arc<str>>,
}

/// One level of the tree. Nodes are keyed like upstream: `key` alone, or
/// `key + "_" + value` (so key `a_b` and key `a` value `b` collide, as upstream).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Level {
    nodes: HashMap<String, Node, foldhash::fast::RandomState>,
    /// Composite keys whose value contains `*`, in config order.
    wildcards: Vec<String>,
}

/// Returned by [`Level::insert`] when the composite key is already present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey(pub String);

impl Level {
    /// The composite key upstream uses for a descriptor entry.
    pub fn composite_key(key: &str, value: Option<&str>) -> String {
        match value {
            Some(v) if !v.is_empty() => format!("{key}_{v}"),
            _ => key.to_owned(),
        }
    }

    /// Adds a node; wildcard values (containing `*`) are tried in insertion order.
    ///
    /// # Errors
    /// [`DuplicateKey`] if the composite key already exists on this level.
    pub fn insert(
        &mut self,
        key: &str,
        value: Option<&str>,
        node: Node,
    ) -> Result<(), DuplicateKey> {
        let composite = Self::composite_key(key, value);
        if self.nodes.contains_key(&composite) {
            return Err(DuplicateKey(composite));
        }
        // Upstream treats any composite key with a `*` as a pattern, so a
        // key-only `path*` is one too.
        if composite.contains('*') {
            self.wildcards.push(composite.clone());
        }
        self.nodes.insert(composite, node);
        Ok(())
    }

    /// Number of nodes on this level.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the level has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `composite` is scratch space for the `key_value` string, reused
    /// across entries and descriptors so a lookup allocates nothing.
    fn lookup(&self, entry: &Entry, composite: &mut String) -> Option<&Node> {
        composite.clear();
        composite.push_str(&entry.key);
        composite.push('_');
        composite.push_str(&entry.value);
        if let Some(node) = self.nodes.get(composite.as_str()) {
            return Some(node);
        }
        for pattern in &self.wildcards {
            if wildcard_match(pattern, composite) {
                return self.nodes.get(pattern);
            }
        }
        self.nodes.get(entry.key.as_str())
    }
}

/// The rules of one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainRules {
    /// Top-level descriptors.
    pub root: Level,
}

/// The result of a successful lookup.
#[derive(Debug)]
pub struct Match<'a> {
    /// The matched limit.
    pub limit: &'a RuleLimit,
    /// Per entry: the shared wildcard pattern to use instead of the value.
    /// Entries past the end of the list use their own value (an empty list,
    /// the common case, means no entry shares).
    pub share_patterns: Vec<Option<&'a str>>,
}

impl DomainRules {
    /// Walks the tree for one descriptor's entries, exactly as upstream.
    pub fn lookup(&self, entries: &[Entry]) -> Option<Match<'_>> {
        self.lookup_with(entries, &mut String::new())
    }

    /// [`DomainRules::lookup`] with caller-provided scratch space (see
    /// `RuleSet::plan`, which reuses one buffer for a whole request).
    pub fn lookup_with(&self, entries: &[Entry], scratch: &mut String) -> Option<Match<'_>> {
        let mut level = &self.root;
        // Allocated only when some node on the path shares its counter.
        let mut share_patterns = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let node = level.lookup(entry, scratch)?;
            if let Some(p) = node.share_pattern.as_deref() {
                share_patterns.resize(i, None);
                share_patterns.push(Some(p));
            }
            if i == entries.len() - 1 {
                return node.limit.as_ref().map(|limit| Match {
                    limit,
                    share_patterns,
                });
            }
            if node.children.is_empty() {
                // Upstream: "request depth does not match config depth".
                return None;
            }
            level = &node.children;
        }
        None
    }
}

/// Matches `text` against `pattern`, where `*` matches any run of characters
/// (zero included) and every other character matches itself.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards() {
        let cases = [
            ("a_b*", "a_b", true),
            ("a_b*", "a_bcd", true),
            ("a_b*", "a_c", false),
            ("a_*d", "a_bcd", true),
            ("a_*d", "a_bcde", false),
            ("a_*b*d*", "a_xbyyd", true),
            ("a_*b*d*", "a_xbyy", false),
            ("*", "", true),
            ("a_**", "a_", true),
            ("k_gpt-4o*", "k_gpt-4o-mini", true),
            ("k_gpt-4o*", "k_gpt-4", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(wildcard_match(p, t), want, "{p} vs {t}");
        }
    }

    /// Every pattern over {a, b, *} and every text over {a, b} up to four
    /// characters, against a plain recursive matcher.
    #[test]
    fn wildcards_agree_with_a_reference_matcher() {
        fn reference(p: &[u8], t: &[u8]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
                Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
            }
        }
        fn all(alphabet: &[u8], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let texts = all(b"ab", 4);
        for p in all(b"ab*", 4) {
            for t in &texts {
                assert_eq!(
                    wildcard_match(&p, t),
                    reference(p.as_bytes(), t.as_bytes()),
                    "{p:?} vs {t:?}"
                );
            }
        }
    }
}
