#!/usr/bin/env bash
# The sidecar benchmark (BENCHMARKS.md): one run measures, at a constant rate, the same POST
#   direct       → upstream (nginx serving a fixed JSON answer)
#   nginx        → nginx as a plain reverse proxy → upstream
#   sidecar-llm  → agentmesh-proxy on an llm/ route (body classified, usage read) → upstream
#   sidecar-http → agentmesh-proxy on an http/ route (passthrough) → upstream
#   pingora      → the smallest pingora proxy (tests/src/bin/pingora-floor.rs): the framework's floor
# for a 200 B and a 4 KB response, and reports p50/p99 and the latency added over direct; then
# the CPU time each proxy spends per call (BENCH_CPU_SECS per target alone, default 10).
# Usage: scripts/bench.sh [RATE] [DURATION] [ROUNDS]   (defaults 1000 req/s, 30s per target, 30 rounds)
# BENCH_SET=proxy (default): the sidecar's llm/ and http/ routes under an allow-all policy.
# BENCH_SET=policy: the llm/ route under no-op, demo and library policies (interpreter, bytecode,
#   cached). BENCH_SET=telemetry: the llm/ route with telemetry off (metrics only, access log
#   off) and on (access log to a file, a span per call exported over OTLP/gRPC to otlp-sink).
#   BENCH_SET=cache: the llm/ route under the demo policy, decision cache off and auto.
#   BENCH_SIZES="small large" (default) picks the answers measured.
# Targets are measured in turn, round after round, and each is compared with nginx round by round
# (median per-round difference and a sign test), since one run's p99 moves by ~0.1 ms.
# BENCH_CPUS=isolated (default): the load generator and the upstream run on CPU 0, each proxy
#   under test on CPU 1 with one worker, so that a proxy is measured, not the contention
#   between it and the load generator. BENCH_CPUS=shared: no pinning, proxies with 2 workers.
# BENCH_SIDECAR=pgo measures the profile-guided build (scripts/build-pgo.sh, run first) instead
#   of target/release; any other value is the path of the sidecar binary to measure.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1000}; DURATION=${2:-30s}; ROUNDS=${3:-30}
CPUS=${BENCH_CPUS:-isolated}
case "$CPUS" in
  isolated) [ "$(nproc)" -ge 2 ] || { echo "bench: isolated mode needs 2 CPUs"; exit 1; }
            LOAD="taskset -c 0"; PROXY="taskset -c 1"; WORKERS=1 ;;
  shared)   LOAD=""; PROXY=""; WORKERS=2 ;;
  *) echo "bench: BENCH_CPUS is isolated or shared"; exit 1 ;;
esac
source scripts/lib.sh
NGINX=$(find_nginx)
SIDECAR_BIN=$(build_bench_bins)

W=$(mktemp -d); start_cleanup "$W"
UP=$(free_port); NG=$(free_port); PF=$(free_port)
mkdir -p "$W/www"; bench_answer 200 > "$W/www/small"; bench_answer 4096 > "$W/www/large"
printf '%s' "$BENCH_REQUEST" > "$W/req.json"

