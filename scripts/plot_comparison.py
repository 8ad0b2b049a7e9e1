#!/usr/bin/env python3
"""Tables and plots of scripts/comparison.sh's CSV: the one script that regenerates every plot
of docs/comparison.md from the raw data.

    scripts/plot_comparison.py CSV... DIR
    e.g. scripts/plot_comparison.py docs/comparison/comparison.csv \
             docs/comparison/callgrind-qcow2-alloc-pool.csv docs/comparison/sweep-null-lat-ring.csv \
             docs/comparison

Several CSVs (later runs of some phases) are read as one; when a later CSV has sweep rows, the
sweep rows of the earlier ones are dropped (a sweep is one run, not a mixture).

Writes DIR/tables.md (printed too) and, when matplotlib is installed (pip install matplotlib),
DIR/ratios.svg, DIR/sweep.svg and DIR/cdf.svg.

Statistics (pure Python, seeded, so the same CSV always gives the same tables):
  * ratio = coroutine / async of a metric, per configuration. For the timed phases the runs
    are pairs (run i of both engines ran back to back, the first engine alternating), so the
    ratio is the median of the per-pair ratios (robust to the load spikes of a shared machine,
    which a mean is not), and its 95 % confidence interval is the percentile bootstrap of that
    median over pairs (10 000 resamples). For callgrind (no pairing needed:
    instruction counts do not drift) it is the ratio of the engines' means, the bootstrap
    resampling each engine's runs.
  * Equivalence bound ±5 %: "equivalent" only if the whole CI lies in [0.95, 1.05] (two one-sided
    tests at 2.5 % each); "coroutine faster"/"async faster" (IOPS), "coroutine costlier"/"async
    costlier" (CPU, instructions) only if the whole CI lies beyond one bound; otherwise
    "inconclusive": the data cannot tell a difference within 5 % from one beyond it.
"""
import csv
import math
import os
import random
import statistics
import sys
from collections import defaultdict

BOUND = (0.95, 1.05)
RESAMPLES = 10_000
CONFIG_ORDER = ["null-inline", "null-yield", "null-lat", "null-lat-ring", "raw-threads", "raw-uring",
                "qcow2-alloc", "qcow2-alloc-pool"]
COLORS = {"coroutine": "#1f77b4", "async": "#ff7f0e"}


def read(path):
    meta, lines = [], []
    with open(path) as f:
        for line in f:
            (meta if line.startswith("#") else lines).append(line)
    return meta, list(csv.DictReader(lines))


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def bootstrap_paired(ratios, seed=1):
    """Median of per-pair ratios and its 95 % percentile-bootstrap CI."""
    if not ratios:
        return (math.nan,) * 3
    rng = random.Random(seed)
    n = len(ratios)
    median = statistics.median
    stats = sorted(median([ratios[rng.randrange(n)] for _ in range(n)]) for _ in range(RESAMPLES))
    return median(ratios), stats[int(0.025 * RESAMPLES)], stats[int(0.975 * RESAMPLES) - 1]


def bootstrap_means(a, b, seed=1):
    """mean(a) / mean(b) and its 95 % CI, resampling each group."""
    rng = random.Random(seed)
    mean = statistics.fmean
    stats = sorted(
        mean([a[rng.randrange(len(a))] for _ in a]) / mean([b[rng.randrange(len(b))] for _ in b])
        for _ in range(RESAMPLES))
    return mean(a) / mean(b), stats[int(0.025 * RESAMPLES)], stats[int(0.975 * RESAMPLES) - 1]


def verdict(lo, hi, more="coroutine faster", less="async faster"):
    if math.isnan(lo):
        return "no pairs"
    if BOUND[0] <= lo and hi <= BOUND[1]:
        return "equivalent"
    if lo > BOUND[1]:
        return more
    if hi < BOUND[0]:
        return less
    return "inconclusive"


