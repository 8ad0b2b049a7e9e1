#!/usr/bin/env bash
# Multi-queue scaling: fio randread 4k against coro-fuse with 1, 2 and 4 queue threads, at QD1 and
# QD32, with 1 and 2 fio jobs, on a raw image on tmpfs and on the null driver. Writes CSV to
# stdout (and to -o FILE); scripts/plot_scaling.py turns it into an SVG plot.
#
#   scripts/scaling.sh [-t SECONDS] [-o CSV] [-w rw]     (root, /dev/fuse, fio, python3)
# Env: SCALING_BACKENDS (default "raw null"), SCALING_THREADS (default "1 2 4").
set -euo pipefail
secs=4 csv="" rw=randread
while getopts "t:o:w:" o; do case $o in t) secs=$OPTARG;; o) csv=$OPTARG;; w) rw=$OPTARG;; *) exit 2;; esac; done
source "$(dirname "$0")/export-lib.sh"
export_setup scaling
python3 -c "import os,sys; f=open(sys.argv[1],'wb'); [f.write(os.urandom(1<<20)) for _ in range(1024)]" "$work/raw.img"
out() { echo "$1"; [[ -z $csv ]] || echo "$1" >>"$csv"; }
[[ -z $csv ]] || : >"$csv"
out "backend,threads,iodepth,numjobs,iops,p50_us,cpu_s"
for backend in ${SCALING_BACKENDS:-raw null}; do
  for threads in ${SCALING_THREADS:-1 2 4}; do
    if [[ $backend == null ]]; then args=(-f null --size 1G "$work/null.img"); else args=("$work/raw.img"); fi
    export_start --threads "$threads" "${args[@]}"
    for depth in 1 32; do
      for nj in 1 2; do
        t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
        res=$(fio --name=s --filename="$work/mnt" --rw="$rw" --bs=4k --iodepth="$depth" --numjobs="$nj" \
              --ioengine=libaio --direct=1 --time_based --runtime="$secs" --ramp_time=1 --size=1G \
              --group_reporting --output-format=json 2>/dev/null |
              python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; r=j['read'] if j['read']['io_bytes'] else j['write']; print(f\"{j['read']['iops']+j['write']['iops']:.0f} {r['clat_ns']['percentile']['50.000000']/1000:.1f}\")")
        t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
        cpu=$(python3 -c "import os; print(f'{($t1-$t0)/os.sysconf(\"SC_CLK_TCK\"):.2f}')")
        read -r iops p50 <<<"$res"
        out "$backend,$threads,$depth,$nj,$iops,$p50,$cpu"
      done
    done
    export_stop
  done
done
