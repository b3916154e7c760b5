#!/usr/bin/env bash
# The local mesh demo: `agentmesh up` — the control server, the mock LLM, two MCP tool servers
# and three agents (planner, researcher, writer), each with its sidecar, on loopback; a sample
# conversation, every call it made, the call policy denied; then up until Ctrl-C.
# DEMO_SKIP_SETUP=1 skips scripts/setup.sh (the binaries must exist). Extra arguments go to
# `agentmesh up` (e.g. --exit, --otlp http://127.0.0.1:4317; see `agentmesh up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_SKIP_SETUP:-0}" = 1 ] || scripts/setup.sh
exec "${AGENTMESH_BIN_DIR:-target/debug}/agentmesh" up "$@"