def pairs(rows, metric):
    """{run: (coroutine value, async value)} for rows of one configuration and depth."""
    by = defaultdict(dict)
    for r in rows:
        if r[metric] not in ("", None):
            by[r["run"]][r["engine"]] = float(r[metric])
    return [(v["coroutine"], v["async"]) for _, v in sorted(by.items(), key=lambda kv: int(kv[0]))
            if "coroutine" in v and "async" in v and v["async"] > 0 and v["coroutine"] > 0]


def med(rows, engine, metric):
    xs = [float(r[metric]) for r in rows if r["engine"] == engine and r[metric] != ""]
    return statistics.median(xs) if xs else float("nan")


def ci_cell(est, lo, hi):
    return f"**{est:.3f}** [{lo:.3f}, {hi:.3f}]"


def ordered(configs):
    return sorted(configs, key=lambda c: CONFIG_ORDER.index(c) if c in CONFIG_ORDER else 99)


def tables(rows):
    out, summary = [], {}
    main = [r for r in rows if r["phase"] == "main"]
    if main:
        out += ["### Main configurations (coroutine / async; 95 % bootstrap CI; bound ±5 %)", "",
                "| configuration | threads | QD | pairs | IOPS co / async (median) | IOPS ratio | verdict "
                "| CPU µs/req co / async | CPU ratio | verdict | p50 µs co / async | p99 µs co / async | pairs won by coroutine |",
                "|---|---:|---:|---:|---|---|---|---|---|---|---|---|---:|"]
        for cfg in ordered({r["config"] for r in main}):
            rs = [r for r in main if r["config"] == cfg]
            ps = pairs(rs, "iops")
            est, lo, hi = bootstrap_paired([c / a for c, a in ps])
            cp = pairs(rs, "cpu_us_per_req")
            cest, clo, chi = bootstrap_paired([c / a for c, a in cp]) if cp else (math.nan,) * 3
            won = sum(c > a for c, a in ps)
            summary[cfg] = (est, lo, hi)
            out.append(
                f"| {cfg} | {rs[0]['threads']} | {rs[0]['iodepth']}×{rs[0]['numjobs']} | {len(ps)} "
                f"| {med(rs, 'coroutine', 'iops'):.0f} / {med(rs, 'async', 'iops'):.0f} "
                f"| {ci_cell(est, lo, hi)} | {verdict(lo, hi)} "
                f"| {med(rs, 'coroutine', 'cpu_us_per_req'):.2f} / {med(rs, 'async', 'cpu_us_per_req'):.2f} "
                f"| {ci_cell(cest, clo, chi)} | {verdict(clo, chi, 'coroutine costlier', 'async costlier')} "
                f"| {med(rs, 'coroutine', 'p50_us'):.0f} / {med(rs, 'async', 'p50_us'):.0f} "
                f"| {med(rs, 'coroutine', 'p99_us'):.0f} / {med(rs, 'async', 'p99_us'):.0f} | {won}/{len(ps)} |")
        loads = [float(r["loadavg1"]) for r in main if r["loadavg1"]]
        if loads:
            out += ["", f"Load average (1 min) at the start of the main runs: median {statistics.median(loads):.2f}, "
                        f"range {min(loads):.2f}–{max(loads):.2f} (2 vCPUs; fio and the daemon account for ~1–2)."]
        out.append("")
    cg = [r for r in rows if r["phase"] == "callgrind"]
    if cg:
        out += ["### Instructions per request (callgrind, user space of the daemon, all threads)", "",
                "| configuration | runs per engine | Ir/req coroutine (mean, min–max) | Ir/req async (mean, min–max) "
                "| ratio co / async | verdict |",
                "|---|---:|---|---|---|---|"]
        for cfg in ordered({r["config"] for r in cg}):
            rs = [r for r in cg if r["config"] == cfg]
            a = [float(r["ir_per_req"]) for r in rs if r["engine"] == "coroutine" and r["ir_per_req"]]
            b = [float(r["ir_per_req"]) for r in rs if r["engine"] == "async" and r["ir_per_req"]]
            if not a or not b:
                continue
            est, lo, hi = bootstrap_means(a, b)
            out.append(f"| {cfg} | {len(a)} | {statistics.fmean(a):.0f} ({min(a):.0f}–{max(a):.0f}) "
                       f"| {statistics.fmean(b):.0f} ({min(b):.0f}–{max(b):.0f}) | {ci_cell(est, lo, hi)} "
                       f"| {verdict(lo, hi, 'coroutine costlier', 'async costlier')} |")
        out.append("")
    sw = [r for r in rows if r["phase"] == "sweep"]
    if sw:
        cfg = sw[0]["config"]
        out += [f"### Queue-depth sweep ({cfg}, threads {sw[0]['threads']})", "",
                "| QD | pairs | IOPS co / async (median) | IOPS ratio | verdict | p50 µs co / async | p99 µs co / async "
                "| CPU µs/req co / async |",
                "|---:|---:|---|---|---|---|---|---|"]
        for d in sorted({int(r["iodepth"]) for r in sw}):
            rs = [r for r in sw if int(r["iodepth"]) == d]
            ps = pairs(rs, "iops")
            est, lo, hi = bootstrap_paired([c / a for c, a in ps])
            out.append(f"| {d} | {len(ps)} | {med(rs, 'coroutine', 'iops'):.0f} / {med(rs, 'async', 'iops'):.0f} "
                       f"| {ci_cell(est, lo, hi)} | {verdict(lo, hi)} "
                       f"| {med(rs, 'coroutine', 'p50_us'):.0f} / {med(rs, 'async', 'p50_us'):.0f} "
                       f"| {med(rs, 'coroutine', 'p99_us'):.0f} / {med(rs, 'async', 'p99_us'):.0f} "
                       f"| {med(rs, 'coroutine', 'cpu_us_per_req'):.2f} / {med(rs, 'async', 'cpu_us_per_req'):.2f} |")
        out.append("")
    return "\n".join(out), summary


