#!/usr/bin/env bash
# Config reload under load: sluice's p99 and failures while its config file is
# rewritten every ~200 ms, against the same load with no rewrites.
#
#   bash benches/load/reload.sh               # RUNS=3 N=400000
#   RUNS=1 N=20000 bash benches/load/reload.sh
#
# sluice (release build, sled on, default durability, --reload-interval-ms
# 100) runs on core 0 with one per-key rule (domain bench, key api_key, a limit
# no run can reach). Each run drives it with h2load on core 1 (32 connections
# x 16 streams, N requests) twice: "steady" (config untouched), then "reload"
# (a background loop replaces the config file every EVERY seconds, alternating
# two valid configs with different limits, each write an atomic rename, for as
# long as h2load runs). Reloads applied are counted from sluice's log ("config
# reloaded", info). h2load counts HTTP 200 even for a gRPC error, so in both
# phases a real gRPC client (examples/rls_check.rs) also checks one answer
# every CHECK_EVERY seconds (on core 1 too): grpc_checks / grpc_failed.
#
# Prints per run, then the medians of RUNS runs (req/s, p50, p99, failed) per
# phase, the p99 ratio reload/steady and the reloads observed, and writes them
# to OUT/reload.csv. Target: no failed calls, p99 during reloads <= 2x steady.
# Only loopback addresses; every run is bounded in requests (N) and time
# (TIMEOUT), every loop in count and time.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

RUNS=${RUNS:-3}
OUT=${OUT:-benches/load}     # where reload.csv is written
mkdir -p "$OUT"
N=${N:-400000}               # requests per h2load run (400k: several seconds, tens of reloads)
TIMEOUT=${TIMEOUT:-120}      # seconds per h2load run; also bounds the rewrite and check loops
EVERY=${EVERY:-0.2}          # seconds between config rewrites
CHECK_EVERY=${CHECK_EVERY:-0.2}  # seconds between gRPC checks

command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release --quiet --bin sluice --example rls_body --example rls_check

