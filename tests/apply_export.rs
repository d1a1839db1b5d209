//! `sluice apply` and `sluice export` against the real binary: the shipped
//! example applies, re-applies as a no-op, exports to a file that applies as
//! a no-op, reports updates, prints key values that work, and refuses bad
//! files and bad tokens without changing anything.

mod proc;

use std::path::Path;
use std::process::Command;

use proc::*;

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plans.yaml")
}

/// Runs `sluice <args> --admin-addr ADDR --data-dir DATA` and returns the result.
fn sluice(args: &[&str], admin: std::net::SocketAddr, data: &Path) -> Finished {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(args)
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--data-dir")
        .arg(data);
    run_command(cmd, TIMEOUT)
}

fn ok(f: &Finished) -> &str {
    assert!(f.success(), "command failed:\n{}", f.output());
    &f.stdout
}

/// Runs `apply -f path` as a dry run, then for real: both must fail, with
/// an error `said` accepts (a check before the first change, so the dry
/// run catches what the real run would).
fn refused_before_any_change(
    path: &str,
    admin: std::net::SocketAddr,
    data: &Path,
    said: impl Fn(&str) -> bool,
) {
    for args in [
        vec!["apply", "-f", path, "--dry-run"],
        vec!["apply", "-f", path],
    ] {
        let f = sluice(&args, admin, data);
        assert!(!f.success(), "{args:?} succeeded:\n{}", f.output());
        assert!(said(&f.stderr), "{args:?}:\n{}", f.output());
    }
}