def percentiles(row):
    pts = []
    for kv in row["clat_pct_us"].split(";"):
        if "=" in kv:
            p, v = kv.split("=")
            pts.append((float(v), float(p) / 100))
    return sorted(pts)


def plots(rows, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_comparison: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return
    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "coro-fuse"})

    main = [r for r in rows if r["phase"] == "main"]
    cg = [r for r in rows if r["phase"] == "callgrind"]
    if main:
        cfgs = ordered({r["config"] for r in main})
        panels = [("iops", "IOPS", main), ("cpu_us_per_req", "CPU time per request", main)]
        if cg:
            panels.append(("ir_per_req", "instructions per request (callgrind)", cg))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.5 * len(cfgs) + 1.4), sharey=True)
        for ax, (metric, title, src) in zip(axes, panels):
            ax.axvspan(*BOUND, color="#ddeedd", label="±5 % bound")
            ax.axvline(1, color="grey", lw=0.8)
            for i, cfg in enumerate(cfgs):
                rs = [r for r in src if r["config"] == cfg]
                if metric == "ir_per_req":
                    a = [float(r[metric]) for r in rs if r["engine"] == "coroutine" and r[metric]]
                    b = [float(r[metric]) for r in rs if r["engine"] == "async" and r[metric]]
                    if not a or not b:
                        continue
                    est, lo, hi = bootstrap_means(a, b)
                else:
                    ps = pairs(rs, metric)
                    if not ps:
                        continue
                    est, lo, hi = bootstrap_paired([c / a for c, a in ps])
                    ax.plot([c / a for c, a in ps], [i] * len(ps), "|", color="#999999", ms=7)
                ax.errorbar(est, i, xerr=[[est - lo], [hi - est]], fmt="o", color="black", capsize=3)
            ax.set_title(f"{title}\ncoroutine / async", fontsize=9)
            ax.set_yticks(range(len(cfgs)), cfgs)
        axes[0].invert_yaxis()
        axes[0].legend(loc="lower left", fontsize=7)
        fig.suptitle("Ratio with 95 % bootstrap CI (dot, bar); ticks: each run pair", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "ratios.svg"))
        plt.close(fig)

    sw = [r for r in rows if r["phase"] == "sweep"]
    if sw:
        depths = sorted({int(r["iodepth"]) for r in sw})
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(6.5, 7.5), sharex=True)
        for e in ("coroutine", "async"):
            for metric, ax in (("iops", ax1), ("p99_us", ax2)):
                ys = [med([r for r in sw if int(r["iodepth"]) == d], e, metric) for d in depths]
                pts = [(int(r["iodepth"]), float(r[metric])) for r in sw if r["engine"] == e]
                ax.plot(depths, ys, "-o", color=COLORS[e], label=e, ms=3)
                ax.plot(*zip(*pts), ".", color=COLORS[e], alpha=0.35, ms=3)
        est = []
        for d in depths:
            ps = pairs([r for r in sw if int(r["iodepth"]) == d], "iops")
            est.append(bootstrap_paired([c / a for c, a in ps]))
        ax3.axhspan(*BOUND, color="#ddeedd")
        ax3.axhline(1, color="grey", lw=0.8)
        ax3.errorbar(depths, [e[0] for e in est], yerr=[[e[0] - e[1] for e in est], [e[2] - e[0] for e in est]],
                     fmt="o", color="black", capsize=3)
        ax1.set_ylabel("IOPS")
        ax2.set_ylabel("p99 latency (µs)")
        ax2.set_yscale("log")
        ax3.set_ylabel("IOPS coroutine / async\n(95 % CI; band ±5 %)")
        ax3.set_xscale("log", base=2)
        ax3.set_xticks(depths, [str(d) for d in depths])
        ax3.set_xlabel("fio iodepth")
        ax1.legend()
        ax1.set_title(f"Queue-depth sweep: {sw[0]['config']}, 4k randread, {sw[0]['threads']} queue thread "
                      "(line: median; dots: runs)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "sweep.svg"))
        plt.close(fig)

        cols = 3
        nrows = math.ceil(len(depths) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(10, 2.6 * nrows), squeeze=False)
        for ax, d in zip(axes.flat, depths):
            for r in (r for r in sw if int(r["iodepth"]) == d):
                pts = percentiles(r)
                if pts:
                    ax.plot([v for v, _ in pts], [1 - p for _, p in pts], drawstyle="steps-post",
                            color=COLORS[r["engine"]], alpha=0.6, lw=0.9)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(5e-5, 1.2)
            ax.set_title(f"QD{d}", fontsize=9)
            ax.grid(True, which="major", color="#eeeeee")
        for ax in axes.flat[len(depths):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("fraction slower (1 − CDF)")
        for ax in axes[-1, :]:
            ax.set_xlabel("completion latency (µs)")
        handles = [plt.Line2D([], [], color=COLORS[e], label=e) for e in COLORS]
        fig.legend(handles=handles, loc="upper right")
        fig.suptitle(f"Completion-latency distribution per run (fio clat percentiles 1–99.99), {sw[0]['config']}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "cdf.svg"))
        plt.close(fig)


def main(srcs, outdir):
    meta, rows = [], []
    for src in srcs:
        m, r = read(src)
        if any(x["phase"] == "sweep" for x in r):
            rows = [x for x in rows if x["phase"] != "sweep"]
        meta += m
        rows += r
    text, _ = tables(rows)
    header = "<!-- generated by scripts/plot_comparison.py from comparison.csv; do not edit -->\n\n"
    with open(os.path.join(outdir, "tables.md"), "w") as f:
        f.write(header + "```\n" + "".join(meta) + "```\n\n" + text)
    print(text)
    plots(rows, outdir)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:-1], sys.argv[-1])
