#!/usr/bin/env bash
# What the larger messages of a token-limit call cost on their own: the
# do-nothing server answering with the exact bytes sluice answers (a rule's
# answer to the rule request, a token plan's answer with its six
# x-ratelimit-* headers to the tokens request), beside sluice itself, pinned
# like run.sh's pinned modes (server on CPU 0, h2load 32x16 on CPU 1).
#
#   bash benches/load/floor.sh              # 5 rounds
#   ROUNDS=7 N=300000 bash benches/load/floor.sh
#   TOKENS_MODE=tokens1 bash benches/load/floor.sh   # the one-token-limit plan
#
# Four (server, request) pairs, each run once per round, in turn, so drift
# over the minutes touches all four alike: noop-rule, noop-tokens (the
# do-nothing server, examples/noop_rls.rs --answer, with sluice's answer
# bytes saved by examples/rls_check.rs --save-answer), sluice-rule and
# sluice-tokens (one sluice, sled on, default durability, the plans of
# run.sh's tokens mode, or of the mode TOKENS_MODE names). Prints each
# pair's median req/s, and per call (the server's core is saturated, so
# 1 s / req/s is its time per call): what
# the tokens messages add to the do-nothing server, and what sluice's
# tokens decision adds beyond that. Needs h2load (Debian: nghttp2-client).
# Only loopback addresses; each h2load run is bounded in requests (N) and
# time (TIMEOUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

ROUNDS=${ROUNDS:-5}
N=${N:-200000}
TIMEOUT=${TIMEOUT:-120}
TOKENS_MODE=${TOKENS_MODE:-tokens}   # run.sh's request for the "tokens" pairs: tokens, tokens1, tokens-nohdr
command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release --quiet --bin sluice --example noop_rls --example rls_body --example rls_check
bin=target/release

bench_workdir
bench_config "$work/config/bench.yaml"
bench_plans "$work/plans.yaml"

# start NAME MARK CMD...: starts CMD on CPU 0 (its stderr in $work/NAME.log),
# waits for "MARK ADDR" and records ADDR as addr_NAME.
declare -A addr_of=()
start() {
  local name=$1 mark=$2; shift 2
  taskset -c 0 "$@" 2> "$work/$name.log" &
  pids+=($!)
  addr_of[$name]=$(wait_addr "$work/$name.log" "$mark" 100) ||
    { echo "$name did not start:" >&2; cat "$work/$name.log" >&2; exit 1; }
}

start sluice "sluice listening on" "$bin/sluice" serve --config-dir "$work/config" \
  --data-dir "$work/data" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --admin-token "$BENCH_ADMIN_TOKEN"

# Each request's body, and sluice's answer to it (checked OK by a real gRPC
# client and saved for the do-nothing server).
for req in rule tokens; do
  case $req in rule) mode_request pinned ;; tokens) mode_request "$TOKENS_MODE" ;; esac
  if [ "$domain" != bench ]; then apply_plans "$work/sluice.log" "$work/plans.yaml" "$work/apply.out"; fi
  "$bin/examples/rls_body" "$domain" "${entries[@]}" > "$work/$req.body"
  "$bin/examples/rls_check" --save-answer "$work/$req.answer" "${addr_of[sluice]}" "$domain" "${entries[@]}" >/dev/null
  start "noop-$req" "noop listening on" "$bin/examples/noop_rls" 127.0.0.1:0 --answer "$work/$req.answer"
  # The do-nothing server must give back exactly what sluice gave.
  "$bin/examples/rls_check" --save-answer "$work/$req.noop-answer" "${addr_of[noop-$req]}" "$domain" "${entries[@]}" >/dev/null
  cmp -s "$work/$req.answer" "$work/$req.noop-answer" ||
    { echo "noop-$req does not answer sluice's bytes" >&2; exit 1; }
  echo "$req: request $(stat -c %s "$work/$req.body") bytes framed, answer $(stat -c %s "$work/$req.answer") bytes" >&2
done

pairs="noop-rule noop-tokens sluice-rule sluice-tokens"
for round in $(seq 1 "$ROUNDS"); do
  for pair in $pairs; do
    server=${pair%-*}; req=${pair##*-}
    [ "$server" = noop ] && server=noop-$req
    h2load_calls 1 "${addr_of[$server]}" 32 16 "$N" "$work/$req.body" "$work" "$TIMEOUT" > "$work/out"
    read -r rps _ _ failed < "$work/out"
    [ "$failed" = 0 ] || { echo "$pair: $failed failed calls in round $round" >&2; exit 1; }
    echo "$rps" >> "$work/$pair.rps"
    echo "round $round $pair $rps" >&2
  done
done

declare -A med=()
for pair in $pairs; do med[$pair]=$(median < "$work/$pair.rps"); done
echo "# benches/load/floor.sh: pinned 32x16, medians of $ROUNDS rounds of $N calls"
echo "date:    $(date -u +%FT%TZ)"
echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
echo "tokens:  run.sh's $TOKENS_MODE request"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
echo "messages: rule request $(stat -c %s "$work/rule.body") B framed, answer $(stat -c %s "$work/rule.answer") B; tokens request $(stat -c %s "$work/tokens.body") B framed, answer $(stat -c %s "$work/tokens.answer") B"
for pair in $pairs; do printf '%-14s %12s req/s\n' "$pair" "${med[$pair]}"; done
awk -v nr="${med[noop-rule]}" -v nt="${med[noop-tokens]}" -v sr="${med[sluice-rule]}" -v st="${med[sluice-tokens]}" 'BEGIN {
  printf "noop-tokens / noop-rule       %.3f  (the tokens messages alone)\n", nt / nr
  printf "sluice-tokens / sluice-rule   %.3f\n", st / sr
  printf "sluice-rule / noop-rule       %.3f\n", sr / nr
  printf "sluice-tokens / noop-tokens   %.3f  (sluice against a do-nothing server with the same messages)\n", st / nt
  msg = 1e9 / nt - 1e9 / nr
  dr = 1e9 / sr - 1e9 / nr; dt = 1e9 / st - 1e9 / nt
  printf "ns per call: the tokens messages add %.0f to the do-nothing server; sluice adds %.0f to it for a rule call, %.0f for a tokens call\n", msg, dr, dt
  printf "a tokens call at 0.90x sluice-rule may cost %.0f ns; with the messages alone it costs %.0f, leaving %.0f ns for the tokens decision (it takes %.0f)\n", 1e9 / (0.9 * sr), 1e9 / nt, 1e9 / (0.9 * sr) - 1e9 / nt, dt
}'
