#!/usr/bin/env python3
"""Plots scripts/engine-compare.sh's CSV as an SVG: for every configuration (backend, queue
threads, iodepth) one bar per engine, in three panels — IOPS, p99 latency and CPU time per
request — each bar the median of the runs, with the runs' range as a whisker. Pure Python (no
plotting library), so it runs on a fresh machine.

    scripts/plot_engines.py engines.csv docs/engines.svg
"""
import csv
import statistics
import sys

ENGINES = ["coroutine", "async"]
COLORS = {"coroutine": "#1f77b4", "async": "#ff7f0e"}
PANELS = [("iops", "IOPS", lambda v: f"{v / 1000:.0f}k"),
          ("p99_us", "p99 latency (µs)", lambda v: f"{v:.0f}"),
          ("cpu_us_per_req", "CPU per request (µs)", lambda v: f"{v:.1f}")]
W, PH, L, R, T, B = 900, 230, 70, 20, 40, 60


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    configs = sorted({(r["backend"], int(r["threads"]), int(r["iodepth"])) for r in rows})
    by = {}
    for r in rows:
        key = (r["backend"], int(r["threads"]), int(r["iodepth"]), r["engine"])
        by.setdefault(key, []).append(r)
    H = T + len(PANELS) * PH + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="15">coro-fuse: coroutine vs async engine, fio 4k randread '
           f'(median of runs; whiskers: min-max)</text>']
    for i, e in enumerate(ENGINES):
        out.append(f'<rect x="{W - R - 180 + i * 90}" y="10" width="12" height="12" fill="{COLORS[e]}"/>')
        out.append(f'<text x="{W - R - 164 + i * 90}" y="20">{e}</text>')
    group_w = (W - L - R) / max(1, len(configs))
    bar_w = group_w * 0.35
    for p, (col, title, fmt) in enumerate(PANELS):
        top = T + p * PH
        bottom = top + PH - B
        vals = [float(r[col]) for r in rows]
        vmax = (max(vals) if vals else 1) * 1.1 or 1
        y = lambda v: bottom - v / vmax * (bottom - top - 10)
        out.append(f'<text x="{L}" y="{top + 8}" font-size="12" font-weight="bold">{title}</text>')
        for k in range(5):
            v = vmax * k / 4
            out.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
        for g, (backend, threads, depth) in enumerate(configs):
            gx = L + g * group_w + group_w * 0.15
            for i, e in enumerate(ENGINES):
                runs = [float(r[col]) for r in by.get((backend, threads, depth, e), [])]
                if not runs:
                    continue
                med = statistics.median(runs)
                x0 = gx + i * bar_w
                out.append(f'<rect x="{x0:.1f}" y="{y(med):.1f}" width="{bar_w * 0.9:.1f}" '
                           f'height="{bottom - y(med):.1f}" fill="{COLORS[e]}"/>')
                cx = x0 + bar_w * 0.45
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(min(runs)):.1f}" y2="{y(max(runs)):.1f}" stroke="black"/>')
            out.append(f'<text x="{gx + bar_w:.1f}" y="{bottom + 14}" text-anchor="middle">{backend} t{threads}</text>')
            out.append(f'<text x="{gx + bar_w:.1f}" y="{bottom + 27}" text-anchor="middle">QD{depth}</text>')
    out.append("</svg>")
    open(dst, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