work=$(mktemp -d)
server=""   # sluice's pid
bg=()       # this phase's background loops
cleanup() {
  for p in "${bg[@]}" ${server:+"$server"}; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Two valid configs that differ in their limit; both far above any run.
bench_config "$work/a.yaml" 4000000000
bench_config "$work/b.yaml" 3000000000
mkdir -p "$work/config"
cp "$work/a.yaml" "$work/config/bench.yaml"
target/release/examples/rls_body bench api_key=key-1 > "$work/body.bin"

# At most this many rewrites / checks per phase: TIMEOUT worth of them.
max_rewrites=$(awk -v t="$TIMEOUT" -v e="$EVERY" 'BEGIN {print int(t / e) + 1}')
max_checks=$(awk -v t="$TIMEOUT" -v e="$CHECK_EVERY" 'BEGIN {print int(t / e) + 1}')

: > "$work/sluice.log"
RUST_LOG=info taskset -c 0 target/release/sluice serve --config-dir "$work/config" --data-dir "$work/data" \
  --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --reload-interval-ms 100 2>"$work/sluice.log" &
server=$!
addr=$(wait_addr "$work/sluice.log" "sluice listening on" 100) ||
  { echo "sluice did not start" >&2; cat "$work/sluice.log" >&2; exit 1; }
target/release/examples/rls_check "$addr" bench api_key=key-1 >/dev/null

reloads() { grep -c 'config reloaded' "$work/sluice.log" || true; }
rejected() { grep -c 'config reload rejected' "$work/sluice.log" || true; }

# Replaces the config file every $EVERY s, alternating b, a, b, ..., until
# $work/stop exists; at most $max_rewrites times.
rewrite_loop() {
  local i src
  for ((i = 1; i <= max_rewrites; i++)); do
    [ -e "$work/stop" ] && break
    if ((i % 2)); then src=b; else src=a; fi
    cp "$work/$src.yaml" "$work/next.yaml"
    mv -f "$work/next.yaml" "$work/config/bench.yaml"
    sleep "$EVERY"
  done
}

# One real gRPC call every $CHECK_EVERY s until $work/stop exists, at most
# $max_checks; writes "checks failed" to $1.
check_loop() {
  local i ok=0 bad=0
  for ((i = 1; i <= max_checks; i++)); do
    [ -e "$work/stop" ] && break
    if timeout 10 target/release/examples/rls_check "$addr" bench api_key=key-1 >/dev/null 2>&1; then
      ok=$((ok + 1))
    else
      bad=$((bad + 1))
    fi
    sleep "$CHECK_EVERY"
  done
  echo "$((ok + bad)) $bad" > "$1"
}

# One h2load run on core 1; prints "req/s p50_us p99_us failed".
load() { h2load_calls 1 "$addr" 32 16 "$N" "$work/body.bin" "$work" "$TIMEOUT"; }

# One phase (steady or reload); appends "rps p50 p99 failed checks check_failed
# reloads" to $work/$1. Not in a subshell: cleanup must see $bg.
phase() {
  local name=$1 before after result
  rm -f "$work/stop" "$work/checks"
  before=$(reloads)
  bg=()
  check_loop "$work/checks" & bg+=($!)
  taskset -cp 1 "${bg[-1]}" >/dev/null
  if [ "$name" = reload ]; then
    rewrite_loop & bg+=($!)
    taskset -cp 1 "${bg[-1]}" >/dev/null
  fi
  result=$(load)
  after=$(reloads)
  touch "$work/stop"
  for p in "${bg[@]}"; do wait "$p"; done
  bg=()
  kill -0 "$server" 2>/dev/null || { echo "sluice exited during $name" >&2; tail -20 "$work/sluice.log" >&2; exit 1; }
  echo "$result $(cat "$work/checks") $((after - before))" >> "$work/$name"
}

# Puts config a back (if the last rewrite left b) and waits until it is applied.
restore() {
  sleep 0.3   # a last rewrite not yet seen by the 100 ms poll lands now
  cmp -s "$work/a.yaml" "$work/config/bench.yaml" && return 0
  local before i
  before=$(reloads)
  cp "$work/a.yaml" "$work/next.yaml"
  mv -f "$work/next.yaml" "$work/config/bench.yaml"
  for ((i = 0; i < 50; i++)); do
    [ "$(reloads)" -gt "$before" ] && return 0
    sleep 0.1
  done
  echo "config restore not applied within 5 s" >&2; exit 1
}

sum() { awk '{s += $1} END {print s + 0}'; }

: > "$work/steady"; : > "$work/reload"
printf '# %-4s %-7s %12s %10s %10s %7s %12s %12s %8s\n' run phase req/s p50_us p99_us failed grpc_checks grpc_failed reloads
for run in $(seq 1 "$RUNS"); do
  for name in steady reload; do
    phase "$name"
    tail -1 "$work/$name" | awk -v r="$run" -v p="$name" '{printf "# %-4s %-7s %12s %10s %10s %7s %12s %12s %8s\n", r, p, $1, $2, $3, $4, $5, $6, $7}'
  done
  restore
done

col() { cut -d' ' -f"$2" "$work/$1"; }
echo "phase,rps,p50_us,p99_us,failed,failed_all,grpc_checks,grpc_failed,reloads,reloads_all,p99_ratio" > "$work/reload.csv"
printf '%-7s %12s %10s %10s %7s %11s %12s %12s %8s %12s\n' phase req/s p50_us p99_us failed failed_all grpc_checks grpc_failed reloads reloads_all
steady_p99=$(col steady 3 | median)
for name in steady reload; do
  rps=$(col "$name" 1 | median); p50=$(col "$name" 2 | median); p99=$(col "$name" 3 | median)
  failed=$(col "$name" 4 | median); failed_all=$(col "$name" 4 | sum)
  checks=$(col "$name" 5 | sum); check_failed=$(col "$name" 6 | sum)
  rel=$(col "$name" 7 | median); rel_all=$(col "$name" 7 | sum)
  ratio=$(awk -v a="$p99" -v b="$steady_p99" 'BEGIN {printf "%.3f", a / b}')
  printf '%-7s %12s %10s %10s %7s %11s %12s %12s %8s %12s\n' "$name" "$rps" "$p50" "$p99" "$failed" "$failed_all" "$checks" "$check_failed" "$rel" "$rel_all"
  echo "$name,$rps,$p50,$p99,$failed,$failed_all,$checks,$check_failed,$rel,$rel_all,$ratio" >> "$work/reload.csv"
done
ratio=$(awk -v a="$(col reload 3 | median)" -v b="$steady_p99" 'BEGIN {printf "%.3f", a / b}')
fails=$(( $(col steady 4 | sum) + $(col reload 4 | sum) + $(col steady 6 | sum) + $(col reload 6 | sum) ))
echo "p99 ratio (reload / steady): $ratio; config reloads applied during load: $(col reload 7 | median) per run (median), $(col reload 7 | sum) in all; rejected: $(rejected)"
if [ "$fails" -eq 0 ] && awk -v r="$ratio" 'BEGIN {exit !(r <= 2)}'; then verdict=met; else verdict="not met"; fi
echo "target (no failed calls, p99 during reloads <= 2x steady): $verdict"
cp "$work/reload.csv" "$OUT/reload.csv"
echo "wrote $OUT/reload.csv"
