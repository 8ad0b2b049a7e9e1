#!/usr/bin/env bash
# Peak RSS of coro-fuse under a write flood (issue 12, item 5): fio 1 MiB O_DIRECT writes,
# 8 jobs x iodepth 4096, against a raw image in DIR exported with --cache none. Samples the
# daemon's VmRSS every 0.1 s and reads VmHWM at the end.
#
#   scripts/flood-rss.sh DIR [SECONDS] [-- COROFUSE-ARGS...]      (root, /dev/fuse, fio)
#   e.g. scripts/flood-rss.sh /dev/shm 20 -- --max-in-flight 65535   (the unbounded "before")
#
# FLOOD_MEM_LIMIT=6G puts the daemon in a memory cgroup of that size (cgroup v1 `memory` or
# v2), so an unbounded run is OOM-killed there instead of taking the machine down.
set -euo pipefail
dir=${1:?usage: $0 DIR [SECONDS] [-- ARGS]}; shift
secs=20
if [[ $# -gt 0 && $1 != -- ]]; then secs=$1; shift; fi
[[ ${1:-} == -- ]] && shift
bin=${CORO_FUSE:-target/release/coro-fuse}
[[ -x $bin ]] || cargo build --release --quiet -p fuse
work=$(mktemp -d "$dir/coro-flood.XXXXXX")
pid="" cg=""
cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && umount -l "$work/mnt" || true
  [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [[ -n $cg ]] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
truncate -s 2G "$work/disk.img"
touch "$work/mnt"
"$bin" --cache none "$@" "$work/disk.img" "$work/mnt" >"$work/log" 2>&1 & pid=$!
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
mountpoint -q "$work/mnt" || { cat "$work/log"; exit 1; }
if [[ -n ${FLOOD_MEM_LIMIT:-} ]]; then
  if [[ -d /sys/fs/cgroup/memory ]]; then
    cg=/sys/fs/cgroup/memory/coro-flood.$$; mkdir "$cg"
    echo "$FLOOD_MEM_LIMIT" >"$cg/memory.limit_in_bytes"
  else
    cg=/sys/fs/cgroup/coro-flood.$$; mkdir "$cg"; echo "$FLOOD_MEM_LIMIT" >"$cg/memory.max"
  fi
  echo "$pid" >"$cg/cgroup.procs"
fi
kb() { awk -v k="$1" '$1==k":" {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0; }
echo "idle: VmRSS $(kb VmRSS) KiB"
peak=0
( while kill -0 "$pid" 2>/dev/null; do r=$(kb VmRSS); echo "${r:-0}"; sleep 0.1; done ) \
  >"$work/rss" & sampler=$!
fio --name=flood --filename="$work/mnt" --rw=write --bs=1M --numjobs=8 --iodepth=4096 \
    --ioengine=libaio --direct=1 --size=2G --time_based --runtime="$secs" --group_reporting \
    >"$work/fio" 2>&1 || { echo "fio exited $?; its last lines:"; grep -v "^ " "$work/fio" | tail -5; }
hwm=$(kb VmHWM)
kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
peak=$(sort -n "$work/rss" | tail -1)
grep -E "WRITE:|IO depths|submit|complete  :|err=" "$work/fio" | sed 's/^ */fio: /' || true
echo "peak VmRSS (sampled) ${peak:-0} KiB, VmHWM ${hwm:-?} KiB"
if kill -0 "$pid" 2>/dev/null; then
  kill "$pid"; wait "$pid" && echo "daemon exited 0" || echo "daemon exited $?"
else
  wait "$pid" || echo "daemon DIED: exit $? (OOM-killed or aborted?)"
fi
pid=""
grep -E "at most|peak in flight|ENOMEM|fatal|error" "$work/log" | head -8 || true
