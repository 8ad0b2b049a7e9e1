#!/usr/bin/env bash
# Every test of the workspace: unit, integration, doc tests (incl. compile_fail), and a build of
# the benchmarks and examples so they cannot rot. See docs/TESTING.md.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --workspace --all-targets --quiet
cargo test --workspace --all-targets
cargo test --workspace --doc
