#!/usr/bin/env python3
"""Plots scripts/scaling.sh's CSV as an SVG: IOPS against queue threads, one line per backend,
iodepth and job count. Pure Python (no plotting library), so it runs on a fresh machine.

    scripts/plot_scaling.py scaling.csv docs/scaling.svg
"""
import csv
import sys

W, H, L, R, T, B = 760, 420, 70, 230, 40, 50
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    series = {}
    for r in rows:
        key = f"{r['backend']} QD{r['iodepth']} jobs={r['numjobs']}"
        series.setdefault(key, []).append((int(r["threads"]), float(r["iops"])))
    threads = sorted({t for s in series.values() for t, _ in s})
    ymax = max(v for s in series.values() for _, v in s) * 1.1
    x = lambda t: L + (threads.index(t)) * (W - L - R) / max(1, len(threads) - 1)
    y = lambda v: H - B - v / ymax * (H - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="15">coro-fuse: 4k random read IOPS against queue threads (2-core VM)</text>']
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
    for t in threads:
        out.append(f'<text x="{x(t):.1f}" y="{H - B + 18}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{(L + W - R) / 2:.1f}" y="{H - 10}" text-anchor="middle">--threads</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        c = COLORS[i % len(COLORS)]
        pts.sort()
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        dash = ' stroke-dasharray="5,3"' if name.startswith("null") else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for t, v in pts:
            out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{c}"/>')
        ly = T + 10 + i * 20
        out.append(f'<line x1="{W - R + 15}" x2="{W - R + 40}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{W - R + 46}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    open(dst, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
