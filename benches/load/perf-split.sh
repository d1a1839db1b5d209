#!/usr/bin/env bash
# Where a ShouldRateLimit call's server time goes: perf samples of sluice
# (sled on, pinned to CPU 0) under h2load (CPU 1, 32 connections x 16
# streams), as CPU nanoseconds per call, split by part, one column per mode.
#
#   bash benches/load/perf-split.sh                   # modes noop rule tokens tokens-nohdr
#   MODES="rule plan" SECS=10 bash benches/load/perf-split.sh
#
# Modes are run.sh's requests: rule (pinned), plan, tokens, tokens-nohdr; and
# noop, the do-nothing server (examples/noop_rls.rs) with rule's request, whose
# column is the floor each part of sluice's is compared with.
# Needs perf (Debian: apt-get install linux-perf) allowed to profile your own
# processes (kernel.perf_event_paranoid 2 or less) and h2load. Builds sluice
# with frame pointers (for perf's call stacks) into target/perf: the release
# binary in target/release is left alone. A sample's part is decided by the
# functions on its stack (first match, in the order of the table); "kernel"
# is kernel time outside those parts (the network stack, wake-ups). Figures
# are per call: the sampled CPU time divided by the calls h2load completed
# per second times the seconds recorded (h2load runs SECS + 4 s; perf records
# SECS s from its second second), so they carry h2load's rate noise.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

MODES=${MODES:-"noop rule tokens tokens-nohdr"}
SECS=${SECS:-8}           # seconds of samples per mode
FREQ=${FREQ:-2000}        # samples per second
OUT=${OUT:-benches/load/perf-split.txt}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }

RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/perf \
  cargo build --release --quiet --bin sluice --example noop_rls --example rls_body --example rls_check
bin=target/perf/release

bench_workdir
bench_config "$work/config/bench.yaml"
bench_plans "$work/plans.yaml"

# The part a sample (its stack, innermost frame first) belongs to; the labels
# are the table's rows, in its order.
parts='decision: plan (decide_plan)
decision: config rules (decide_rules)
decision: API key lookup (Catalog::resolve)
decision: answer headers (plans::headers::build)
decision: the rest (request conversion, statuses, drops)
request decode (prost)
answer encode (WireResponse::new; prost)
sled (its own threads)
kernel (network stack, scheduling)
gRPC, HTTP/2, runtime, allocator (tonic, hyper, h2, tokio, jemalloc)'

