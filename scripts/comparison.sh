#!/usr/bin/env bash
# The engine comparison of docs/comparison.md, end to end: coro-fuse --engine coroutine against
# --engine async through the whole export, on requests that complete inline AND on requests that
# suspend. One command makes every number and plot of that page:
#
#   scripts/comparison.sh [-o DIR]        (default DIR: docs/comparison; root, /dev/fuse, fio,
#                                          qemu-img, python3 (+ matplotlib for the plots), valgrind)
#
# Phases (PHASES, default "main sweep callgrind"):
#   main       every configuration below, RUNS (10) runs per engine, engines alternating run by
#              run and the first engine of a pair alternating too (so drift on a shared machine
#              hits both alike); each run on a fresh export after WARMUP (1) s of unmeasured fio;
#              time-based runs last RUNTIME (3) s.
#   sweep      queue depth DEPTHS (1 2 4 … 256) on SWEEP_CONFIG (null-lat-ring), SWEEP_RUNS (10) runs
#              per engine and depth, SWEEP_RUNTIME (2) s each, same alternation; fio's
#              completion-latency percentiles go into the CSV for the CDF plots.
#   callgrind  user-space instructions per request of the daemon (valgrind --tool=callgrind:
#              counters zeroed after a warm-up, dumped after CG_IOS requests; deterministic, so
#              immune to the VM's noise), CG_RUNS (3) runs per engine and configuration
#              of CG_CONFIGS (default: all but qcow2-alloc, whose 2-thread io_uring export
#              cannot run under valgrind 3.19 — see qcow2-alloc-pool — plus qcow2-alloc-pool).
#              Hardware counters (`perf stat -e instructions,cycles`) are used instead when
#              `perf stat -e instructions true` counts on this machine; on the project's VM it
#              says <not supported> (no PMU), so there are no cycle counts: CPU time per request
#              (utime+stime from /proc/PID/stat) is the time measure, and it is noisy.
#
# Configurations (CONFIGS, default: all):
#   null-inline   -f null: every request completes inline (the old table's case: it measures
#                 request creation, nothing suspends). 4k randread QD32, 1 queue thread.
#   null-yield    -f null --null-latency yield: every request suspends once, resumed by a BH.
#   null-lat      -f null --null-latency LATENCY_NS (50000): every request sleeps on a timer.
#   null-lat-ring null-lat on io_uring event loops (--aio io_uring), whose waits take a
#                 nanosecond timeout: an idle epoll loop sleeps in whole milliseconds
#                 (epoll_wait), which at low depths turns the 50 µs into ~1.1 ms. The sweep's
#                 default; not in the main phase (CONFIGS) unless named.
#   raw-threads   a raw image of random data on a disk (DISKDIR, default /var/tmp: ext4),
#                 --cache none --aio threads: O_DIRECT preadv on the thread pool.
#   raw-uring     the same image, --cache none --aio io_uring: O_DIRECT reads on the loop's ring.
#   qcow2-alloc   a fresh empty qcow2 (QCOW2_SIZE, 256M; 64 KiB clusters) on DISKDIR per run, --threads 2 --cache
#                 none --aio io_uring; fio: 2 jobs × QD16 of 64 KiB random writes, each job into
#                 its own half, so every write allocates a cluster under the qcow2 CoMutex,
#                 which the two queue threads contend for.
#   qcow2-alloc-pool  qcow2-alloc with --aio threads (epoll loops, disk I/O on the pool): the
#                 form callgrind can count. valgrind 3.19 does not treat io_uring_enter as a
#                 blocking syscall, so a queue thread waiting in it keeps valgrind's lock and
#                 the other thread never runs: the 2-thread io_uring export never mounts.
#                 Not in the main phase unless named.
#
# Output: DIR/comparison.csv — '#' lines of metadata (commit, rustc, kernel, fio, qemu, valgrind,
# CPU, the command line and every knob), then one row per measured run of every phase (all raw
# data: requests, IOPS, latency mean/percentiles, daemon CPU ticks, callgrind instructions,
# load average at the start). Then scripts/plot_comparison.py DIR/comparison.csv DIR regenerates
# every plot and prints the tables (ratios with bootstrap CIs, equivalence verdicts).
set -euo pipefail
me=comparison
die() { echo "$me: $*" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
outdir=$root/docs/comparison
while getopts "o:" o; do case $o in o) outdir=$OPTARG;; *) exit 2;; esac; done
runs=${RUNS:-10} runtime=${RUNTIME:-3} warmup=${WARMUP:-1}
sweep_runs=${SWEEP_RUNS:-10} sweep_runtime=${SWEEP_RUNTIME:-2}
depths=${DEPTHS:-1 2 4 8 16 32 64 128 256} sweep_config=${SWEEP_CONFIG:-null-lat-ring}
cg_runs=${CG_RUNS:-3} cg_ios=${CG_IOS:-4000}
cg_configs=${CG_CONFIGS:-null-inline null-yield null-lat raw-threads raw-uring qcow2-alloc-pool}
latency_ns=${LATENCY_NS:-50000}
phases=${PHASES:-main sweep callgrind}
all_configs="null-inline null-yield null-lat raw-threads raw-uring qcow2-alloc"
configs=${CONFIGS:-$all_configs}
all_configs="$all_configs null-lat-ring qcow2-alloc-pool"
diskdir=${DISKDIR:-/var/tmp}
qcow2_size=${QCOW2_SIZE:-256M}
for t in fio qemu-img python3 mountpoint umount getconf; do
  command -v "$t" >/dev/null || die "missing $t"
