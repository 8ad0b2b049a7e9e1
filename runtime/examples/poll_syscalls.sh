#!/usr/bin/env bash
# Syscalls per event-loop wait: the `polling` crate vs runtime's epoll wrapper vs AioContext::poll.
#
#   runtime/examples/poll_syscalls.sh [N]        (N iterations per mode, default 5000)
#
# Method. Each mode of examples/poll_syscalls.rs runs its measured loop on the main thread (the
# "poller") while a second thread (the "waker") makes it runnable once per iteration; see that
# file's header. We run every mode twice under strace:
#
#  1. `strace -f -c` — the command one would type by hand. Its summary adds up *all* threads and
#     the whole process (start-up, thread creation, the waker's writes), so we only report its
#     total divided by N, as "all/iter".
#  2. `strace -ff -o DIR/MODE.tr` — one trace file per thread (DIR/MODE.tr.<tid>), so the waker's
#     syscalls can never be mixed into the poller's, and no call is split into
#     "<unfinished>/<resumed>" halves. The poller is the main thread, whose tid is the pid the
#     program prints. It brackets its loop with two getppid() calls (made nowhere else), so we
#     count only the lines between the two markers, grouped by syscall name, divided by N.
#     The waker's column is every syscall of the other threads (including ~20 of thread
#     start/exit, negligible over N) divided by N; it includes sched_yield when strace slowed the
#     poller down enough for the waker to stop spinning, so read it as an upper bound.
#
# Timings are meaningless under strace and are not shown; the counts do not depend on timing,
# except that a wait may end early or late (waits/iter shows how many waits one iteration took).
set -euo pipefail

N=${1:-5000}
NT=$(( N < 300 ? N : 300 )) # the timer-only modes take 1 ms per iteration
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p runtime --example poll_syscalls
bin=$root/target/release/examples/poll_syscalls
out=$(mktemp -d /tmp/poll_syscalls.XXXXXX)

modes="polling-fd polling-fd-timeout polling-fd-level polling-fd-level-timeout polling-notify
polling-notify-timeout polling-timer epoll-fd epoll-fd-timeout aio-remote aio-remote-timer
aio-timer aio-local-bh"

# count N MARKED FILE...: syscalls per iteration in strace -ff files, as "TOTAL|name×k, ...",
# most frequent first. With MARKED=1, only the lines between the two getppid() markers count.
count() {
    local n=$1 marked=$2
    shift 2
    awk -v marked="$marked" '
        FNR == 1 { inside = !marked }
        marked && /^getppid\(/ { inside = !inside; next }
        inside && /^[a-z_0-9]+\(/ { name = $0; sub(/\(.*/, "", name); print name }' "$@" |
        sort | uniq -c | sort -rn |
        awk -v n="$n" '{ t += $1 }  # names below 0.005/iteration (thread start/exit) omitted
            $1 / n >= 0.005 { s = s (s != "" ? ", " : "") sprintf("%s×%.2f", $2, $1 / n) }
            END { printf "%.2f|%s\n", t / n, s }'
}

printf '%-24s %5s %5s %6s %6s %6s  %s\n' mode n waits poller waker all "poller syscalls | waker syscalls (per iteration)"
for mode in $modes; do
    n=$N
    case $mode in polling-timer | aio-timer) n=$NT ;; esac

    # 1. The plain `strace -f -c` summary: total calls of every thread, whole process.
    /usr/bin/strace -f -c -o "$out/$mode.c.txt" "$bin" "$mode" "$n" >/dev/null
    # Its last row is: % time, seconds, usecs/call, calls, [errors,] "total".
    all=$(awk '$NF == "total" { print $4 }' "$out/$mode.c.txt")

    # 2. Per-thread traces: the poller is the main thread (tid = pid), the rest is the waker.
    line=$(/usr/bin/strace -ff -o "$out/$mode.tr" "$bin" "$mode" "$n")
    pid=$(sed -E 's/.* pid=([0-9]+).*/\1/' <<<"$line")
    waits=$(sed -E 's/.* waits_per_iter=([0-9.]+).*/\1/' <<<"$line")
    poller=$(count "$n" 1 "$out/$mode.tr.$pid")
    others=()
    for f in "$out/$mode".tr.*; do [ "$f" != "$out/$mode.tr.$pid" ] && others+=("$f"); done
    if [ ${#others[@]} -gt 0 ]; then waker=$(count "$n" 0 "${others[@]}"); else waker="0.00|-"; fi
    printf '%-24s %5d %5.2f %6s %6s %6.2f  %s | %s\n' "$mode" "$n" "$waits" "${poller%%|*}" \
        "${waker%%|*}" "$(awk -v a="$all" -v n="$n" 'BEGIN { print a / n }')" \
        "${poller#*|}" "${waker#*|}"
done
echo "traces and strace -c summaries kept in $out"
