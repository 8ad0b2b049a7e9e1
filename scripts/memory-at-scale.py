#!/usr/bin/env python3
"""Memory at scale in the real daemon (issue 16, item 7). Root, /dev/fuse, fio, qemu-img.

    scripts/memory-at-scale.py [-o docs/memory-at-scale] [--quick] [--only PART,...]

PARTS (all by default, in this order):

  held     1k, 10k, 30k suspended READs held at a blkdebug gate (`--inject-error
           read:hold=FILE`), per engine, each run a fresh daemon process; smaps_rollup of the
           daemon idle (after mount) and with all N held; bytes per held request.
  canary   stack high-water marks (`--stack-canary`) for a raw image, a compressed qcow2
           (`qemu-img convert -c`) and a backing chain (qcow2 -> qcow2 -> raw), per engine
           (the async engine runs qcow2 through coroutines too: the bridge).
  sweep    `--coroutine-stack` 16K..1M: does each path still work, and RSS at 10k held.
  maplimit `vm.max_map_count` lowered (restored afterwards) below what N held coroutines need:
           what the requests beyond get, whether the daemon survives, and the async engine at
           the same limit.

Writes OUT.csv (one row per measurement) and OUT.md (the tables docs/comparison.md quotes).
Every daemon is `--threads 1 --transport dev --max-request 4K --max-in-flight 65535`: one
queue holds them all (max_background = 65535), and a READ's request buffer is 8 KiB of heap
instead of a 1 MiB huge-page mapping (with the default --max-request each held request would
also hold that).
"""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CORO_FUSE", ROOT / "target/release/coro-fuse"))
ENGINES = ("coroutine", "async")
COMMON = ["--threads", "1", "--transport", "dev", "--max-in-flight", "65535"]
PR_SET_THP_DISABLE = 41


def no_thp():
    """In the daemon's process before exec: transparent huge pages off for it alone (the
    flag is inherited across exec), so MADV_HUGEPAGE on its buffers is ignored."""
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")
KIB = 1024
MIB = 1024 * 1024


def log(msg):
    print(f"[memory-at-scale] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The daemon


class Daemon:
    """One coro-fuse process exporting IMAGE on a file mountpoint in WORK."""

    def __init__(self, work, image, args, name, thp=True):
        self.work = Path(work)
        self.mnt = self.work / f"{name}.mnt"
        self.mnt.write_bytes(b"")
        self.logpath = self.work / f"{name}.log"
        self.logf = open(self.logpath, "w")
        self.proc = subprocess.Popen([str(BIN), str(image), str(self.mnt)] + COMMON + args,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     preexec_fn=None if thp else no_thp)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.mounted():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon did not mount: {self.log()}")

    def mounted(self):
        want = str(self.mnt)
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == want for line in f)

    def log(self):
        return self.logpath.read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def smaps(self):
        """smaps_rollup fields in bytes, plus the number of mappings."""
        out = {}
        with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * KIB
        with open(f"/proc/{self.proc.pid}/maps") as f:
            out["maps"] = sum(1 for _ in f)
        return out

    def stop(self, timeout=60):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.mounted():
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.logf.close()
        return self.proc.returncode


def wait_held(d, gate, n, timeout):
    """Waits until the gate's watcher logs `n request(s) held` (or a steady lower count)."""
    deadline = time.time() + timeout
    last, since = -1, time.time()
    while time.time() < deadline:
        held = [int(line.split(": ")[-1].split()[0]) for line in d.log().splitlines()
                if f"gate {gate}: " in line and "request(s) held" in line]
        now = held[-1] if held else 0
        if now >= n:
            return now
        if now != last:
            last, since = now, time.time()
        elif now > 0 and time.time() - since > 5:
            return now  # steady below n (e.g. ENOMEM answered the rest)
        if not d.alive():
            return now
        time.sleep(0.1)
    return last


