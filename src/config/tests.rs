use super::*;

fn err(yaml: &str) -> String {
    parse_file(Path::new("rules.yaml"), yaml)
        .unwrap_err()
        .to_string()
}

#[test]
fn embedded_default_parses() {
    let cfg = embedded_default().unwrap();
    assert!(cfg.rules.domains().contains_key("llm-gateway"));
}

#[test]
fn errors_name_file_line_and_field() {
    let cases = [
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limt: {}\n",
            "rules.yaml:4:5: unknown field `rate_limt`",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 1\n",
            "rules.yaml:5:13: field `unit`: invalid rate limit unit 'fortnight'",
        ),
        ("domain: \"\"\n", "rules.yaml:1:9: field `domain`: config file cannot have empty domain"),
        (
            "domain: d\ndescriptors:\n  - key: \"\"\n",
            "rules.yaml:3:10: field `key`: descriptor has empty key",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n  - key: a\n",
            "rules.yaml:4:10: field `key`: duplicate descriptor composite key 'a'",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a_b\n  - key: a\n    value: b\n",
            "rules.yaml:4:10: field `key`: duplicate descriptor composite key 'a_b'",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unlimited: true\n      unit: second\n",
            "rules.yaml:6:13: field `unit`: should not specify rate limit unit when unlimited",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      name: x\n      replaces: [{name: x}]\n",
            "field `replaces.name`: replaces should not contain name of same descriptor",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      replaces:\n        - name:\n",
            "field `replaces.name`: should not have an empty replaces entry",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      requests_per_unit: 5\n",
            "rules.yaml:5:7: field `unit`: rate limit for 'a' needs a unit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: -1\n",
            "rules.yaml:6:26: requests_per_unit must be a whole number from 0 to 4294967295, not -1 (in `requests_per_unit: -1`)",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 2.5}\n",
            "requests_per_unit must be a whole number from 0 to 4294967295, not 2.5",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: many}\n",
            "requests_per_unit must be a whole number from 0 to 4294967295, not 'many'",
        ),
        // Nulls read as upstream's YAML library reads them (empty), so they
        // get upstream's messages, not the parser's.
        ("domain:\n", "rules.yaml:1:7: field `domain`: config file cannot have empty domain"),
        (
            "domain: d\ndescriptors:\n  - key:\n    value: v\n",
            "rules.yaml:3:8: field `key`: descriptor has empty key",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      replaces:\n        - name:\n",
            "rules.yaml:7:15: field `replaces.name`: should not have an empty replaces entry",
        ),
        ("descriptors: []\n", "missing field `domain`"),
        ("domain: [\n", "rules.yaml:"),
    ];
    for (yaml, want) in cases {
        let got = err(yaml);
        assert!(
            got.contains(want),
            "for\n{yaml}\nwant `{want}`\ngot  `{got}`"
        );
    }
}

#[test]
fn empty_file_is_an_error() {
    assert_eq!(
        err("\n"),
        "rules.yaml: file is empty: expected a `domain` and `descriptors`"
    );
}

/// Upstream rejects an empty replaces entry, not an empty list.
#[test]
fn an_empty_replaces_list_loads() {
    parse_file(
        Path::new("r.yaml"),
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: 1\n      replaces: []\n",
    )
    .unwrap();
}

#[test]
fn accepts_every_upstream_key() {
    let yaml = r#"
domain: full
descriptors:
  - key: a
    value: "x*"
    share_threshold: true
    shadow_mode: true
    detailed_metric: true
    value_to_metric: true
    quota_mode: true
    metadata:
      team: blue
      nested: {a: [1, 2]}
    rate_limit:
      unit: SeCoNd
      requests_per_unit: 4294967295
      name: n1
      replaces:
        - name: n2
    descriptors:
      - key: b
        rate_limit: {unlimited: true}
"#;
    parse_file(Path::new("full.yaml"), yaml).unwrap();
}

