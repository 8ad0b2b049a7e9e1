#!/usr/bin/env bash
# Three exports side by side — coro-fuse with `--transport dev`, coro-fuse with `--transport
# uring`, and qemu-storage-daemon's FUSE export — each on its own copy of one image (or each with
# its null driver: the transport alone), the same fio jobs run on all three in turn, the order
# rotating every round so that drift on a shared machine hits all alike. Prints per job the
# median IOPS and p50 total latency (submission to completion, fio lat) of each side and the median ratios uring/dev and each
# coro side against qsd (IOPS; for QD1 also the p50 latency ratio dev/uring, > 1 = uring faster).
#
#   scripts/transport-compare.sh [-t SECONDS] [-r ROUNDS] [-j JOBS] [-f raw|qcow2|null] [-o CSV]
# Env: COMMON (coro-fuse arguments of both coro sides, e.g. "--threads 2 --cache none"),
#      URING (more arguments of the uring side, e.g. "--uring-entries 32"),
#      URING2 (if set, a fourth side "uring2": --transport uring with these arguments instead
#      of URING's, e.g. URING2="--uring-pin off"; its ratios are printed against dev too),
#      QSD_AIO (default threads), QSD_FILE_OPTS (e.g. cache.direct=on), WORKDIR (default
#      /dev/shm/transport-compare; a disk folder such as /var/tmp/tc measures a disk),
#      CORO_FUSE (binary; default target/release/coro-fuse, built if missing).
# Jobs: seqread seqwrite randread randwrite randread-qd1 randread-2jobs randrw-2jobs (as
# ../shared/bench/peer-compare.sh), and randread-qd1-cpu0: QD1 with fio held on CPU 0
# (--cpus_allowed=0), a client that stays on one CPU as a VM's vCPU thread or a pinned
# database does. The -sync forms use fio's psync engine (pread): fio's libaio `lat` starts when
# io_submit returns, and a FUSE O_DIRECT read does all its work inside io_submit, so only the
# psync p50 is the round trip. Needs: root, /dev/fuse, enable_uring on, fio, qemu-img,
# qemu-storage-daemon, python3. The CSV has every run (raw data), one row per job, side, round.
set -euo pipefail
secs=6 rounds=3 jobs=all fmt=raw csv=""
while getopts "t:r:j:f:o:" o; do case $o in t) secs=$OPTARG;; r) rounds=$OPTARG;; j) jobs=$OPTARG;; f) fmt=$OPTARG;; o) csv=$OPTARG;; *) exit 2;; esac; done
for t in fio qemu-img python3 qemu-storage-daemon; do command -v "$t" >/dev/null || { echo "transport-compare: missing $t" >&2; exit 2; }; done
[[ $(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null) == Y ]] || {
  echo "transport-compare: FUSE over io_uring is off (echo 1 > /sys/module/fuse/parameters/enable_uring)" >&2; exit 2; }
common=${COMMON:-} uring_extra=${URING:-} uring2_extra=${URING2-}
sides=(dev uring qsd); [[ -n ${URING2+x} ]] && sides=(dev uring uring2 qsd)
bin=${CORO_FUSE:-target/release/coro-fuse}
[[ -x $bin ]] || cargo build --release --quiet -p fuse
work=${WORKDIR:-/dev/shm/transport-compare}; mkdir -p "$work"
pids=()
cleanup() {
  for s in "${sides[@]}"; do mountpoint -q "$work/$s.mnt" 2>/dev/null && umount "$work/$s.mnt" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$work"/{dev,uring,uring2,qsd}.{img,mnt,log,null} "$work/src.raw"
  rmdir "$work" 2>/dev/null || true
}
trap cleanup EXIT
wait_mount() { for _ in $(seq 100); do mountpoint -q "$1" && return 0; sleep 0.1; done; echo "transport-compare: $1 never mounted" >&2; cat "${1%.mnt}.log" >&2; return 1; }
for s in "${sides[@]}"; do touch "$work/$s.mnt"; done
if [[ $fmt == null ]]; then
  # shellcheck disable=SC2086
  "$bin" -f null --size 1073741824 --transport dev $common "$work/dev.null" "$work/dev.mnt" >"$work/dev.log" 2>&1 & pids+=($!)
  # shellcheck disable=SC2086
  "$bin" -f null --size 1073741824 --transport uring $common $uring_extra "$work/uring.null" "$work/uring.mnt" >"$work/uring.log" 2>&1 & pids+=($!)
  if [[ ${sides[2]} == uring2 ]]; then
    # shellcheck disable=SC2086
    "$bin" -f null --size 1073741824 --transport uring $common $uring2_extra "$work/uring2.null" "$work/uring2.mnt" >"$work/uring2.log" 2>&1 & pids+=($!)
  fi
  qsd_node=(--blockdev node-name=fmt,driver=null-co,size=1073741824,read-zeroes=on)
else
  qemu-img create -q -f raw "$work/src.raw" 1G
  python3 -c "import os,sys; f=open(sys.argv[1],'r+b'); [f.write(os.urandom(1<<20)) for _ in range(1024)]" "$work/src.raw"
  for s in "${sides[@]}"; do qemu-img convert -q -f raw -O "$fmt" "$work/src.raw" "$work/$s.img"; done
  rm -f "$work/src.raw"
  # shellcheck disable=SC2086
  "$bin" --transport dev $common "$work/dev.img" "$work/dev.mnt" >"$work/dev.log" 2>&1 & pids+=($!)
  # shellcheck disable=SC2086
  "$bin" --transport uring $common $uring_extra "$work/uring.img" "$work/uring.mnt" >"$work/uring.log" 2>&1 & pids+=($!)
  if [[ ${sides[2]} == uring2 ]]; then
    # shellcheck disable=SC2086
    "$bin" --transport uring $common $uring2_extra "$work/uring2.img" "$work/uring2.mnt" >"$work/uring2.log" 2>&1 & pids+=($!)
  fi
  qsd_node=(--blockdev node-name=prot,driver=file,filename="$work/qsd.img",aio=${QSD_AIO:-threads}${QSD_FILE_OPTS:+,$QSD_FILE_OPTS}
            --blockdev node-name=fmt,driver=$fmt,file=prot)