done
[[ " $phases " != *" callgrind "* ]] || command -v valgrind >/dev/null || die "missing valgrind (apt-get install valgrind)"
((EUID == 0)) || die "needs root (FUSE mounts)"
[[ -c /dev/fuse ]] || die "no /dev/fuse"
for c in $configs $sweep_config $cg_configs; do [[ " $all_configs " == *" $c "* ]] || die "unknown configuration '$c'"; done
bin=${CORO_FUSE:-$root/target/release/coro-fuse}
[[ -n ${CORO_FUSE:-} ]] || cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p fuse
[[ -x $bin ]] || die "no coro-fuse binary at $bin"
mkdir -p "$outdir"
csv=$outdir/comparison.csv

work=$(mktemp -d /dev/shm/coro-$me.XXXXXX)
disk=$(mktemp -d "$diskdir/coro-$me.XXXXXX")
pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  mountpoint -q "$work/mnt" 2>/dev/null && { umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" || true; }
  [[ -n $pid ]] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  mountpoint -q "$work/mnt" 2>/dev/null && { umount -l "$work/mnt" || true; }
  ((rc == 0)) || { [[ -s $work/log ]] && tail -n 20 "$work/log" >&2; }
  rm -rf "$work" "$disk"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
touch "$work/mnt"

# --- metadata ---------------------------------------------------------------------------------
perf_note="perf stat -e instructions: $( (perf stat -x, -e instructions true 2>&1 >/dev/null || true) | grep -q '^[0-9]' && echo counts || echo 'not supported on this machine (no PMU): callgrind Ir instead, no cycles')"
{
  echo "# coro-fuse engine comparison (scripts/comparison.sh)"
  echo "# date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# commit: $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- . ':!docs' || echo ' (dirty)')"
  echo "# rustc: $(rustc -V)"
  echo "# kernel: $(uname -r)"
  echo "# fio: $(fio --version)"
  echo "# qemu-img: $(qemu-img --version | head -1)"
  echo "# valgrind: $(valgrind --version 2>/dev/null || echo none)"
  echo "# cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "# disk: $diskdir ($(findmnt -no FSTYPE -T "$diskdir"))"
  echo "# $perf_note"
  echo "# command: RUNS=$runs RUNTIME=$runtime WARMUP=$warmup SWEEP_RUNS=$sweep_runs SWEEP_RUNTIME=$sweep_runtime DEPTHS='$depths' SWEEP_CONFIG=$sweep_config CG_RUNS=$cg_runs CG_CONFIGS='$cg_configs' CG_IOS=$cg_ios LATENCY_NS=$latency_ns PHASES='$phases' CONFIGS='$configs' QCOW2_SIZE=$qcow2_size scripts/comparison.sh -o $outdir"
  echo "phase,config,engine,threads,rw,bs,iodepth,numjobs,run,slot,started_utc,loadavg1,runtime_s,requests,iops,mib_s,lat_mean_us,p50_us,p99_us,cpu_ticks,clk_tck,cpu_us_per_req,ir_total,ir_per_req,clat_pct_us"
} >"$csv"
hz=$(getconf CLK_TCK)
pcts="1:5:10:20:30:40:50:60:70:75:80:85:90:95:97.5:99:99.5:99.9:99.95:99.99"

# --- configurations ---------------------------------------------------------------------------
# config NAME -> sets: threads, args (daemon arguments before IMAGE MNT), image, fresh (1: a new
# qcow2 per run), rw, bs, numjobs, depth, sized (1: fio writes a fixed amount instead of time).
raw_img=$disk/raw.img qcow_img=$disk/alloc.qcow2
config() {
  threads=1 fresh=0 rw=randread bs=4k numjobs=1 depth=32 sized=0 image=$work/null-co
  case $1 in
    null-inline) args=(-f null --size 1G) ;;
    null-yield) args=(-f null --size 1G --null-latency yield) ;;
    null-lat) args=(-f null --size 1G --null-latency "$latency_ns") ;;
    null-lat-ring) args=(-f null --size 1G --null-latency "$latency_ns" --aio io_uring) ;;
    raw-threads|raw-uring)
      [[ -f $raw_img ]] || { echo "$me: 1 GiB of random data in $raw_img" >&2
        head -c 1G /dev/urandom >"$raw_img"; sync "$raw_img"; }
      args=(-f raw --cache none --aio "$([[ $1 == raw-threads ]] && echo threads || echo io_uring)")
      image=$raw_img ;;
    qcow2-alloc|qcow2-alloc-pool)
      threads=2 fresh=1 rw=randwrite bs=64k numjobs=2 depth=16 sized=1 image=$qcow_img
      args=(-f qcow2 --cache none --aio "$([[ $1 == qcow2-alloc ]] && echo io_uring || echo threads)") ;;
  esac
}
fresh_image() { rm -f "$qcow_img"; qemu-img create -q -f qcow2 -o cluster_size=64k "$qcow_img" "$qcow2_size"; }

