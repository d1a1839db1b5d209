# Shared by the load scripts in benches/load (run.sh, reload.sh, memory.sh,
# perf-split.sh, callgrind-server.sh): sourced, not run. Every function
# writes only to the paths it is given, except bench_workdir, which sets
# $work and $pids and the EXIT trap.

# A stand-in for a generated API key value (slk_ + 32 characters, the same
# length), for requests to the do-nothing server, which ignores it.
BENCH_KEY_PLACEHOLDER=slk_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx

# The admin token the scripts start sluice with (loopback only).
BENCH_ADMIN_TOKEN=bench-admin-token

# bench_config FILE [LIMIT] [UNIT]: one per-key rule (domain bench, key
# api_key), by default 4000000000 per minute: far above what a run can reach.
bench_config() {
  mkdir -p "$(dirname "$1")"
  cat > "$1" <<YAML
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: ${3:-minute}, requests_per_unit: ${2:-4000000000}}
YAML
}

# bench_plans FILE: usage plans for the plan and tokens modes (applied through
# the admin API): a throttle and a quota, and the same plus three token limits
# (a sliding per-minute limit with a per-model limit, a calendar day, a
# monthly budget), all far above what a run can reach; one key per plan. The
# tokens-nohdr plan is the tokens plan with header_style NONE: the same
# decision without the six x-ratelimit-* headers in each answer. The tokens1
# plan has one per-minute token limit and nothing else (no throttle, no
# quota, no price): a token-limit decision on its own, like for like with
# the one per-key rule.
bench_plans() {
  {
    cat <<'YAML'
usage_plans:
  - name: bench-plan
    throttle: { rate_limit: 1000000000, burst_limit: 2000000000 }
    quota: { limit: 1000000000000, period: DAY }
    stages: [{ domain: bench-plan }]
YAML
    local plan
    for plan in bench-tokens:OPENAI bench-tokens-nohdr:NONE; do
      cat <<YAML
  - name: ${plan%%:*}
    throttle: { rate_limit: 1000000000, burst_limit: 2000000000 }
    quota: { limit: 1000000000000, period: DAY }
    stages: [{ domain: ${plan%%:*} }]
    header_style: ${plan#*:}
    limits:
      - { name: tpm, metric: TOKENS, limit: 1000000000000, window: MINUTE, model_limits: { "gpt-4o*": 1000000000000 } }
      - { name: tpd, metric: TOKENS, limit: 1000000000000, window: DAY }
      - { name: budget, metric: SPEND, limit: 1000000000000, window: MONTH }
    prices:
      "gpt-4o*": { input_per_million: 2500000, output_per_million: 10000000 }
YAML
    done
    # One token limit and nothing else: a token-limit decision on its own.
    cat <<'YAML'
  - name: bench-tokens1
    stages: [{ domain: bench-tokens1 }]
    limits:
      - { name: tpm, metric: TOKENS, limit: 1000000000000, window: MINUTE }
YAML
    cat <<'YAML'
api_keys:
  - { name: bench-plan-key, usage_plans: [bench-plan] }
  - { name: bench-tokens-key, usage_plans: [bench-tokens] }
  - { name: bench-tokens-nohdr-key, usage_plans: [bench-tokens-nohdr] }
  - { name: bench-tokens1-key, usage_plans: [bench-tokens1] }
YAML
  } > "$1"
}

# mode_request MODE: sets $domain and $entries (an array of key=value) for a
# mode's request: the plan and tokens modes name a plan's domain and carry
# $BENCH_KEY_PLACEHOLDER until apply_plans gives the real key; the others
# send one api_key descriptor against the per-key rule.
mode_request() {
  case $1 in
    plan) domain=bench-plan; entries=("api_key=$BENCH_KEY_PLACEHOLDER") ;;
    tokens|tokens-nohdr|tokens1) domain=bench-$1; entries=("api_key=$BENCH_KEY_PLACEHOLDER" model=gpt-4o-mini) ;;
    *) domain=bench; entries=(api_key=key-1) ;;
  esac
}

# apply_plans SLUICE_LOG PLANS_FILE OUT_FILE: applies PLANS_FILE to the sluice
# whose log is SLUICE_LOG (its admin address is read from the log), and
# replaces the placeholder in $entries with the key of $domain's plan.
apply_plans() {
  local admin key
  admin=$(sed -n 's/.*admin API listening on \([0-9.]*:[0-9]*\).*/\1/p' "$1" | head -1)
  [ -n "$admin" ] || { echo "no admin address in $1" >&2; return 1; }
  target/release/sluice apply -f "$2" --admin-addr "$admin" --admin-token "$BENCH_ADMIN_TOKEN" > "$3"
  key=$(sed -n "s/^created api key $domain-key: value \([^ ]*\) .*/\1/p" "$3")
  [ -n "$key" ] || { echo "no key value in sluice apply's output:" >&2; cat "$3" >&2; return 1; }
  entries=("${entries[@]/$BENCH_KEY_PLACEHOLDER/$key}")
}

# wait_addr LOG MARK TRIES: waits (TRIES x 0.1 s at most) for "MARK ADDR" in
# LOG and prints ADDR; fails if it never shows.
wait_addr() {
  local log=$1 mark=$2 tries=$3 i addr
  for ((i = 0; i < tries; i++)); do
    addr=$(sed -n "s/.*$mark \([0-9.]*:[0-9]*\).*/\1/p" "$log" | head -1)
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.1
  done
  return 1
}

# h2load_calls CPUS ADDR CLIENTS STREAMS N BODY WORKDIR TIMEOUT: one h2load
# run of N ShouldRateLimit calls (BODY: the gRPC-framed request), on CPU list
# CPUS (empty: any). Prints "req/s p50_us p99_us failed"; latencies from
# h2load's --log-file (columns: start time, status, duration in us).
h2load_calls() {
  local cpus=$1 addr=$2 clients=$3 streams=$4 n=$5 body=$6 dir=$7 limit=$8
  local log="$dir/h2load.log" lat="$dir/lat.tsv"
  rm -f "$lat"
  local cmd=(h2load -n "$n" -c "$clients" -m "$streams" -t 1 -d "$body"
    -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$lat"
    "http://$addr/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
  if [ -n "$cpus" ]; then cmd=(taskset -c "$cpus" "${cmd[@]}"); fi
  timeout "$limit" "${cmd[@]}" > "$log"
  local rps failed count p50 p99
  rps=$(sed -n 's/.*finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$log")
  failed=$(sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p' "$log")
  cut -f3 "$lat" | sort -n > "$dir/sorted"
  count=$(wc -l < "$dir/sorted")
  p50=$(sed -n "$(((count + 1) / 2))p" "$dir/sorted")
  p99=$(sed -n "$(((count * 99 + 99) / 100))p" "$dir/sorted")
  echo "$rps $p50 $p99 $failed"
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench_workdir: sets $work, a fresh temporary directory, and $pids, the
# background processes the script starts; when the script exits, each is
# stopped and the directory removed (bench_cleanup, the EXIT trap).
bench_workdir() {
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