# Two nginx processes: the upstream, and the plain reverse proxy in front of it. They must not
# share worker processes, or nginx's proxy hop would be an in-process call the sidecar cannot make.
nginx_conf upstream "$WORKERS" "$(nginx_upstream_block "$UP")"
nginx_conf proxy "$WORKERS" "$(nginx_proxy_block "$NG" "$UP")"
# A sidecar for agent `planner` (the policy library's example manifest grants it llm/openai and
# gpt-4o-mini), under the policy section given; prints its outbound port.
sidecars=()
sidecar() { # name policy-yaml [extra-yaml] [access-log]
  local out adm; out=$(free_port); adm=$(free_port)
  cat > "$W/$1.yaml" <<SIDECAR_CONF
agent: {name: planner}
listeners: {outbound: "127.0.0.1:$out", admin: "127.0.0.1:$adm"}
upstreams:
  - {name: llm/openai, endpoints: ["http://127.0.0.1:$UP"]}
  - {name: http/bench, endpoints: ["http://127.0.0.1:$UP"]}
policy: $2
${3:-}
SIDECAR_CONF
  $PROXY "$SIDECAR_BIN" --config "$W/$1.yaml" --access-log "${4:-off}" --threads "$WORKERS" 2>"$W/$1.log" &
  pids+=($!); sidecars+=("$1:$!:$adm:$out")
}
ALLOW_ALL="{path: $PWD/tests/fixtures/policy-allow-all}"
LIBRARY="$PWD/policies"
targets=()
case "${BENCH_SET:-proxy}" in
  proxy) # the data plane: policy reduced to its floor (decision := true)
    sidecar sidecar "$ALLOW_ALL"
    targets=("sidecar-llm=llm/openai" "sidecar-http=http/bench") ;;
  policy) # the same llm/ route under each policy
    sidecar allow-all "$ALLOW_ALL"
    sidecar demo "{path: $PWD/examples/local/policy}"
    sidecar library "{path: $LIBRARY}"
    sidecar library-bytecode "{path: $LIBRARY, engine: bytecode}"
    sidecar library-cached "{path: $LIBRARY, cache: {ttl: 60s, ignore: [/input/budget]}}"
    targets=("allow-all=llm/openai" "demo=llm/openai" "library=llm/openai" "library-bytecode=llm/openai" "library-cached=llm/openai") ;;
  cache) # the llm/ route under the demo policy, its decision cache off and auto
    sidecar cache-off "{path: $PWD/examples/local/policy, cache: {mode: off}}"
    sidecar cache-auto "{path: $PWD/examples/local/policy}"
    targets=("cache-off=llm/openai" "cache-auto=llm/openai") ;;
  telemetry) # the llm/ route with telemetry off (metrics only) and on (+ access log + OTLP spans)
    OT=$(free_port)
    $LOAD target/release/otlp-sink "127.0.0.1:$OT" 2>"$W/otlp-sink.log" & pids+=($!)
    sidecar telemetry-off "$ALLOW_ALL"
    # The access log goes beside, not into, the configs' directory: the sidecar watches that
    # directory for config changes, and each line written there would wake its watcher.
    mkdir -p "$W/logs"
    sidecar telemetry-on "$ALLOW_ALL" "telemetry: {traces: {endpoint: \"http://127.0.0.1:$OT\"}}" "$W/logs/access.jsonl"
    targets=("telemetry-off=llm/openai" "telemetry-on=llm/openai") ;;
  *) echo "bench: BENCH_SET is proxy, policy, cache or telemetry"; exit 1 ;;
esac
$LOAD "$NGINX" -c "$W/upstream.conf" & pids+=($!); UPSTREAM_PID=$!
$PROXY "$NGINX" -c "$W/proxy.conf" & pids+=($!); NGINX_PID=$!
$PROXY target/release/pingora-floor "127.0.0.1:$PF" "127.0.0.1:$UP" "$WORKERS" 2>"$W/floor.log" & pids+=($!); FLOOR_PID=$!
up=0
for _ in $(seq 1 100); do
  ok=1
  for s in "${sidecars[@]}"; do curl -fs "http://127.0.0.1:$(echo "$s" | cut -d: -f3)/readyz" >/dev/null 2>&1 || ok=0; done
  if [ $ok = 1 ] && curl -fs -X POST "http://127.0.0.1:$NG/small" >/dev/null 2>&1 \
     && curl -fs -X POST "http://127.0.0.1:$PF/small" >/dev/null 2>&1; then up=1; break; fi
  sleep 0.1