/// The value printed for a new key: `created api key NAME: value VALUE (...)`.
fn printed_value(out: &str, name: &str) -> String {
    let mark = format!("created api key {name}: value ");
    let line = out
        .lines()
        .find(|l| l.starts_with(&mark))
        .unwrap_or_else(|| panic!("no value printed for {name}:\n{out}"));
    line[mark.len()..]
        .split_whitespace()
        .next()
        .expect("a value")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_applies_idempotently_and_exports_to_a_no_op() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();

    // Dry run: lists six changes and makes none.
    let out = ok(&sluice(
        &["apply", "-f", example().to_str().unwrap(), "--dry-run"],
        admin,
        &data,
    ))
    .to_owned();
    for line in [
        "+ usage plan gold",
        "+ usage plan silver",
        "+ api key alice",
        "+ api key bob",
        "+ bind alice -> gold",
        "+ bind bob -> silver",
        "6 changes",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(
        !exported.contains("gold"),
        "dry run changed nothing:\n{exported}"
    );

    // Apply: the same changes, and each new key's value, once.
    let out = ok(&sluice(
        &["apply", "-f", example().to_str().unwrap()],
        admin,
        &data,
    ))
    .to_owned();
    assert!(out.contains("6 changes applied"), "{out}");
    let alice = printed_value(&out, "alice");
    assert!(alice.starts_with("slk_"), "{alice}");

    // The printed value is a working key of plan gold (domain llm-gateway).
    let mut c = s.client().await;
    let r = should(&mut c, request("llm-gateway", &[("api_key", &alice)])).await;
    assert_eq!(r.overall_code, OK, "{r:?}");
    let name = &r.statuses[0].current_limit.as_ref().expect("a limit").name;
    assert!(name.starts_with("gold/"), "{r:?}");

    // Again: nothing to do.
    let out = ok(&sluice(
        &["apply", "-f", example().to_str().unwrap()],
        admin,
        &data,
    ))
    .to_owned();
    assert_eq!(out.trim(), "no changes");

    // Export, then apply the export: nothing to do; values never exported.
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(
        exported.contains("name: gold") && exported.contains("name: alice"),
        "{exported}"
    );
    assert!(
        !exported.contains(&alice),
        "the key value must never be exported"
    );
    let file = dir.path().join("exported.yaml");
    std::fs::write(&file, &exported).unwrap();
    let out = ok(&sluice(
        &["apply", "-f", file.to_str().unwrap()],
        admin,
        &data,
    ))
    .to_owned();
    assert_eq!(
        out.trim(),
        "no changes",
        "export then apply must be a no-op"
    );

    // An edit shows as an update of exactly that field, and lands.
    let edited = std::fs::read_to_string(example()).unwrap().replace(
        "throttle: { rate_limit: 10, burst_limit: 20 }",
        "throttle: { rate_limit: 10, burst_limit: 40 }",
    );
    let file = dir.path().join("edited.yaml");
    std::fs::write(&file, edited).unwrap();
    let out = ok(&sluice(
        &["apply", "-f", file.to_str().unwrap()],
        admin,
        &data,
    ))
    .to_owned();
    assert!(
        out.lines().any(|l| l == "~ usage plan gold: throttle"),
        "{out}"
    );
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(exported.contains("burst_limit: 40"), "{exported}");
    drop(c);
    s.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_and_bad_tokens_fail_clearly_and_change_nothing() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "usage_plans:\n  - name: gold\n    throtle: { rate_limit: 1, burst_limit: 1 }\n",
    )
    .unwrap();
    let f = sluice(&["apply", "-f", bad.to_str().unwrap()], admin, &data);
    assert!(!f.success());
    let err = f.output();
    assert!(
        err.contains("bad.yaml") && err.contains("throtle") && err.contains("line 3"),
        "{err}"
    );

    // Valid YAML the server refuses: the server's message names the field.
    let invalid = dir.path().join("invalid.yaml");
    std::fs::write(
        &invalid,
        "usage_plans:\n  - name: gold\n    throttle: { rate_limit: 5, burst_limit: 0 }\n",
    )
    .unwrap();
    let f = sluice(&["apply", "-f", invalid.to_str().unwrap()], admin, &data);
    assert!(!f.success());
    assert!(
        f.output().contains("throttle.burst_limit"),
        "{}",
        f.output()
    );

    let f = sluice(
        &[
            "apply",
            "-f",
            example().to_str().unwrap(),
            "--admin-token",
            "wrong",
        ],
        admin,
        &data,
    );
    assert!(!f.success());
    assert!(
        f.output().to_lowercase().contains("unauthenticated"),
        "{}",
        f.output()
    );

    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(
        !exported.contains("name:"),
        "nothing was created:\n{exported}"
    );
    s.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_limits_apply_idempotently_and_export_to_a_no_op() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();

    let text = r#"usage_plans:
  - name: llm
    stages:
      - domain: llm-gateway
    limits:
      - name: tpm
        metric: TOKENS
        limit: 100000
        window: MINUTE
        model_limits: { "gpt-4o*": 30000 }
      - name: weighted-daily
        metric: TOKENS
        count: WEIGHTED
        input_weight: 0.5
        output_weight: 2
        limit: 200000
        window: DAY
        time_zone: UTC
        scope: CUSTOMER
      - name: monthly-budget
        metric: SPEND
        limit: 50000000
        window: MONTH
        anchor_day: 0
        time_zone: Europe/Paris
    prices:
      "gpt-4o*": { input_per_million: 2500000, output_per_million: 10000000 }
    header_style: BOTH
"#;
    let file = dir.path().join("limits.yaml");
    std::fs::write(&file, text).unwrap();
    let apply = |path: &Path| sluice(&["apply", "-f", path.to_str().unwrap()], admin, &data);

    let out = ok(&apply(&file)).to_owned();
    assert!(out.lines().any(|l| l == "+ usage plan llm"), "{out}");
    assert!(out.contains("1 change applied"), "{out}");
    // Server defaults (count TOTAL, time_zone UTC, MONTH anchor 0) compare
    // equal to the file's.
    let out = ok(&apply(&file)).to_owned();
    assert_eq!(out.trim(), "no changes");

    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    for part in [
        "name: tpm",
        "name: weighted-daily",
        "name: monthly-budget",
        "scope: CUSTOMER",
        "window: MONTH",
        "header_style: BOTH",
        "output_per_million: 10000000",
    ] {
        assert!(exported.contains(part), "missing {part:?} in:\n{exported}");
    }
    let exported_file = dir.path().join("exported.yaml");
    std::fs::write(&exported_file, &exported).unwrap();
    let out = ok(&apply(&exported_file)).to_owned();
    assert_eq!(
        out.trim(),
        "no changes",
        "export then apply must be a no-op:\n{exported}"
    );

    // One changed limit is an update of `limits` only, and lands.
    let edited = dir.path().join("edited.yaml");
    std::fs::write(&edited, text.replace("limit: 100000", "limit: 120000")).unwrap();
    let out = ok(&apply(&edited)).to_owned();
    assert!(
        out.lines().any(|l| l == "~ usage plan llm: limits"),
        "{out}"
    );
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(exported.contains("limit: 120000"), "{exported}");

    // Dropping the prices a SPEND limit needs (no shared table): refused
    // before any change, naming the plan and the limit.
    let no_prices = dir.path().join("no-prices.yaml");
    let text = text.replace(
        "    prices:\n      \"gpt-4o*\": { input_per_million: 2500000, output_per_million: 10000000 }\n",
        "",
    );
    assert!(!text.contains("prices"));
    std::fs::write(&no_prices, text).unwrap();
    let f = apply(&no_prices);
    assert!(!f.success(), "{}", f.output());
    assert!(
        f.stderr
            .contains("limit \"monthly-budget\" is a SPEND limit")
            && f.stderr.contains("prices"),
        "{}",
        f.output()
    );
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(exported.contains("gpt-4o*"), "prices kept:\n{exported}");
    s.terminate();
}

