#!/usr/bin/env bash
# Allocating writes into an EMPTY qcow2 image: coro-fuse against qemu-storage-daemon, each run on
# a fresh image, alternating which side goes first. Every write of the run allocates clusters
# (fio writes the image once, not time-based), which `peer-compare.sh -f qcow2` (a fully
# allocated image) does not measure.
#
#   scripts/qcow2-alloc-compare.sh [-r ROUNDS] [-s SIZE] [-c CLUSTER] [-- CORO_FUSE_ARGS...]
#
#   -r  rounds (default 5)   -s  image size (default 1G)   -c  cluster size (default 64k)
# Jobs: seqwrite 1M QD16 over the whole image, and 256 MiB of randwrite 4k QD32 (the first
# write into each 64k cluster allocates it, with copy-on-write of the rest). Prints MiB/s per
# round, then each side's median and the ratio of the medians.
#
# Before every run, 1.5× the image size is written to and deleted from the work directory. On
# this VM (virtio-balloon free page reporting) memory freed more than ~2 s ago is handed back to
# the host, and touching it again costs a host page fault per page: without the warm-up, an
# allocating run's speed depended mostly on how long ago the previous run freed its image
# (±40 %, with whichever side ran second in a pair usually slower). With it, both sides start
# from recently freed pages and the spread is about ±10 %.
# Env: CORO_FUSE (binary), QSD (default qemu-storage-daemon), WORKDIR (default /dev/shm).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5 size=1G cluster=64k
while getopts "r:s:c:" o; do case $o in r) rounds=$OPTARG;; s) size=$OPTARG;; c) cluster=$OPTARG;; *) exit 2;; esac; done
shift $((OPTIND-1)); [[ ${1:-} == -- ]] && shift
extra=("$@")
warm=$(numfmt --from=iec "$size"); warm=$((warm * 3 / 2))
for t in fio qemu-img python3 ${QSD:-qemu-storage-daemon}; do
  command -v "$t" >/dev/null || { echo "qcow2-alloc-compare: missing $t" >&2; exit 2; }
done
bin=${CORO_FUSE:-target/release/coro-fuse}
[[ -x $bin ]] || cargo build --release --quiet -p fuse
work=$(mktemp -d "${WORKDIR:-/dev/shm}/qcow2-alloc.XXXXXX")
pid=""
cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt" || true
  [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
touch "$work/mnt"

start() { # side
  rm -f "$work/img"
  head -c "$warm" /dev/zero >"$work/warm"; rm -f "$work/warm"
  qemu-img create -q -f qcow2 -o cluster_size="$cluster" "$work/img" "$size"
  if [[ $1 == coro ]]; then
    "$bin" "${extra[@]}" "$work/img" "$work/mnt" >"$work/log" 2>&1 & pid=$!
  else
    ${QSD:-qemu-storage-daemon} --blockdev node-name=prot,driver=file,filename="$work/img",aio=threads \
      --blockdev node-name=fmt,driver=qcow2,file=prot \
      --export type=fuse,id=exp0,node-name=fmt,mountpoint="$work/mnt",writable=on >"$work/log" 2>&1 & pid=$!
  fi
  for _ in $(seq 100); do mountpoint -q "$work/mnt" && return; sleep 0.1; done
  cat "$work/log"; exit 1
}
stop() {
  kill "$pid"; wait "$pid" || true; pid=""
  # The image must still be sound after the run (leaks are not expected after a clean stop).
  qemu-img check -q "$work/img" || { echo "qcow2-alloc-compare: qemu-img check failed ($1)" >&2; exit 1; }
}
job() { # side rw bs depth io_size -> MiB/s
  start "$1"
  fio --name=alloc --filename="$work/mnt" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio \
      --direct=1 --size="$size" --io_size="$5" --output-format=json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(f\"{j['write']['bw_bytes']/2**20:.0f}\")"
  stop "$1"
}
for spec in "seqwrite:write:1M:16:$size" randwrite:randwrite:4k:32:256M; do
  IFS=: read -r name rw bs depth io <<<"$spec"
  cs=() qs=()
  for r in $(seq "$rounds"); do
    if ((r % 2)); then c=$(job coro "$rw" "$bs" "$depth" "$io"); q=$(job qsd "$rw" "$bs" "$depth" "$io")
    else q=$(job qsd "$rw" "$bs" "$depth" "$io"); c=$(job coro "$rw" "$bs" "$depth" "$io"); fi
    cs+=("$c") qs+=("$q")
    printf '%-10s round %d: coro %6s MiB/s  qsd %6s MiB/s  ratio %s\n' "$name" "$r" "$c" "$q" \
      "$(python3 -c "print(f'{$c/max($q,1):.2f}')")"
  done
  python3 -c "
import statistics as s, sys
c = [float(x) for x in sys.argv[2].split()]; q = [float(x) for x in sys.argv[3].split()]
print(f'{sys.argv[1]:<10} median coro {s.median(c):.0f} MiB/s, qsd {s.median(q):.0f} MiB/s: ratio {s.median(c) / max(s.median(q), 1):.2f}')
" "$name" "${cs[*]}" "${qs[*]}"
done