fi
qemu-storage-daemon "${qsd_node[@]}" \
  --export type=fuse,id=exp0,node-name=fmt,mountpoint="$work/qsd.mnt",writable=on >"$work/qsd.log" 2>&1 & pids+=($!)
for s in "${sides[@]}"; do wait_mount "$work/$s.mnt"; done
sleep 0.5
grep -q "via io_uring" "$work/uring.log" || { echo "transport-compare: the uring side is not on io_uring:" >&2; cat "$work/uring.log" >&2; exit 1; }
alljobs="seqread:read:1M:16:1 seqwrite:write:1M:16:1 randread:randread:4k:32:1 randwrite:randwrite:4k:32:1 randread-qd1:randread:4k:1:1 randread-qd1-cpu0:randread:4k:1:1:0 randread-qd1-sync:randread:4k:1:1::psync randread-qd1-sync-cpu0:randread:4k:1:1:0:psync randread-2jobs:randread:4k:32:2 randrw-2jobs:randrw:4k:32:2"
fiojob() { # file name rw bs depth numjobs [cpus] [ioengine] -> "iops lat_p50_us"
  fio --name="$2" --filename="$1" --rw="$3" --bs="$4" --iodepth="$5" --numjobs="$6" ${7:+--cpus_allowed=$7} --ioengine="${8:-libaio}" --direct=1 \
      --time_based --runtime="$secs" --ramp_time=1 --group_reporting --size=1G --lat_percentiles=1 --output-format=json 2>/dev/null |
  python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; r,w=j['read'],j['write']
iops=r['iops']+w['iops']; p=[x['lat_ns']['percentile']['50.000000'] if 'percentile' in x['lat_ns'] else x['lat_ns']['mean'] for x in (r,w) if x['io_bytes']]
print(f\"{iops:.0f} {min(p)/1000:.1f}\")"
}
raw=$(mktemp)
{
  echo "# transport-compare $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?) kernel $(uname -r) $(fio --version) $(qemu-storage-daemon --version | head -1)"
  echo "# fmt=$fmt secs=$secs rounds=$rounds COMMON='$common' URING='$uring_extra' URING2='${URING2-(none)}' WORKDIR=$work QSD_AIO=${QSD_AIO:-threads} QSD_FILE_OPTS=${QSD_FILE_OPTS:-}"
  echo "job,side,round,iops,p50_us"
} >"$raw"
order=("${sides[@]}") n=${#sides[@]}
for spec in $alljobs; do
  IFS=: read -r name rw bs depth nj cpus engine <<<"$spec"
  [[ $jobs == all || ,$jobs, == *,$name,* ]] || continue
  for r in $(seq "$rounds"); do
    for k in $(seq 0 $((n - 1))); do
      s=${order[$(( (k + r) % n ))]}
      read -r iops p50 < <(fiojob "$work/$s.mnt" "$name" "$rw" "$bs" "$depth" "$nj" "$cpus" "$engine")
      echo "$name,$s,$r,$iops,$p50" >>"$raw"
    done
  done
done
[[ -n $csv ]] && cp "$raw" "$csv"
python3 - "$raw" <<'EOF'
import csv, statistics as st, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if not l.startswith('#'))]
jobs = list(dict.fromkeys(r['job'] for r in rows))
sides = list(dict.fromkeys(r['side'] for r in rows))
two = 'uring2' in sides
head = f"{'job':18} {'dev':>9} {'uring':>9}" + (f" {'uring2':>9}" if two else "") + f" {'qsd':>9} {'u/dev':>6}" + (f" {'u2/dev':>6}" if two else "")
head += f" {'dev/qsd':>7} {'u/qsd':>6} {'p50 dev':>8} {'p50 u':>7}" + (f" {'p50 u2':>7}" if two else "") + f" {'p50 qsd':>8} {'lat d/u':>7}" + (f" {'lat d/u2':>8}" if two else "")
print(head)
for j in jobs:
    by = {}
    for r in rows:
        if r['job'] == j:
            by.setdefault(int(r['round']), {})[r['side']] = (float(r['iops']), float(r['p50_us']))
    rounds = [v for v in by.values() if len(v) == len(sides)]
    med = lambda side, i: st.median(v[side][i] for v in rounds)
    ratio = lambda a, b: st.median(v[a][0] / max(v[b][0], 1) for v in rounds)
    lat = lambda u: st.median(v['dev'][1] / max(v[u][1], 0.001) for v in rounds)
    line = f"{j:18} {med('dev',0):9.0f} {med('uring',0):9.0f}" + (f" {med('uring2',0):9.0f}" if two else "") + f" {med('qsd',0):9.0f} {ratio('uring','dev'):6.2f}" + (f" {ratio('uring2','dev'):6.2f}" if two else "")
    line += f" {ratio('dev','qsd'):7.2f} {ratio('uring','qsd'):6.2f} {med('dev',1):8.1f} {med('uring',1):7.1f}" + (f" {med('uring2',1):7.1f}" if two else "") + f" {med('qsd',1):8.1f} {lat('uring'):7.2f}" + (f" {lat('uring2'):8.2f}" if two else "")
    print(line)
EOF
rm -f "$raw"
