#!/usr/bin/env bash
# The training run of the profile-guided build (scripts/build-pgo.sh): runs the mesh's binaries
# in BIN_DIR (built with -Cprofile-generate; each writes its profile to LLVM_PROFILE_FILE when it
# exits) on the calls a sidecar carries in production, so that the optimised build lays out and
# inlines for those paths and none of them is treated as cold:
#   1. `agentmesh up --exit`: the control server, SVIDs from join tokens, xDS, mTLS between
#      sidecars, the inbound listener, A2A (send and stream), MCP, OpenAI and Anthropic calls,
#      the policy library, spans exported over OTLP;
#   2. one sidecar (policy library, access log to a file, spans over OTLP) in front of the mock
#      LLM and the MCP tool server, under a constant load of each call kind in turn, HTTP/1.1
#      and h2c: OpenAI Chat Completions (JSON and SSE) and Responses, Anthropic Messages (JSON
#      and SSE), MCP tools/call, a denied model, malformed JSON.
# Usage: LLVM_PROFILE_FILE=DIR/%p-%m.profraw scripts/pgo-train.sh BIN_DIR
# PGO_TRAIN_RATE (default 500 req/s) and PGO_TRAIN_SECS (default 3 s per kind) size phase 2.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?usage: scripts/pgo-train.sh BIN_DIR}
RATE=${PGO_TRAIN_RATE:-500}; SECS=${PGO_TRAIN_SECS:-3}
source scripts/lib.sh
command -v curl >/dev/null || { echo "pgo-train: needs curl (scripts/setup.sh installs it)"; exit 1; }
# The load generator and the span sink are not trained: the test harness's debug build.
cargo build -q -p agentmesh-tests --bin meshbench --bin otlp-sink
TOOLS=target/debug

W=$(mktemp -d); start_cleanup "$W"
OT=$(free_port)
"$TOOLS/otlp-sink" "127.0.0.1:$OT" 2>"$W/otlp-sink.log" & pids+=($!)

echo "-- phase 1: agentmesh up --exit (the whole local mesh, one conversation)"
"$BIN/agentmesh" up --exit --bin-dir "$BIN" --run-dir "$W/up" --otlp "http://127.0.0.1:$OT" >"$W/up.log" 2>&1 \
  || { echo "pgo-train: agentmesh up failed:"; tail -30 "$W/up.log"; exit 1; }
grep -E '^[0-9]+ calls' "$W/up.log" || true

echo "-- phase 2: one sidecar, each call kind at $RATE req/s for ${SECS}s, HTTP/1.1 and h2c"
LLM=$(free_port); MCP=$(free_port); OUTP=$(free_port); ADM=$(free_port)
"$BIN/mock-llm" --listen "127.0.0.1:$LLM" >"$W/mock-llm.log" 2>&1 & pids+=($!)
"$BIN/mcp-tools" --listen "127.0.0.1:$MCP" >"$W/mcp-tools.log" 2>&1 & pids+=($!)
mkdir -p "$W/sidecar" "$W/logs" "$W/policy"
# The policy library, with the plain HTTP route granted to the agent as well.
cp -r policies/. "$W/policy/"
python3 - "$W/policy/data.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
doc["agents"]["planner"]["upstreams"].append("http/models")
json.dump(doc, open(sys.argv[1], "w"))
PY
cat > "$W/sidecar/sidecar.yaml" <<CONF
agent: {name: planner}
listeners: {outbound: "127.0.0.1:$OUTP", admin: "127.0.0.1:$ADM"}
upstreams:
  - {name: llm/openai, endpoints: ["http://127.0.0.1:$LLM"]}
  - {name: llm/anthropic, endpoints: ["http://127.0.0.1:$LLM"]}
  - {name: mcp/search-tools, endpoints: ["http://127.0.0.1:$MCP/mcp"]}
  - {name: http/models, endpoints: ["http://127.0.0.1:$LLM"]}
