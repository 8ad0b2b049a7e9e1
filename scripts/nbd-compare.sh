#!/usr/bin/env bash
# coro-fuse against nbdfuse on the same qemu-nbd server (docs/nbd.md): fio 4k randread QD32,
# 1M sequential read and 1M sequential write, through each FUSE mount, alternating the two
# clients, ROUNDS rounds (default 3). Prints one CSV line per run and a median table.
#
#   [NBDFUSE_ARGS="-C 1"] [WORKDIR=/var/tmp] [QEMU_NBD_ARGS="--cache=none --aio=io_uring"] \
#     scripts/nbd-compare.sh [ROUNDS] [SECONDS]
#
# Needs root, /dev/fuse, qemu-nbd, nbdfuse, fio; builds coro-fuse --release. The image (512 MiB,
# written once so that reads return data) lives in WORKDIR (default /dev/shm); the server serves
# it with its default cache unless QEMU_NBD_ARGS says otherwise (on a disk,
# "--cache=none --aio=io_uring" makes every request reach the device); both clients talk to it
# over the same Unix socket.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-10}
W=$(mktemp -d "${WORKDIR:-/dev/shm}/nbd-compare.XXXXXX")
IMG=$W/disk.img
SOCK=$W/nbd.sock
CF=$W/cf.mnt
NF=$W/nf.d
cleanup() {
  fusermount3 -u "$CF" 2>/dev/null || umount -l "$CF" 2>/dev/null || true
  fusermount3 -u "$NF" 2>/dev/null || umount -l "$NF" 2>/dev/null || true
  [[ -n ${QPID:-} ]] && kill "$QPID" 2>/dev/null || true
  [[ -n ${CPID:-} ]] && kill "$CPID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
cargo build --release -q -p fuse --bin coro-fuse
BIN=$PWD/target/release/coro-fuse
dd if=/dev/urandom of="$IMG" bs=1M count=512 status=none
# shellcheck disable=SC2086
qemu-nbd -t --shared=8 -f raw ${QEMU_NBD_ARGS:-} -k "$SOCK" "$IMG" &
QPID=$!
for _ in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.05; done
touch "$CF"
mkdir -p "$NF"
URI="nbd+unix:///?socket=$SOCK"

mount_cf() {
  "$BIN" "$URI" "$CF" >"$W/cf.log" 2>&1 &
  CPID=$!
  for _ in $(seq 200); do grep -q "exported" "$W/cf.log" 2>/dev/null && return; sleep 0.05; done
  cat "$W/cf.log"; exit 1
}
umount_cf() { kill -TERM "$CPID"; wait "$CPID" || true; CPID=; }
mount_nf() {
  # shellcheck disable=SC2086
  nbdfuse ${NBDFUSE_ARGS:-} "$NF" "$URI" &
  for _ in $(seq 200); do [[ -e $NF/nbd ]] && return; sleep 0.05; done
  echo "nbdfuse did not mount"; exit 1
}
umount_nf() { fusermount3 -u "$NF"; sleep 0.2; }

job() { # name file -> prints IOPS MB/s
  local name=$1 file=$2 args
  case $name in
    randread4k) args="--rw=randread --bs=4k --iodepth=32" ;;
    seqread1M) args="--rw=read --bs=1M --iodepth=4" ;;
    seqwrite1M) args="--rw=write --bs=1M --iodepth=4" ;;
  esac
  # shellcheck disable=SC2086
  fio --name="$name" --filename="$file" $args --ioengine=libaio --direct=1 --size=512M \
      --runtime="$SECS" --time_based --output-format=terse --terse-version=3 |
    awk -F';' '{ r=$8; w=$49; if ($6 + 0 > 0 || $7 + 0 > 0) print $8, $7/1024; else print $49, $48/1024 }'
}

echo "round,client,job,iops,MBps" | tee "$W/results.csv"
for r in $(seq "$ROUNDS"); do
  for client in coro-fuse nbdfuse; do
    if [[ $client == coro-fuse ]]; then mount_cf; F=$CF; else mount_nf; F=$NF/nbd; fi
    for j in randread4k seqread1M seqwrite1M; do
      read -r iops mbps < <(job "$j" "$F")
      echo "$r,$client,$j,$iops,$mbps" | tee -a "$W/results.csv"
    done
    if [[ $client == coro-fuse ]]; then umount_cf; else umount_nf; fi
  done
done
echo
echo "medians (IOPS / MB/s):"
python3 - "$W/results.csv" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for j in ["randread4k", "seqread1M", "seqwrite1M"]:
    med = {}
    for c in ["coro-fuse", "nbdfuse"]:
        v = [float(r["iops"]) for r in rows if r["client"] == c and r["job"] == j]
        m = [float(r["MBps"]) for r in rows if r["client"] == c and r["job"] == j]
        med[c] = (statistics.median(v), statistics.median(m))
    ratio = med["coro-fuse"][0] / med["nbdfuse"][0] if med["nbdfuse"][0] else float("nan")
    print(f"| {j} | {med['coro-fuse'][0]:.0f} IOPS, {med['coro-fuse'][1]:.0f} MB/s | "
          f"{med['nbdfuse'][0]:.0f} IOPS, {med['nbdfuse'][1]:.0f} MB/s | {ratio:.2f}x |")
EOF