/// A SPEND limit without prices of its own needs the server's shared price
/// table, which a file does not carry: `apply` (and its dry run) checks it
/// before the first change, so nothing is half applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_without_prices_needs_the_shared_table_before_any_change() {
    use sluice::proto::admin::admin_service_client::AdminServiceClient;
    use sluice::proto::admin::{ModelPrice, PriceTable, UpdatePriceTableRequest};

    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();
    // The first plan is fine on its own: a partial apply would create it.
    let text = r#"usage_plans:
  - name: first
    stages: [{ domain: d1 }]
  - name: budget
    stages: [{ domain: d2 }]
    limits:
      - { name: monthly, metric: SPEND, limit: 5000000, window: MONTH }
"#;
    let file = dir.path().join("budget.yaml");
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();
    refused_before_any_change(path, admin, &data, |stderr| {
        stderr.contains("usage plan \"budget\": limit \"monthly\" is a SPEND limit")
            && stderr.contains("shared price table would be empty")
    });
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(!exported.contains("first"), "nothing applied:\n{exported}");

    // With a shared table on the server, the same file applies.
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{admin}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        AdminServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    client
        .update_price_table(UpdatePriceTableRequest {
            price_table: Some(PriceTable {
                prices: [(
                    "*".to_owned(),
                    ModelPrice {
                        input_per_million: 1_000_000,
                        output_per_million: 2_000_000,
                    },
                )]
                .into(),
            }),
        })
        .await
        .unwrap();
    let out = ok(&sluice(&["apply", "-f", path], admin, &data)).to_owned();
    assert!(out.contains("2 changes applied"), "{out}");
    s.terminate();
}

/// A file that changes what a named limit counts is refused before any
/// change, as the server would refuse it (the counter would mix units).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_what_a_named_limit_counts_is_refused_before_any_change() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();
    let text = "usage_plans:\n  - name: p\n    stages: [{ domain: d }]\n    limits:\n      - { name: daily, metric: TOKENS, limit: 1000, window: DAY }\n";
    let file = dir.path().join("a.yaml");
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();
    ok(&sluice(&["apply", "-f", path], admin, &data));
    // Another plan first in the file: a partial apply would create it.
    let edited = text
        .replace(
            "usage_plans:\n",
            "usage_plans:\n  - name: another\n    stages: [{ domain: d2 }]\n",
        )
        .replace("metric: TOKENS", "metric: REQUESTS");
    std::fs::write(&file, edited).unwrap();
    refused_before_any_change(path, admin, &data, |stderr| {
        stderr.contains("usage plan \"p\"") && stderr.contains("new name")
    });
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(
        exported.contains("TOKENS") && !exported.contains("another"),
        "nothing changed:\n{exported}"
    );
    s.terminate();
}

/// The shared price table travels in the file (`shared_prices`): export
/// writes it, and apply sets it (first, before plans that rely on it), so
/// an export applies to a fresh server as it is; a file without the
/// section leaves the server's table alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_price_table_is_exported_and_applied() {
    let dir = tempdir();
    let text = r#"shared_prices:
  "gpt-4o*": { input_per_million: 2500000, output_per_million: 10000000 }
