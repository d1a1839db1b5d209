//! The README's walk-throughs, run as written: the usage-plan one and the LLM
//! one (tokens, money, ReportUsage, Reserve/Settle). Their `sh` blocks are
//! read from README.md at test time and run by bash, with the real `grpcurl`
//! first on PATH, against the real `sluice serve` started in a fresh
//! directory (so `data/admin-token` is created there, as the README says).
//!
//! The only change made to the text: the addresses `127.0.0.1:8081` (RLS)
//! and `127.0.0.1:8082` (admin) are replaced by the ports the server actually
//! listens on (it binds 127.0.0.1:0 so that tests can run in parallel).
//! Every other character of every block runs exactly as written.

mod proc;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proc::*;
use serde_json::Value;

const START: &str = "<!-- walkthrough:start -->";
const END: &str = "<!-- walkthrough:end -->";
const LLM_START: &str = "<!-- llm-walkthrough:start -->";
const LLM_END: &str = "<!-- llm-walkthrough:end -->";
/// The addresses the README uses; replaced by the real ones.
const README_RLS: &str = "127.0.0.1:8081";
const README_ADMIN: &str = "127.0.0.1:8082";
/// Bound on the whole bash run.
const BASH_TIMEOUT: Duration = Duration::from_secs(120);

/// The ```sh blocks between the markers `start_mark` and `end_mark`, in
/// order. Panics if the markers or the blocks are missing.
fn walkthrough_blocks(readme: &str, start_mark: &str, end_mark: &str) -> Vec<String> {
    let start = readme
        .find(start_mark)
        .unwrap_or_else(|| panic!("README.md has no {start_mark} marker"));
    let end = readme
        .find(end_mark)
        .unwrap_or_else(|| panic!("README.md has no {end_mark} marker"));
    assert!(
        start < end,
        "{end_mark} comes before {start_mark} in README.md"
    );
    let section = &readme[start + start_mark.len()..end];
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in section.lines() {
        match &mut cur {
            None if line.trim_end() == "```sh" => cur = Some(Vec::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => {
                let b = cur.take().expect("inside a block");
                blocks.push(b.join("\n"));
            }
            Some(b) => b.push(line),
        }
    }
    assert!(
        cur.is_none(),
        "an ```sh block between {start_mark} and {end_mark} is not closed"
    );
    assert!(
        !blocks.is_empty(),
        "no ```sh blocks between {start_mark} and {end_mark}"
    );
    blocks
}

/// Runs `script` with `bash` in `cwd` with `dir` first on PATH, in its own
/// process group, bounded by [`BASH_TIMEOUT`]: on timeout the whole group
/// (bash and any grpcurl it started) is killed and the test fails. (bash
/// waits for each grpcurl it runs, so a finished run leaves none behind.)
fn run_bash(script: &str, cwd: &Path, dir: &Path) -> Finished {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![dir.to_owned()];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).expect("PATH entries join");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .current_dir(cwd)
        .env("PATH", path)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().expect("start bash");
    let pid = child.id();
    let read = |r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let mut r = r;
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped stdout")));
    let err = read(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + BASH_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for bash") {
            break s;
        }
        if Instant::now() >= deadline {
            // Our own process group: bash and whatever it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            let _ = child.wait();
            panic!("the walk-through did not finish within {BASH_TIMEOUT:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// The JSON documents in `text`, one after the other (grpcurl prints one per
/// call). Panics on anything that is not JSON.
fn json_docs(text: &str, what: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{what}: output is not JSON documents ({e}):\n{text}"))
}

/// The one JSON document in `text`.
fn one_doc(text: &str, what: &str) -> Value {
    let mut docs = json_docs(text, what);
    assert_eq!(docs.len(), 1, "{what}: expected one response:\n{text}");
    docs.remove(0)
}

/// The value of the response header `key`, if the response adds it.
fn header<'a>(resp: &'a Value, key: &str) -> Option<&'a str> {
    resp["responseHeadersToAdd"]
        .as_array()?
        .iter()
        .find(|h| h["key"] == key)
        .and_then(|h| h["value"].as_str())
}

fn today_utc() -> String {
    jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .to_string()
}

fn read_readme() -> String {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", readme_path.display()))
}

/// One run of a walk-through: each block's output, in order.
struct Walk {
    blocks: Vec<String>,
    /// What each block printed to stdout, in order (one per block).
    outputs: Vec<String>,
    /// What `epilogue` printed after the last block.
    epilogue: String,
    /// bash's stderr (grpcurl's errors), for messages.
    stderr: String,
    /// The server, still running.
    sluice: Sluice,
    _tmp: tempfile::TempDir,
}

impl Walk {
    /// Block `i`, its output and bash's stderr, for messages.
    fn ctx(&self, i: usize) -> String {
        format!(
            "block {i}:\n{}\n--- output ---\n{}\n--- stderr ---\n{}",
            self.blocks[i], self.outputs[i], self.stderr
        )
    }
}

/// Starts the real `sluice serve` in a fresh directory and runs `blocks` as
/// written (only the two addresses replaced) in one bash process, followed by
/// `epilogue` (test-only lines, e.g. printing variables the blocks set).
/// Panics if bash fails.
fn run_walkthrough(blocks: Vec<String>, epilogue: &str) -> Walk {
    let all = blocks.concat();
    for addr in [README_RLS, README_ADMIN] {
        assert!(all.contains(addr), "the walk-through never uses {addr}");
    }

    let tmp = tempdir();
    // `--data-dir data` relative to the cwd is the default; no
    // `--config-dir` and no ./config, so the embedded default (domain
    // llm-gateway) is served, as in the quick start.
    let mut s = SluiceCmd::serve_embedded(Path::new("data"))
        .cwd(tmp.path())
        .start();
    let admin = s.admin_addr();
    assert!(
        tmp.path().join("data/admin-token").is_file(),
        "data/admin-token was not created in the working directory"
    );

    // The real grpcurl, under the name the README calls it by.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).expect("create bin dir");
    std::os::unix::fs::symlink(grpcurl(), bin.join("grpcurl")).expect("symlink grpcurl");

    // One bash process, so the functions and KEY carry over; a marker line
    // before each block splits the output.
    let mut script = String::from("set -euo pipefail\n");
    for (i, b) in blocks.iter().enumerate() {
        let b = b
            .replace(README_RLS, &s.addr.to_string())
            .replace(README_ADMIN, &admin.to_string());
        script.push_str(&format!("echo '@@block {i}@@'\n{b}\n"));
    }
    script.push_str(&format!("echo '@@epilogue@@'\n{epilogue}\n"));
    script.push_str("echo '@@end@@'\n");
    let done = run_bash(&script, tmp.path(), &bin);
    assert!(
        done.success() && done.stdout.contains("@@end@@"),
        "the walk-through failed ({}):\n--- script ---\n{script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        done.status,
        done.stdout,
        done.stderr
    );
    let (out, _) = done.stdout.split_once("@@end@@").expect("checked above");
    let (out, epilogue_out) = out.split_once("@@epilogue@@\n").expect("epilogue marker");
    let mut outputs = Vec::new();
    for (i, p) in out.split("@@block ").skip(1).enumerate() {
        let (n, text) = p.split_once("@@\n").expect("marker line");
        assert_eq!(n, i.to_string(), "block markers out of order");
        outputs.push(text.to_owned());
    }
    assert_eq!(outputs.len(), blocks.len(), "one output per block");
    Walk {
        blocks,
        outputs,
        epilogue: epilogue_out.to_owned(),
        stderr: done.stderr,
        sluice: s,
        _tmp: tmp,
    }
}

#[test]
fn readme_walkthrough_runs_as_written() {
    let readme = read_readme();
    let blocks = walkthrough_blocks(&readme, START, END);
    assert_eq!(
        blocks.len(),
        8,
        "the walk-through's ```sh blocks changed; update this test:\n{blocks:#?}"
    );

    // The quota is per UTC day: do not straddle midnight.
    avoid_window_edge(86_400, 150);

    let mut w = run_walkthrough(blocks, "");
    let outputs = std::mem::take(&mut w.outputs);
    let mut parts = outputs.iter().enumerate();
    let mut next = |want: usize| {
        let (n, text) = parts.next().expect("one output per block");
        assert_eq!(n, want);
        text.as_str()
    };
    let blocks = &w.blocks;
    let stderr = &w.stderr;
    let ctx = |i: usize, text: &str| {
        format!(
            "block {i}:\n{}\n--- output ---\n{text}\n--- stderr ---\n{}",
            blocks[i], stderr
        )
    };

    // 0: the helpers print nothing.
    let text = next(0);
    assert_eq!(text.trim(), "", "{}", ctx(0, text));

    // 1: the plan is created.
    let text = next(1);
    let plan = one_doc(text, &ctx(1, text));
    assert_eq!(plan["name"], "gold", "{}", ctx(1, text));
    assert!(
        plan["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{}",
        ctx(1, text)
    );
    assert_eq!(
        plan["stages"][0]["domain"],
        "llm-gateway",
        "{}",
        ctx(1, text)
    );

    // 2: the key's value (echoed), then the binding.
    let text = next(2);
    let (key_line, rest) = text.split_once('\n').unwrap_or((text, ""));
    let key = key_line.trim();
    assert!(
        key.starts_with("slk_") && key.len() > 4,
        "KEY should be the new key's value: {}",
        ctx(2, text)
    );
    let binding = one_doc(rest, &ctx(2, text));
    assert_eq!(binding["keyName"], "alice", "{}", ctx(2, text));
    assert_eq!(binding["usagePlanId"], plan["id"], "{}", ctx(2, text));

    // 3: allowed; the throttle binds with 19 of the burst of 20 left.
    let text = next(3);
    let r = one_doc(text, &ctx(3, text));
    assert_eq!(r["overallCode"], "OK", "{}", ctx(3, text));
    let st = &r["statuses"][0];
    assert_eq!(st["code"], "OK", "{}", ctx(3, text));
    assert_eq!(st["limitRemaining"], 19, "{}", ctx(3, text));
    assert_eq!(
        st["currentLimit"]["name"],
        "gold/throttle",
        "{}",
        ctx(3, text)
    );
    assert_eq!(
        st["currentLimit"]["requestsPerUnit"],
        10,
        "{}",
        ctx(3, text)
    );
    assert_eq!(st["currentLimit"]["unit"], "SECOND", "{}", ctx(3, text));

    // 4: an unknown key is refused as invalid.
    let text = next(4);
    let r = one_doc(text, &ctx(4, text));
    assert_eq!(r["overallCode"], "OVER_LIMIT", "{}", ctx(4, text));
    assert_eq!(r["statuses"][0]["code"], "OVER_LIMIT", "{}", ctx(4, text));
    assert_eq!(
        header(&r, "x-sluice-reason"),
        Some("invalid-key"),
        "{}",
        ctx(4, text)
    );

    // 5: 25 hits never fit the burst of 20.
    let text = next(5);
    let r = one_doc(text, &ctx(5, text));
    assert_eq!(r["overallCode"], "OVER_LIMIT", "{}", ctx(5, text));
    assert_eq!(
        header(&r, "x-sluice-reason"),
        Some("throttled"),
        "{}",
        ctx(5, text)
    );

    // 6: UpdateUsage leaves one request; it passes, the next is refused.
    let text = next(6);
    let docs = json_docs(text, &ctx(6, text));
    assert_eq!(docs.len(), 3, "{}", ctx(6, text));
    assert_eq!(docs[0]["keyName"], "alice", "{}", ctx(6, text));
    assert_eq!(docs[1]["overallCode"], "OK", "{}", ctx(6, text));
    let r = &docs[2];
    assert_eq!(r["overallCode"], "OVER_LIMIT", "{}", ctx(6, text));
    assert_eq!(
        header(r, "x-sluice-reason"),
        Some("quota-exceeded"),
        "{}",
        ctx(6, text)
    );
    let lim = &r["statuses"][0]["currentLimit"];
    assert_eq!(lim["name"], "gold/quota", "{}", ctx(6, text));
    assert_eq!(lim["requestsPerUnit"], 2, "{}", ctx(6, text));
    assert_eq!(lim["unit"], "DAY", "{}", ctx(6, text));

    // 7: today's usage: the two allowed calls.
    let text = next(7);
    let u = one_doc(text, &ctx(7, text));
    let item = &u["items"][0];
    assert_eq!(item["keyName"], "alice", "{}", ctx(7, text));
    let day = &item["days"][0];
    assert_eq!(day["date"], today_utc().as_str(), "{}", ctx(7, text));
    assert_eq!(day["used"], "2", "{}", ctx(7, text));
    assert!(parts.next().is_none(), "more output than blocks");

    assert!(w.sluice.is_running(), "sluice died:\n{}", w.sluice.stderr());
}

/// The limit status named `name` in a ReportUsage response.
fn limit_status<'a>(resp: &'a Value, name: &str) -> Option<&'a Value> {
    resp["limits"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)
}

