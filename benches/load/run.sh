#!/usr/bin/env bash
# Load test: sluice against a do-nothing RLS server, driven by the same
# external load generator (h2load, or ghz when installed), in one run.
#
#   bash benches/load/run.sh            # all modes, 3 runs each
#   RUNS=5 MODES="pinned sync" bash benches/load/run.sh
#   LOADGEN=h2load bash benches/load/run.sh   # h2load even when ghz is installed
#
# Needs h2load (Debian: apt-get install nghttp2-client), or ghz and jq: ghz is
# used when it is on PATH (or LOADGEN=ghz), with benches/load/ghz.json. Prints,
# per mode and server, the median req/s, p50 and p99 latency of RUNS runs, and
# the ratio of sluice to the do-nothing server. Only loopback addresses; every
# run is bounded in requests (N) and time (TIMEOUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

RUNS=${RUNS:-3}
OUT=${OUT:-benches/load}   # where results.csv and chart.svg are written
mkdir -p "$OUT"
MODES=${MODES:-"pinned unpinned 1x1 sync plan tokens tokens-nohdr tokens1"}
N=${N:-200000}            # requests per run (32x16 modes)
N1=${N1:-20000}           # requests per run (1x1 mode)
TIMEOUT=${TIMEOUT:-120}   # seconds per load generator run
if [ -z "${LOADGEN:-}" ]; then
  if command -v ghz >/dev/null; then LOADGEN=ghz; else LOADGEN=h2load; fi
fi

case $LOADGEN in
  h2load) command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; } ;;
  ghz)
    command -v ghz >/dev/null || { echo "ghz not found: https://ghz.sh/docs/install" >&2; exit 1; }
    command -v jq >/dev/null || { echo "jq not found (parses ghz's JSON report): apt-get install jq" >&2; exit 1; } ;;
  *) echo "LOADGEN must be h2load or ghz, not $LOADGEN" >&2; exit 1 ;;
esac
cargo build --release --quiet --bin sluice --example noop_rls --example rls_body --example rls_check

bench_workdir

bench_config "$work/config/bench.yaml"
bench_plans "$work/plans.yaml"

# Starts "$@" on CPU list $cpus; waits for "<mark> ADDR" on stderr; sets $addr.
start() {
  local cpus=$1 log=$2 mark=$3; shift 3
  : > "$log"   # before the server starts: never read the last server's address
  if [ -n "$cpus" ]; then taskset -c "$cpus" "$@" 2>"$log" & else "$@" 2>"$log" & fi
  pids+=($!)
  addr=$(wait_addr "$log" "$mark" 100) || { echo "server did not start: $log" >&2; cat "$log" >&2; exit 1; }
}

# One load generator run; prints "req/s p50_us p99_us failed".
load() {
  if [ "$LOADGEN" = ghz ]; then load_ghz "$@"; else load_h2load "$@"; fi
}

load_h2load() { h2load_calls "$@" "$work/body.bin" "$work" "$TIMEOUT"; }

# ghz (https://ghz.sh) with benches/load/ghz.json: the same call and request;
# clients x streams become --connections x (--concurrency / --connections),
# ghz's workers being spread evenly over its connections. Flags override the
# config file. Its JSON report (--format json) has rps, latencyDistribution
# (percentage, latency in ns, over the calls that succeeded) and
# statusCodeDistribution (gRPC codes, so a gRPC error counts as failed here,
# unlike with h2load); calls that did not end OK, or did not run, are failed.
load_ghz() {
  local cpus=$1 addr=$2 clients=$3 streams=$4 n=$5
  local log="$work/ghz.json"
  # The mode's request (the file's data is the pinned mode's).
  local data e sep=""
  data="{\"domain\":\"$domain\",\"descriptors\":[{\"entries\":["
  for e in "${entries[@]}"; do data+="$sep{\"key\":\"${e%%=*}\",\"value\":\"${e#*=}\"}"; sep=","; done
  data+="]}],\"hitsAddend\":1}"
  local cmd=(ghz --config=benches/load/ghz.json --total="$n" --concurrency="$((clients * streams))"
    --connections="$clients" --data="$data" --format=json --output="$log" "$addr")
  rm -f "$log"
  if [ -n "$cpus" ]; then timeout "$TIMEOUT" taskset -c "$cpus" "${cmd[@]}"; else timeout "$TIMEOUT" "${cmd[@]}"; fi
  ghz_summary "$n" < "$log"
}

