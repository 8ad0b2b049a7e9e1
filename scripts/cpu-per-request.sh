#!/usr/bin/env bash
# CPU cost per request: coro-fuse against qemu-storage-daemon's FUSE export, plus fio straight on
# the image file as the ceiling. The companion of ../shared/bench/peer-compare.sh (same jobs, same
# fio settings but for the ramp, same knobs): peer-compare says which export is faster, this says
# what each one burns per request and how much of a core it keeps busy doing it.
#
#   scripts/cpu-per-request.sh [-t SECONDS] [-j JOBS] [-f raw|qcow2] [-o CSV] [-B] [-- CORO_FUSE_ARGS...]
#
#   -t  seconds per fio run (default 6)        -f  image format: raw (default) or qcow2 (random data
#   -j  comma list of jobs (default: all):         converted, so every cluster is allocated)
#       seqread seqwrite randread randwrite    -o  also write the table (and the raw counts) as CSV
#       randread-qd1 randread-2jobs randrw-2jobs
#   -B  no fio-direct baseline (it is on by default for raw; for qcow2 the image file is not the
#       guest view, so the baseline columns say n/a)
#   CORO_FUSE_ARGS are passed to coro-fuse before IMAGE MOUNTPOINT (e.g. -- --threads 1 --cache none).
# Env: CORO_FUSE (binary; default target/release/coro-fuse, built if missing), QSD (default
#      qemu-storage-daemon), QSD_AIO (default threads), QSD_FILE_OPTS (more file-driver options,
#      e.g. cache.direct=on), WORKDIR (default /dev/shm/cpu-per-request; a disk folder measures a
#      disk), WARMUP (seconds of unmeasured fio before each measured run, default 1; 0: none).
# Needs: root, /dev/fuse, fio (with libaio and io_uring), qemu-img, qemu-storage-daemon, python3.
# Every file the script makes in WORKDIR (images, mountpoints, logs) is removed on exit, and
# WORKDIR itself if it is then empty.
#
# How CPU per request is computed, per job and side:
#   * Each side gets a fresh 1 GiB image of random data and its own daemon; one fio run (libaio,
#     direct=1, time_based, --ramp_time=0) goes through the export. With WARMUP > 0 an unmeasured
#     fio run of the same job comes first, outside everything measured below.
#   * Right before and right after the measured fio invocation the script reads utime+stime
#     (fields 14 and 15 of /proc/PID/stat, in clock ticks, `getconf CLK_TCK` per second) of the
#     daemon PID, and the wall clock. Only the daemon is counted: fio's own CPU, and the kernel
#     work done in fio's context (submitting the I/O, FUSE queueing, copying the data on the fio
#     side), is in neither number.
#   * /proc/PID/stat (unlike /proc/PID/task/TID/stat) is the whole thread group: the kernel sums
#     every thread, including threads that have already exited (QEMU's thread-pool workers come and
#     go; coro-fuse has queue threads and a pool). Checked on Linux 6.18: a process whose worker
#     thread burnt 1 s showed ~100 ticks in /proc/PID/stat after the worker exited, while its
#     /proc/PID/task/*/stat summed to 4. io_uring workers (iou-wrk) are threads of the process too.
#   * requests = read.total_ios + write.total_ios from fio's JSON (group_reporting: all numjobs).
#     With --ramp_time=0 that is every request fio issued during the measured window, so CPU and
#     requests cover the same interval (a ramp would burn daemon CPU on requests fio does not count).
#     A request is one fio I/O (one application request), not one FUSE request: an export whose
#     max request size is smaller than bs (qsd: 64K) gets several FUSE requests per 1M I/O, and
#     that is rightly part of its cost.
#   * CPU µs/req = (ticks_after - ticks_before) / CLK_TCK * 1e6 / requests.
#   * %core = (ticks_after - ticks_before) / CLK_TCK / wall seconds between the two reads * 100
#     (100 = one core fully busy; can exceed 100 with several threads).
#   * The resolution is one tick (10 ms at CLK_TCK=100) over the whole run: use -t 6 or more for
#     low-CPU jobs (QD1); at -t 2 the last digit is noise.
#   * Which side runs first alternates from job to job; the fio-direct baseline (io_uring,
#     direct=1 on the coro side's image file, no daemon in the path) runs last.
# The table's p50 columns are fio's completion latency (clat) median; for mixed jobs the smaller of
# the read and write medians, as in peer-compare.
set -euo pipefail
me=cpu-per-request
die() { echo "$me: $*" >&2; exit 2; }
secs=6 jobs=all fmt=raw csv="" baseline=1
while getopts "t:j:f:o:B" o; do case $o in t) secs=$OPTARG;; j) jobs=$OPTARG;; f) fmt=$OPTARG;; o) csv=$OPTARG;; B) baseline=0;; *) exit 2;; esac; done
shift $((OPTIND-1)); [[ ${1:-} == -- ]] && shift
extra=("$@")
[[ $fmt == raw || $fmt == qcow2 ]] || die "-f must be raw or qcow2, not '$fmt'"
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || die "-t must be a whole number of seconds > 0"
warmup=${WARMUP:-1}; [[ $warmup =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds"
[[ $fmt == raw ]] || baseline=0
# Same jobs as peer-compare: name:rw:bs:iodepth:numjobs.
alljobs="seqread:read:1M:16:1 seqwrite:write:1M:16:1 randread:randread:4k:32:1 randwrite:randwrite:4k:32:1 randread-qd1:randread:4k:1:1 randread-2jobs:randread:4k:32:2 randrw-2jobs:randrw:4k:32:2"
if [[ $jobs != all ]]; then
  for n in ${jobs//,/ }; do [[ " $alljobs" == *" $n:"* ]] || die "unknown job '$n'"; done
fi
qsd=${QSD:-qemu-storage-daemon}
for t in fio qemu-img python3 mountpoint umount getconf "$qsd"; do
  command -v "$t" >/dev/null || die "missing $t (apt-get install fio qemu-utils python3 util-linux)"
done
((EUID == 0)) || die "needs root (both FUSE mounts are made directly)"
[[ -c /dev/fuse ]] || die "no /dev/fuse (modprobe fuse)"
engines=$(fio --enghelp 2>&1)
for e in libaio io_uring; do grep -qw "$e" <<<"$engines" || die "this fio has no $e engine"; done
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CORO_FUSE:-$root/target/release/coro-fuse}
[[ -x $bin ]] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"
[[ -x $bin ]] || die "no coro-fuse binary at $bin"
hz=$(getconf CLK_TCK)
work=${WORKDIR:-/dev/shm/$me}
made_work=0; [[ -d $work ]] || made_work=1
mkdir -p "$work"
[[ -n $csv ]] && : >"$csv"   # fail on an unwritable CSV before spending minutes on images
size=1G
files=("$work/coro.img" "$work/qsd.img" "$work/base.raw" "$work/base.img" "$work/coro.mnt" "$work/qsd.mnt"
       "$work/coro.log" "$work/qsd.log" "$work/fio.json" "$work/fio.err")
declare -A pid=()
# shellcheck disable=SC2317  # only ever run by the trap
cleanup() {
  local rc=$? m p
  trap - EXIT INT TERM
  for m in "$work/coro.mnt" "$work/qsd.mnt"; do mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || true; }; done
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pid[@]}"; do wait "$p" 2>/dev/null || true; done
  # A killed daemon leaves a dead FUSE mount behind ("Transport endpoint is not connected").
  for m in "$work/coro.mnt" "$work/qsd.mnt"; do mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m" || true; }; done
  if ((rc)); then for l in "$work/coro.log" "$work/qsd.log" "$work/fio.err"; do
    [[ -s $l ]] && { echo "--- $l:" >&2; tail -n 20 "$l" >&2; }; done; fi
  rm -f "${files[@]}"
  ((made_work)) && rmdir "$work" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One random image, copied for the other side: both exports start from identical contents.
echo "$me: making two $size $fmt images of random data in $work" >&2
qemu-img create -q -f raw "$work/base.raw" $size
python3 -c "import os,sys; f=open(sys.argv[1],'r+b'); [f.write(os.urandom(1<<20)) for _ in range(1024)]" "$work/base.raw"
if [[ $fmt == raw ]]; then mv "$work/base.raw" "$work/base.img"
else qemu-img convert -q -f raw -O qcow2 "$work/base.raw" "$work/base.img"; rm "$work/base.raw"; fi
cp "$work/base.img" "$work/coro.img"; mv "$work/base.img" "$work/qsd.img"

touch "$work/coro.mnt" "$work/qsd.mnt"
"$bin" "${extra[@]}" "$work/coro.img" "$work/coro.mnt" >"$work/coro.log" 2>&1 & pid[coro]=$!
"$qsd" --blockdev "node-name=prot,driver=file,filename=$work/qsd.img,aio=${QSD_AIO:-threads}${QSD_FILE_OPTS:+,$QSD_FILE_OPTS}" \
  --blockdev node-name=fmt,driver="$fmt",file=prot \
  --export type=fuse,id=exp0,node-name=fmt,mountpoint="$work/qsd.mnt",writable=on >"$work/qsd.log" 2>&1 & pid[qsd]=$!
wait_mount() { # side
  for _ in $(seq 100); do
    mountpoint -q "$work/$1.mnt" && return 0
    kill -0 "${pid[$1]}" 2>/dev/null || die "the $1 daemon exited before mounting"
    sleep 0.1
  done
  die "$work/$1.mnt never mounted"
}
wait_mount coro; wait_mount qsd
# $! must be the daemon itself (no wrapper shell, no fork into the background), else the ticks
# below would be someone else's.
for s in coro qsd; do
  comm=$(<"/proc/${pid[$s]}/comm")
  case $s:$comm in coro:coro-fuse*|qsd:qemu-storage-d*) ;; *) die "pid ${pid[$s]} of the $s side is '$comm', not the daemon";; esac
