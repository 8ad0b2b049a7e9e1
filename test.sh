#!/usr/bin/env bash
# Every test of the workspace: unit, integration, doc tests (incl. compile_fail), a build of the
# benchmarks and examples so they cannot rot, a short run of each fuzz target, and the
# end-to-end suite again under both blocking-I/O paths (--aio): the first run uses the defaults
# (one queue thread per CPU, at most 4; --aio auto: io_uring where the kernel allows it and the
# image is on a disk, the thread pool for images in memory, as most test images are), then 1
# queue thread with --aio threads (thread pool, epoll loops), 4 with --aio io_uring (forced,
# tmpfs images too), and the async engine (one future per request instead of one coroutine)
# with 2 threads under --aio io_uring and under --aio threads; then twice with --transport uring
# (FUSE over io_uring: default engine, and async with 1 thread and --aio threads). The repeated
# runs leave out the test binaries of format and protocol drivers (formats_v, vmdk, nbd): what
# they test lies below the export and does not change with these settings, the first run
# covers them, and nbd.rs runs both engines itself. See docs/TESTING.md.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --workspace --all-targets --quiet
cargo test --workspace --all-targets
cargo test --workspace --doc
# A short libFuzzer run of every fuzz target (cargo test already replayed their corpora); SKIP
# without cargo-fuzz, a failure under CI=true (.ci/run installs it).
echo "== fuzz targets, ${FUZZ_SECONDS:-10} s each =="
FUZZ_SECONDS=${FUZZ_SECONDS:-10} scripts/fuzz-smoke.sh
repeat=()
for f in tests/tests/*.rs; do
  n=$(basename "$f" .rs)
  case $n in formats_v|vmdk|nbd) ;; *) repeat+=(--test "$n") ;; esac
done
echo "== end-to-end suite with --threads 1 --aio threads =="
CORO_FUSE_THREADS=1 CORO_FUSE_AIO=threads cargo test -p tests "${repeat[@]}"
echo "== end-to-end suite with --threads 4 --aio io_uring =="
CORO_FUSE_THREADS=4 CORO_FUSE_AIO=io_uring cargo test -p tests "${repeat[@]}"
echo "== end-to-end suite with --engine async --threads 2 --aio io_uring =="
CORO_FUSE_ENGINE=async CORO_FUSE_THREADS=2 CORO_FUSE_AIO=io_uring cargo test -p tests "${repeat[@]}"
echo "== end-to-end suite with --engine async --threads 2 --aio threads =="
CORO_FUSE_ENGINE=async CORO_FUSE_THREADS=2 CORO_FUSE_AIO=threads cargo test -p tests "${repeat[@]}"
echo "== end-to-end suite with --transport uring (FUSE over io_uring) =="
CORO_FUSE_TRANSPORT=uring cargo test -p tests "${repeat[@]}"
echo "== end-to-end suite with --transport uring --engine async --threads 1 --aio threads =="
CORO_FUSE_TRANSPORT=uring CORO_FUSE_ENGINE=async CORO_FUSE_THREADS=1 CORO_FUSE_AIO=threads cargo test -p tests "${repeat[@]}"
