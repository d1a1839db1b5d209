//! Config files in envoyproxy/ratelimit's YAML format: one domain per file,
//! loaded from a directory, validated into an [`engine::RuleSet`].
//!
//! Depends on `engine` only; knows nothing about the server or storage.
//!
//! [`engine::RuleSet`]: crate::engine::RuleSet

mod schema;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_saphyr::Location;

use crate::engine::{DomainRules, Level, Limit, Node, RuleLimit, RuleSet, Unit};
use schema::{DescriptorYaml, FileYaml};

/// The config used when no config directory exists: typical LLM-gateway limits.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yaml");

/// Where in a file something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

impl From<Location> for Position {
    fn from(l: Location) -> Self {
        Position {
            line: l.line(),
            column: l.column(),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A config error. Every variant names the file; most name line and field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The directory or a file could not be read.
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error (in the message, so not also a `source`: it was
        /// printed twice).
        error: std::io::Error,
    },
    /// A config directory that was named explicitly does not exist.
    #[error("{}: config dir not found (leave out --config-dir and SLUICE_CONFIG_DIR to serve the embedded example config)", path.display())]
    NoDir {
        /// The directory.
        path: PathBuf,
    },
    /// The file is not valid YAML or does not fit the schema.
    #[error("{}{}: {message}", path.display(), pos.map_or_else(String::new, |p| format!(":{p}")))]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where, when known.
        pos: Option<Position>,
        /// What the parser said.
        message: String,
    },
    /// A field has a value upstream rejects.
    #[error("{}:{pos}: field `{field}`: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where.
        pos: Position,
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Two files define the same domain.
    #[error("{}:{pos}: field `domain`: domain '{domain}' is already defined in {}", path.display(), other.display())]
    DuplicateDomain {
        /// The second file.
        path: PathBuf,
        /// Where in it.
        pos: Position,
        /// The domain.
        domain: String,
        /// The first file.
        other: PathBuf,
    },
}

/// A loaded config: the rules plus the files they came from.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The rules.
    pub rules: RuleSet,
    /// domain -> file it came from.
    pub sources: BTreeMap<String, PathBuf>,
}

/// Parses one file's text into a domain name and its rules.
///
/// # Errors
/// [`Error::Syntax`] or [`Error::Invalid`], naming `path`, line and field.
pub fn parse_file(path: &Path, text: &str) -> Result<(String, Position, DomainRules), Error> {
    let empty = || Error::Syntax {
        path: path.to_owned(),
        pos: None,
        message: "file is empty: expected a `domain` and `descriptors`".into(),
    };
    if text.trim().is_empty() {
        return Err(empty());
    }
    // Every document of the file, empty ones (a leading or trailing `---`,
    // as Kubernetes and Helm write them) skipped: upstream's YAML decoder
    // reads the first document and accepts those markers.
    let parse = |duplicates| {
        let mut budget = serde_saphyr::Budget::default();
        budget.max_depth = MAX_YAML_DEPTH;
        let opts = serde_saphyr::options! {
            with_snippet: false,
            duplicate_keys: duplicates,
            budget: Some(budget),
        };
        serde_saphyr::from_str_multiple_with_options::<FileYaml, Vec<FileYaml>>(text, opts)
    };
    let parsed = match parse(serde_saphyr::DuplicateKeyPolicy::Error) {
        // Upstream's YAML decoder (yaml.v2, not strict) takes the last of a
        // key given twice in one mapping: so does sluice, with a warning.
        Err(serde_saphyr::Error::DuplicateMappingKey { key, location }) => {
            tracing::warn!(
                file = %path.display(),
                line = location.line(),
                "key `{}` is given twice in one mapping (the first such key in the file; there may be more): the last value is used, as envoyproxy/ratelimit does",
                key.as_deref().unwrap_or("?")
            );
            parse(serde_saphyr::DuplicateKeyPolicy::LastWins)
        }
        other => other,
    };
    let mut docs = parsed.map_err(|e| {
        let pos = e.location().map(Position::from);
        Error::Syntax {
            path: path.to_owned(),
            pos,
            message: describe(&e, pos, text),
        }
    })?;
    if docs.len() > 1 {
        // Upstream would silently ignore every domain after the first.
        let second = &docs[1].domain;
        return Err(Error::Syntax {
            path: path.to_owned(),
            pos: Some(second.referenced.into()),
            message: format!(
                "a second YAML document (domain `{}`): a config file holds one domain; \
                 envoyproxy/ratelimit would read only the first and ignore the rest, so \
                 put each domain in its own file",
                second.value.as_deref().unwrap_or_default()
            ),
        });
    }
    let file = docs.pop().ok_or_else(empty)?;
    let invalid = |loc: Location, field: &'static str, message: String| Error::Invalid {
        path: path.to_owned(),
        pos: loc.into(),
        field,
        message,
    };
    let domain_pos: Position = file.domain.referenced.into();
    let domain = file.domain.value.unwrap_or_default();
    if domain.is_empty() {
        return Err(invalid(
            file.domain.referenced,
            "domain",
            "config file cannot have empty domain".into(),
        ));
    }
    let mut root = Level::default();
    load_level(
        &mut root,
        file.descriptors.unwrap_or_default(),
        "",
        &invalid,
    )?;
    Ok((domain, domain_pos, DomainRules { root }))
}