done

# utime + stime of the whole thread group, in ticks. The comm field may hold spaces: cut after
# its closing parenthesis, so the state (field 3) becomes f[0] and fields 14, 15 are f[11], f[12].
cpu_ticks() { local s f; s=$(<"/proc/$1/stat"); s=${s##*) }; read -ra f <<<"$s"; echo $((f[11] + f[12])); }
now_ns() { date +%s%N; }
fio_run() { # file engine secs name rw bs depth numjobs -> JSON in $work/fio.json
  fio --name="$4" --filename="$1" --rw="$5" --bs="$6" --iodepth="$7" --numjobs="$8" --ioengine="$2" --direct=1 \
      --time_based --runtime="$3" --ramp_time=0 --group_reporting --size=1G --output-format=json \
      >"$work/fio.json" 2>"$work/fio.err" || die "fio $4 on $1 failed"
}
# fio_stats [t0 t1 w0 w1] -> "iops p50_us requests cpu_us_per_req pct_core" (the last two "-" without ticks)
fio_stats() {
  python3 - "$work/fio.json" "$hz" "$@" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
hz = float(sys.argv[2])
r, w = j["read"], j["write"]
iops = r["iops"] + w["iops"]
reqs = r["total_ios"] + w["total_ios"]
p50 = min(x["clat_ns"]["percentile"]["50.000000"] for x in (r, w) if x["io_bytes"]) / 1000
out = f"{iops:.0f} {p50:.1f} {reqs}"
if len(sys.argv) > 3:
    t0, t1, w0, w1 = (int(a) for a in sys.argv[3:7])
    cpu = (t1 - t0) / hz
    out += f" {cpu * 1e6 / max(reqs, 1):.2f} {cpu / ((w1 - w0) / 1e9) * 100:.1f}"
print(out)
PY
}
declare -A iops=() p50=() reqs=() perreq=() core=() ticks=()
measure() { # side name rw bs depth numjobs
  local s=$1 p=${pid[$1]} t0 t1 w0 w1; shift
  ((warmup)) && fio_run "$work/$s.mnt" libaio "$warmup" "$@"
  kill -0 "$p" 2>/dev/null || die "the $s daemon is gone"
  w0=$(now_ns); t0=$(cpu_ticks "$p")
  fio_run "$work/$s.mnt" libaio "$secs" "$@"
  t1=$(cpu_ticks "$p"); w1=$(now_ns)
  read -r "iops[$s]" "p50[$s]" "reqs[$s]" "perreq[$s]" "core[$s]" < <(fio_stats "$t0" "$t1" "$w0" "$w1")
  ticks[$s]=$((t1 - t0))
}

row() { printf '%-15s %10s %10s %6s %11s %10s %10s %9s %11s %11s %10s %9s %10s\n' "$@"; }
row job coro-iops qsd-iops ratio coro-us/req qsd-us/req coro-%core qsd-%core direct-iops coro/direct coro-p50us qsd-p50us direct-p50
[[ -n $csv ]] && echo "job,coro_iops,qsd_iops,ratio,coro_cpu_us_per_req,qsd_cpu_us_per_req,coro_pct_core,qsd_pct_core,direct_iops,coro_direct_ratio,coro_p50_us,qsd_p50_us,direct_p50_us,coro_requests,qsd_requests,coro_cpu_ticks,qsd_cpu_ticks,clk_tck,secs" >"$csv"
i=0
for spec in $alljobs; do
  IFS=: read -r name rw bs depth nj <<<"$spec"
  [[ $jobs == all || ,$jobs, == *,$name,* ]] || continue
  if ((i++ % 2)); then order="qsd coro"; else order="coro qsd"; fi
  for s in $order; do measure "$s" "$name" "$rw" "$bs" "$depth" "$nj"; done
  di=n/a dl=n/a dr=n/a
  if ((baseline)); then
    ((warmup)) && fio_run "$work/coro.img" io_uring "$warmup" "$name" "$rw" "$bs" "$depth" "$nj"
    fio_run "$work/coro.img" io_uring "$secs" "$name" "$rw" "$bs" "$depth" "$nj"
    read -r di dl _ < <(fio_stats)
    dr=$(python3 -c "import sys; print(f'{float(sys.argv[1]) / max(float(sys.argv[2]), 1):.2f}')" "${iops[coro]}" "$di")
  fi
  ratio=$(python3 -c "import sys; print(f'{float(sys.argv[1]) / max(float(sys.argv[2]), 1):.2f}')" "${iops[coro]}" "${iops[qsd]}")
  row "$name" "${iops[coro]}" "${iops[qsd]}" "$ratio" "${perreq[coro]}" "${perreq[qsd]}" \
    "${core[coro]}" "${core[qsd]}" "$di" "$dr" "${p50[coro]}" "${p50[qsd]}" "$dl"
  [[ -n $csv ]] && echo "$name,${iops[coro]},${iops[qsd]},$ratio,${perreq[coro]},${perreq[qsd]},${core[coro]},${core[qsd]},$di,$dr,${p50[coro]},${p50[qsd]},$dl,${reqs[coro]},${reqs[qsd]},${ticks[coro]},${ticks[qsd]},$hz,$secs" >>"$csv"
done
exit 0