def fio_hold(mnt, n, extra=()):
    """fio issuing n concurrent 4k O_DIRECT reads (exactly n I/Os), in jobs of <= 4096."""
    jobs = max(1, -(-n // 4096))
    depth = -(-n // jobs)
    cmd = ["fio", "--name=hold", f"--filename={mnt}", "--rw=randread", "--bs=4k",
           "--direct=1", "--ioengine=libaio", f"--iodepth={depth}",
           f"--iodepth_batch_submit={min(depth, 256)}", f"--numjobs={jobs}",
           f"--number_ios={depth}", "--thread", "--group_reporting", "--norandommap",
           "--continue_on_error=all", "--output-format=json"] + list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), \
        jobs * depth


def fio_result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    try:
        j = json.loads(out[out.index("{"):])
        job = j["jobs"][0]
        return {"ios": job["read"]["total_ios"], "errors": job.get("total_err", 0),
                "first_error": job.get("error", 0), "rc": proc.returncode}
    except (ValueError, KeyError, IndexError):
        return {"ios": 0, "errors": -1, "first_error": -1, "rc": proc.returncode,
                "stderr": err[-500:]}


def held_run(work, image, engine, n, extra_args=(), name=None, timeout=120, thp=False):
    """A fresh daemon; idle smaps; n reads held; smaps; release; fio's result; stop."""
    name = name or f"{engine}-{n}{'-thp' if thp else ''}"
    gate = Path(work) / f"{name}.gate"
    args = ["--engine", engine, "--max-request", "4K", "--inject-error",
            f"read:hold={gate}"] + list(extra_args)
    d = Daemon(work, image, args, name, thp=thp)
    time.sleep(0.5)
    base = d.smaps()
    fio, issued = fio_hold(d.mnt, n)
    held = wait_held(d, gate, issued, timeout)
    time.sleep(1.0)  # let the last ones settle into their suspension
    full = d.smaps() if d.alive() else {}
    gate.write_text("")
    res = fio_result(fio)
    rc = d.stop()
    lines = d.log().splitlines()
    enomem = sum(1 for line in lines if "ENOMEM" in line)
    last = [line for line in lines if "ENOMEM" not in line and "request(s) held" not in line]
    row = {"part": "held", "engine": engine, "thp": thp, "n": issued, "held": held,
           "stack": extra_args[1] if "--coroutine-stack" in extra_args else "256K",
           "fio_ios": res["ios"], "fio_errors": res["errors"],
           "first_error": res["first_error"], "enomem": enomem, "daemon_rc": rc,
           "aborted": (rc or 0) < 0,
           "last_words": " / ".join(last[-3:])[-400:] if (rc or 0) < 0 else ""}
    for k in ("Rss", "Pss", "Anonymous", "AnonHugePages", "maps"):
        row[f"base_{k}"] = base.get(k, "")
        row[f"held_{k}"] = full.get(k, "")
    if full and held:
        row["rss_per_req"] = round((full["Rss"] - base["Rss"]) / held)
        row["anon_per_req"] = round((full["Anonymous"] - base["Anonymous"]) / held)
        row["maps_per_req"] = round((full["maps"] - base["maps"]) / held, 3)
    log(f"{name}: held {held}/{issued}, fio ios {res['ios']} ENOMEM {enomem}, "
        f"rc {rc}, rss/req {row.get('rss_per_req')} {row['last_words']}")
    return row, d


# ---------------------------------------------------------------------------------------------
# Images


def compressible(path, size):
    """size bytes, each 4 KiB: 1 KiB random then 3 KiB of text (compresses ~3-4x)."""
    text = (b"coro-fuse memory at scale; " * 160)[:3 * KIB]
    with open(path, "wb") as f:
        for _ in range(size // (4 * KIB)):
            f.write(os.urandom(KIB) + text)


def make_images(work):
    work = Path(work)
    raw = work / "base.raw"
    compressible(raw, 64 * MIB)
    comp = work / "compressed.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", str(raw), str(comp)],
                   check=True)
    mid = work / "mid.qcow2"
    top = work / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw",
                    str(mid)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", str(mid)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2",
                    str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 32M 8M", str(top)],
                   check=True, stdout=subprocess.DEVNULL)
    return {"raw": raw, "compressed qcow2": comp, "backing chain": top}


def workload(mnt, seconds):
    """Reads and writes of 4k-1M over the whole image, then a sequential read: every path
    (plain, compressed, backing, COW) gets exercised."""
    rnd = subprocess.run(
        ["fio", "--name=mix", f"--filename={mnt}", "--rw=randrw", "--bsrange=4k-1m",
         "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--runtime={seconds}",
         "--time_based", "--output-format=json", "--size=64M"],
        capture_output=True, text=True)
    seq = subprocess.run(["dd", f"if={mnt}", "of=/dev/null", "bs=1M", "iflag=direct"],
                         capture_output=True, text=True)
    ok = rnd.returncode == 0 and seq.returncode == 0
    errs = -1
    try:
        j = json.loads(rnd.stdout[rnd.stdout.index("{"):])
        errs = j["jobs"][0]["error"]
    except (ValueError, KeyError, IndexError):
        ok = False
    return ok and errs == 0, (rnd.stderr + seq.stderr)[-300:]