done
[ "$up" = 1 ] || { echo "bench: nginx or a sidecar did not start"; cat "$W"/*.log; exit 1; }
# name=URL for each sidecar target (`target=route`: the route on the sidecar of that name, or of
# the only sidecar), with `| PID` of that sidecar when asked.
urls() { # size [pid]
  for t in "${targets[@]}"; do
    name=${t%%=*}; route=${t#*=}
    s=$(printf '%s\n' "${sidecars[@]}" | grep "^$name:" || printf '%s\n' "${sidecars[@]}" | head -1)
    echo "$name=http://127.0.0.1:$(echo "$s" | cut -d: -f4)/$route/$1${2:+|$(echo "$s" | cut -d: -f2)}"
  done
}
# CPU time, in ns, of every thread of the given processes and of their children (nginx's workers).
cpu_ns() { # pid...
  local total=0 p t a
  for p in "$@" $(for p in "$@"; do pgrep -P "$p"; done); do
    for t in /proc/"$p"/task/*/schedstat; do
      read -r a _ < "$t" 2>/dev/null && total=$((total + a))
    done
  done
  echo "$total"
}
# CPU per call: each target alone at the same rate for CPU_SECS, its proxy's CPU time over the
# calls (for `direct`, the upstream's own: what serving the answer costs). Real CPU time on
# this machine, where callgrind counts instructions under emulation.
CPU_SECS=${BENCH_CPU_SECS:-10}
cpu_per_call() { # size
  local line name url pid before after us ref=""
  for line in "direct=http://127.0.0.1:$UP/$1|$UPSTREAM_PID" "nginx=http://127.0.0.1:$NG/$1|$NGINX_PID" \
      $(urls "$1" pid) "pingora=http://127.0.0.1:$PF/$1|$FLOOR_PID"; do
    name=${line%%=*}; url=${line#*=}; pid=${url#*|}; url=${url%|*}
    $LOAD target/release/meshbench --rate "$RATE" --duration 1s --warmup 0s --body-file "$W/req.json" "w=$url" >/dev/null 2>&1
    before=$(cpu_ns "$pid")
    $LOAD target/release/meshbench --rate "$RATE" --duration "${CPU_SECS}s" --warmup 0s --body-file "$W/req.json" "w=$url" 2>/dev/null \
      | awk '$1=="w" && $3==0 {ok=1} END {exit !ok}' || echo "bench: $name had errors while its CPU was measured"
    after=$(cpu_ns "$pid")
    us=$(awk -v ns=$((after - before)) -v calls=$((RATE * CPU_SECS)) 'BEGIN {print ns / calls / 1000}')
    awk -v name="$name" -v us="$us" -v ref="$ref" \
      'BEGIN {printf "%-16s %7.1f us CPU per call", name, us; if (ref != "") printf "  %5.2fx nginx", us / ref; print ""}'
    if [ "$name" = nginx ]; then ref=$us; fi
  done
}

echo "# $(date -u +%FT%TZ), $(nproc) cores, CPUs $CPUS, proxies with $WORKERS worker(s), $RATE req/s, $DURATION per target in $ROUNDS rounds (after 2s warm-up)"
SIZES=${BENCH_SIZES:-small large}
for size in $SIZES; do
  bytes=$(wc -c < "$W/www/$size")
  echo; echo "## response $bytes bytes, request $(wc -c < "$W/req.json") bytes"
  # shellcheck disable=SC2046
  $LOAD target/release/meshbench --rate "$RATE" --duration "$DURATION" --rounds "$ROUNDS" --compare nginx --body-file "$W/req.json" \
    "direct=http://127.0.0.1:$UP/$size" \
    "nginx=http://127.0.0.1:$NG/$size" \
    $(urls "$size") \
    "pingora=http://127.0.0.1:$PF/$size"
  echo; echo "CPU time per call, each target alone at $RATE req/s for ${CPU_SECS}s (direct: the upstream's):"
  cpu_per_call "$size"
done
echo
for s in "${sidecars[@]}"; do
  echo "sidecar $(echo "$s" | cut -d: -f1) memory after the run: $(grep -E 'VmRSS|VmHWM' /proc/$(echo "$s" | cut -d: -f2)/status | tr -s ' \t' ' ' | paste -sd ',')"
done
for s in "${sidecars[@]}"; do
  traces=$(curl -fs "http://127.0.0.1:$(echo "$s" | cut -d: -f3)/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("traces"))' 2>/dev/null || true)
  [ "$traces" != "None" ] && [ -n "$traces" ] && echo "sidecar $(echo "$s" | cut -d: -f1) spans: $traces"
done
true
