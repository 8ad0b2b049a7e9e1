#!/usr/bin/env bash
# Every test of the workspace: unit, integration, doc tests (incl. compile_fail), a build of the
# benchmarks and examples so they cannot rot, and the end-to-end suite once more with 2 and 4
# queue threads. See docs/TESTING.md.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --workspace --all-targets --quiet
cargo test --workspace --all-targets
cargo test --workspace --doc
for n in 2 4; do
  echo "== end-to-end suite with --threads $n =="
  CORO_FUSE_THREADS=$n cargo test -p tests
done