def path_run(work, image, engine, extra, name, seconds):
    d = Daemon(work, image, ["--engine", engine] + extra, name)
    ok, err = workload(d.mnt, seconds)
    alive = d.alive()
    rc = d.stop()
    hw = None
    for line in d.log().splitlines():
        if "high-water mark" in line:
            hw = int(line.split("high-water mark ")[1].split()[0])
    if rc != 0 or not alive:
        ok = False
    return ok, hw, rc, d.log() if not ok else ""


# ---------------------------------------------------------------------------------------------
# Parts


def part_held(work, image, rows, sizes):
    # As shipped (THP on): only the smallest N, each held request pins a 2 MiB huge page.
    for engine in ENGINES:
        row, _ = held_run(work, image, engine, sizes[0], thp=True)
        rows.append(row)
    for n in sizes:
        for engine in ENGINES:
            row, _ = held_run(work, image, engine, n)
            rows.append(row)


def part_canary(work, images, rows, seconds):
    for path, image in images.items():
        for engine in ENGINES:
            ok, hw, rc, err = path_run(work, image, engine, ["--stack-canary"],
                                       f"canary-{engine}", seconds)
            log(f"canary {path} {engine}: ok={ok} high-water={hw} rc={rc} {err[-400:]}")
            rows.append({"part": "canary", "path": path, "engine": engine, "ok": ok,
                         "high_water": hw if hw is not None else "", "daemon_rc": rc})


def part_sweep(work, images, raw_image, rows, sizes, seconds, n_held):
    for size in sizes:
        for path, image in images.items():
            ok, _, rc, err = path_run(work, image, "coroutine", ["--coroutine-stack", size],
                                      f"sweep-{size}", seconds)
            sig = -rc if rc is not None and rc < 0 else ""
            log(f"sweep {size} {path}: ok={ok} rc={rc} {err[-300:]}")
            rows.append({"part": "sweep", "stack": size, "path": path, "engine": "coroutine",
                         "ok": ok, "daemon_rc": rc, "signal": sig})
        if n_held:
            row, _ = held_run(work, raw_image, "coroutine", n_held,
                              ["--coroutine-stack", size], name=f"sweep-held-{size}")
            row["part"] = "sweep-held"
            rows.append(row)


def part_maplimit(work, image, rows, limit, n):
    old = Path("/proc/sys/vm/max_map_count").read_text().strip()
    try:
        Path("/proc/sys/vm/max_map_count").write_text(str(limit))
        log(f"vm.max_map_count {old} -> {limit}")
        for engine in ENGINES:
            row, d = held_run(work, image, engine, n, name=f"maplimit-{engine}", timeout=60)
            row["part"] = "maplimit"
            row["max_map_count"] = limit
            rows.append(row)
    finally:
        Path("/proc/sys/vm/max_map_count").write_text(old)
        log(f"vm.max_map_count restored to {old}")


# ---------------------------------------------------------------------------------------------
# Output


def fmt_bytes(b):
    if b == "" or b is None:
        return ""
    b = int(b)
    return f"{b / MIB:.1f} MiB" if abs(b) >= 10 * MIB else f"{b / KIB:.0f} KiB"


