//! The real `grpcurl` against the real `sluice` binary: reflection, health
//! and ShouldRateLimit as an operator would call them.

mod proc;

use std::net::SocketAddr;

use proc::*;

const RLS: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// A sluice serving the embedded default config.
fn default_server(tmp: &tempfile::TempDir) -> Sluice {
    SluiceCmd::serve_embedded(&tmp.path().join("data"))
        .cwd(tmp.path())
        .start()
}

/// JSON text without whitespace, so assertions ignore grpcurl's indentation.
fn compact(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

fn call(s: &Sluice, method: &str, body: &str) -> Finished {
    let addr = s.addr.to_string();
    run_grpcurl(["-plaintext", "-d", body, addr.as_str(), method])
}

fn should_ok(s: &Sluice, body: &str) -> String {
    let f = call(s, &format!("{RLS}/ShouldRateLimit"), body);
    assert!(
        f.success(),
        "grpcurl ShouldRateLimit failed: {}",
        f.output()
    );
    compact(&f.stdout)
}

#[test]
fn grpcurl_is_available() {
    let p = grpcurl();
    let f = run_grpcurl(["-version"]);
    assert!(
        f.success(),
        "{} -version failed: {}",
        p.display(),
        f.output()
    );
    assert!(f.output().contains("grpcurl"), "{}", f.output());
}

/// The services `grpcurl list` shows on `addr`.
fn listed(addr: SocketAddr) -> Vec<String> {
    let addr = addr.to_string();
    let f = run_grpcurl(["-plaintext", addr.as_str(), "list"]);
    assert!(f.success(), "grpcurl list {addr} failed: {}", f.output());
    f.stdout.lines().map(|l| l.trim().to_owned()).collect()
}

const ADMIN: &str = "sluice.admin.v1.AdminService";
const USAGE: &str = "sluice.usage.v1.UsageService";

#[test]
fn list_shows_rls_health_and_reflection() {
    let tmp = tempdir();
    let s = default_server(&tmp);
    let services = listed(s.addr);
    for want in [RLS, USAGE, "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} not listed: {services:?}"
        );
    }
    assert!(
        services
            .iter()
            .any(|s| s.starts_with("grpc.reflection.") && s.ends_with(".ServerReflection")),
        "no reflection service listed: {services:?}"
    );
}

/// Every service a port lists can be described, the reflection services of
/// both versions included (grpcurl asks v1alpha, which did not know v1's
/// descriptor: a bare `describe` failed on both ports).
#[test]
fn every_listed_service_is_described_on_both_ports() {
    let tmp = tempdir();
    let mut s = default_server(&tmp);
    let admin = s.admin_addr();
    for addr in [s.addr, admin] {
        let a = addr.to_string();
        let f = run_grpcurl(["-plaintext", a.as_str(), "describe"]);
        assert!(f.success(), "describe on {a}: {}", f.output());
        for name in listed(addr) {
            assert!(
                f.stdout.contains(&format!("{name} is a service")),
                "{name} not described on {a}:\n{}",
                f.output()
            );
        }
    }
}

/// Health/Watch sends a status once and then only its changes (it sent
/// SERVING again with every flush of the counters, ten times a second).
#[test]
fn health_watch_sends_a_status_once() {
    let tmp = tempdir();
    let s = default_server(&tmp);
    let addr = s.addr.to_string();
    let mut cmd = std::process::Command::new(grpcurl());
    cmd.args([
        "-plaintext",
        "-max-time",
        "2",
        "-d",
        r#"{"service":"ratelimit"}"#,
        addr.as_str(),
        "grpc.health.v1.Health/Watch",
    ]);
    let f = run_command(cmd, TIMEOUT);
    let sent = f.stdout.matches("\"SERVING\"").count();
    assert_eq!(sent, 1, "{}", f.output());
}

/// Each port lists only what it answers: the admin API is not offered on
/// the RLS port (a call there would be UNIMPLEMENTED), nor RLS on the admin
/// port; both still describe any message type.
#[test]
fn each_port_lists_only_the_services_it_serves() {
    let tmp = tempdir();
    let mut s = default_server(&tmp);
    let rls = listed(s.addr);
    assert!(
        !rls.iter().any(|s| s == ADMIN),
        "admin listed on the RLS port: {rls:?}"
    );
    let admin_addr = s.admin_addr();
    let admin = listed(admin_addr);
    assert!(
        admin.iter().any(|s| s == ADMIN),
        "admin not listed on its port: {admin:?}"
    );
    for other in [RLS, USAGE] {
        assert!(
            !admin.iter().any(|s| s == other),
            "{other} listed on the admin port: {admin:?}"
        );
    }
    assert!(
        admin.iter().any(|s| s == "grpc.health.v1.Health"),
        "{admin:?}"
    );
    let addr = s.addr.to_string();
    let f = run_grpcurl([
        "-plaintext",
        addr.as_str(),
        "describe",
        "sluice.admin.v1.UsagePlan",
    ]);
    assert!(
        f.success(),
        "describe on the RLS port failed: {}",
        f.output()
    );
    assert!(f.stdout.contains("message UsagePlan"), "{}", f.output());
}

/// grpcurl's output for a call to `method` on `addr` that must fail with
/// UNIMPLEMENTED.
fn unimplemented(addr: &str, method: &str, body: &str) -> String {
    let f = run_grpcurl(["-plaintext", "-d", body, addr, method]);
    assert!(!f.success(), "{method} answered on {addr}: {}", f.output());
    let out = f.output();
    assert!(out.contains("Unimplemented"), "{out}");
    out
}

