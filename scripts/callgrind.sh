#!/usr/bin/env bash
# Instructions per proxied call, counted by callgrind (BENCHMARKS.md): repeatable for the same
# build whatever else the machine does, where latency moves by ~0.1 ms from run to run.
# Runs nginx as the upstream (an OpenAI-shaped answer as in scripts/bench.sh), then, one at
# a time under `valgrind --tool=callgrind`, nginx as a plain reverse proxy (its one process
# serving, as in scripts/bench.sh: the baseline), the bare pingora proxy (tests/src/bin/pingora-floor.rs)
# and the sidecar (one worker; allow-all policy, or CALLGRIND_POLICY=DIR) on its llm/ and http/
# routes, with its decision cache off and auto; each gets a warm-up, then N calls at 50 req/s
# (CALLGRIND_RATE) are counted: at that rate no call waits for another under valgrind, so no new
# connection's set-up is counted into the calls.
# Usage: scripts/callgrind.sh [N]   (default 2000). CALLGRIND_SIZE: the answer's bytes (default
# 200). CALLGRIND_FOOTPRINT=1 also simulates the caches and reports, per target, the 64-byte
# lines of code its calls run (the code a call needs back in cache after something else ran
# on the CPU): all of them, and the hot ones, run by nine calls in ten or more (the others are
# code run now and then, such as a decision-cache refill); and the L1i misses per call (32 KiB
# L1i, simulated). Output files stay in
# $CALLGRIND_OUT (or a temporary directory) for `callgrind_annotate --inclusive=yes FILE`.
# BENCH_SIDECAR=pgo counts the profile-guided build (scripts/build-pgo.sh), as in bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
RATE=${CALLGRIND_RATE:-50}   # slow enough that no call waits for another under valgrind
SIZE=${CALLGRIND_SIZE:-200}
command -v valgrind >/dev/null || { echo "callgrind: needs valgrind (apt-get install valgrind)"; exit 1; }
source scripts/lib.sh
NGINX=$(find_nginx)
SIDECAR_BIN=$(build_bench_bins)
OUT=${CALLGRIND_OUT:-$(mktemp -d)}; mkdir -p "$OUT"
W=$(mktemp -d); start_cleanup "$W"
UP=$(free_port)
mkdir -p "$W/www"; bench_answer "$SIZE" > "$W/www/small"
printf '%s' "$BENCH_REQUEST" > "$W/req.json"
nginx_conf upstream 1 "$(nginx_upstream_block "$UP")"
"$NGINX" -c "$W/upstream.conf" & pids+=($!)

count() { # name url command...
  local name=$1 url=$2; shift 2
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.%p.out" $EXTRA "$@" 2>"$W/$name.log" &
  local vp=$!
  for _ in $(seq 1 200); do
    curl -fs -o /dev/null -X POST -d @"$W/req.json" "$url" 2>/dev/null && break; sleep 0.2
  done
  target/release/meshbench --rate "$RATE" --duration 2s --warmup 0s --rounds 1 --body-file "$W/req.json" "w=$url" >/dev/null 2>&1
  callgrind_control -z "$vp" >/dev/null 2>&1
  target/release/meshbench --rate "$RATE" --duration "$((N / RATE))s" --warmup 0s --rounds 1 --body-file "$W/req.json" "w=$url" 2>/dev/null | awk '$1=="w" && $3==0 {ok=1} END {exit !ok}' \
    || echo "callgrind: $name had errors" >&2
  callgrind_control -d "$vp" >/dev/null 2>&1
  sleep 0.5; kill -INT "$vp" 2>/dev/null; wait "$vp" 2>/dev/null || true
  local total file
  file=$(ls "$OUT/$name".*.out.1 | tail -1)
  total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  if [ -z "$EXTRA" ]; then
    printf '%-14s %10d instructions per call\n' "$name" "$((total / N))"
  else
    footprint "$name" "$file" "$total"
  fi
}
# Code lines run and L1i misses, from a dump with absolute instruction addresses. Cost lines
# are `0xADDR Ir I1mr ...`; a `calls=` line's next line is that call's inclusive cost, which
# is left out of the misses (its instruction is counted where it runs).
footprint() { # name file total-instructions
  python3 - "$1" "$2" "$3" "$N" <<'PY'
import sys
name, path, total, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
runs, i1, col, skip = {}, 0, None, False  # runs: instruction address -> times run
for row in open(path):
    if row.startswith("events:"):
        col = row.split()[1:].index("I1mr") + 1
    elif row.startswith("calls="):
        skip = True
        continue
    elif row.startswith("0x"):
        f = row.split()
        if not skip:
            a = int(f[0], 16)
            runs[a] = runs.get(a, 0) + int(f[1])
            i1 += int(f[col]) if len(f) > col else 0
    skip = False
lines = {a // 64 for a in runs}
hot = {a // 64 for a, r in runs.items() if r * 10 >= n * 9}
print(f"{name:<26} {total // n:>10} instructions per call  {len(lines):>6} code lines "
      f"({len(lines) * 64 // 1024} KiB), {len(hot):>5} hot ({len(hot) * 64 // 1024} KiB)  "
      f"{i1 / n:>7.0f} L1i misses per call")
PY
}
EXTRA=""
[ -n "${CALLGRIND_FOOTPRINT:-}" ] && EXTRA="--cache-sim=yes --dump-instr=yes --dump-line=no --compress-pos=no --compress-strings=no"

echo "# $(date -u +%FT%TZ): instructions per call, $N calls of 115 B POST -> $SIZE B answer, one worker"
NG=$(free_port)
# One process (no master), so that valgrind counts the worker that proxies.
nginx_conf proxy 1 "$(nginx_proxy_block "$NG" "$UP")" "master_process off;"
count nginx "http://127.0.0.1:$NG/small" "$NGINX" -c "$W/proxy.conf"   # the plain-proxy baseline
FP=$(free_port)
count floor "http://127.0.0.1:$FP/small" target/release/pingora-floor "127.0.0.1:$FP" "127.0.0.1:$UP" 1
POLICY=${CALLGRIND_POLICY:-$PWD/tests/fixtures/policy-allow-all}
echo "# sidecar policy: $POLICY"
for cache in off auto; do
  OUTP=$(free_port); ADM=$(free_port)
  cat > "$W/sidecar.yaml" <<CONF
agent: {name: planner}
listeners: {outbound: "127.0.0.1:$OUTP", admin: "127.0.0.1:$ADM"}
upstreams:
  - {name: llm/openai, endpoints: ["http://127.0.0.1:$UP"]}
  - {name: http/bench, endpoints: ["http://127.0.0.1:$UP"]}
policy: {path: $POLICY, cache: {mode: $cache}}
CONF
  for route in llm/openai http/bench; do
    count "sidecar-${route%%/*}-cache-$cache" "http://127.0.0.1:$OUTP/$route/small" \
      "$SIDECAR_BIN" --config "$W/sidecar.yaml" --access-log off --threads 1
  done
done
echo "callgrind files: $OUT"