usage_plans:
  - name: budget
    stages: [{ domain: d }]
    limits:
      - { name: monthly, metric: SPEND, limit: 5000000, window: MONTH }
"#;
    let file = dir.path().join("prices.yaml");
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();

    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();
    let out = ok(&sluice(&["apply", "-f", path, "--dry-run"], admin, &data)).to_owned();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["~ shared price table", "+ usage plan budget", "2 changes"],
        "{out}"
    );
    let out = ok(&sluice(&["apply", "-f", path], admin, &data)).to_owned();
    assert!(out.contains("2 changes applied"), "{out}");
    let out = ok(&sluice(&["apply", "-f", path], admin, &data)).to_owned();
    assert!(out.contains("no changes"), "{out}");
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(exported.contains("shared_prices:"), "{exported}");
    // A file without the section leaves the table alone.
    let plain = dir.path().join("plain.yaml");
    std::fs::write(&plain, "usage_plans: []\n").unwrap();
    let out = ok(&sluice(
        &["apply", "-f", plain.to_str().unwrap()],
        admin,
        &data,
    ))
    .to_owned();
    assert!(out.contains("no changes"), "{out}");
    // Emptying it while the server's budget plan (not in the file) relies
    // on it: refused before any change, in a dry run too.
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "shared_prices: {}\n").unwrap();
    for dry in [true, false] {
        let mut args = vec!["apply", "-f", empty.to_str().unwrap()];
        if dry {
            args.push("--dry-run");
        }
        let f = sluice(&args, admin, &data);
        assert!(!f.success(), "{}", f.output());
        assert!(
            f.stderr
                .contains("usage plan \"budget\" (not in the file) has a SPEND limit"),
            "{}",
            f.output()
        );
    }
    s.terminate();

    // The export applies to a fresh server as it is, then is a no-op.
    let again = dir.path().join("exported.yaml");
    std::fs::write(&again, &exported).unwrap();
    let data2 = dir.path().join("data2");
    let mut s2 = SluiceCmd::serve_embedded(&data2).start();
    let admin2 = s2.admin_addr();
    let again = again.to_str().unwrap();
    let out = ok(&sluice(&["apply", "-f", again], admin2, &data2)).to_owned();
    assert!(out.starts_with("~ shared price table\n"), "{out}");
    let out = ok(&sluice(&["apply", "-f", again], admin2, &data2)).to_owned();
    assert!(out.contains("no changes"), "{out}");
    s2.terminate();
}

