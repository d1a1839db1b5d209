//! Process-level tests: the real `sluice` binary, started as a child process
//! and driven over gRPC, signals and its data and config directories.

mod proc;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proc::*;
use tonic_health::pb::health_check_response::ServingStatus;

/// A day-limited domain for persistence tests.
const PERSIST_DOMAIN: &str = "persist";
const PERSIST_LIMIT: u32 = 1000;

fn persist_config(dir: &Path) {
    write_atomic(
        &dir.join("persist.yaml"),
        &simple_config(PERSIST_DOMAIN, "user", "day", PERSIST_LIMIT),
    );
}

/// Makes `n` hits on the persistence limit for `user`; returns the last
/// remaining count.
async fn hit_n(s: &Sluice, user: &str, n: u32) -> u32 {
    let mut c = s.client().await;
    let mut last = None;
    for _ in 0..n {
        let r = should(&mut c, request(PERSIST_DOMAIN, &[("user", user)])).await;
        assert_eq!(r.overall_code, OK, "{r:?}");
        let st = &r.statuses[0];
        assert_eq!(first_limit(&r), Some(PERSIST_LIMIT), "{r:?}");
        assert_eq!(st.current_limit.as_ref().unwrap().unit, DAY);
        last = Some(st.limit_remaining);
    }
    last.expect("n > 0")
}