/// The parser's message without the "at line X, column Y" that the position
/// already gives, plus the offending line so the field is named even when the
/// parser's message does not ("invalid u32").
/// How deep a config file's YAML may nest (mappings and lists): a level of
/// descriptors takes two, so 40 levels fit, more than a request's entries
/// (`--max-entries`, 32 by default), with room for the deepest rule's own
/// `rate_limit`, `replaces` and `metadata`. Deeper files are refused before
/// parsing recurses into them: an unoptimized build overflows a 2 MiB
/// stack (a tokio worker's, where reloads run) near 48 levels.
const MAX_YAML_DEPTH: usize = 88;

/// The descriptor levels [`MAX_YAML_DEPTH`] is sized for.
const MAX_LEVELS: usize = 40;

fn describe(e: &serde_saphyr::Error, pos: Option<Position>, text: &str) -> String {
    use serde_saphyr::budget::BudgetBreach;
    let msg = match e {
        serde_saphyr::Error::Budget {
            breach: BudgetBreach::Depth { .. },
            ..
        } => format!(
            "the YAML nests too deep (more than {MAX_YAML_DEPTH} mappings and lists in one another): descriptors may nest {MAX_LEVELS} levels"
        ),
        serde_saphyr::Error::Budget { breach, .. } => {
            format!("the file is too large or expands too far through YAML aliases ({breach:?})")
        }
        e => e.to_string(),
    };
    let msg = msg.trim();
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    let line = pos
        .and_then(|p| {
            text.lines()
                .nth(usize::try_from(p.line).ok()?.checked_sub(1)?)
        })
        .map(str::trim)
        .filter(|l| !l.is_empty());
    match line {
        Some(l) if !msg.contains("unknown field") => format!("{msg} (in `{l}`)"),
        _ => msg.to_string(),
    }
}

fn load_level(
    level: &mut Level,
    descriptors: Vec<DescriptorYaml>,
    parent: &str,
    invalid: &impl Fn(Location, &'static str, String) -> Error,
) -> Result<(), Error> {
    for d in descriptors {
        let key_loc = d.key.referenced;
        let key = d.key.value.unwrap_or_default();
        if key.is_empty() {
            return Err(invalid(key_loc, "key", "descriptor has empty key".into()));
        }
        let value = d.value.as_ref().map(|v| v.value.as_str());
        let composite = Level::composite_key(&key, value);
        let path = format!("{parent}{composite}");
        let limit = match d.rate_limit {
            None => None,
            Some(rl) => {
                let rl_loc = rl.referenced;
                let rl = rl.value;
                let unit = match &rl.unit {
                    None => None,
                    Some(u) => match Unit::parse(&u.value) {
                        Some(unit) => Some((unit, u.referenced)),
                        // Upstream checks the unit of an unlimited rule
                        // only for being a valid one (refused below).
                        None if rl.unlimited => None,
                        None => {
                            return Err(invalid(
                                u.referenced,
                                "unit",
                                format!(
                                    "invalid rate limit unit '{}' (expected second, minute, hour, day, week, month or year)",
                                    u.value
                                ),
                            ))
                        }
                    },
                };
                let name: Option<Arc<str>> = rl.name.filter(|n| !n.is_empty()).map(Arc::from);
                let mut replaces = Vec::new();
                // An empty list replaces nothing (upstream loads it too).
                if let Some(r) = rl.replaces {
                    for item in r.value {
                        let replaced = item.name.value.unwrap_or_default();
                        if replaced.is_empty() {
                            return Err(invalid(
                                item.name.referenced,
                                "replaces.name",
                                "should not have an empty replaces entry".into(),
                            ));
                        }
                        if name.as_deref() == Some(replaced.as_str()) {
                            return Err(invalid(
                                item.name.referenced,
                                "replaces.name",
                                "replaces should not contain name of same descriptor".into(),
                            ));
                        }
                        replaces.push(Arc::from(replaced));
                    }
                }
                if rl.unlimited {
                    if let Some((_, loc)) = unit {
                        return Err(invalid(
                            loc,
                            "unit",
                            "should not specify rate limit unit when unlimited".into(),
                        ));
                    }
                    Some(RuleLimit::Unlimited { replaces })
                } else {
                    let Some((unit, _)) = unit else {
                        return Err(invalid(
                            rl_loc,
                            "unit",
                            format!("rate limit for '{path}' needs a unit (or unlimited: true)"),
                        ));
                    };
                    Some(RuleLimit::Limited {
                        limit: Arc::new(Limit {
                            requests_per_unit: rl.requests_per_unit.unwrap_or(0),
                            unit,
                            name,
                        }),
                        shadow_mode: d.shadow_mode,
                        quota_mode: d.quota_mode,
                        replaces,
                    })
                }
            }
        };
        let share_pattern = match (&d.value, d.share_threshold) {
            (Some(v), true) if v.value.contains('*') => Some(Arc::from(v.value.as_str())),
            (_, true) => {
                return Err(invalid(
                    key_loc,
                    "share_threshold",
                    format!("share_threshold on '{path}' needs a value containing '*'"),
                ))
            }
            _ => None,
        };
        let mut node = Node {
            limit,
            children: Level::default(),
            share_pattern,
        };
        load_level(
            &mut node.children,
            d.descriptors.unwrap_or_default(),
            &format!("{path}."),
            invalid,
        )?;
        level.insert(&key, value, node).map_err(|_| {
            invalid(
                key_loc,
                "key",
                format!("duplicate descriptor composite key '{path}'"),
            )
        })?;
    }
    Ok(())
}

/// Parses the embedded default config.
///
/// # Errors
/// Never in a released build (a test checks the embedded file); typed for safety.
pub fn embedded_default() -> Result<Config, Error> {
    let path = PathBuf::from("<embedded default>");
    let (domain, _, rules) = parse_file(&path, EMBEDDED_DEFAULT)?;
    Ok(Config {
        rules: RuleSet::new(HashMap::from([(domain.clone(), rules)])),
        sources: BTreeMap::from([(domain, path)]),
    })
}

/// How deep [`read_dir`] goes into subdirectories (a symlink loop ends
/// here).
const MAX_DEPTH: usize = 8;

/// The config files of a directory and its subdirectories (as upstream's
/// runtime loader reads them): every `*.yaml` / `*.yml` whose name, and
/// whose directories' names below `dir`, do not start with a dot
/// (Kubernetes ConfigMap mounts keep their `..data` copies in dot
/// directories), sorted by path, with their contents.
///
/// # Errors
/// [`Error::Read`] if the directory or a file cannot be read.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, Error> {
    let mut files = Vec::new();
    walk_entries(dir, 0, &mut |path, is_yaml| {
        if is_yaml {
            let bytes = std::fs::read(&path).map_err(|e| Error::Read {
                path: path.clone(),
                error: e,
            })?;
            let text = String::from_utf8(bytes).map_err(|e| not_utf8(&path, &e))?;
            files.push((path, text));
        }
        Ok(())
    })?;
    files.sort();
    Ok(files)
}

