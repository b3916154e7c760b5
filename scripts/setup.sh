#!/usr/bin/env bash
# Installs what agentmesh needs on a fresh Debian machine with only the Rust toolchain:
# cmake and a C/C++ toolchain (pingora's build), nginx and curl (benchmark baseline and probes),
# Prometheus and promtool (the metrics tests scrape and lint /metrics),
# Python venv with the official SDKs (tests). Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v c++ >/dev/null || need+=(g++)
command -v curl >/dev/null || need+=(curl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v promtool >/dev/null || need+=(prometheus)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with the official SDKs"
  python3 -m venv .venv
fi
.venv/bin/pip install -q -r tests/python/requirements.txt

echo "==> building agentmesh"
cargo build --workspace --bins