/// Plans of one key that change stages: an update that takes a stage from
/// another plan of the key waits for that plan's update (a chain applies);
/// two plans that trade stages are refused before any change, in a dry run
/// and a real run alike, naming the file's line and the way out; a key
/// leaving a plan is unbound before the plans change. Errors found against
/// the server's state name the file and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_trading_stages_under_one_key_are_ordered_or_refused_before_any_change() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();
    let file = dir.path().join("a.yaml");
    let path = file.to_str().unwrap();
    let write = |a: &str, b: &str, k: &str| {
        let text = format!(
            "usage_plans:\n  - name: a\n    stages: [{{ domain: {a} }}]\n  - name: b\n    stages: [{{ domain: {b} }}]\napi_keys:\n  - name: k\n    usage_plans: [{k}]\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    write("d1", "d2", "a, b");
    ok(&sluice(&["apply", "-f", path], admin, &data));

    // A chain: a takes d2 from b, b moves on to d3. In file order a's update
    // would be refused; b's goes first.
    write("d2", "d3", "a, b");
    let out = ok(&sluice(&["apply", "-f", path], admin, &data)).to_owned();
    assert!(
        out.find("~ usage plan b: stages").unwrap() < out.find("~ usage plan a: stages").unwrap(),
        "{out}"
    );
    let exported = ok(&sluice(&["export"], admin, &data)).to_owned();
    assert!(
        exported.contains("domain: d2") && exported.contains("domain: d3"),
        "{exported}"
    );

    // A swap: no order works. Refused in the dry run and the real run, with
    // a's line (2), and nothing changes.
    write("d3", "d2", "a, b");
    refused_before_any_change(path, admin, &data, |stderr| {
        stderr.contains("a.yaml:2:")
            && stderr.contains("trade stages")
            && stderr.contains("bound to only one of them")
    });
    assert_eq!(ok(&sluice(&["export"], admin, &data)), exported);

    // The way out: the key leaves b in the same file; it is unbound first,
    // then both plans change.
    write("d3", "d2", "a");
    let out = ok(&sluice(&["apply", "-f", path], admin, &data)).to_owned();
    assert!(
        out.find("- bind k -> b").unwrap() < out.find("~ usage plan a: stages").unwrap(),
        "{out}"
    );
    let f = sluice(&["apply", "-f", path, "--dry-run"], admin, &data);
    assert!(ok(&f).contains("no changes"), "{}", f.output());

    // A binding to a plan that exists nowhere: the binding's line.
    std::fs::write(
        &file,
        "api_keys:\n  - name: k\n    usage_plans:\n      - a\n      - nowhere\n",
    )
    .unwrap();
    let f = sluice(&["apply", "-f", path, "--dry-run"], admin, &data);
    assert!(!f.success(), "{}", f.output());
    assert!(
        f.stderr.contains("a.yaml:5:") && f.stderr.contains("\"nowhere\""),
        "{}",
        f.output()
    );
    s.terminate();
}

/// A limit removed and added back under its name in another unit within 33
/// days is refused by the server; apply asks the server to check each
/// update first (validate_only), so the dry run says so with the plan's
/// line and the real run changes nothing (it used to unbind a key first,
/// then fail at the update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_limit_added_back_in_another_unit_is_refused_before_any_change() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut s = SluiceCmd::serve_embedded(&data).start();
    let admin = s.admin_addr();
    let file = dir.path().join("a.yaml");
    let path = file.to_str().unwrap();
    let plan = |limits: &str| {
        format!(
            "usage_plans:\n  - name: lim\n    stages: [{{ domain: d }}]\n{limits}  - name: other\n    stages: [{{ domain: e }}]\n"
        )
    };
    let with_req = "    limits:\n      - { name: req, metric: REQUESTS, limit: 10, window: DAY }\n";
    let keys = |plans: &str| format!("api_keys:\n  - name: k\n    usage_plans: [{plans}]\n");
    std::fs::write(&file, plan(with_req) + &keys("lim, other")).unwrap();
    ok(&sluice(&["apply", "-f", path], admin, &data));
    std::fs::write(&file, plan("") + &keys("lim, other")).unwrap();
    ok(&sluice(&["apply", "-f", path], admin, &data));
    let before = ok(&sluice(&["export"], admin, &data)).to_owned();

    // Back as TOKENS, and the key leaves `other` in the same file.
    let with_tokens =
        "    limits:\n      - { name: req, metric: TOKENS, limit: 10, window: DAY }\n";
    std::fs::write(&file, plan(with_tokens) + &keys("lim")).unwrap();
    refused_before_any_change(path, admin, &data, |stderr| {
        stderr.contains("a.yaml:2:") && stderr.contains("removed limit")
    });
    assert_eq!(
        ok(&sluice(&["export"], admin, &data)),
        before,
        "nothing changed"
    );
    s.terminate();
}

/// A token in the environment and a token file on the command line are a
/// conflict said at once (the environment's token silently won, and the
/// call failed as unauthenticated); an empty token names where it came
/// from, the variable included.
#[test]
fn token_sources_that_conflict_are_refused() {
    let dir = tempdir();
    let file = dir.path().join("tok");
    std::fs::write(&file, "good\n").unwrap();
    let mut cmd = Command::new(sluice_bin());
    cmd.args([
        "export",
        "--admin-addr",
        "127.0.0.1:1",
        "--admin-token-file",
    ])
    .arg(&file)
    .env("SLUICE_ADMIN_TOKEN", "wrong");
    let f = run_command(cmd, TIMEOUT);
    assert_eq!(f.status.code(), Some(2), "{}", f.output());
    assert!(f.stderr.contains("cannot be used with"), "{}", f.output());

    let mut cmd = Command::new(sluice_bin());
    cmd.args(["export", "--admin-addr", "127.0.0.1:1"])
        .env("SLUICE_ADMIN_TOKEN", "");
    let f = run_command(cmd, TIMEOUT);
    assert!(!f.success(), "{}", f.output());
    assert!(f.stderr.contains("SLUICE_ADMIN_TOKEN"), "{}", f.output());
}
