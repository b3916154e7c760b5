#!/usr/bin/env bash
# The local mesh demo: mock LLM + sample MCP server + one sidecar, and an agent (official SDKs)
# making a few calls through it. The sidecar prints one line per call.
# Ports: AGENTMESH_DEMO_OUTBOUND (15001), _ADMIN (15000), _LLM (9100), _MCP (9200).
# DEMO_SKIP_SETUP=1 skips scripts/setup.sh (binaries and .venv must exist).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_SKIP_SETUP:-0}" = 1 ] || scripts/setup.sh

OUT=${AGENTMESH_DEMO_OUTBOUND:-15001}; ADMIN=${AGENTMESH_DEMO_ADMIN:-15000}
LLM=${AGENTMESH_DEMO_LLM:-9100}; MCP=${AGENTMESH_DEMO_MCP:-9200}
BIN=${AGENTMESH_BIN_DIR:-target/debug}
WORK=$(mktemp -d)
pids=()
# SIGINT is the sidecar's fast shutdown (SIGTERM drains for its grace period); background jobs of
# a script ignore SIGINT unless they install a handler, which the sidecar does, so the fixtures
# get SIGTERM.
cleanup() {
  [ ${#pids[@]} -gt 2 ] && kill -INT "${pids[2]}" 2>/dev/null
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

sed -e "s/127.0.0.1:15001/127.0.0.1:$OUT/; s/127.0.0.1:15000/127.0.0.1:$ADMIN/" \
    -e "s/127.0.0.1:9100/127.0.0.1:$LLM/; s/127.0.0.1:9200/127.0.0.1:$MCP/" \
    -e "s|path: policy |path: $PWD/examples/local/policy |" \
    examples/local/sidecar.yaml > "$WORK/sidecar.yaml"

wait_up() { # url name
  for _ in $(seq 1 200); do
    if curl -fsS "$1" >/dev/null 2>&1 || python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then
      echo "  ✓ $2"; return 0; fi
    sleep 0.1
  done
  echo "  ✗ $2 did not start; its log:"; cat "$WORK/$2.log"; exit 1
}

echo "==> starting the local mesh"
"$BIN/mock-llm" --listen "127.0.0.1:$LLM" --script examples/local/mock-llm-script.yaml >"$WORK/mock-llm.log" 2>&1 & pids+=($!)
"$BIN/mcp-tools" --listen "127.0.0.1:$MCP" >"$WORK/mcp-tools.log" 2>&1 & pids+=($!)
"$BIN/agentmesh-proxy" --config "$WORK/sidecar.yaml" --access-log stdout --access-log-format text 2>"$WORK/sidecar.log" & pids+=($!)
wait_up "http://127.0.0.1:$LLM/healthz" mock-llm
wait_up "http://127.0.0.1:$MCP/healthz" mcp-tools
wait_up "http://127.0.0.1:$ADMIN/readyz" sidecar

echo "==> the agent makes its calls; the sidecar prints one line per call:"
echo "direction kind target             model/tool                       status tokens in/out  latency"
AGENTMESH_OUTBOUND="http://127.0.0.1:$OUT" .venv/bin/python scripts/demo_agent.py
sleep 0.3
echo
echo "==> demo done; the sidecar's config: curl http://127.0.0.1:$ADMIN/config_dump"
