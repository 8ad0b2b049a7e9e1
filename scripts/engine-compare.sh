#!/usr/bin/env bash
# Coroutines vs async/await through the whole export: fio 4k random reads against coro-fuse
# --engine coroutine and --engine async, alternating engines run by run (so drift on a shared
# machine hits both alike), on the null driver and a raw image on tmpfs, at QD1 and QD32, with 1
# and 2 queue threads. Each measured run follows a 1 s unmeasured warm-up on a fresh export.
# Writes CSV to stdout (and to -o FILE); scripts/plot_engines.py turns it into an SVG plot.
#
#   scripts/engine-compare.sh [-o CSV]            (root, /dev/fuse, fio, python3)
# Env: RUNTIME seconds per measured run (default 10), RUNS per configuration and engine
#      (default 3), BACKENDS (default "null raw"), THREADS (default "1 2"), DEPTHS ("1 32").
#
# Columns: engine, backend, threads, iodepth, run, iops, p50_us, p99_us (completion latency),
# cpu_s (user+system time of the daemon during the measured run, from /proc/PID/stat) and
# cpu_us_per_req (cpu_s / requests completed).
set -euo pipefail
csv=""
while getopts "o:" o; do case $o in o) csv=$OPTARG;; *) exit 2;; esac; done
runtime=${RUNTIME:-10} runs=${RUNS:-3}
source "$(dirname "$0")/export-lib.sh"
export_setup engines
python3 -c "import os,sys; f=open(sys.argv[1],'wb'); [f.write(os.urandom(1<<20)) for _ in range(1024)]" "$work/raw.img"
out() { echo "$1"; [[ -z $csv ]] || echo "$1" >>"$csv"; }
[[ -z $csv ]] || : >"$csv"
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$pid/stat"; }
# fio ARGS...: one fio run on the export, JSON on stdout.
run_fio() {
  fio --name=e --filename="$work/mnt" --rw=randread --bs=4k --ioengine=libaio --direct=1 \
      --size=1G --group_reporting --output-format=json "$@" 2>/dev/null
}
out "engine,backend,threads,iodepth,run,iops,p50_us,p99_us,cpu_s,cpu_us_per_req"
for backend in ${BACKENDS:-null raw}; do
  if [[ $backend == null ]]; then args=(-f null --size 1G "$work/null.img"); else args=("$work/raw.img"); fi
  for threads in ${THREADS:-1 2}; do
    for depth in ${DEPTHS:-1 32}; do
      for run in $(seq "$runs"); do
        # Alternate which engine goes first, so neither always gets the warmer machine.
        if (( run % 2 )); then engines="coroutine async"; else engines="async coroutine"; fi
        for engine in $engines; do
          export_start --engine "$engine" --threads "$threads" "${args[@]}"
          run_fio --iodepth="$depth" --time_based --runtime=1 >/dev/null
          t0=$(cpu_ticks)
          run_fio --iodepth="$depth" --time_based --runtime="$runtime" >"$work/fio.json"
          t1=$(cpu_ticks)
          export_stop
          row=$(python3 - "$work/fio.json" "$t0" "$t1" "$hz" <<'PY'
import json, sys
t0, t1, hz = (float(a) for a in sys.argv[2:5])
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
pct = r["clat_ns"]["percentile"]
cpu = (t1 - t0) / hz
ios = max(r["total_ios"], 1)
print(f"{r['iops']:.0f},{pct['50.000000'] / 1000:.1f},{pct['99.000000'] / 1000:.1f},{cpu:.2f},{cpu / ios * 1e6:.2f}")
PY
)
          out "$engine,$backend,$threads,$depth,$run,$row"
        done
      done
    done
  done
done