/// Document markers as Kubernetes ConfigMaps and Helm templates write them
/// load, as upstream's decoder (the first document) reads them.
#[test]
fn leading_and_trailing_document_markers_load() {
    let body = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 5}\n";
    for text in [
        format!("---\n{body}"),
        format!("{body}---\n"),
        format!("---\n{body}---\n"),
        format!("# comment\n---\n{body}...\n"),
    ] {
        let (domain, _, rules) =
            parse_file(Path::new("rules.yaml"), &text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(domain, "d");
        let plain = parse_file(Path::new("rules.yaml"), body).unwrap().2;
        assert_eq!(rules, plain, "{text:?}");
    }
}

/// A second domain in one file is an error naming its line, where upstream
/// would silently drop it.
#[test]
fn a_second_document_is_an_error_naming_its_domain_and_line() {
    let e = err("domain: a\ndescriptors: []\n---\ndomain: b\n");
    assert!(
        e.starts_with("rules.yaml:4:9: a second YAML document (domain `b`)"),
        "{e}"
    );
    assert!(e.contains("put each domain in its own file"), "{e}");
}

#[test]
fn a_file_of_comments_only_is_empty() {
    assert_eq!(
        err("# nothing here\n---\n"),
        "rules.yaml: file is empty: expected a `domain` and `descriptors`"
    );
}

/// `requests_per_unit:` with no value is 0, a limit that always denies, as
/// upstream reads it; quoted and whole-float numbers load as numbers.
#[test]
fn requests_per_unit_null_quoted_and_float_forms() {
    for (v, want) in [
        ("", 0),
        ("\"7\"", 7),
        ("1e3", 1000),
        ("4294967295", u32::MAX),
    ] {
        let yaml =
            format!("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {{unit: minute, requests_per_unit: {v}}}\n");
        let (_, _, rules) = parse_file(Path::new("r.yaml"), &yaml).unwrap();
        let entry = crate::engine::Entry {
            key: "a".into(),
            value: "x".into(),
        };
        let m = rules.lookup(&[entry]).expect("the rule matches");
        let crate::engine::RuleLimit::Limited { limit, .. } = m.limit else {
            panic!("a counted limit for requests_per_unit: {v}");
        };
        assert_eq!(limit.requests_per_unit, want, "requests_per_unit: {v}");
    }
}

/// As upstream: an unlimited rule's unit is checked only for being a valid
/// one (refused with unlimited); an invalid one is ignored.
#[test]
fn an_unlimited_rule_ignores_an_invalid_unit() {
    let (_, _, rules) = parse_file(
        Path::new("rules.yaml"),
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: fortnight}\n",
    )
    .unwrap();
    let set = RuleSet::new(HashMap::from([("d".to_owned(), rules)]));
    assert!(set.domains().contains_key("d"));
}

/// A key given twice in one mapping: the last value, as upstream's yaml.v2
/// (not strict) takes it, instead of an error that named a library option.
#[test]
fn a_key_given_twice_takes_the_last_value() {
    let (domain, _, _) = parse_file(
        Path::new("rules.yaml"),
        "domain: a\ndomain: b\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
    )
    .unwrap();
    assert_eq!(domain, "b");
}

/// Descriptors nest deeper than a request's entries go by default (32);
/// too deep is an error that says so, naming the file and line (it named a
/// parser budget before), not a stack overflow.
#[test]
fn deep_nesting_loads_and_too_deep_says_so() {
    let nest = |levels: usize| {
        let mut y = String::from("domain: d\ndescriptors:\n");
        for i in 0..levels {
            let pad = "  ".repeat(2 * i + 1);
            y.push_str(&format!("{pad}- key: k{i}\n"));
            if i + 1 < levels {
                y.push_str(&format!("{pad}  descriptors:\n"));
            } else {
                y.push_str(&format!(
                    "{pad}  rate_limit: {{unit: second, requests_per_unit: 1, replaces: [{{name: other}}]}}\n"
                ));
            }
        }
        y
    };
    // On a 2 MiB stack (a tokio worker's, where reloads run), unoptimized.
    let deepest = nest(40);
    let loaded = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || parse_file(Path::new("rules.yaml"), &deepest).map(|(d, _, _)| d))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(loaded.unwrap(), "d");
    let e = err(&nest(44));
    assert!(
        e.starts_with("rules.yaml:") && e.contains("descriptors may nest 40 levels"),
        "{e}"
    );
}
