#!/usr/bin/env bash
# Instructions per decision under callgrind: a figure that does not drift with
# machine load, unlike criterion's times (benches/decision.rs).
#
#   bash benches/callgrind.sh
#
# Builds examples/decision_count.rs in release and runs each case under
# `valgrind --tool=callgrind` with K1 and K2 decisions on the same hot key,
# counting only the decision loop (`--collect-atstart=no
# --toggle-collect=<the loop>`: setup and other threads are left out), then
#
#   instructions per decision = (Ir(K2) - Ir(K1)) / (K2 - K1)
#
# which also removes the loop's one-off costs (the first counters, the
# allocator's first pages).
#
# Repeatability: the driver decides on a thread with its own (jemalloc) cache,
# and this script preloads a getrandom(3) that returns a fixed sequence
# (built here with cc; without cc it warns and runs without it), so API key
# ids and hash seeds, and with them the catalog's maps, are the same every
# run. The config-rule cases then repeat to the instruction. The plan cases
# still move by up to ~100 instructions per decision (< 1%) from run to run:
# the setup's heap layout depends on how sled's threads interleaved with it,
# and a few paths depend on it (memcmp on catalog strings, the allocator's slow
# path). So each K is run REPS times and the median Ir is used (two whole
# runs of this script then agree to within ~0.2%); `spread` is the largest
# minus the smallest per-decision figure of the REPS pairs of runs.
#
# Writes benches/callgrind.csv (case,instructions_per_decision) and prints a
# table. Knobs (environment): K1 (1000), K2 (11000), REPS (5), CASES (the
# list below; `decision_count` without arguments lists every case), OUT
# (benches/callgrind.csv).
set -euo pipefail

cd "$(dirname "$0")/.."
K1=${K1:-1000}
K2=${K2:-11000}
REPS=${REPS:-5}
OUT=${OUT:-benches/callgrind.csv}
CASES=${CASES:-rule-memory rule-sled plan-memory tokens-request-memory tokens-charge-memory plan-sled}

command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
if [ "$K2" -le "$K1" ]; then
  echo "K2 ($K2) must be larger than K1 ($K1)" >&2
  exit 1
fi

cargo build --release --example decision_count >&2
BIN=${CARGO_TARGET_DIR:-target}/release/examples/decision_count
[ -x "$BIN" ] || { echo "not built: $BIN" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# getrandom(3) (and getentropy) returning a fixed splitmix64 sequence. Rust's
# std and the getrandom crate call the libc function when it exists, so an
# LD_PRELOAD'ed one replaces the kernel's randomness for this process only.
PRELOAD=
if command -v cc >/dev/null; then
  cat >"$WORK/fixed_random.c" <<'EOF'
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
static uint64_t state = 0x5eed5eed5eed5eedULL;
static uint64_t next(void) {
    uint64_t z = __atomic_add_fetch(&state, 0x9e3779b97f4a7c15ULL, __ATOMIC_RELAXED);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
ssize_t getrandom(void *buf, size_t len, unsigned int flags) {
    (void)flags;
    unsigned char *p = buf;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = next();
        for (size_t j = 0; j < 8 && i + j < len; j++) p[i + j] = (unsigned char)(v >> (8 * j));
    }
    return (ssize_t)len;
}
int getentropy(void *buf, size_t len) { return getrandom(buf, len, 0) < 0 ? -1 : 0; }
EOF
  cc -O2 -shared -fPIC -o "$WORK/fixed_random.so" "$WORK/fixed_random.c"
  PRELOAD=$WORK/fixed_random.so
else
  echo "warning: no cc: running with the OS's randomness (ids and hash seeds differ per run; expect more spread)" >&2
fi

describe() {
  case $1 in
    rule-memory) echo "config rule, 1 descriptor (memory)" ;;
    rule-sled) echo "config rule, 1 descriptor (sled)" ;;
    plan-memory) echo "plan throttle + quota (memory)" ;;
    plan-sled) echo "plan throttle + quota (sled)" ;;
    tokens-request-memory) echo "plan, 3 token limits, request (memory)" ;;
    tokens-charge-memory) echo "plan, 3 token limits, charge (memory)" ;;
    tokens-request-sled) echo "plan, 3 token limits, request (sled)" ;;
    tokens-charge-sled) echo "plan, 3 token limits, charge (sled)" ;;
    *) echo "$1" ;;
  esac
}

# Ir of the decision loop for one run: case, K, run number. A run killed by
# a signal from outside (exit status > 128) is retried, up to 3 times.
count() {
  local out="$WORK/$1.$2.$3.out" try rc
  for try in 1 2 3 4; do
    rc=0
    LD_PRELOAD=$PRELOAD valgrind --tool=callgrind --collect-atstart=no \
      --toggle-collect='*decision_count*measured*' \
      --callgrind-out-file="$out" "$BIN" "$1" "$2" >"$WORK/log" 2>&1 || rc=$?
    if [ "$rc" -le 128 ] || [ "$try" -eq 4 ]; then break; fi
    echo "$1 $2: killed by signal $((rc - 128)), retrying" >&2
  done
  if [ "$rc" -ne 0 ]; then
    cat "$WORK/log" >&2
    echo "callgrind run failed: $1 $2" >&2
    exit 1
  fi
  local ir
  ir=$(awk '/^totals:/ {print $2}' "$out")
  if [ -z "$ir" ] || [ "$ir" -eq 0 ]; then
    echo "no instructions collected for $1 $2 (toggle-collect pattern not found?)" >&2
    exit 1
  fi
  echo "$ir"
}

median() { tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "case,instructions_per_decision" >"$WORK/csv"
printf '%-22s %-40s %14s %14s %10s %8s\n' case what "Ir(K1=$K1)" "Ir(K2=$K2)" "Ir/dec" spread >"$WORK/table"
for c in $CASES; do
  a=() b=() per=()
  for r in $(seq "$REPS"); do
    x=$(count "$c" "$K1" "$r")
    y=$(count "$c" "$K2" "$r")
    a+=("$x") b+=("$y")
    per+=("$(awk -v x="${a[-1]}" -v y="${b[-1]}" -v k1="$K1" -v k2="$K2" 'BEGIN {printf "%.1f", (y - x) / (k2 - k1)}')")
    echo "$c run $r: Ir($K1)=${a[-1]} Ir($K2)=${b[-1]} -> ${per[-1]}/decision" >&2
  done
  ma=$(echo "${a[*]}" | median)
  mb=$(echo "${b[*]}" | median)
  ipd=$(awk -v x="$ma" -v y="$mb" -v k1="$K1" -v k2="$K2" 'BEGIN {printf "%.1f", (y - x) / (k2 - k1)}')
  spread=$(printf '%s\n' "${per[@]}" | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.1f", hi - lo}')
  echo "$c,$ipd" >>"$WORK/csv"
  printf '%-22s %-40s %14s %14s %10s %8s\n' "$c" "$(describe "$c")" "$ma" "$mb" "$ipd" "$spread" >>"$WORK/table"
done

cp "$WORK/csv" "$OUT"
echo
echo "instructions per decision = (Ir(K2) - Ir(K1)) / (K2 - K1), median Ir of $REPS runs per K"
cat "$WORK/table"
echo
echo "wrote $OUT"
