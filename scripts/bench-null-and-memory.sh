#!/usr/bin/env bash
# Transport-only IOPS (the `null` driver: no backend I/O at all) and memory: idle RSS and peak
# RSS (VmHWM) of coro-fuse after fio runs at QD32 against a raw image on tmpfs.
#
#   scripts/bench-null-and-memory.sh [SECONDS]      (root, /dev/fuse, fio)
set -euo pipefail
secs=${1:-5}
source "$(dirname "$0")/export-lib.sh"
export_setup bench
kb() { awk -v k="$1" '$1==k":" {print $2}' "/proc/$pid/status"; }
fiojob() { # rw bs depth numjobs
  fio --name=j --filename="$work/mnt" --rw="$1" --bs="$2" --iodepth="$3" --numjobs="$4" \
      --ioengine=libaio --direct=1 --time_based --runtime="$secs" --ramp_time=1 --size=1G \
      --group_reporting --output-format=json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(f\"{j['read']['iops']+j['write']['iops']:.0f}\")"
}
echo "== null driver (transport only), 1 queue =="
printf '%-22s %10s\n' job iops
export_start -f null --size 1G "$work/null.img"
for spec in randread:4k:32:1 randwrite:4k:32:1 randread:4k:1:1 read:1M:16:1 write:1M:16:1; do
  IFS=: read -r rw bs d nj <<<"$spec"
  printf '%-22s %10s\n' "$rw-$bs-qd$d" "$(fiojob "$rw" "$bs" "$d" "$nj")"
done
export_stop
echo "== memory, raw image on tmpfs =="
truncate -s 1G "$work/disk.img"
export_start "$work/disk.img"
sleep 0.5
echo "idle RSS:            $(kb VmRSS) KiB"
fiojob randread 4k 32 1 >/dev/null
fiojob randwrite 4k 32 1 >/dev/null
echo "after 4k QD32, VmHWM: $(kb VmHWM) KiB (RSS now $(kb VmRSS) KiB)"
fiojob write 1M 32 1 >/dev/null
fiojob read 1M 32 1 >/dev/null
echo "after 1M QD32, VmHWM: $(kb VmHWM) KiB (RSS now $(kb VmRSS) KiB)"
export_stop
