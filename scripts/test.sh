#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: format, clippy, Rust unit and end-to-end tests,
# and the Python SDK suites against real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test"
# The end-to-end suites start the workspace's binaries (sidecar, control server, CLI, fixtures).
cargo build --workspace --bins
cargo test --workspace
echo "==> SDK suites (pytest)"
AGENTMESH_BIN_DIR="$PWD/target/debug" .venv/bin/python -m pytest -q tests/python
echo "==> profile-guided build (scripts/build-pgo.sh, dev profile): train, rebuild, run the mesh on it"
# The dev profile checks the build's steps (instrument, train, merge, rebuild) and that the
# binaries it makes run the whole mesh, in a fraction of the release build's time.
PGO_PROFILE=dev scripts/build-pgo.sh
target/pgo-dev/bin/agentmesh up --exit --run-dir .agentmesh/pgo-check