# Reads a ghz JSON report; prints "req/s p50_us p99_us failed" for $1 requests.
ghz_summary() {
  jq -r --argjson n "$1" '
    def pct(p): [(.latencyDistribution // [])[] | select(.percentage == p) | .latency][0] // 0;
    "\(.rps) \(pct(50)) \(pct(99)) \($n - (.statusCodeDistribution.OK // 0))"' |
    awk '{printf "%.2f %d %d %d\n", $1, ($2 + 500) / 1000, ($3 + 500) / 1000, $4}'
}

printf '%-12s %-6s %12s %10s %10s\n' mode server req/s p50_us p99_us
echo "mode,server,rps,p50_us,p99_us" > "$work/results.csv"
for mode in $MODES; do
  case $mode in
    pinned) server_cpus=0; load_cpus=1; clients=32; streams=16; n=$N ;;
    unpinned) server_cpus=""; load_cpus=""; clients=32; streams=16; n=$N ;;
    1x1) server_cpus=0; load_cpus=1; clients=1; streams=1; n=$N1 ;;
    # pinned, with every acknowledged hit on disk before the answer
    sync) server_cpus=0; load_cpus=1; clients=32; streams=16; n=$N ;;
    # pinned, the descriptor's API key decided against a usage plan
    # tokens-nohdr: the tokens plan without the x-ratelimit-* answer headers
    plan|tokens|tokens-nohdr|tokens1) server_cpus=0; load_cpus=1; clients=32; streams=16; n=$N ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
  esac
  # The request: one api_key descriptor against the per-key rule, or (plan
  # and tokens modes) against a plan; the key value comes from `sluice apply`
  # once sluice runs, so the do-nothing server (which ignores it) goes first.
  mode_request "$mode"
  declare -A result=()
  for server in noop sluice; do
    if [ "$server" = noop ]; then
      start "$server_cpus" "$work/noop.log" "noop listening on" target/release/examples/noop_rls 127.0.0.1:0
    else
      rm -rf "$work/data"
      durability=interval; [ "$mode" = sync ] && durability=sync
      start "$server_cpus" "$work/sluice.log" "sluice listening on" target/release/sluice serve \
        --config-dir "$work/config" --data-dir "$work/data" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --durability "$durability" --admin-token "$BENCH_ADMIN_TOKEN"
      if [ "$domain" != bench ]; then
        apply_plans "$work/sluice.log" "$work/plans.yaml" "$work/apply.out"
      fi
    fi
    target/release/examples/rls_body "$domain" "${entries[@]}" > "$work/body.bin"
    # h2load counts HTTP 200 even for a gRPC error: check one answer for real.
    target/release/examples/rls_check "$addr" "$domain" "${entries[@]}" >/dev/null
    : > "$work/runs"
    for _ in $(seq 1 "$RUNS"); do load "$load_cpus" "$addr" "$clients" "$streams" "$n" >> "$work/runs"; done
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
    if awk '$4 != 0 {exit 1}' "$work/runs"; then :; else echo "$server: failed requests in $mode" >&2; cat "$work/runs" >&2; exit 1; fi
    rps=$(cut -d' ' -f1 "$work/runs" | median); p50=$(cut -d' ' -f2 "$work/runs" | median); p99=$(cut -d' ' -f3 "$work/runs" | median)
    result[$server]=$rps
    printf '%-12s %-6s %12s %10s %10s\n' "$mode" "$server" "$rps" "$p50" "$p99"
    echo "$mode,$server,$rps,$p50,$p99" >> "$work/results.csv"
  done
  awk -v s="${result[sluice]}" -v n="${result[noop]}" -v m="$mode" 'BEGIN {printf "%-12s ratio  %12.3f\n", m, s / n}'
done

# The chart: req/s per mode, do-nothing server beside sluice, from the CSV.
cp "$work/results.csv" "$OUT/results.csv"
awk -F, -v runs="$RUNS" -v loadgen="$LOADGEN" -v when="$(date -u +%FT%TZ)" -v cpu="$(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" '
  NR == 1 { next }
  { mode[++n] = $1; server[n] = $2; rps[n] = $3; if ($3 > max) max = $3 }
  END {
    # One group of two bars per mode, 180 px apart; at least 640 px wide.
    h = 360; left = 70; bottom = 300; top = 56; bw = 60
    w = left + 40 + int((n + 1) / 2) * 180; if (w < 640) w = 640
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", w, h
    printf "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", w, h
    printf "<text x=\"%d\" y=\"18\" font-size=\"14\">ShouldRateLimit req/s, median of %s runs (%s)</text>\n", left, runs, loadgen
    printf "<text x=\"%d\" y=\"34\" font-size=\"11\">%s; %s</text>\n", left, cpu, when
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", left, bottom, w - 20, bottom
    for (i = 1; i <= n; i++) {
      group = int((i - 1) / 2); x = left + 20 + group * 180 + ((i - 1) % 2) * (bw + 10)
      bh = (bottom - top) * rps[i] / max; color = (server[i] == "sluice") ? "#2b7bb9" : "#aaaaaa"
      printf "<rect x=\"%d\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"%s\"/>\n", x, bottom - bh, bw, bh, color
      printf "<text x=\"%d\" y=\"%.1f\" text-anchor=\"middle\">%.0f</text>\n", x + bw / 2, bottom - bh - 4, rps[i]
      printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", x + bw / 2, bottom + 16, server[i]
      if (i % 2 == 0) printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" font-weight=\"bold\">%s (%.3fx)</text>\n", x - 5, bottom + 34, mode[i], rps[i] / rps[i - 1]
    }
    print "</svg>"
  }' "$work/results.csv" > "$OUT/chart.svg"
echo "wrote $OUT/results.csv and $OUT/chart.svg"
