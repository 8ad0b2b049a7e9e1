#!/usr/bin/env bash
# A short run of every cargo-fuzz target (fuzz/, see docs/TESTING.md): FUZZ_SECONDS each
# (default 15), starting from the committed corpus, new inputs kept in a scratch directory (the
# committed corpus stays as it is). Prints the executions of each target; exits 1 on the first
# crash, timeout or leak (libFuzzer's artifact is left in fuzz/artifacts/TARGET/: add it to
# fuzz/corpus/TARGET/ with the fix). Without cargo-fuzz it says SKIP and exits 0 (FUZZ_REQUIRED=1,
# or CI=true, makes that a failure). `cargo test` replays the corpus without either.
#
#   scripts/fuzz-smoke.sh                 # every target, 15 s each
#   FUZZ_SECONDS=120 scripts/fuzz-smoke.sh qcow2_image
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-15}
# nightly where it is installed; else the stable toolchain, with RUSTC_BOOTSTRAP=1 for the
# sanitizer's -Z flags (a fresh machine has stable only).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  cargo=(cargo +nightly)
else
  cargo=(env RUSTC_BOOTSTRAP=1 cargo)
fi
if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
  echo "SKIP: fuzz-smoke needs cargo-fuzz (cargo install cargo-fuzz) — the fuzz targets did not run" >&2
  [[ ${FUZZ_REQUIRED:-} == 1 || ${CI:-} == true ]] && exit 1
  exit 0
fi
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <("${cargo[@]}" fuzz list)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"${cargo[@]}" fuzz build -O >/dev/null
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  status=0
  "${cargo[@]}" fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$t.log")
  if ((status != 0)); then
    tail -n 60 "$scratch/$t.log" >&2
    echo "fuzz-smoke: $t FAILED after ${runs:-?} executions (status $status)" >&2
    exit 1
  fi
  echo "fuzz-smoke: $t: ${runs:-?} executions in ${secs} s, no crash"
done
