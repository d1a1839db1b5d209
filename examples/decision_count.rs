//! Runs K decisions of one bench case, for counting instructions per
//! decision under callgrind (`benches/callgrind.sh`): a figure that does not
//! drift with machine noise, unlike criterion's times.
//!
//! ```sh
//! cargo run --release --example decision_count -- <case> <K>
//! valgrind --tool=callgrind --collect-atstart=no \
//!     --toggle-collect='*decision_count*measured*' \
//!     target/release/examples/decision_count rule-memory 1000
//! ```
//!
//! The limiters, plans, keys and requests are the criterion benches' own
//! (`benches/decision.rs`), from the shared `benches/common/mod.rs`. Every
//! decision is on the same hot key, on a current-thread tokio runtime, with a
//! fake clock that starts at the benches' `NOW_S` and advances [`STEP_US`]
//! per decision (no window, minute or day boundary is crossed within 10^5
//! decisions). Only the decision loop ([`measured`], never inlined) is meant
//! to be counted: with `--toggle-collect` the setup and the other threads
//! (sled's, the decider's parent) are left out, and differencing two values
//! of K removes the loop's one-off costs (the first counters, the first
//! pages of the allocator).
//!
//! What would still differ from run to run, and how it is pinned down:
//! - the heap: the decisions run on a thread of their own, started before
//!   the setup ([`Decider`]), so they allocate from a heap that sled's
//!   threads never touched;
//! - the allocator: jemalloc, as in the `sluice` binary (glibc's malloc
//!   costs more and depends more on the heap's history);
//! - randomness: API key and plan ids and hash seeds come from the OS;
//!   `benches/callgrind.sh` preloads a `getrandom` that returns a fixed
//!   sequence, so the catalog's maps have the same shape every run.
//!
//! With the sled store, the writer and purge tasks are spawned on the same
//! current-thread runtime and do not run while every decision completes
//! without waiting (interval durability): the count is the decision path's
//! own, with sled's dirty-key tracking, not the background flush.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use sluice::config;
use sluice::engine::{Code, Request};
use sluice::limiter::RateLimiter;
use sluice::plans::registry::Registry;
use sluice::storage::memory::MemoryCounters;
use sluice::storage::CounterStore;
use tokio::runtime::Runtime;

/// The same allocator as the `sluice` binary.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../benches/common/mod.rs"]
mod common;

/// How far the fake clock advances per decision, in microseconds.
pub const STEP_US: i64 = 10;

/// The cases: name (`<what>-<store>`) and description.
const CASES: &[(&str, &str)] = &[
    ("rule-memory", "config rule, 1 descriptor, in-memory store"),
    ("rule-sled", "config rule, 1 descriptor, sled store"),
    ("plan-memory", "plan (throttle + quota), in-memory store"),
    ("plan-sled", "plan (throttle + quota), sled store"),
    (
        "tokens-request-memory",
        "plan with 3 token limits, request, in-memory store",
    ),
    (
        "tokens-charge-memory",
        "plan with 3 token limits, charge, in-memory store",
    ),
    (
        "tokens-request-sled",
        "plan with 3 token limits, request, sled store",
    ),
    (
        "tokens-charge-sled",
        "plan with 3 token limits, charge, sled store",
    ),
];

fn usage() -> ExitCode {
    eprintln!("usage: decision_count <case> <K>\ncases:");
    for (name, what) in CASES {
        eprintln!("  {name:<22} {what}");
    }
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [case, k] = args.as_slice() else {
        return usage();
    };
    let Ok(k) = k.parse::<u64>() else {
        return usage();
    };
    if !CASES.iter().any(|(name, _)| name == case) {
        return usage();
    }
    let (what, store) = case.rsplit_once('-').expect("case names end in -store");
    let decider = Decider::start();
    let rt = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
    );
    let decided = if store == "sled" {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, registry) = rt.block_on(async { common::open_sled(dir.path()) });
        if what != "rule" {
            rt.block_on(common::add_all_plans(&registry));
        }
        let n = decider.run(prepare(&rt, what, store.clone(), Some(&registry), k));
        rt.block_on(store.close()).expect("final flush");
        n
    } else {
        // As in the benches: plans and keys in a temporary sled database.
        let registry = (what != "rule").then(|| {
            let registry = common::temporary_registry();
            rt.block_on(common::add_all_plans(&registry));
            registry
        });
        decider.run(prepare(
            &rt,
            what,
            MemoryCounters::default(),
            registry.as_ref(),
            k,
        ))
    };
    println!("{case}: {decided} decisions, all OK");
    ExitCode::SUCCESS
}

