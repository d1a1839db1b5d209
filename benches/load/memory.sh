#!/usr/bin/env bash
# Memory and restart with many distinct keys, against the real binary over
# gRPC (examples/rls_keys), in one run:
#
#   bash benches/load/memory.sh              # 1,000,000 keys
#   KEYS=10000 bash benches/load/memory.sh   # a quick check
#
# Phase "expiry": rule `api_key`, 1000 per minute. RSS (VmRSS) after one
#   warm-up call, after KEYS distinct keys sent inside one minute window
#   (the load starts just after a minute boundary), and once that window has
#   ended and the purger has removed the counters (the server logs each purge
#   at trace level; the script waits until they sum to every key sent), read
#   SETTLE s and again LATE s after the purge with the server idle (a server
#   whose RSS climbs back while idle shows it there).
# Phase "restart": rule `api_key`, 1000 per day, so counters stay live. KEYS
#   distinct keys, SIGTERM (final flush), restart on the same data dir
#   (RESTARTS times): wall time from exec to the "sluice listening" log line,
#   the restored count from "counter store opened ... restored=", RSS after
#   the restart, and a check that restored counters count on (remaining 998
#   for a key hit once before the restart, 999 for a new key).
#
# Only loopback addresses; every wait is bounded. Prints a table and writes
# it, with the machine, date and command, to $OUT (benches/load/memory.txt).
# SLUICE=path/to/sluice measures another build of the server (A/B runs).
# Wall times suffer from other work on the machine: the restart is also
# given as the CPU time (user + sys) the server used until it listened.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

KEYS=${KEYS:-1000000}
OUT=${OUT:-benches/load/memory.txt}
mkdir -p "$(dirname "$OUT")"
LOAD_TIMEOUT=${LOAD_TIMEOUT:-300}      # seconds for one rls_keys run
PURGE_TIMEOUT=${PURGE_TIMEOUT:-60}     # seconds after the window ends
SETTLE=${SETTLE:-5}                    # seconds after purge before the first RSS read
LATE=${LATE:-60}                       # seconds after purge of the second (a server left
                                       # idle must not grow back: sled compacts meanwhile)