/// The error for a config file that is not UTF-8, at its first bad byte.
fn not_utf8(path: &Path, e: &std::string::FromUtf8Error) -> Error {
    let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
    let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    Error::Syntax {
        path: path.to_owned(),
        pos: Some(Position {
            line: count(valid.iter().filter(|b| **b == b'\n').count() + 1),
            column: count(valid.len() - line_start + 1),
        }),
        message: format!(
            "not UTF-8 text (byte 0x{:02x} here): save the file as UTF-8",
            e.as_bytes()[valid.len()]
        ),
    }
}

/// The files [`read_dir`] does not read because they are not `*.yaml` /
/// `*.yml`, or are links to nothing (dotfiles aside), sorted: the caller
/// warns about them, since upstream would read them.
///
/// # Errors
/// [`Error::Read`] if a directory cannot be read.
pub fn ignored_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    walk_entries(dir, 0, &mut |path, is_yaml| {
        if !is_yaml {
            out.push(path);
        }
        Ok(())
    })?;
    out.sort();
    Ok(out)
}

/// Calls `f` with every regular file under `dir` (not under a dot name)
/// and whether it is YAML by its name.
fn walk_entries(
    dir: &Path,
    depth: usize,
    f: &mut dyn FnMut(PathBuf, bool) -> Result<(), Error>,
) -> Result<(), Error> {
    let read_err = |path: &Path, error| Error::Read {
        path: path.to_owned(),
        error,
    };
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
        let entry = entry.map_err(|e| read_err(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            if depth < MAX_DEPTH {
                walk_entries(&path, depth + 1, f)?;
            }
        } else if path.is_file() {
            f(path, name.ends_with(".yaml") || name.ends_with(".yml"))?;
        } else if path.is_symlink() {
            // A link to nothing: not read, and named in the warning.
            f(path, false)?;
        }
    }
    Ok(())
}

/// Validates a set of files (as read by [`read_dir`]) into one config.
///
/// # Errors
/// The first file's error, or [`Error::DuplicateDomain`].
pub fn from_files(files: &[(PathBuf, String)]) -> Result<Config, Error> {
    let mut domains = HashMap::new();
    let mut sources: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (path, text) in files {
        let (domain, pos, rules) = parse_file(path, text)?;
        if let Some(other) = sources.get(&domain) {
            return Err(Error::DuplicateDomain {
                path: path.clone(),
                pos,
                domain,
                other: other.clone(),
            });
        }
        sources.insert(domain.clone(), path.clone());
        domains.insert(domain, rules);
    }
    Ok(Config {
        rules: RuleSet::new(domains),
        sources,
    })
}

/// Reads and validates every config file in `dir`.
///
/// # Errors
/// See [`read_dir`] and [`from_files`].
pub fn load_dir(dir: &Path) -> Result<Config, Error> {
    from_files(&read_dir(dir)?)
}

#[cfg(test)]
mod tests;
