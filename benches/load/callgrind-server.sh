#!/usr/bin/env bash
# Instructions per ShouldRateLimit call, server side, for the do-nothing
# server and for sluice (config rule, sled on, default durability), counted
# by callgrind while h2load sends the same calls over loopback. Unlike req/s,
# the count does not drift with machine load, so it shows what a change to
# the hot path is worth; the annotated profiles show where the instructions
# go (the profile behind the targets in BENCHMARKS.md).
#
#   bash benches/load/callgrind-server.sh        # N=20000 calls per server
#   MODES="rule plan tokens" bash benches/load/callgrind-server.sh
#
# MODES picks sluice's requests, as run.sh's modes do: rule (the default: one
# api_key descriptor against a per-key rule), plan (an API key decided against
# a plan with a throttle and a quota), tokens (the same plus three token
# limits, with a model entry); sluice runs once per mode.
#
# Each server runs under `valgrind --tool=callgrind`; 2000 warm-up calls,
# then the counters are zeroed, N calls are sent (4 connections x 16
# streams), and the counters dumped. Prints instructions per call for both
# and their ratio, and writes the profiles to $OUT (callgrind.noop.out,
# callgrind.sluice.out, callgrind.sluice-plan.out, ...; read them with
# callgrind_annotate). Only user space
# is counted (not the kernel's TCP work), and valgrind hides SHA-NI, so a
# plan's API-key hash is counted in its software form.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

N=${N:-20000}
MODES=${MODES:-rule}   # rule, plan, tokens, tokens-nohdr, tokens1: the request, as in run.sh
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release --quiet --bin sluice --example noop_rls --example rls_body --example rls_check

work=$(mktemp -d)
vpid=""
cleanup() { [ -n "$vpid" ] && kill "$vpid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

bench_config "$work/config/bench.yaml"
bench_plans "$work/plans.yaml"

calls() {
  timeout 600 h2load -n "$1" -c 4 -m 16 -t 1 -d "$work/body.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://$2/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" |
    sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p'
}

# profile NAME MARK MODE CMD...: sets $result to the instructions per call of
# MODE's request (lib.sh's mode_request). Not run in a command substitution:
# the valgrind it starts must be known to this shell's EXIT trap.
profile() {
  local name=$1 mark=$2 mode=$3; shift 3
  local log="$work/$name.log" out="$OUT/callgrind.$name"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" 2>"$log" &
  vpid=$!
  local addr
  addr=$(wait_addr "$log" "$mark" 400) || { echo "$name did not start" >&2; cat "$log" >&2; exit 1; }
  mode_request "$mode"
  if [ "$mode" != rule ] && [ "$name" != noop ]; then
    apply_plans "$log" "$work/plans.yaml" "$work/apply.out"
  fi
  target/release/examples/rls_body "$domain" "${entries[@]}" > "$work/body.bin"
  target/release/examples/rls_check "$addr" "$domain" "${entries[@]}" >/dev/null
  calls 2000 "$addr" >/dev/null
  callgrind_control -z "$vpid" >/dev/null 2>&1
  local ok
  ok=$(calls "$N" "$addr")
  [ "$ok" = "$N" ] || { echo "$name: only $ok of $N calls succeeded" >&2; exit 1; }
  callgrind_control -d "$vpid" >/dev/null 2>&1
  kill "$vpid"; wait "$vpid" 2>/dev/null || true; vpid=""
  mv "$out.1" "$out.out"; rm -f "$out"
  result=$(callgrind_annotate "$out.out" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d , |
    awk -v n="$N" '{printf "%.0f\n", $1 / n}')
  [ -n "$result" ] || { echo "$name: no instruction total in $out.out" >&2; exit 1; }
}

profile noop "noop listening on" rule target/release/examples/noop_rls 127.0.0.1:0
noop=$result
printf 'instructions per call (server, user space), N=%s:\n  %-14s %8s\n' "$N" noop "$noop"
profiles="$OUT/callgrind.noop.out"
for mode in $MODES; do
  name=sluice; [ "$mode" = rule ] || name="sluice-$mode"
  rm -rf "$work/data"
  profile "$name" "sluice listening on" "$mode" target/release/sluice serve --config-dir "$work/config" \
    --data-dir "$work/data" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --admin-token "$BENCH_ADMIN_TOKEN"
  n=$result
  printf '  %-20s %8s  (noop/sluice %.3f)\n' "$name" "$n" "$(awk -v a="$noop" -v b="$n" 'BEGIN {print a / b}')"
  profiles+=" $OUT/callgrind.$name.out"
done
echo "profiles: $profiles (callgrind_annotate --inclusive=yes)"