fn assert_exit_ok(s: &mut Sluice, status: std::process::ExitStatus) {
    assert_eq!(
        status.code(),
        Some(0),
        "graceful stop should exit 0, got {status}; stderr:\n{}",
        s.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_start_without_config_dir_serves_embedded_default_and_health() {
    let tmp = tempdir();
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .cwd(tmp.path())
        .args(["--reload-interval-ms", "50"])
        .start();
    assert!(
        s.stderr().contains("embedded default"),
        "stderr should say the embedded default is served:\n{}",
        s.stderr()
    );

    let mut c = s.client().await;
    let r = should(
        &mut c,
        request("llm-gateway", &[("remote_address", "10.1.2.3")]),
    )
    .await;
    assert_eq!(r.overall_code, OK, "{r:?}");
    assert_eq!(r.statuses.len(), 1);
    let st = &r.statuses[0];
    let limit = st.current_limit.as_ref().expect("current_limit set");
    assert_eq!(limit.requests_per_unit, 10);
    assert_eq!(limit.unit, SECOND);
    assert_eq!(st.limit_remaining, 9);

    // An unknown domain is OK with no limit.
    let r = should(&mut c, request("nope", &[("remote_address", "10.1.2.3")])).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(first_limit(&r), None);

    let mut h = s.health().await;
    for name in [
        "",
        "ratelimit",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        assert_eq!(
            health_status(&mut h, name).await,
            ServingStatus::Serving as i32,
            "health of {name:?}"
        );
    }
    drop((c, h));
    // Polls of the default dir that never existed say nothing (a "config
    // dir is gone" warning came once a second).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
    assert!(s.stderr().contains("stopped cleanly"), "{}", s.stderr());
    assert!(!s.stderr().contains("WARN"), "{}", s.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_persist_across_graceful_restart() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    avoid_window_edge(86_400, 300);
    let cmd = SluiceCmd::serve(&cfg, &data).cwd(tmp.path());

    let mut s = cmd.start();
    assert_eq!(hit_n(&s, "alice", 7).await, PERSIST_LIMIT - 7);
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
    drop(s);

    let mut s = cmd.start();
    assert_eq!(hit_n(&s, "alice", 1).await, PERSIST_LIMIT - 8);
    // Another graceful cycle keeps counting.
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
    drop(s);
    let s = cmd.start();
    assert_eq!(hit_n(&s, "alice", 2).await, PERSIST_LIMIT - 10);
    assert_eq!(hit_n(&s, "bob", 1).await, PERSIST_LIMIT - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_sigkill_after_a_flush_interval() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    avoid_window_edge(86_400, 300);
    let cmd = SluiceCmd::serve(&cfg, &data).cwd(tmp.path()).args([
        "--durability",
        "interval",
        "--flush-interval-ms",
        "100",
    ]);

    let mut s = cmd.start();
    assert_eq!(hit_n(&s, "carol", 5).await, PERSIST_LIMIT - 5);
    // Well over the 100 ms flush interval (not a timing assertion).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let status = s.kill9();
    assert!(
        !status.success(),
        "kill -9 should not look like a clean exit"
    );
    drop(s);

    let mut s = cmd.start();
    assert!(
        s.stderr().contains("counter store opened"),
        "{}",
        s.stderr()
    );
    assert_eq!(hit_n(&s, "carol", 1).await, PERSIST_LIMIT - 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_durability_keeps_every_acknowledged_hit_across_sigkill() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    avoid_window_edge(86_400, 300);
    // A huge flush interval proves the sync path, not the timer, persisted it.
    let cmd = SluiceCmd::serve(&cfg, &data).cwd(tmp.path()).args([
        "--durability",
        "sync",
        "--flush-interval-ms",
        "60000",
    ]);

    let mut s = cmd.start();
    assert_eq!(hit_n(&s, "dave", 9).await, PERSIST_LIMIT - 9);
    s.kill9(); // at once, no wait
    drop(s);

    let mut s = cmd.start();
    assert_eq!(hit_n(&s, "dave", 1).await, PERSIST_LIMIT - 10);
    s.kill9();
    drop(s);
    let s = cmd.start();
    assert_eq!(hit_n(&s, "dave", 1).await, PERSIST_LIMIT - 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_applies_changes_and_keeps_last_good_config() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    let alpha = cfg.join("alpha.yaml");
    let beta = cfg.join("beta.yaml");
    write_atomic(&alpha, &simple_config("alpha", "k", "hour", 1000));
    let mut s = SluiceCmd::serve(&cfg, &data)
        .cwd(tmp.path())
        .args(["--reload-interval-ms", "100"])
        .start();
    let mut c = s.client().await;
    let alpha_req = request("alpha", &[("k", "v")]);
    let beta_req = request("beta", &[("b", "v")]);

    let r = should(&mut c, alpha_req.clone()).await;
    assert_eq!(first_limit(&r), Some(1000), "{r:?}");
    let r = should(&mut c, beta_req.clone()).await;
    assert_eq!(first_limit(&r), None, "beta is not configured yet: {r:?}");

    // 1. Change a file's limit.
    write_atomic(&alpha, &simple_config("alpha", "k", "hour", 2000));
    poll_until(&mut c, &alpha_req, "alpha limit 2000", |r| {
        first_limit(r) == Some(2000)
    })
    .await;

    // 2. Add a file with a new domain.
    write_atomic(&beta, &simple_config("beta", "b", "hour", 500));
    let r = poll_until(&mut c, &beta_req, "new domain beta", |r| {
        first_limit(r) == Some(500)
    })
    .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().unit, HOUR);

    // 3. Remove it: the domain becomes unknown (OK, no current_limit).
    std::fs::remove_file(&beta).unwrap();
    let r = poll_until(&mut c, &beta_req, "domain beta removed", |r| {
        first_limit(r).is_none()
    })
    .await;
    assert_eq!(r.overall_code, OK, "{r:?}");
    assert_eq!(r.statuses.len(), 1);

    // 4. An invalid edit is rejected, naming the file; the old config serves.
    write_atomic(
        &alpha,
        "domain: alpha\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 3000\n",
    );
    let line = s.wait_for_line(|l| l.contains("config reload rejected"));
    assert!(
        line.contains("alpha.yaml") && line.contains("unit"),
        "the rejection should name the file and field: {line}"
    );
    for _ in 0..3 {
        let r = should(&mut c, alpha_req.clone()).await;
        assert_eq!(first_limit(&r), Some(2000), "last good config: {r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    assert!(s.is_running(), "an invalid config must not stop the server");

    // 5. Fix it: reloaded.
    write_atomic(&alpha, &simple_config("alpha", "k", "hour", 3000));
    poll_until(&mut c, &alpha_req, "alpha fixed to 3000", |r| {
        first_limit(r) == Some(3000)
    })
    .await;
    let r = should(&mut c, beta_req.clone()).await;
    assert_eq!(first_limit(&r), None, "beta stays removed: {r:?}");

    // 6. The directory goes away (a volume unmounted): said once, and the
    // last config keeps serving; back, it is read again.
    let away = tmp.path().join("config-away");
    std::fs::rename(&cfg, &away).unwrap();
    let line = s.wait_for_line(|l| l.contains("config dir is gone"));
    assert!(line.contains("WARN"), "{line}");
    let r = should(&mut c, alpha_req.clone()).await;
    assert_eq!(first_limit(&r), Some(3000), "last good config: {r:?}");
    write_atomic(
        &away.join("alpha.yaml"),
        &simple_config("alpha", "k", "hour", 4000),
    );
    std::fs::rename(&away, &cfg).unwrap();
    poll_until(&mut c, &alpha_req, "alpha back at 4000", |r| {
        first_limit(r) == Some(4000)
    })
    .await;
    drop(c);
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
}

/// A config dir with no config file loads (upstream starts with no rules
/// too) but says that no rule applies; a file that is not UTF-8 is refused
/// naming its line and column.
#[test]
fn an_empty_config_dir_is_said_and_a_non_utf8_file_is_placed() {
    let tmp = tempdir();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let c = SluiceCmd::check_config(&empty).cwd(tmp.path()).run();
    assert!(c.success(), "{}", c.output());
    assert!(
        c.stderr.contains("WARN") && c.stderr.contains("no rule applies"),
        "{}",
        c.output()
    );

    let latin = tmp.path().join("latin");
    std::fs::create_dir_all(&latin).unwrap();
    std::fs::write(
        latin.join("x.yaml"),
        b"domain: d\n# caf\xe9\ndescriptors: []\n",
    )
    .unwrap();
    let c = SluiceCmd::check_config(&latin).cwd(tmp.path()).run();
    assert!(!c.success(), "{}", c.output());
    assert!(
        c.stderr
            .contains("x.yaml:2:6: not UTF-8 text (byte 0xe9 here)"),
        "{}",
        c.output()
    );
}

const TYPO_CONFIG: &str = "domain: bad
descriptors:
  - key: k
    rate_limt:
      unit: hour
      requests_per_unit: 5
";

const BAD_UNIT_CONFIG: &str = "domain: bad
descriptors:
  - key: k
    rate_limit:
      unit: fortnight
      requests_per_unit: 5
";

/// upstream's examples/ratelimit/config/quota.yaml loads, without the
/// warning earlier versions gave (quota_mode is implemented now; its
/// answers are checked in rls_e2e.rs).
#[test]
fn upstream_quota_mode_config_loads_without_a_warning() {
    let tmp = tempdir();
    let cfg = tmp.path().join("cfg");
    write_atomic(
        &cfg.join("quota.yaml"),
        "---\ndomain: quota\ndescriptors:\n  - key: service\n    value: service_1\n    quota_mode: true\n    rate_limit:\n      unit: minute\n      requests_per_unit: 1\n",
    );
    let c = SluiceCmd::check_config(&cfg).cwd(tmp.path()).run();
    assert!(c.success(), "{}", c.output());
    assert!(c.stdout.contains("quota"), "{}", c.output());
    assert!(!c.stderr.contains("WARN"), "{}", c.output());
}

#[test]
fn bad_config_at_startup_fails_naming_file_line_and_field() {
    let tmp = tempdir();
    let good = tmp.path().join("good");
    write_atomic(
        &good.join("good.yaml"),
        &simple_config("good", "k", "hour", 5),
    );
    let ok = SluiceCmd::check_config(&good).cwd(tmp.path()).run();
    assert!(ok.success(), "check-config on a valid dir: {}", ok.output());
    assert!(ok.stdout.contains("good"), "{}", ok.output());

    for (name, text, expect) in [
        ("typo", TYPO_CONFIG, "bad.yaml:4:5: unknown field"),
        ("unit", BAD_UNIT_CONFIG, "bad.yaml:5:13: field `unit`"),
    ] {
        let cfg = tmp.path().join(name);
        write_atomic(&cfg.join("bad.yaml"), text);
        let data = tmp.path().join(format!("data-{name}"));
        let f = SluiceCmd::serve(&cfg, &data)
            .cwd(tmp.path())
            .expect_failure();
        assert!(!f.success(), "{name}: serve should fail");
        assert!(
            f.stderr.contains(expect),
            "{name}: serve stderr should contain {expect:?}:\n{}",
            f.stderr
        );
        if name == "typo" {
            assert!(f.stderr.contains("rate_limt"), "{}", f.stderr);
        }

        let c = SluiceCmd::check_config(&cfg).cwd(tmp.path()).run();
        assert!(!c.success(), "{name}: check-config should fail");
        assert!(
            c.output().contains(expect),
            "{name}: check-config output should contain {expect:?}:\n{}",
            c.output()
        );
    }
}

#[test]
fn data_dir_that_is_a_regular_file_is_refused() {
    let tmp = tempdir();
    let data = tmp.path().join("data-file");
    std::fs::write(&data, b"not a directory").unwrap();
    let f = SluiceCmd::serve_embedded(&data)
        .cwd(tmp.path())
        .expect_failure();
    assert!(!f.success());
    assert!(
        f.stderr.contains(&data.display().to_string()),
        "the error should name {}:\n{}",
        data.display(),
        f.stderr
    );
    assert_eq!(std::fs::read(&data).unwrap(), b"not a directory");
}

fn random_bytes(n: usize) -> Vec<u8> {
    // xorshift64*, seeded from the clock and pid: only needs to be garbage.
    let mut x = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn write_garbage(path: &Path, n: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&random_bytes(n)).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn garbage_sled_files_are_refused_naming_the_path() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("sled")).unwrap();
    write_garbage(&data.join("sled/conf"), 4096);
    write_garbage(&data.join("sled/db"), 256 * 1024);
    let db_before = std::fs::read(data.join("sled/db")).unwrap();
    let f = SluiceCmd::serve_embedded(&data)
        .cwd(tmp.path())
        .expect_failure();
    assert!(!f.success());
    assert!(
        f.stderr.contains(&data.display().to_string()) && f.stderr.contains("data dir"),
        "the error should name the data dir {}:\n{}",
        data.display(),
        f.stderr
    );
    assert_eq!(
        std::fs::read(data.join("sled/db")).unwrap(),
        db_before,
        "refusing must not rewrite the data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_real_data_dir_is_refused_not_reset() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    avoid_window_edge(86_400, 300);
    let cmd = SluiceCmd::serve(&cfg, &data)
        .cwd(tmp.path())
        .args(["--durability", "sync"]);
    let mut s = cmd.start();
    assert_eq!(hit_n(&s, "erin", 3).await, PERSIST_LIMIT - 3);
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
    drop(s);

    let db = data.join("sled/db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    write_garbage(&db, len.max(64 * 1024));
    match cmd.start_or_exit() {
        Ok(s) => {
            let mut c = s.client().await;
            let r = should(&mut c, request(PERSIST_DOMAIN, &[("user", "erin")])).await;
            panic!(
                "sluice started on a corrupted data dir (at {}); next hit answered remaining {} \
                 (4 hits would leave {})",
                s.addr,
                r.statuses[0].limit_remaining,
                PERSIST_LIMIT - 4
            );
        }
        Err(f) => {
            assert!(!f.success());
            assert!(
                f.stderr.contains(&data.display().to_string()),
                "the error should name {}:\n{}",
                data.display(),
                f.stderr
            );
        }
    }
}

/// A config dir the operator names must exist: a typo in `--config-dir` (or
/// SLUICE_CONFIG_DIR) must not silently serve the embedded example rules.
/// `check-config` refuses it too. Nothing is created.
#[test]
fn a_named_config_dir_that_does_not_exist_is_refused() {
    let tmp = tempdir();
    let missing = tmp.path().join("confg");
    let data = tmp.path().join("data");
    let f = SluiceCmd::serve(&missing, &data)
        .cwd(tmp.path())
        .expect_failure();
    assert!(!f.success());
    let want = format!("{}: config dir not found", missing.display());
    assert!(f.stderr.contains(&want), "want `{want}` in:\n{}", f.stderr);
    assert!(!data.exists(), "nothing may be created");
    let f = SluiceCmd::serve_embedded(&data)
        .env("SLUICE_CONFIG_DIR", &missing)
        .expect_failure();
    assert!(f.stderr.contains(&want), "want `{want}` in:\n{}", f.stderr);
    let f = SluiceCmd::check_config(&missing).run();
    assert!(!f.success());
    assert!(f.stderr.contains(&want), "want `{want}` in:\n{}", f.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_in_use_by_another_sluice_is_refused() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let mut first = SluiceCmd::serve_embedded(&data).start();
    let f = SluiceCmd::serve_embedded(&data).expect_failure();
    assert!(!f.success());
    assert!(
        f.stderr.contains(&data.display().to_string()),
        "the error should name {}:\n{}",
        data.display(),
        f.stderr
    );
    assert!(
        f.stderr
            .contains("locked by another process (is another sluice serving this data dir?)"),
        "{}",
        f.stderr
    );
    // The first one is unaffected.
    assert!(first.is_running());
    let mut c = first.client().await;
    let r = should(
        &mut c,
        request("llm-gateway", &[("remote_address", "10.9.9.9")]),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    drop(c);
    let status = first.terminate();
    assert_exit_ok(&mut first, status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_json_lines() {
    let tmp = tempdir();
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .cwd(tmp.path())
        .args(["--log-format", "json"])
        .start();
    let mut c = s.client().await;
    should(
        &mut c,
        request("llm-gateway", &[("remote_address", "10.0.0.7")]),
    )
    .await;
    drop(c);
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
    let lines: Vec<String> = s
        .lines()
        .iter()
        .filter(|l| !l.trim().is_empty())
        .cloned()
        .collect();
    assert!(lines.len() >= 3, "expected several log lines: {lines:?}");
    for l in &lines {
        let t = l.trim();
        assert!(
            t.starts_with('{') && t.ends_with('}') && t.contains("\"level\""),
            "not a JSON log line: {l}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("sluice listening on")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_is_invalid_argument_and_server_stays_up() {
    let tmp = tempdir();
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .cwd(tmp.path())
        .start();
    let mut c = s.client().await;
    let err = try_should(&mut c, request("", &[("remote_address", "10.0.0.8")]))
        .await
        .expect_err("empty domain must be rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("domain"), "{err:?}");

    let mut empty = request("llm-gateway", &[]);
    empty.descriptors.clear();
    let err = try_should(&mut c, empty)
        .await
        .expect_err("no descriptors must be rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Same connection, then a fresh one: both work.
    let r = should(
        &mut c,
        request("llm-gateway", &[("remote_address", "10.0.0.8")]),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(first_limit(&r), Some(10));
    let mut c2 = s.client().await;
    let r = should(
        &mut c2,
        request("llm-gateway", &[("remote_address", "10.0.0.9")]),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert!(s.is_running());
    drop((c, c2));
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
}

/// A client that keeps its connection open and stops reading (here: its
/// runtime is never polled again) must not stall a graceful stop: after
/// `--drain-timeout-ms` the server drops it, flushes and exits 0.
#[test]
fn sigterm_does_not_wait_forever_for_a_stuck_client() {
    let tmp = tempdir();
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .arg("--drain-timeout-ms")
        .arg("500")
        .start();
    let stuck = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = stuck.block_on(async {
        let mut c = s.client().await;
        let r = should(
            &mut c,
            request("llm-gateway", &[("remote_address", "10.0.0.1")]),
        )
        .await;
        assert_eq!(r.overall_code, OK, "{r:?}");
        c
    });
    // `stuck` is not polled from here on: the connection stays open and
    // nobody answers the server's GOAWAY/PING.
    let status = s.terminate();
    assert_exit_ok(&mut s, status);
    let stderr = s.stderr();
    assert!(stderr.contains("drain timeout"), "{stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    drop(client);
}

/// Reads from `s` until it closes (read returns 0) or an error; panics if
/// neither happens within `within` (a bound, not a timing assertion).
fn wait_closed(s: &mut std::net::TcpStream, within: Duration, what: &str) {
    use std::io::Read;
    s.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // the server's HTTP/2 settings, then EOF
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: still open after {within:?} ({e})"),
        }
    }
}

/// A connection that sends nothing is closed once idle for
/// --idle-timeout-secs, and past --max-connections a new connection is
/// closed at once (a warning says why); once connections go, new clients
/// are served again. Waits are bounded, never asserted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_the_connection_cap_holds() {
    let tmp = tempdir();
    // Idle: closed after about a second (bounded at 30 s).
    let idle_server = SluiceCmd::serve_embedded(&tmp.path().join("data-idle"))
        .args(["--idle-timeout-secs", "1"])
        .start();
    let addr = idle_server.addr;
    tokio::task::block_in_place(|| {
        let mut idle = std::net::TcpStream::connect(addr).expect("connect");
        wait_closed(&mut idle, Duration::from_secs(30), "an idle connection");
    });
    drop(idle_server);

    // The cap (idle connections kept for the default 300 s): two held
    // open, a third is closed at once.
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .args(["--max-connections", "2"])
        .start();
    let addr = s.addr;
    tokio::task::block_in_place(|| {
        let held: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut third = std::net::TcpStream::connect(addr).expect("connect");
        wait_closed(
            &mut third,
            Duration::from_secs(30),
            "a connection past the cap",
        );
        drop(held);
    });
    // Slots free again: a real client is served (a few tries while the
    // server notices the held connections closed).
    let mut served = false;
    for _ in 0..50 {
        if let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(5), async {
            sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(format!(
                "http://{addr}"
            ))
            .await
        })
        .await
        {
            // A connection accepted before a slot was freed is closed at
            // once: a transport error, so try again.
            let r = try_should(
                &mut c,
                request("llm-gateway", &[("remote_address", "10.0.0.9")]),
            )
            .await;
            if r.is_ok_and(|r| r.overall_code == OK) {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "no call served after the held connections closed");
    assert!(
        s.stderr().contains("too many connections"),
        "the cap is logged:\n{}",
        s.stderr()
    );
}

/// A data dir that holds other files and no sluice database (e.g. the config
/// dir given as --data-dir) starts with a warning naming them; once the
/// database is there, no warning.
#[test]
fn a_data_dir_with_foreign_files_is_warned_about() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    write_atomic(
        &data.join("rules.yaml"),
        &simple_config("d", "k", "hour", 5),
    );
    let want = "the data dir holds files that are not sluice's (rules.yaml)";
    let mut s = SluiceCmd::serve_embedded(&data).start();
    assert!(s.stderr().contains(want), "{}", s.stderr());
    drop(s);
    let mut s = SluiceCmd::serve_embedded(&data).start();
    assert!(!s.stderr().contains("not sluice's"), "{}", s.stderr());
}

/// curl or a browser pointed at a gRPC port gets a plain HTTP/1.1 answer
/// saying what the port speaks (not h2's frames, which curl reports as
/// "HTTP/0.9"), on both ports; gRPC goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_gets_a_plain_answer_naming_grpc() {
    use std::io::Read;
    let tmp = tempdir();
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data")).start();
    let admin = s.admin_addr();
    for addr in [s.addr, admin] {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"),
            "{addr}: {answer:?}"
        );
        assert!(answer.contains("gRPC over HTTP/2"), "{addr}: {answer:?}");
    }
    let mut h = s.health().await;
    assert_eq!(
        health_status(&mut h, "").await,
        ServingStatus::Serving as i32
    );
    drop(h);
    s.terminate();
}

/// As upstream's runtime loader, config files in subdirectories load;
/// dot names (Kubernetes' `..data` copies, editor files) are skipped, and
/// files that are not YAML by name are named in a warning instead of
/// vanishing without a word.
#[test]
fn config_in_subdirectories_loads_and_other_files_are_named() {
    let tmp = tempdir();
    let cfg = tmp.path().join("cfg");
    write_atomic(&cfg.join("top.yaml"), &simple_config("top", "k", "hour", 5));
    write_atomic(
        &cfg.join("team/a/nested.yml"),
        &simple_config("nested", "k", "hour", 5),
    );
    write_atomic(
        &cfg.join("..data/copy.yaml"),
        &simple_config("top", "k", "hour", 5),
    );
    write_atomic(
        &cfg.join(".hidden.yaml"),
        &simple_config("top", "k", "hour", 5),
    );
    write_atomic(
        &cfg.join("limits.conf"),
        &simple_config("conf", "k", "hour", 5),
    );
    std::os::unix::fs::symlink(cfg.join("gone.yaml"), cfg.join("broken.yaml")).unwrap();
    let c = SluiceCmd::check_config(&cfg).cwd(tmp.path()).run();
    assert!(c.success(), "{}", c.output());
    assert!(c.stdout.contains("ok: domain nested"), "{}", c.output());
    assert!(c.stdout.contains("ok: domain top"), "{}", c.output());
    assert!(!c.stdout.contains("domain conf"), "{}", c.output());
    assert!(
        c.stderr.contains("not reading")
            && c.stderr.contains("limits.conf")
            && c.stderr.contains("broken.yaml"),
        "{}",
        c.output()
    );
    assert!(!c.stderr.contains("copy.yaml"), "{}", c.output());
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
fn http1(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sets a resource limit on the running process `pid` with util-linux's
/// `prlimit` (`--fsize=...`, `--nofile=...`); panics if it cannot.
fn prlimit(pid: u32, limit: &str) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(limit)
        .output()
        .unwrap_or_else(|e| panic!("prlimit (util-linux) is needed for this test: {e}"));
    assert!(
        out.status.success(),
        "prlimit {limit}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The address of the HTTP port (--http-listen), from its log line.
fn http_addr(s: &mut Sluice) -> std::net::SocketAddr {
    let line = s.wait_for_line(|l| l.contains("/json) listening on"));
    line.split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// envoyproxy/ratelimit's HTTP endpoints on --http-listen: GET /healthcheck
/// answers 200 OK (Kubernetes httpGet probes written for upstream work),
/// POST /json decides a JSON RateLimitRequest, 200 or 429 as upstream, and
/// bad input is a 400 naming what is wrong.
#[test]
fn the_http_port_serves_healthcheck_and_json() {
    let tmp = tempdir();
    let cfg = tmp.path().join("cfg");
    write_atomic(&cfg.join("d.yaml"), &simple_config("d", "k", "minute", 1));
    let mut s = SluiceCmd::serve(&cfg, &tmp.path().join("data"))
        .args(["--http-listen", "127.0.0.1:0"])
        .start();
    let addr = http_addr(&mut s);
    assert_eq!(http1(addr, "GET", "/healthcheck", ""), (200, "OK".into()));
    let req = r#"{"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}"#;
    let (status, body) = http1(addr, "POST", "/json", req);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["overallCode"], "OK", "{body}");
    assert_eq!(
        v["statuses"][0]["currentLimit"]["requestsPerUnit"], 1,
        "{body}"
    );
    assert_eq!(v["statuses"][0]["currentLimit"]["unit"], "MINUTE", "{body}");
    let (status, body) = http1(addr, "POST", "/json", req);
    assert_eq!(status, 429, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["overallCode"], "OVER_LIMIT", "{body}");
    assert_eq!(v["statuses"][0]["code"], "OVER_LIMIT", "{body}");
    let (status, body) = http1(addr, "POST", "/json", r#"{"domain": "d"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("descriptor list must not be empty"), "{body}");
    let (status, body) = http1(addr, "POST", "/json", "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid JSON RateLimitRequest"), "{body}");
    // Any method, as upstream; an unknown path says what the port serves.
    assert_eq!(http1(addr, "HEAD", "/healthcheck", "").0, 200);
    let (status, body) = http1(addr, "GET", "/nope", "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("/healthcheck and /json"), "{body}");
    s.terminate();
}

/// Listen addresses take a host name (`localhost:PORT`, its IPv4 address),
/// here through the environment; a name that does not resolve is a clear
/// start-up error.
#[test]
fn listen_addresses_take_host_names() {
    let tmp = tempdir();
    let mut s = SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .env("SLUICE_HTTP_LISTEN", "localhost:0")
        .start();
    let line = s.wait_for_line(|l| l.contains("/json) listening on"));
    assert!(line.contains("listening on 127.0.0.1:"), "{line}");
    s.terminate();
    let f = SluiceCmd::serve_embedded(&tmp.path().join("data2"))
        .arg("--http-listen")
        .arg("no-such-host.invalid:1")
        .run();
    assert!(!f.success(), "{}", f.output());
    assert!(
        f.stderr
            .contains("\"no-such-host.invalid:1\" is not IP:PORT or HOST:PORT"),
        "{}",
        f.output()
    );
}

/// A disk that stops taking writes (here: a file size limit on the running
/// server, set with util-linux's `prlimit`, so sled's writes fail with
/// EFBIG as on a full disk): decisions go on from memory (interval
/// durability), gRPC health turns NOT_SERVING, SIGTERM still ends the
/// process (sled 0.34 never completes a flush after a failed write: the
/// final flush used to hang it forever), and the data dir written before
/// the failure restarts intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fails_writes_turns_health_not_serving_and_shutdown_still_ends() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    avoid_window_edge(86_400, 300);
    let cmd = SluiceCmd::serve(&cfg, &data).cwd(tmp.path());
    let mut s = cmd
        .clone()
        .args(["--http-listen", "127.0.0.1:0"])
        .ignoring_sigxfsz()
        .start();
    let http = http_addr(&mut s);
    assert_eq!(http1(http, "GET", "/healthcheck", "").0, 200);
    assert_eq!(hit_n(&s, "erin", 3).await, PERSIST_LIMIT - 3);
    // Written: the store flushes every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = data.join("sled").join("db");
    let size = std::fs::metadata(&db).expect("sled's log").len();
    prlimit(s.pid(), &format!("--fsize={size}:unlimited"));

    // New counters to write: the next write fails; decisions go on.
    let mut c = s.client().await;
    let mut h = s.health().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        i += 1;
        let user = format!("writer-{i}");
        let r = should(&mut c, request(PERSIST_DOMAIN, &[("user", &user)])).await;
        assert_eq!(r.overall_code, OK, "{r:?}");
        if health_status(&mut h, "").await == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health still SERVING after {i} calls; stderr:\n{}",
            s.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every name follows (set one after the other, a moment apart).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health_status(&mut h, "ratelimit").await != ServingStatus::NotServing as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "ratelimit still SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Upstream's HTTP health check says so too.
    assert_eq!(http1(http, "GET", "/healthcheck", "").0, 500);
    let line = s.wait_for_line(|l| l.contains("writing counters to disk failed"));
    assert!(line.contains("ERROR"), "{line}");
    assert_eq!(
        hit_n(&s, "erin", 1).await,
        PERSIST_LIMIT - 4,
        "decided from memory"
    );
    drop((c, h));

    // SIGTERM ends it (the final flush fails, bounded), naming the loss.
    s.signal("TERM");
    let status = s.wait_exit(Duration::from_secs(120));
    assert!(!status.success(), "{status:?}");
    assert!(
        s.stderr().contains("final flush of counters failed"),
        "{}",
        s.stderr()
    );
    drop(s);

    // Restarted without the limit: what was written before is there.
    let s = cmd.start();
    assert_eq!(hit_n(&s, "erin", 1).await, PERSIST_LIMIT - 4);
}

/// The reader of sluice's stderr going away (a log shipper restarting,
/// `| head`) changes nothing but the logs: SIGHUP is ignored, SIGTERM still
/// drains, flushes and exits 0, and the hits made before are on disk. A log
/// line written into the broken pipe used to panic the task writing it (the
/// signal handler's), so SIGTERM was never acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_sigterm() {
    use std::io::BufRead;
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    avoid_window_edge(86_400, 300);
    let mut child = Command::new(sluice_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--config-dir")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sluice");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("sluice exited before listening")
            .expect("read stderr");
        if let Some(a) = listening_addr(&line) {
            break a;
        }
    };
    let mut c = sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .expect("connect");
    for _ in 0..3 {
        let r = should(&mut c, request(PERSIST_DOMAIN, &[("user", "frank")])).await;
        assert_eq!(r.overall_code, OK, "{r:?}");
    }
    drop(c);
    drop(lines); // the read end closes: every log line now fails with EPIPE
    let pid = child.id().to_string();
    let kill = |sig: &str| {
        let st = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(st.success(), "kill {sig}");
    };
    kill("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().expect("wait").is_none(),
        "SIGHUP ended the process"
    );
    kill("-TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit within 60 s of SIGTERM with stderr closed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");

    let s = SluiceCmd::serve(&cfg, &data).cwd(tmp.path()).start();
    assert_eq!(hit_n(&s, "frank", 1).await, PERSIST_LIMIT - 4);
}

/// With sync durability a disk that fails writes fails every decision with
/// UNAVAILABLE (Envoy's failure_mode_deny then decides), and says so in the
/// log once, not once per call (a line per refused call flooded the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_under_sync_durability_is_unavailable_and_logged_once() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    let mut s = SluiceCmd::serve(&cfg, &data)
        .cwd(tmp.path())
        .args(["--durability", "sync"])
        .ignoring_sigxfsz()
        .start();
    assert_eq!(hit_n(&s, "gina", 1).await, PERSIST_LIMIT - 1);
    let size = std::fs::metadata(data.join("sled").join("db"))
        .expect("sled's log")
        .len();
    prlimit(s.pid(), &format!("--fsize={size}:unlimited"));
    let mut c = s.client().await;
    for i in 0..20 {
        let user = format!("sync-{i}");
        let r = c
            .should_rate_limit(request(PERSIST_DOMAIN, &[("user", &user)]))
            .await;
        let e = r.expect_err("a decision that cannot be made durable");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
    drop(c);
    s.signal("TERM");
    s.wait_exit(Duration::from_secs(120));
    let stderr = s.stderr();
    let lines = stderr
        .lines()
        .filter(|l| l.contains("decision failed: storage unavailable"))
        .count();
    assert_eq!(lines, 1, "{stderr}");
}

/// Out of file descriptors (the open-file limit lowered on the running
/// server with util-linux's `prlimit`, then more connections than it
/// allows): accepting says why, once, instead of retrying in a silent busy
/// loop, and once the connections close the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_said_once_and_passes() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    let mut s = SluiceCmd::serve(&cfg, &data).cwd(tmp.path()).start();
    assert_eq!(hit_n(&s, "hank", 1).await, PERSIST_LIMIT - 1);
    let open = std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
        .expect("/proc")
        .count();
    prlimit(s.pid(), &format!("--nofile={}:{}", open + 8, open + 8));
    let held: Vec<std::net::TcpStream> = (0..40)
        .filter_map(|_| std::net::TcpStream::connect(s.addr).ok())
        .collect();
    let line = s.wait_for_line(|l| l.contains("cannot accept connections"));
    assert!(
        line.contains("ERROR") && line.contains("open-file limit"),
        "{line}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    // The connections it could not accept are accepted (and closed) now;
    // a new client is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = s.client().await;
            should(&mut c, request(PERSIST_DOMAIN, &[("user", "hank")])).await
        })
        .await;
        if let Ok(r) = answered {
            assert_eq!(r.statuses[0].limit_remaining, PERSIST_LIMIT - 2, "{r:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never answered again");
    }
    let said = s
        .stderr()
        .lines()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    assert_eq!(said, 1, "{}", s.stderr());
    s.terminate();
}

/// A config file that fails every poll the same way before it is parsed
/// (here: not UTF-8) is said once, not once per poll; fixed, it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_error_that_repeats_every_poll_is_said_once() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    let mut s = SluiceCmd::serve(&cfg, &data)
        .cwd(tmp.path())
        .args(["--reload-interval-ms", "50"])
        .start();
    let bad = cfg.join("bad.yaml");
    std::fs::write(&bad, b"domain: bad\n# caf\xe9\ndescriptors: []\n").unwrap();
    let line = s.wait_for_line(|l| l.contains("config reload rejected"));
    assert!(line.contains("bad.yaml:2:6"), "{line}");
    // Twenty polls more.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let said = s
        .stderr()
        .lines()
        .filter(|l| l.contains("config reload rejected"))
        .count();
    assert_eq!(said, 1, "{}", s.stderr());
    write_atomic(&bad, &simple_config("bad", "k", "hour", 7));
    let mut c = s.client().await;
    poll_until(
        &mut c,
        &request("bad", &[("k", "v")]),
        "the fixed file",
        |r| first_limit(r) == Some(7),
    )
    .await;
    drop(c);
    s.terminate();
}

/// The HTTP port (--http-listen) keeps the connection bounds of the gRPC
/// ports: past --max-connections a new connection is closed at once, and
/// an idle one is closed after --idle-timeout-secs (it kept every
/// connection, so idle ones could exhaust the process's file descriptors).
#[test]
fn the_http_port_bounds_its_connections() {
    use std::io::Read;
    let tmp = tempdir();
    let cfg = tmp.path().join("cfg");
    write_atomic(&cfg.join("d.yaml"), &simple_config("d", "k", "minute", 1));
    let mut s = SluiceCmd::serve(&cfg, &tmp.path().join("data"))
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--max-connections", "3", "--idle-timeout-secs", "1"])
        .start();
    let http = http_addr(&mut s);
    let closed = |c: &mut std::net::TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    let mut idle: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(http).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(http).expect("connect");
    assert!(closed(&mut extra), "a fourth connection is closed at once");
    for c in &mut idle {
        assert!(closed(c), "an idle connection is closed");
    }
    assert_eq!(http1(http, "GET", "/healthcheck", "").0, 200);
    s.terminate();
}

/// The database removed from the data dir while sluice runs (a cleanup
/// script, a volume swapped) is noticed: gRPC health turns NOT_SERVING and
/// the log says what happened, instead of writing on into a deleted file
/// and losing everything at the next restart without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_removed_while_running_is_noticed() {
    let tmp = tempdir();
    let (cfg, data) = (tmp.path().join("config"), tmp.path().join("data"));
    persist_config(&cfg);
    let mut s = SluiceCmd::serve(&cfg, &data).cwd(tmp.path()).start();
    assert_eq!(hit_n(&s, "ida", 1).await, PERSIST_LIMIT - 1);
    let mut h = s.health().await;
    assert_eq!(
        health_status(&mut h, "").await,
        ServingStatus::Serving as i32
    );
    let token = std::fs::read_to_string(data.join("admin-token")).expect("admin token");
    let admin_addr = s.admin_addr();
    // sled's log file; its other files stay.
    std::fs::remove_file(data.join("sled").join("db")).expect("remove the database");
    let line = s.wait_for_line(|l| l.contains("was removed while sluice runs"));
    assert!(line.contains("ERROR"), "{line}");
    // Health follows the store's state in a task of its own: a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health_status(&mut h, "").await != ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < deadline, "health still SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(h);
    // An admin write is refused, not made into the deleted file.
    use sluice::proto::admin::admin_service_client::AdminServiceClient;
    use sluice::proto::admin::{ApiStage, CreateUsagePlanRequest, UsagePlan};
    let mut admin = AdminServiceClient::connect(format!("http://{admin_addr}"))
        .await
        .expect("connect admin");
    let mut req = tonic::Request::new(CreateUsagePlanRequest {
        usage_plan: Some(UsagePlan {
            name: "after".into(),
            stages: vec![ApiStage {
                domain: "x".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().expect("header"),
    );
    let e = admin
        .create_usage_plan(req)
        .await
        .expect_err("a write after the database was removed");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    drop(admin);
    s.signal("TERM");
    let status = s.wait_exit(Duration::from_secs(120));
    assert!(
        !status.success(),
        "the final flush cannot succeed: {status:?}"
    );
    // What the log said to do works: the rest moved aside, it starts empty.
    std::fs::rename(data.join("sled"), tmp.path().join("sled-aside")).expect("move aside");
    let s = SluiceCmd::serve(&cfg, &data).cwd(tmp.path()).start();
    assert_eq!(hit_n(&s, "ida", 1).await, PERSIST_LIMIT - 1);
}

/// Request bounds of 0 are refused at start naming the range (they were
/// accepted, and then every call was INVALID_ARGUMENT: behind Envoy all
/// traffic denied or allowed, as failure_mode_deny says).
#[test]
fn request_bounds_of_zero_are_refused_at_start() {
    let tmp = tempdir();
    for flag in ["--max-descriptors", "--max-entries", "--max-key-value-len"] {
        let f = SluiceCmd::serve_embedded(&tmp.path().join("data"))
            .cwd(tmp.path())
            .args([flag, "0"])
            .expect_failure();
        assert!(
            f.stderr.contains(&format!("invalid value '0' for '{flag}"))
                && f.stderr.contains("is not in 1..="),
            "{flag}: {}",
            f.stderr
        );
    }
}
