#!/usr/bin/env bash
# The profile-guided release build: the build to ship (README; BENCHMARKS.md, "ninth session").
#   1. builds the mesh's binaries instrumented (-Cprofile-generate), in target/pgo-gen;
#   2. trains them on the calls a sidecar carries (scripts/pgo-train.sh): the whole local mesh
#      (`agentmesh up`: control plane, SVIDs, mTLS between sidecars, A2A, MCP, LLM, the policy
#      library), then a sidecar alone under a constant load of each call kind, HTTP/1.1 and h2c;
#   3. merges the profiles with the toolchain's llvm-profdata (rustup's llvm-tools component,
#      installed when missing);
#   4. builds the same binaries with that profile (-Cprofile-use) into target/pgo/bin.
# Takes two fat-LTO builds and a minute of training: about 37 minutes on 2 cores.
# PGO_PROFILE=quick-release or dev: that cargo profile instead, into target/pgo-PROFILE (faster;
# for checking the script, not for shipping). Extra RUSTFLAGS from the environment are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PGO_PROFILE:-release}
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
GEN="$PWD/target/pgo-gen"; RAW="$GEN/profiles"
# The release build goes to target/pgo; another profile's beside it, never over it.
OUT="$PWD/target/pgo"; [ "$PROFILE" = release ] || OUT="$PWD/target/pgo-$PROFILE"
# The mesh's binaries; the test harness (load generator, benchmarks) is not shipped.
PACKAGES=(-p agentmesh-proxy -p agentmesh-control -p agentmesh-cli -p agentmesh-agent-runtime)

if [ ! -x "$PROFDATA" ]; then
  echo "==> installing llvm-profdata (rustup component llvm-tools)"
  rustup component add llvm-tools
fi
[ -x "$PROFDATA" ] || { echo "build-pgo: $PROFDATA not found after installing llvm-tools"; exit 1; }

# --target keeps RUSTFLAGS off build scripts and proc macros, which must not be instrumented.
build() { # target-dir rustflags
  CARGO_TARGET_DIR="$1" RUSTFLAGS="${RUSTFLAGS:-} $2" \
    cargo build --profile "$PROFILE" --target "$HOST" "${PACKAGES[@]}" --bins
}
profile_dir() { # cargo's output directory of the profile
  case "$PROFILE" in dev) echo debug ;; *) echo "$PROFILE" ;; esac
}

echo "==> [1/4] instrumented build ($PROFILE) in $GEN"
build "$GEN" "-Cprofile-generate=$RAW"

echo "==> [2/4] training"
rm -rf "$RAW"; mkdir -p "$RAW"
LLVM_PROFILE_FILE="$RAW/%p-%m.profraw" scripts/pgo-train.sh "$GEN/$HOST/$(profile_dir)"
n=$(find "$RAW" -name '*.profraw' | wc -l)
[ "$n" -gt 0 ] || { echo "build-pgo: training wrote no profiles to $RAW"; exit 1; }

echo "==> [3/4] merging $n profiles"
# Named by content, so that a new profile changes RUSTFLAGS and cargo rebuilds every crate with it.
"$PROFDATA" merge -o "$GEN/merged.profdata" "$RAW"
sum=$(sha256sum "$GEN/merged.profdata" | cut -c1-16)
DATA="$GEN/agentmesh-$sum.profdata"
mv "$GEN/merged.profdata" "$DATA"
find "$GEN" -maxdepth 1 -name 'agentmesh-*.profdata' ! -path "$DATA" -delete
# The sidecar's own code must be among the hottest functions, or the training missed it.
hot=$("$PROFDATA" show --topn=100 "$DATA" | grep -c 'agentmesh_proxy' || true)
[ "$hot" -gt 0 ] || { echo "build-pgo: no sidecar function among the profile's 100 hottest; the training did not reach it"; exit 1; }
echo "   $("$PROFDATA" show "$DATA" | grep -E '^Total functions'), $hot of the 100 hottest in the sidecar's crate"

echo "==> [4/4] optimised build ($PROFILE) in $OUT"
# Functions the training never ran (error paths of other platforms, the CLI's rarer commands)
# are expected: no warning for each.
build "$OUT" "-Cprofile-use=$DATA -Cllvm-args=-pgo-warn-missing-function=false"
ln -sfn "$HOST/$(profile_dir)" "$OUT/bin"
echo "build-pgo: binaries in ${OUT#"$PWD/"}/bin/ (profile $DATA)"