/// Work for the [`Decider`]: returns the number of decisions made.
type Job = Box<dyn FnOnce() -> u64 + Send>;

/// The thread the decisions run on, started before any setup.
///
/// It allocates from a thread cache of its own (jemalloc), which only
/// the decisions touch, so the counted loop starts from the same heap every
/// run. On the main thread, the heap after the setup depends on how sled's
/// threads interleaved with it, and with it the cost of allocating (tens to
/// hundreds of instructions per decision, from run to run).
struct Decider {
    jobs: mpsc::Sender<Job>,
    thread: std::thread::JoinHandle<u64>,
}

impl Decider {
    fn start() -> Decider {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // Its heap set up before the setup's threads exist.
            black_box(Box::new(0u64));
            ready_tx.send(()).expect("main thread waits");
            rx.recv().map(|job| job()).unwrap_or(0)
        });
        ready.recv().expect("decider thread started");
        Decider { jobs, thread }
    }

    fn run(self, job: Job) -> u64 {
        self.jobs.send(job).expect("decider thread waits");
        self.thread.join().expect("decider thread")
    }
}

/// Builds the case's limiter and request; the returned job checks one
/// decision and runs the measured loop.
fn prepare<S: CounterStore>(
    rt: &Arc<Runtime>,
    what: &str,
    store: S,
    registry: Option<&Registry>,
    k: u64,
) -> Job {
    let (limiter, req) = if what == "rule" {
        (
            RateLimiter::new(common::config(), store),
            common::rule_request(),
        )
    } else {
        let limiter = RateLimiter::new(config::embedded_default().expect("default config"), store)
            .with_plans(registry.expect("plan cases have a registry").handle());
        let req = match what {
            "plan" => common::plan_req(common::HOT_KEY, &[]),
            "tokens-request" => common::token_req(None),
            "tokens-charge" => common::token_req(Some("total_tokens")),
            other => unreachable!("case {other}"),
        };
        (limiter, req)
    };
    let rt = rt.clone();
    Box::new(move || {
        // The request in this thread's heap too (see `Decider`).
        let req = req.clone();
        let start_us = common::NOW_S * 1_000_000;
        // The same decision as the loop's, before it, so a case that
        // refuses (a broken setup) fails here instead of being counted.
        let first = rt
            .block_on(limiter.decide(&req, start_us))
            .expect("decision");
        assert_eq!(first.overall, Code::Ok, "{first:?}");
        assert!(first.statuses.iter().all(|s| s.code == Code::Ok));
        let last = measured(&rt, &limiter, &req, start_us + STEP_US, k);
        assert_eq!(last, Code::Ok, "the last decision refused");
        k + 1
    })
}

/// The counted loop: `k` decisions of `req`, the clock advancing by
/// [`STEP_US`] each. Returns the last decision's overall code.
#[inline(never)]
fn measured<S: CounterStore>(
    rt: &Runtime,
    limiter: &RateLimiter<S>,
    req: &Request,
    start_us: i64,
    k: u64,
) -> Code {
    let mut last = Code::Ok;
    let mut now_us = start_us;
    for _ in 0..k {
        let d = rt
            .block_on(limiter.decide(black_box(req), black_box(now_us)))
            .expect("decision");
        last = black_box(d).overall;
        now_us += STEP_US;
    }
    last
}
