# Sourced by the benchmark scripts: one coro-fuse export at a time on a tmpfs work dir, always
# unmounted and stopped on exit.
#   export_setup NAME   sets $bin (built if missing) and $work, installs the cleanup trap
#   export_start ARGS   starts `coro-fuse ARGS $work/mnt` and waits for the mount ($pid)
#   export_stop         stops it (SIGTERM, wait)
export_setup() {
  bin=${CORO_FUSE:-target/release/coro-fuse}
  [[ -x $bin ]] || cargo build --release --quiet -p fuse
  work=$(mktemp -d "/dev/shm/coro-$1.XXXXXX")
  pid=""
  trap export_cleanup EXIT
  touch "$work/mnt"
}
export_cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt" || true
  [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
export_start() {
  "$bin" "$@" "$work/mnt" >"$work/log" 2>&1 & pid=$!
  for _ in $(seq 100); do mountpoint -q "$work/mnt" && return; sleep 0.1; done
  cat "$work/log"; exit 1
}
export_stop() { kill "$pid"; wait "$pid" || true; pid=""; }