CONCURRENCY=${CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
RESTARTS=${RESTARTS:-3}                # restarts measured in phase "restart"

cargo build --release --quiet --bin sluice --example rls_keys

bench_workdir
# Private copies: a rebuild of target/ during the run must not swap binaries
# between the phases.
cp "${SLUICE:-target/release/sluice}" "$work/sluice"
cp target/release/examples/rls_keys "$work/"
bin=$work/sluice
keys_bin=$work/rls_keys

say() { echo "[memory.sh $(date -u +%T)] $*" >&2; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
now_ns() { date +%s%N; }
# Nanoseconds since the epoch of a log line's leading RFC 3339 timestamp.
log_ns() { date -d "$(cut -d' ' -f1 <<<"$1")" +%s%N; }

# Starts sluice on loopback with config dir $1, data dir $2, log $3; waits
# (10 s at most) for "sluice listening on ADDR"; sets $addr, $pid, $ready_s
# (exec to the listening line, from the line's own timestamp), $store_s
# (exec to "counter store opened") and $ready_cpu_s (CPU seconds used by
# then, read right after the line shows).
start() {
  local config=$1 data=$2 log=$3 t0 line
  t0=$(now_ns)
  RUST_LOG="info,sluice::storage::sled_store=trace" "$bin" serve --config-dir "$config" --data-dir "$data" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 2>"$log" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 1000); do
    line=$(grep -m1 'sluice listening on' "$log" || true)
    if [ -n "$line" ]; then
      addr=$(sed -n 's/.*sluice listening on \([0-9.]*:[0-9]*\).*/\1/p' <<<"$line")
      ready_cpu_s=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$pid/stat")
      ready_s=$(awk -v a="$t0" -v b="$(log_ns "$line")" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
      store_s=$(awk -v a="$t0" -v b="$(log_ns "$(grep -m1 'counter store opened' "$log")")" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  echo "sluice did not start: $log" >&2; cat "$log" >&2; exit 1
}

# SIGTERM, then wait (30 s at most) for a clean exit.
stop() {
  local log=$1
  kill -TERM "$pid"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then echo "sluice did not stop in 30 s" >&2; exit 1; fi
  wait "$pid" || { echo "sluice exited non-zero" >&2; cat "$log" >&2; exit 1; }
  pids=("${pids[@]/$pid}")
  grep -q 'stopped cleanly' "$log" || { echo "no clean stop in $log" >&2; exit 1; }
}

load_keys() {
  "$keys_bin" "$addr" bench api_key "$KEYS" --concurrency "$CONCURRENCY" \
    --connections "$CONNECTIONS" --timeout "$LOAD_TIMEOUT"
}

# Sum of "purged expired counters removed=N" in a log.
purged() { sed -n 's/.*purged expired counters removed=\([0-9]*\).*/\1/p' "$1" | awk '{s += $1} END {print s + 0}'; }

bench_config "$work/expiry/config/bench.yaml" 1000 minute
bench_config "$work/restart/config/bench.yaml" 1000 day

load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- Phase "expiry" ---------------------------------------------------------
say "expiry: $KEYS keys in one minute window"
log="$work/expiry/sluice.log"
start "$work/expiry/config" "$work/expiry/data" "$log"
"$keys_bin" "$addr" bench api_key --one warm-up --timeout 10 >/dev/null
sleep 1
e_start=$(rss_kb "$pid")
# Start just after a minute boundary so the whole load falls in one window.
sec=$(( $(date +%s) % 60 ))
if [ "$sec" -gt 1 ]; then say "waiting $(( 60 - sec )) s for the next minute"; sleep $(( 60 - sec )); fi
w_start=$(( $(date +%s) / 60 ))
e_load=$(load_keys)
w_end=$(( $(date +%s) / 60 ))
say "$e_load"
[ "$w_start" = "$w_end" ] || { echo "the load crossed a minute boundary ($e_load): one window is not possible here" >&2; exit 1; }
sleep 2   # let the writer flush the last changes
e_after=$(rss_kb "$pid")
e_hwm=$(hwm_kb "$pid")
# Wait for the window to end and the purger to remove every counter.
deadline=$(( (w_end + 1) * 60 + PURGE_TIMEOUT ))
while :; do
  p=$(purged "$log")
  [ "$p" -ge "$KEYS" ] && [ "$(date +%s)" -ge $(( (w_end + 1) * 60 + 1 )) ] && break
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "purged $p of $KEYS by the deadline" >&2; exit 1; fi
  sleep 1
done
purge_s=$(( $(date +%s) - (w_end + 1) * 60 ))
sleep "$SETTLE"
e_expired=$(rss_kb "$pid")
sleep $(( LATE > SETTLE ? LATE - SETTLE : 0 ))
e_late=$(rss_kb "$pid")
e_purged=$(purged "$log")
stop "$log"

# ---- Phase "restart" --------------------------------------------------------
say "restart: $KEYS keys in a day window, SIGTERM, restart"
log="$work/restart/sluice.log"
start "$work/restart/config" "$work/restart/data" "$log"
"$keys_bin" "$addr" bench api_key --one warm-up --timeout 10 >/dev/null
sleep 1
r_start=$(rss_kb "$pid")
day0=$(( $(date +%s) / 86400 ))
r_load=$(load_keys)
say "$r_load"
sleep 2
r_after=$(rss_kb "$pid")
t0=$(now_ns)
stop "$log"
stop_s=$(awk -v a="$t0" -v b="$(now_ns)" 'BEGIN {printf "%.2f", (b - a) / 1e9}')
# The restart, RESTARTS times (the wall time is noisy on a shared machine);
# the checks follow the last one.
readies=(); stores=(); cpus=()
for i in $(seq 1 "$RESTARTS"); do
  log2="$work/restart/sluice-restart$i.log"
  start "$work/restart/config" "$work/restart/data" "$log2"
  readies+=("$ready_s"); stores+=("$store_s"); cpus+=("$ready_cpu_s")
  r_restart=$(rss_kb "$pid")
  restored=$(sed -n 's/.*counter store opened.*restored=\([0-9]*\).*/\1/p' "$log2" | head -1)
  [ "$restored" = "$(( KEYS + 1 ))" ] || { echo "restart $i: restored=$restored, want $(( KEYS + 1 ))" >&2; exit 1; }
  [ "$i" = "$RESTARTS" ] || stop "$log2"
done
first=$("$keys_bin" "$addr" bench api_key --one key-0 --timeout 10)
last=$("$keys_bin" "$addr" bench api_key --one "key-$(( KEYS - 1 ))" --timeout 10)
fresh=$("$keys_bin" "$addr" bench api_key --one never-sent --timeout 10)
sleep 1
r_restart_used=$(rss_kb "$pid")
stop "$log2"
[ "$(( $(date +%s) / 86400 ))" = "$day0" ] || { echo "the day window changed during the run (UTC midnight): run again" >&2; exit 1; }
check() { grep -q "remaining $2\$" <<<"$1" || { echo "restore check failed: got '$1', want remaining $2" >&2; exit 1; }; }
check "$first" 998; check "$last" 998; check "$fresh" 999

# ---- Report -----------------------------------------------------------------
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
per_key() { awk -v a="$1" -v b="$2" -v n="$KEYS" 'BEGIN {printf "%.0f", (b - a) * 1024 / n}'; }
report="$work/report.txt"
{
  echo "# benches/load/memory.sh: memory and restart with $KEYS distinct keys"
  echo "date:    $(date -u +%FT%TZ)"
  echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
  echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "load:    $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (1/5/15 min load average; other work on the machine skews the times)"
  echo "binary:  sluice sha256 $(sha256sum "$bin" | cut -c1-16)"
  echo "command: ${SLUICE:+SLUICE=$SLUICE }KEYS=$KEYS CONCURRENCY=$CONCURRENCY CONNECTIONS=$CONNECTIONS RESTARTS=$RESTARTS LATE=$LATE bash benches/load/memory.sh"
  echo
  echo "expiry (rule: 1000/minute; load: $e_load)"
  printf '  %-44s %10s MiB\n' "RSS after warm-up (start)" "$(mib "$e_start")"
  printf '  %-44s %10s MiB  (peak %s MiB)\n' "RSS after $KEYS keys, one window" "$(mib "$e_after")" "$(mib "$e_hwm")"
  printf '  %-44s %10s MiB  (purged %s counters, %s s after the window end, read %s s later)\n' "RSS after the window expired and was purged" "$(mib "$e_expired")" "$e_purged" "$purge_s" "$SETTLE"
  printf '  %-44s %10s MiB  (%s s after the purge, no calls since)\n' "RSS later" "$(mib "$e_late")" "$LATE"
  printf '  %-44s %10s bytes\n' "bytes per key while live (after - start)/N" "$(per_key "$e_start" "$e_after")"
  printf '  %-44s %10s bytes\n' "bytes per key left after expiry" "$(per_key "$e_start" "$e_expired")"
  printf '  %-44s %10s bytes\n' "bytes per key left, later" "$(per_key "$e_start" "$e_late")"
  echo
  echo "restart (rule: 1000/day; load: $r_load)"
  printf '  %-44s %10s MiB\n' "RSS after warm-up (start)" "$(mib "$r_start")"
  printf '  %-44s %10s MiB\n' "RSS after $KEYS keys" "$(mib "$r_after")"
  printf '  %-44s %10s bytes\n' "bytes per key while live (after - start)/N" "$(per_key "$r_start" "$r_after")"
  printf '  %-44s %10s s\n' "SIGTERM to exit (final flush)" "$stop_s"
  printf '  %-44s %10s s  (each: %s; counter store opened at: %s)\n' "restart: exec to 'sluice listening', median" "$(printf '%s\n' "${readies[@]}" | median)" "${readies[*]}" "${stores[*]}"
  printf '  %-44s %10s s  (each: %s)\n' "restart: CPU used until listening, median" "$(printf '%s\n' "${cpus[@]}" | median)" "${cpus[*]}"
  printf '  %-44s %10s\n' "restored counters (log restored=)" "$restored"
  printf '  %-44s %10s MiB\n' "RSS right after the last restart" "$(mib "$r_restart")"
  printf '  %-44s %10s MiB\n' "RSS after 3 checks" "$(mib "$r_restart_used")"
  echo "  checks after restart: $first | $last | $fresh"
} > "$report"
cat "$report"
cp "$report" "$OUT"
echo "wrote $OUT"