/// A call to the other port's service is UNIMPLEMENTED with a message that
/// says where it is served (tonic's own answer has an empty message).
#[test]
fn a_call_to_the_wrong_port_says_which_port_serves_it() {
    let tmp = tempdir();
    let mut s = default_server(&tmp);
    let rls_addr = s.addr.to_string();
    let admin_addr = s.admin_addr().to_string();
    let out = unimplemented(
        &rls_addr,
        "sluice.admin.v1.AdminService/ListUsagePlans",
        "{}",
    );
    assert!(
        out.contains("/sluice.admin.v1.AdminService/ListUsagePlans is not served on this port")
            && out.contains("is on the admin port (--admin-listen"),
        "{out}"
    );
    let out = unimplemented(
        &admin_addr,
        &format!("{RLS}/ShouldRateLimit"),
        r#"{"domain":"llm-gateway"}"#,
    );
    assert!(out.contains("are on the RLS port (--listen"), "{out}");
    // The right port still answers.
    assert!(should_ok(
        &s,
        r#"{"domain":"llm-gateway","descriptors":[{"entries":[{"key":"api_key","value":"a"}]}]}"#
    )
    .contains(r#""overallCode":"OK""#));
}

#[test]
fn describe_rls_service() {
    let tmp = tempdir();
    let s = default_server(&tmp);
    let addr = s.addr.to_string();
    let f = run_grpcurl(["-plaintext", addr.as_str(), "describe", RLS]);
    assert!(f.success(), "grpcurl describe failed: {}", f.output());
    assert!(f.stdout.contains("is a service"), "{}", f.stdout);
    assert!(f.stdout.contains("ShouldRateLimit"), "{}", f.stdout);
    assert!(
        f.stdout
            .contains(".envoy.service.ratelimit.v3.RateLimitRequest"),
        "{}",
        f.stdout
    );

    let f = run_grpcurl([
        "-plaintext",
        addr.as_str(),
        "describe",
        "envoy.service.ratelimit.v3.RateLimitResponse",
    ]);
    assert!(f.success(), "describe RateLimitResponse: {}", f.output());
    assert!(f.stdout.contains("overall_code"), "{}", f.stdout);
}

#[test]
fn should_rate_limit_by_reflection_on_default_config() {
    let tmp = tempdir();
    let s = default_server(&tmp);
    let out = should_ok(
        &s,
        r#"{"domain":"llm-gateway","descriptors":[{"entries":[{"key":"remote_address","value":"10.0.0.1"}]}]}"#,
    );
    assert!(out.contains(r#""overallCode":"OK""#), "{out}");
    assert!(out.contains(r#""limitRemaining":9"#), "{out}");
    assert!(out.contains(r#""requestsPerUnit":10"#), "{out}");
    assert!(out.contains(r#""unit":"SECOND""#), "{out}");
}

#[test]
fn should_rate_limit_goes_over_limit() {
    let tmp = tempdir();
    let cfg = tmp.path().join("config");
    write_atomic(
        &cfg.join("tiny.yaml"),
        &simple_config("tiny", "user", "hour", 2),
    );
    avoid_window_edge(3_600, 30);
    let s = SluiceCmd::serve(&cfg, &tmp.path().join("data"))
        .cwd(tmp.path())
        .start();
    let body = r#"{"domain":"tiny","descriptors":[{"entries":[{"key":"user","value":"u1"}]}]}"#;

    let out = should_ok(&s, body);
    assert!(out.contains(r#""overallCode":"OK""#), "1st: {out}");
    assert!(out.contains(r#""limitRemaining":1"#), "1st: {out}");
    let out = should_ok(&s, body);
    assert!(out.contains(r#""overallCode":"OK""#), "2nd: {out}");
    let out = should_ok(&s, body);
    assert!(out.contains(r#""overallCode":"OVER_LIMIT""#), "3rd: {out}");
    assert!(out.contains(r#""code":"OVER_LIMIT""#), "3rd: {out}");
    assert!(out.contains(r#""unit":"HOUR""#), "3rd: {out}");
}

#[test]
fn health_check_via_grpcurl() {
    let tmp = tempdir();
    let s = default_server(&tmp);
    for body in [r#"{"service":"ratelimit"}"#, r#"{"service":""}"#] {
        let f = call(&s, "grpc.health.v1.Health/Check", body);
        assert!(f.success(), "health check {body}: {}", f.output());
        assert!(
            compact(&f.stdout).contains(r#""status":"SERVING""#),
            "{body}: {}",
            f.stdout
        );
    }
}

#[test]
fn empty_domain_is_invalid_argument() {
    let tmp = tempdir();
    let mut s = default_server(&tmp);
    let f = call(
        &s,
        &format!("{RLS}/ShouldRateLimit"),
        r#"{"domain":"","descriptors":[{"entries":[{"key":"remote_address","value":"10.0.0.1"}]}]}"#,
    );
    assert!(!f.success(), "grpcurl should fail: {}", f.output());
    let out = f.output();
    assert!(out.contains("InvalidArgument"), "{out}");
    assert!(out.contains("rate limit domain must not be empty"), "{out}");
    // The server is still up and answers.
    let out = should_ok(
        &s,
        r#"{"domain":"llm-gateway","descriptors":[{"entries":[{"key":"remote_address","value":"10.0.0.2"}]}]}"#,
    );
    assert!(out.contains(r#""overallCode":"OK""#), "{out}");
    assert!(s.is_running());
}