start() { # engine [wrapper...]
  local engine=$1; shift
  ((fresh)) && fresh_image
  "$@" "$bin" --engine "$engine" --threads "$threads" "${args[@]}" "$image" "$work/mnt" >"$work/log" 2>&1 & pid=$!
  for _ in $(seq 300); do
    mountpoint -q "$work/mnt" && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$work/log" >&2; die "the daemon exited before mounting"; }
    sleep 0.1
  done
  die "no mount after 30 s"
}
stop() {
  kill "$pid"; wait "$pid" || true; pid=""
  if ((fresh)); then qemu-img check -q "$qcow_img" || die "qemu-img check failed after a run"; fi
}
# fio_run SECONDS|ios:N|- DEPTH -> $work/fio.json (time-based for a number of seconds; a number
# of requests per job; or the configuration's fixed size)
fio_run() {
  local how=$1 d=$2 extra=()
  case $how in
    ios:*) extra=(--number_ios="${how#ios:}") ;;
    -) extra=() ;;
    *) extra=(--time_based --runtime="$how") ;;
  esac
  local size=1G; ((sized)) && size=$(( $(numfmt --from=iec "$qcow2_size") / numjobs ))
  [[ $how == ios:* ]] && ((sized)) && size=$(( ${how#ios:} * $(numfmt --from=iec "${bs^^}") ))
  fio --name=cmp --filename="$work/mnt" --rw="$rw" --bs="$bs" --iodepth="$d" --numjobs="$numjobs" \
      --offset_increment="$size" --size="$size" --ioengine=libaio --direct=1 --group_reporting \
      --percentile_list="$pcts" --output-format=json "${extra[@]}" >"$work/fio.json" 2>"$work/fio.err" ||
    { cat "$work/fio.err" >&2; die "fio failed"; }
}
cpu_ticks() { local s f; s=$(<"/proc/$1/stat"); s=${s##*) }; read -ra f <<<"$s"; echo $((f[11] + f[12])); }
# row PHASE CONFIG ENGINE DEPTH RUN SLOT STARTED LOAD TICKS IR -> appends one CSV row
row() {
  python3 - "$work/fio.json" "$hz" "$@" >>"$csv" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
hz = int(sys.argv[2])
phase, config, engine, depth, run, slot, started, load, ticks, ir = sys.argv[3:13]
opts = j["job options"]
r, w = j["read"], j["write"]
d = r if r["total_ios"] else w
reqs = r["total_ios"] + w["total_ios"]
secs = (r["runtime"] if r["total_ios"] else w["runtime"]) / 1000
pct = d["clat_ns"].get("percentile", {})
pcts = ";".join(f"{float(k):g}={v / 1000:.1f}" for k, v in sorted(pct.items(), key=lambda kv: float(kv[0])))
p = lambda q: pct.get(q, 0) / 1000
cpu = f"{int(ticks) / hz * 1e6 / max(reqs, 1):.3f}" if ticks else ""
irq = f"{int(ir) / max(reqs, 1):.1f}" if ir else ""
print(",".join(str(x) for x in [
    phase, config, engine, sys.argv[-1], opts["rw"], opts["bs"], depth, opts.get("numjobs", 1), run, slot,
    started, load, f"{secs:.3f}", reqs, f"{r['iops'] + w['iops']:.1f}",
    f"{(r['bw_bytes'] + w['bw_bytes']) / 2**20:.2f}", f"{d['clat_ns']['mean'] / 1000:.2f}",
    f"{p('50.000000'):.1f}", f"{p('99.000000'):.1f}", ticks, hz, cpu, ir, irq, pcts]))
PY
}
now() { date -u +%H:%M:%S; }
load() { cut -d' ' -f1 /proc/loadavg; }

# One measured run: fresh export, warm-up, measured fio, stop.
measure() { # phase config engine depth run slot secs
  local phase=$1 cfg=$2 engine=$3 d=$4 run=$5 slot=$6 secs=$7 t0 t1 started ld
  start "$engine"
  if ((warmup > 0 && !sized)); then fio_run "$warmup" "$d"; fi
  started=$(now) ld=$(load)
  t0=$(cpu_ticks "$pid")
  if ((sized)); then fio_run - "$d"; else fio_run "$secs" "$d"; fi
  t1=$(cpu_ticks "$pid")
  stop
  row "$phase" "$cfg" "$engine" "$d" "$run" "$slot" "$started" "$ld" $((t1 - t0)) "" "$threads"
}
pair() { # phase config depth run secs: both engines, the first alternating with the run
  local order=(coroutine async)
  (($4 % 2)) || order=(async coroutine)
  measure "$1" "$2" "${order[0]}" "$3" "$4" 1 "$5"
  measure "$1" "$2" "${order[1]}" "$3" "$4" 2 "$5"
}

if [[ " $phases " == *" main "* ]]; then
  for cfg in $configs; do
    config "$cfg"
    for run in $(seq "$runs"); do
      echo "$me: main $cfg run $run/$runs ($(now), load $(load))" >&2
      pair main "$cfg" "$depth" "$run" "$runtime"
    done
  done
fi
if [[ " $phases " == *" sweep "* ]]; then
  config "$sweep_config"
  for d in $depths; do
    for run in $(seq "$sweep_runs"); do
      echo "$me: sweep $sweep_config QD$d run $run/$sweep_runs ($(now), load $(load))" >&2
      pair sweep "$sweep_config" "$d" "$run" "$sweep_runtime"
    done
  done
fi
if [[ " $phases " == *" callgrind "* ]]; then
  for cfg in $cg_configs; do
    config "$cfg"
    for run in $(seq "$cg_runs"); do
      for engine in coroutine async; do
        echo "$me: callgrind $cfg $engine run $run/$cg_runs ($(now))" >&2
        rm -f "$work"/cg.*
        start "$engine" valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p.out"
        ((sized)) || fio_run ios:500 "$depth"
        callgrind_control -z "$pid" >/dev/null 2>&1
        started=$(now) ld=$(load)
        if ((sized)); then fio_run ios:$((cg_ios / numjobs)) "$depth"; else fio_run "ios:$cg_ios" "$depth"; fi
        callgrind_control -d "$pid" >/dev/null 2>&1
        ir=$(awk '/^totals:/ {print $2}' "$work/cg.$pid.out.1")
        stop
        row callgrind "$cfg" "$engine" "$depth" "$run" 1 "$started" "$ld" "" "$ir" "$threads"
      done
    done
  done
fi
rm -f "$raw_img" "$qcow_img"
echo "$me: raw data in $csv" >&2
python3 "$root/scripts/plot_comparison.py" "$csv" "$outdir" || echo "$me: plots failed (is matplotlib installed? pip install matplotlib)" >&2
