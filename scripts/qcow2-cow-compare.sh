#!/usr/bin/env bash
# Copy-on-write cost: two coro-fuse binaries on a fresh qcow2 overlay (64 KiB clusters) over a
# 1 GiB random raw backing file, fio randwrite 4k QD32 for 10 s, alternating, a new overlay per
# run (first writes to a cluster copy the rest of it from the backing file).
#
#   scripts/qcow2-cow-compare.sh NEW_BINARY OLD_BINARY [ROUNDS]      (root, /dev/fuse, fio)
# Env: W (work directory, default /dev/shm/cow; e.g. /var/tmp/cow for ext4). The backing file
# stays in W for the next run; remove W when done.
set -euo pipefail
new=${1:?usage: $0 NEW_BINARY OLD_BINARY [ROUNDS]} old=${2:?old binary} rounds=${3:-2}
w=${W:-/dev/shm/cow}
mkdir -p "$w"
cd "$w"
pid=""
cleanup() { mountpoint -q mnt 2>/dev/null && umount mnt || true; [[ -n $pid ]] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT
if [[ ! -f base.raw ]]; then
  qemu-img create -q -f raw base.raw 1G
  python3 -c "import os; f=open('base.raw','r+b'); [f.write(os.urandom(1<<20)) for _ in range(1024)]"
fi
run() { # label binary
  rm -f top.qcow2
  qemu-img create -q -f qcow2 -F raw -b "$w/base.raw" -o cluster_size=65536 top.qcow2
  touch mnt
  "$2" top.qcow2 mnt >coro.log 2>&1 & pid=$!
  for _ in $(seq 100); do mountpoint -q mnt && break; sleep 0.1; done
  mountpoint -q mnt || { echo "$1: never mounted" >&2; cat coro.log >&2; exit 1; }
  iops=$(fio --name=cow --filename=mnt --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio \
    --direct=1 --time_based --runtime=10 --size=1G --output-format=json 2>/dev/null |
    python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['write']['iops']))")
  umount mnt; wait "$pid"; pid=""
  echo "$1 $iops"
}
for _ in $(seq "$rounds"); do run new "$new"; run old "$old"; done