#[test]
fn readme_llm_walkthrough_runs_as_written() {
    let readme = read_readme();
    let blocks = walkthrough_blocks(&readme, LLM_START, LLM_END);
    assert_eq!(
        blocks.len(),
        3,
        "the LLM walk-through's ```sh blocks changed; update this test:\n{blocks:#?}"
    );

    // `tpd` is a CALENDAR_DAY and `budget` a CALENDAR_MONTH (anchor day 1)
    // window, both in UTC: do not straddle UTC midnight. Every month
    // boundary in UTC is a UTC midnight, so this guards both.
    avoid_window_edge(86_400, 150);

    // Test-only, after the blocks: the values of the variables they set
    // (block 0 stores the key's value in KEY without printing it).
    let w = run_walkthrough(blocks, r#"printf 'KEY=%s\nRES=%s\n' "$KEY" "$RES""#);
    let var = |name: &str| {
        w.epilogue
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in the epilogue:\n{}", w.epilogue))
            .to_owned()
    };

    // 0: the plan "llm" with its two limits, then the binding of "bob".
    let docs = json_docs(&w.outputs[0], &w.ctx(0));
    assert_eq!(docs.len(), 2, "{}", w.ctx(0));
    let plan = &docs[0];
    assert_eq!(plan["name"], "llm", "{}", w.ctx(0));
    assert!(
        plan["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{}",
        w.ctx(0)
    );
    assert_eq!(plan["stages"][0]["domain"], "llm-gateway", "{}", w.ctx(0));
    let limits = plan["limits"].as_array().expect("limits");
    assert_eq!(limits.len(), 2, "{}", w.ctx(0));
    assert_eq!(limits[0]["name"], "tpd", "{}", w.ctx(0));
    assert_eq!(limits[0]["window"], "CALENDAR_DAY", "{}", w.ctx(0));
    assert_eq!(limits[1]["name"], "budget", "{}", w.ctx(0));
    assert_eq!(limits[1]["window"], "CALENDAR_MONTH", "{}", w.ctx(0));
    let binding = &docs[1];
    assert_eq!(binding["keyName"], "bob", "{}", w.ctx(0));
    assert_eq!(binding["usagePlanId"], plan["id"], "{}", w.ctx(0));
    let key = var("KEY");
    assert!(
        key.starts_with("slk_") && key.len() > 4,
        "KEY should be the new key's value, got {key:?}: {}",
        w.ctx(0)
    );

    // 1: 1200 in + 300 out = 1500 tokens of 100000: 98500 left; spend
    // 1200 * 2.5 + 300 * 10 = 6000 micro-units of 5000000: 4994000 left.
    // The retry with the same requestId counts nothing.
    let docs = json_docs(&w.outputs[1], &w.ctx(1));
    assert_eq!(docs.len(), 2, "{}", w.ctx(1));
    for (n, r) in docs.iter().enumerate() {
        let duplicate = r["duplicate"].as_bool().unwrap_or(false);
        assert_eq!(duplicate, n == 1, "report {n}: {}", w.ctx(1));
        let tpd = limit_status(r, "llm/tpd").unwrap_or_else(|| panic!("{}", w.ctx(1)));
        assert_eq!(tpd["remaining"], "98500", "report {n}: {}", w.ctx(1));
        let budget = limit_status(r, "llm/budget").unwrap_or_else(|| panic!("{}", w.ctx(1)));
        assert_eq!(budget["remaining"], "4994000", "report {n}: {}", w.ctx(1));
    }

    // 2: Reserve holds the estimate, Settle charges the actual usage:
    // tpd held 1000 in + 4000 out = 5000 tokens, charged 1000 + 250 = 1250;
    // budget held 1000 * 2.5 + 4000 * 10 = 42500 micro-units, charged
    // 1000 * 2.5 + 250 * 10 = 5000.
    assert!(
        !var("RES").is_empty(),
        "Reserve returned no reservationId: {}",
        w.ctx(2)
    );
    let settle = one_doc(&w.outputs[2], &w.ctx(2));
    let settled = settle["limits"].as_array().expect("limits");
    let find = |name: &str| {
        settled
            .iter()
            .find(|l| l["limit"] == name)
            .unwrap_or_else(|| panic!("no {name} in Settle: {}", w.ctx(2)))
    };
    assert_eq!(settled.len(), 2, "{}", w.ctx(2));
    assert_eq!(find("tpd")["held"], "5000", "{}", w.ctx(2));
    assert_eq!(find("tpd")["charged"], "1250", "{}", w.ctx(2));
    assert_eq!(find("budget")["held"], "42500", "{}", w.ctx(2));
    assert_eq!(find("budget")["charged"], "5000", "{}", w.ctx(2));

    let mut sluice = w.sluice;
    assert!(sluice.is_running(), "sluice died:\n{}", sluice.stderr());
}
