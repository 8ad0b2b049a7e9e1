#!/usr/bin/env bash
# Every test of the workspace: unit, integration, doc tests (incl. compile_fail), a build of the
# benchmarks and examples so they cannot rot, a short run of each fuzz target, and the
# end-to-end suite once more with 1 and 4 queue threads (the first run uses the default: one per
# CPU, at most 4), and once with the async engine (one future per request instead of one
# coroutine). See docs/TESTING.md.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --workspace --all-targets --quiet
cargo test --workspace --all-targets
cargo test --workspace --doc
# A short libFuzzer run of every fuzz target (cargo test already replayed their corpora); SKIP
# without cargo-fuzz, a failure under CI=true (.ci/run installs it).
echo "== fuzz targets, ${FUZZ_SECONDS:-10} s each =="
FUZZ_SECONDS=${FUZZ_SECONDS:-10} scripts/fuzz-smoke.sh
for n in 1 4; do
  echo "== end-to-end suite with --threads $n =="
  CORO_FUSE_THREADS=$n cargo test -p tests
done
echo "== end-to-end suite with --engine async --threads 2 =="
CORO_FUSE_ENGINE=async CORO_FUSE_THREADS=2 cargo test -p tests