for mode in $MODES; do
  case $mode in noop|rule) req=pinned ;; plan|tokens|tokens-nohdr|tokens1) req=$mode ;; *) echo "unknown mode $mode" >&2; exit 1 ;; esac
  mode_request "$req"
  rm -rf "$work/data"
  if [ "$mode" = noop ]; then
    taskset -c 0 "$bin/examples/noop_rls" 127.0.0.1:0 > "$work/sluice.log" 2>&1 &
    mark="noop listening on"
  else
    taskset -c 0 "$bin/sluice" serve --config-dir "$work/config" --data-dir "$work/data" \
      --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --admin-token "$BENCH_ADMIN_TOKEN" > "$work/sluice.log" 2>&1 &
    mark="sluice listening on"
  fi
  pids+=($!)
  addr=$(wait_addr "$work/sluice.log" "$mark" 100) || { echo "$mode did not start" >&2; cat "$work/sluice.log" >&2; exit 1; }
  if [ "$domain" != bench ]; then apply_plans "$work/sluice.log" "$work/plans.yaml" "$work/apply.out"; fi
  "$bin/examples/rls_body" "$domain" "${entries[@]}" > "$work/body.bin"
  "$bin/examples/rls_check" "$addr" "$domain" "${entries[@]}" >/dev/null
  timeout $((SECS + 30)) taskset -c 1 h2load -D $((SECS + 4)) -c 32 -m 16 -t 1 -d "$work/body.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$addr/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" > "$work/h2load.out" &
  hpid=$!
  sleep 1
  perf record -q -F "$FREQ" -g -p "${pids[-1]}" -o "$work/$mode.data" -- sleep "$SECS" 2> "$work/perf.err" ||
    { echo "perf record failed (kernel.perf_event_paranoid is $(cat /proc/sys/kernel/perf_event_paranoid)):" >&2; cat "$work/perf.err" >&2; exit 1; }
  wait "$hpid"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
  rps=$(sed -n 's/.*finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$work/h2load.out")
  failed=$(sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p' "$work/h2load.out")
  if [ -z "$rps" ] || [ "$failed" != 0 ]; then echo "h2load in mode $mode:" >&2; cat "$work/h2load.out" >&2; exit 1; fi
  # Each sample: a header line ("comm tid time: period event:") and its
  # stack, one frame per line, innermost first; a blank line ends it.
  perf script -i "$work/$mode.data" 2>/dev/null | awk -v mode="$mode" -v rps="$rps" -v secs="$SECS" '
    function part(s, leaf) {
      # sluice encodes its answer as the handler returns (WireResponse::new).
      if (s ~ /sluice::server::wire::WireResponse::new/) return 7
      if (s ~ /should_rate_limit::\{\{closure/) {
        if (s ~ /decide_plan/) return 1
        if (s ~ /decide_rules/) return 2
        if (s ~ /Catalog::resolve/) return 3
        if (s ~ /plans::headers::build/) return 4
        return 5
      }
      if (s ~ /ProstDecoder/) return 6
      if (s ~ /prost::message::Message::encode|(WireResponse|RateLimitResponse) as prost::message::Message>|drop_in_place<sluice::(server::wire::WireResponse|proto::envoy::service::ratelimit::v3::RateLimitResponse)>|sluice::server::wire::[a-z_]+\+/) return 7
      if (s ~ /sled::/) return 8
      if (leaf ~ /kernel\.kallsyms/) return 9
      return 10
    }
    function flush() { if (n) { ns[part(stack, leaf)] += period; total += period } n = 0; stack = "" }
    /^[^ \t]/ { flush(); for (i = 1; i <= NF; i++) if ($i ~ /^cpu-clock|^task-clock|^cycles/) period = $(i - 1); next }
    /^[ \t]*$/ { flush(); next }
    { if (!n) leaf = $0; stack = stack "|" $0; n++ }
    END {
      flush(); calls = rps * secs
      printf "%s %.2f", mode, rps
      for (i = 1; i <= 10; i++) printf " %.0f", ns[i] / calls
      printf " %.0f\n", total / calls
    }' >> "$work/split"
  echo "$mode: $rps calls/s under perf" >&2
done

{
  echo "# benches/load/perf-split.sh: CPU ns per ShouldRateLimit call, by part (perf, $FREQ Hz, $SECS s per mode)"
  echo "date:    $(date -u +%FT%TZ)"
  echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
  echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "command: MODES=\"$MODES\" SECS=$SECS FREQ=$FREQ bash benches/load/perf-split.sh"
  echo
  awk -v parts="$parts" '
    BEGIN { np = split(parts, label, "\n") }
    { m[NR] = $1; r[NR] = $2; for (i = 1; i <= np + 1; i++) v[NR, i] = $(i + 2) }
    END {
      printf "%-70s", "part (ns per call)"; for (j = 1; j <= NR; j++) printf " %13s", m[j]; printf "\n"
      for (i = 1; i <= np; i++) { printf "%-70s", label[i]; for (j = 1; j <= NR; j++) printf " %13d", v[j, i]; printf "\n" }
      printf "%-70s", "total"; for (j = 1; j <= NR; j++) printf " %13d", v[j, np + 1]; printf "\n"
      printf "%-70s", "calls/s (h2load, under perf)"; for (j = 1; j <= NR; j++) printf " %13.0f", r[j]; printf "\n"
    }' "$work/split"
} | tee "$OUT"
