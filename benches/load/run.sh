#!/usr/bin/env bash
# Load test: sluice against a do-nothing RLS server, driven by the same
# external load generator (h2load), in one run.
#
#   bash benches/load/run.sh            # all modes, 3 runs each
#   RUNS=5 MODES="pinned" bash benches/load/run.sh
#
# Needs h2load (Debian: apt-get install nghttp2-client). Prints, per mode and
# server, the median req/s, p50 and p99 latency of RUNS runs, and the ratio of
# sluice to the do-nothing server. Only loopback addresses; every run is
# bounded in requests (N) and time (TIMEOUT).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
OUT=${OUT:-benches/load}   # where results.csv and chart.svg are written
MODES=${MODES:-"pinned unpinned 1x1"}
N=${N:-200000}            # requests per run (32x16 modes)
N1=${N1:-20000}           # requests per run (1x1 mode)
TIMEOUT=${TIMEOUT:-120}   # seconds per h2load run

command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release --quiet --bin sluice --example noop_rls --example rls_body --example rls_check

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# One per-key rule, far above what a run can reach.
mkdir -p "$work/config"
cat > "$work/config/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 4000000000}
YAML
target/release/examples/rls_body bench api_key=key-1 > "$work/body.bin"

# Starts "$@" on CPU list $cpus; waits for "<mark> ADDR" on stderr; sets $addr.
start() {
  local cpus=$1 log=$2 mark=$3; shift 3
  if [ -n "$cpus" ]; then taskset -c "$cpus" "$@" 2>"$log" & else "$@" 2>"$log" & fi
  pids+=($!)
  for _ in $(seq 1 100); do
    addr=$(sed -n "s/.*$mark \([0-9.]*:[0-9]*\).*/\1/p" "$log" | head -1)
    [ -n "$addr" ] && return 0
    sleep 0.1
  done
  echo "server did not start: $log" >&2; cat "$log" >&2; exit 1
}

# One h2load run; prints "req/s p50_us p99_us failed".
load() {
  local cpus=$1 addr=$2 clients=$3 streams=$4 n=$5
  local log="$work/h2load.log" lat="$work/lat.tsv"
  rm -f "$lat"
  local cmd=(h2load -n "$n" -c "$clients" -m "$streams" -t 1 -d "$work/body.bin"
    -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$lat"
    "http://$addr/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
  if [ -n "$cpus" ]; then timeout "$TIMEOUT" taskset -c "$cpus" "${cmd[@]}" >"$log"; else timeout "$TIMEOUT" "${cmd[@]}" >"$log"; fi
  local rps failed
  rps=$(sed -n 's/.*finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$log")
  failed=$(sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p' "$log")
  # --log-file columns: start time (us), status, duration (us).
  cut -f3 "$lat" | sort -n > "$work/sorted"
  local count p50 p99
  count=$(wc -l < "$work/sorted")
  p50=$(sed -n "$(( (count + 1) / 2 ))p" "$work/sorted")
  p99=$(sed -n "$(( (count * 99 + 99) / 100 ))p" "$work/sorted")
  echo "$rps $p50 $p99 $failed"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-9s %-6s %12s %10s %10s\n' mode server req/s p50_us p99_us
echo "mode,server,rps,p50_us,p99_us" > "$work/results.csv"
for mode in $MODES; do
  case $mode in
    pinned) server_cpus=0; load_cpus=1; clients=32; streams=16; n=$N ;;
    unpinned) server_cpus=""; load_cpus=""; clients=32; streams=16; n=$N ;;
    1x1) server_cpus=0; load_cpus=1; clients=1; streams=1; n=$N1 ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
  esac
  declare -A result=()
  for server in noop sluice; do
    if [ "$server" = noop ]; then
      start "$server_cpus" "$work/noop.log" "noop listening on" target/release/examples/noop_rls 127.0.0.1:0
    else
      rm -rf "$work/data"
      start "$server_cpus" "$work/sluice.log" "sluice listening on" target/release/sluice serve \
        --config-dir "$work/config" --data-dir "$work/data" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
    fi
    # h2load counts HTTP 200 even for a gRPC error: check one answer for real.
    target/release/examples/rls_check "$addr" bench api_key=key-1 >/dev/null
    : > "$work/runs"
    for _ in $(seq 1 "$RUNS"); do load "$load_cpus" "$addr" "$clients" "$streams" "$n" >> "$work/runs"; done
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
    if awk '$4 != 0 {exit 1}' "$work/runs"; then :; else echo "$server: failed requests in $mode" >&2; cat "$work/runs" >&2; exit 1; fi
    rps=$(cut -d' ' -f1 "$work/runs" | median); p50=$(cut -d' ' -f2 "$work/runs" | median); p99=$(cut -d' ' -f3 "$work/runs" | median)
    result[$server]=$rps
    printf '%-9s %-6s %12s %10s %10s\n' "$mode" "$server" "$rps" "$p50" "$p99"
    echo "$mode,$server,$rps,$p50,$p99" >> "$work/results.csv"
  done
  awk -v s="${result[sluice]}" -v n="${result[noop]}" -v m="$mode" 'BEGIN {printf "%-9s ratio  %12.3f\n", m, s / n}'
done

# The chart: req/s per mode, do-nothing server beside sluice, from the CSV.
cp "$work/results.csv" "$OUT/results.csv"
awk -F, -v runs="$RUNS" -v when="$(date -u +%FT%TZ)" -v cpu="$(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" '
  NR == 1 { next }
  { mode[++n] = $1; server[n] = $2; rps[n] = $3; if ($3 > max) max = $3 }
  END {
    w = 640; h = 360; left = 70; bottom = 300; top = 40; bw = 60
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", w, h
    printf "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", w, h
    printf "<text x=\"%d\" y=\"20\" font-size=\"14\">ShouldRateLimit req/s, median of %s runs (h2load; %s; %s)</text>\n", left, runs, cpu, when
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