policy: {path: $W/policy}
telemetry: {traces: {endpoint: "http://127.0.0.1:$OT"}}
CONF
"$BIN/agentmesh-proxy" --config "$W/sidecar/sidecar.yaml" --access-log "$W/logs/access.jsonl" 2>"$W/sidecar.log" & pids+=($!)
SIDECAR=$!
wait_http "http://127.0.0.1:$LLM/healthz" mock-llm "$W/mock-llm.log"
wait_http "http://127.0.0.1:$MCP/healthz" mcp-tools "$W/mcp-tools.log"
wait_http "http://127.0.0.1:$ADM/readyz" sidecar "$W/sidecar.log"

S="http://127.0.0.1:$OUTP"
ask='"messages":[{"role":"user","content":"training request: say hello in one short sentence"}]'
MCP_META='"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}'
# name | path | body ("" for GET) | headers (;-separated)
KINDS=(
  "openai-chat|llm/openai/v1/chat/completions|{\"model\":\"gpt-4o-mini\",$ask}|"
  "openai-chat-sse|llm/openai/v1/chat/completions|{\"model\":\"gpt-4o-mini\",\"stream\":true,\"stream_options\":{\"include_usage\":true},$ask}|"
  "openai-responses|llm/openai/v1/responses|{\"model\":\"gpt-4o-mini\",\"input\":\"training request\"}|"
  "anthropic|llm/anthropic/v1/messages|{\"model\":\"claude-haiku-4-5\",\"max_tokens\":64,$ask}|anthropic-version: 2023-06-01"
  "anthropic-sse|llm/anthropic/v1/messages|{\"model\":\"claude-haiku-4-5\",\"max_tokens\":64,\"stream\":true,$ask}|anthropic-version: 2023-06-01"
  "mcp-tools-call|mcp/search-tools|{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"add\",\"arguments\":{\"a\":2,\"b\":40},$MCP_META}}|accept: application/json, text/event-stream;mcp-protocol-version: 2026-07-28;mcp-method: tools/call;mcp-name: add"
  "http-get|http/models/v1/models||"
  "denied-model|llm/openai/v1/chat/completions|{\"model\":\"gpt-4o\",$ask}|"
  "malformed|llm/openai/v1/chat/completions|{\"model\":|"
)
for kind in "${KINDS[@]}"; do
  IFS='|' read -r name path body headers <<<"$kind"
  # Refusals are trained at a fifth of the rate: present, so not laid out as cold, but not hot.
  # They are errors to meshbench by design; every other kind must succeed.
  refusal=0; rate=$RATE
  case "$name" in denied-model|malformed) refusal=1; rate=$((RATE / 5)) ;; esac
  args=(--rate "$rate" --duration "${SECS}s" --warmup 0s --rounds 1)
  if [ -n "$body" ]; then printf '%s' "$body" > "$W/$name.json"; args+=(--body-file "$W/$name.json"); fi
  IFS=';' read -ra hs <<<"$headers"
  for h in "${hs[@]}"; do args+=(--header "$h"); done
  for proto in http1 h2c; do
    extra=(); [ $proto = h2c ] && extra=(--http2)
    line=$("$TOOLS/meshbench" "${args[@]}" "${extra[@]}" "$name=$S/$path" 2>/dev/null | awk -v n="$name" '$1==n')
    printf '   %-18s %-5s %s\n' "$name" "$proto" "$(echo "$line" | awk '{print $2 " req/s, " $3 " errors"}')"
    [ "$refusal" = 1 ] || [ "$(echo "$line" | awk '{print $3}')" = 0 ] \
      || { echo "pgo-train: $name ($proto) had errors; the sidecar's log:"; tail -20 "$W/sidecar.log"; exit 1; }
  done
done
# SIGINT: the sidecar's fast shutdown, after which it writes its profile.
kill -INT "$SIDECAR"; wait "$SIDECAR" 2>/dev/null || true