def markdown(rows):
    out = []
    held = [r for r in rows if r["part"] == "held"]
    if held:
        out += ["### Suspended requests held at a gate (smaps_rollup of the daemon)", "",
                "| engine | THP | reads issued | held | idle Rss | held Rss | Rss / request "
                "| Anonymous / request | mappings idle → held | answered ENOMEM | all done after "
                "release | daemon exit |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
        for r in held:
            thp = "on" if r["thp"] else "off"
            out.append(f"| {r['engine']} | {thp} | {r['n']} | {r['held']} | "
                       f"{fmt_bytes(r['base_Rss'])} | "
                       f"{fmt_bytes(r['held_Rss'])} | {r.get('rss_per_req', '')} B | "
                       f"{r.get('anon_per_req', '')} B | {r['base_maps']} → {r['held_maps']} | "
                       f"{r['enomem']} | {r['fio_ios'] == r['n']} | {r['daemon_rc']} |")
        out.append("")
    canary = [r for r in rows if r["part"] == "canary"]
    if canary:
        out += ["### Stack high-water marks (`--stack-canary`, 256 KiB stacks)", "",
                "| path | engine | most stack used by a request | workload ok |",
                "|---|---|---:|---|"]
        for r in canary:
            hw = f"{r['high_water']} B" if r["high_water"] != "" else "n/a"
            out.append(f"| {r['path']} | {r['engine']} | {hw} | {r['ok']} |")
        out.append("")
    sweep = [r for r in rows if r["part"] == "sweep"]
    if sweep:
        paths = list(dict.fromkeys(r["path"] for r in sweep))
        sizes = list(dict.fromkeys(r["stack"] for r in sweep))
        sh = {r["stack"]: r for r in rows if r["part"] == "sweep-held"}
        out += ["### Stack-size sweep (coroutine engine)", "",
                "| stack | " + " | ".join(paths) + " | Rss / held request (10k) | "
                "held Rss (10k) |",
                "|---|" + "---|" * len(paths) + "---:|---:|"]
        for s in sizes:
            cells = []
            for p in paths:
                r = next(x for x in sweep if x["stack"] == s and x["path"] == p)
                if r["ok"]:
                    cells.append("works")
                else:
                    sig = f"signal {r['signal']}" if r["signal"] else f"exit {r['daemon_rc']}"
                    cells.append(f"**fails** ({sig})")
            h = sh.get(s, {})
            out.append(f"| {s} | " + " | ".join(cells) +
                       f" | {h.get('rss_per_req', '')} B | {fmt_bytes(h.get('held_Rss'))} |")
        out.append("")
    ml = [r for r in rows if r["part"] == "maplimit"]
    if ml:
        out += [f"### vm.max_map_count = {ml[0]['max_map_count']} (default 65530)", "",
                "| engine | reads issued | held at the gate | answered ENOMEM at once "
                "| mappings idle → held | all completed after release | daemon exit |",
                "|---|---:|---:|---:|---|---|---|"]
        for r in ml:
            out.append(f"| {r['engine']} | {r['n']} | {r['held']} | {r['enomem']} | "
                       f"{r['base_maps']} → {r['held_maps']} | {r['fio_ios'] == r['n']} | "
                       f"{r['daemon_rc']} |")
        out.append("")
        for r in ml:
            if r.get("last_words"):
                out.append(f"- {r['engine']}, last log lines: `{r['last_words']}`")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default=str(ROOT / "docs/memory-at-scale"))
    ap.add_argument("--only", default="held,canary,sweep,maplimit")
    ap.add_argument("--quick", action="store_true", help="small N, short workloads")
    ap.add_argument("--dir", default="/dev/shm", help="where the images go (default tmpfs)")
    a = ap.parse_args()
    parts = a.only.split(",")
    if not BIN.exists():
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "fuse"], cwd=ROOT,
                       check=True)
    sizes = [200, 1000] if a.quick else [1000, 10000, 30000]
    seconds = 1 if a.quick else 3
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="coro-mem.") as work:
        raw = Path(work) / "held.raw"
        with open(raw, "wb") as f:
            f.truncate(256 * MIB)
        images = make_images(work) if ("canary" in parts or "sweep" in parts) else {}
        if "held" in parts:
            part_held(work, raw, rows, sizes)
        if "canary" in parts:
            part_canary(work, images, rows, seconds)
        if "sweep" in parts:
            part_sweep(work, images, raw, rows, ["4K", "8K", "16K", "32K", "64K", "128K",
                                                  "256K", "512K", "1M"], seconds, 1000 if a.quick else 10000)
        if "maplimit" in parts:
            part_maplimit(work, raw, rows, 2000 if a.quick else 20000,
                          1500 if a.quick else 30000)
    # A partial run (--only) keeps the other parts' rows of the previous CSV.
    ran = set(parts) | ({"sweep-held"} if "sweep" in parts else set())
    if os.path.exists(a.out + ".csv"):
        with open(a.out + ".csv") as f:
            old = [r for r in csv.DictReader(f) if r["part"] not in ran]
        for r in old:
            for k in ("thp", "ok", "aborted"):
                if k in r:
                    r[k] = r[k] == "True"
        order = ["held", "canary", "sweep", "sweep-held", "maplimit"]
        rows = sorted(old + rows, key=lambda r: order.index(r["part"]))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    md = markdown(rows)
    Path(a.out + ".md").write_text(
        "<!-- generated by scripts/memory-at-scale.py; do not edit -->\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
