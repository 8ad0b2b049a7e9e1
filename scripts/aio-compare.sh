#!/usr/bin/env bash
# coro-fuse against itself: two exports of copies of one image, side A and side B with different
# arguments (default: `--aio threads` against `--aio io_uring`), the same fio jobs run alternately
# (A first in odd rounds, B first in even ones), so drift on a shared machine hits both alike.
# Prints, per job, the median IOPS of each side, the median ratio B/A, p50 latencies, and each
# daemon's CPU per request (utime+stime of the whole process over the measured runs, divided by
# the requests fio completed in them; see scripts/cpu-per-request.sh for the method).
#
#   scripts/aio-compare.sh [-t SECONDS] [-r ROUNDS] [-j JOBS] [-f raw|qcow2] [-o CSV]
# Env: A, B (argument strings of the two sides; default "--aio threads" / "--aio io_uring"),
#      COMMON (arguments of both, e.g. "--cache none --threads 1"), WORKDIR (default
#      /dev/shm/aio-compare; a disk folder measures a disk), CORO_FUSE (binary), BIN_A/BIN_B
#      (a binary per side, e.g. two builds compared with A="" B="").
# Jobs: the peer-compare list (seqread seqwrite randread randwrite randread-qd1 randread-2jobs
#       randrw-2jobs). Needs: root, /dev/fuse, fio, qemu-img, python3.
set -euo pipefail
secs=6 rounds=2 jobs=all fmt=raw csv=""
while getopts "t:r:j:f:o:" o; do case $o in t) secs=$OPTARG;; r) rounds=$OPTARG;; j) jobs=$OPTARG;; f) fmt=$OPTARG;; o) csv=$OPTARG;; *) exit 2;; esac; done
for t in fio qemu-img python3; do command -v "$t" >/dev/null || { echo "aio-compare: missing $t" >&2; exit 2; }; done
a_args=${A---aio threads} b_args=${B---aio io_uring} common=${COMMON:-}
bin=${CORO_FUSE:-target/release/coro-fuse}
[[ -x $bin ]] || cargo build --release --quiet -p fuse
work=${WORKDIR:-/dev/shm/aio-compare}; mkdir -p "$work"
pids=()
cleanup() {
  for s in a b; do mountpoint -q "$work/$s.mnt" 2>/dev/null && umount "$work/$s.mnt" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$work"/{a,b}.{img,mnt,log} "$work/src.raw"
  rmdir "$work" 2>/dev/null || true
}
trap cleanup EXIT
python3 -c "import os,sys; f=open(sys.argv[1],'wb'); [f.write(os.urandom(1<<20)) for _ in range(1024)]" "$work/src.raw"
for s in a b; do
  if [[ $fmt == raw ]]; then cp "$work/src.raw" "$work/$s.img"; else qemu-img convert -q -f raw -O "$fmt" "$work/src.raw" "$work/$s.img"; fi
done
rm -f "$work/src.raw"
start() { # side args...
  local s=$1; shift
  touch "$work/$s.mnt"
  # shellcheck disable=SC2086  # the argument strings are word lists
  local b=$bin
  [[ $s == a && -n ${BIN_A:-} ]] && b=$BIN_A
  [[ $s == b && -n ${BIN_B:-} ]] && b=$BIN_B
  "$b" -f "$fmt" $common "$@" "$work/$s.img" "$work/$s.mnt" >"$work/$s.log" 2>&1 & pids+=($!)
  for _ in $(seq 100); do mountpoint -q "$work/$s.mnt" && return; sleep 0.1; done
  echo "aio-compare: side $s never mounted" >&2; cat "$work/$s.log" >&2; exit 1
}
# shellcheck disable=SC2086
start a $a_args; apid=${pids[-1]}
# shellcheck disable=SC2086
start b $b_args; bpid=${pids[-1]}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
alljobs="seqread:read:1M:16:1 seqwrite:write:1M:16:1 randread:randread:4k:32:1 randwrite:randwrite:4k:32:1 randread-qd1:randread:4k:1:1 randread-2jobs:randread:4k:32:2 randrw-2jobs:randrw:4k:32:2"
run() { # side pid name rw bs depth numjobs -> "iops p50_us requests cpu_ticks"
  local t0 t1
  t0=$(ticks "$2")
  fio --name="$3" --filename="$work/$1.mnt" --rw="$4" --bs="$5" --iodepth="$6" --numjobs="$7" --ioengine=libaio --direct=1 \
      --time_based --runtime="$secs" --group_reporting --size=1G --output-format=json 2>/dev/null >"$work/$1.json"
  t1=$(ticks "$2")
  python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; r,w=j['read'],j['write']
p=[x['clat_ns']['percentile']['50.000000'] for x in (r,w) if x['io_bytes']]
print(f\"{r['iops']+w['iops']:.0f} {min(p)/1000:.1f} {r['total_ios']+w['total_ios']} {int(sys.argv[2])-int(sys.argv[3])}\")" "$work/$1.json" "$t1" "$t0"
  rm -f "$work/$1.json"
}
hz=$(getconf CLK_TCK)
echo "A: $common $a_args    B: $common $b_args    ($fmt, $work)"
printf '%-15s %10s %10s %7s %8s %8s %9s %9s\n' job A-iops B-iops B/A A-p50us B-p50us A-cpu-us B-cpu-us
[[ -n $csv ]] && echo "job,a_iops,b_iops,ratio,a_p50_us,b_p50_us,a_cpu_us_per_req,b_cpu_us_per_req" >"$csv"
for spec in $alljobs; do
  IFS=: read -r name rw bs depth nj <<<"$spec"
  [[ $jobs == all || ,$jobs, == *,$name,* ]] || continue
  res=()
  for r in $(seq "$rounds"); do
    if ((r % 2)); then ra=$(run a "$apid" "$name" "$rw" "$bs" "$depth" "$nj"); rb=$(run b "$bpid" "$name" "$rw" "$bs" "$depth" "$nj")
    else rb=$(run b "$bpid" "$name" "$rw" "$bs" "$depth" "$nj"); ra=$(run a "$apid" "$name" "$rw" "$bs" "$depth" "$nj"); fi
    res+=("${ra// /,},${rb// /,}")
  done
  line=$(python3 -c "
import statistics as s, sys
hz=float(sys.argv[1]); rows=[[float(x) for x in r.split(',')] for r in sys.argv[2:]]
m=lambda i: s.median(r[i] for r in rows)
cpu=lambda i: sum(r[i+3] for r in rows)/hz*1e6/max(sum(r[i+2] for r in rows),1)
print(f'{m(0):.0f} {m(4):.0f} {s.median(r[4]/max(r[0],1) for r in rows):.2f} {m(1):.1f} {m(5):.1f} {cpu(0):.2f} {cpu(4):.2f}')" "$hz" "${res[@]}")
  read -r ai bi ratio al bl ac bc <<<"$line"
  printf '%-15s %10s %10s %7s %8s %8s %9s %9s\n' "$name" "$ai" "$bi" "$ratio" "$al" "$bl" "$ac" "$bc"
  [[ -n $csv ]] && echo "$name,$ai,$bi,$ratio,$al,$bl,$ac,$bc" >>"$csv"
done
