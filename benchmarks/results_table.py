"""Render ``namm compare`` outputs (``<task>__results.json``) as a markdown section of docs/results.md.

    python benchmarks/results_table.py runs/results-2k --title "SmolLM2, 2k tokens" --name smollm2-2k
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from _report import write_section

from namm.atomic import atomic_write_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--title", required=True)
    ap.add_argument("--name", required=True, help="Section marker in the output file.")
    ap.add_argument("--command", default="", help="The command that produced the results (quoted in the doc).")
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--pivot", action="store_true", help="Also a tasks x policies table of scores vs full.")
    ap.add_argument("--no-plots", action="store_true", help="Do not embed the per-task plots.")
    args = ap.parse_args()
    files = sorted(args.run_dir.glob("*__results.json"))
    if not files:
        raise SystemExit(f"no *__results.json in {args.run_dir}")
    lines = [f"## {args.title}", ""]
    if args.command:
        lines += [f"`{args.command}`", ""]
    if args.pivot:
        lines += pivot([json.loads(f.read_text()) for f in files]) + [""]
    lines += ["| task | policy | budget | score | vs full | mean KV tokens | mean cache | samples |",
              "|---|---|---|---|---|---|---|---|"]
    for file in files:
        data = json.loads(file.read_text())
        for r in data["results"]:
            lines.append(f"| {data['task']} | {r['policy']} | {r['budget']} | {r['score']:.1f} | {r['relative']:.2f} | "
                         f"{r['mean_kv_tokens']:.0f} | {r['cache_fraction']:.0%} | {r['samples']} |")
    lines.append("")
    for file in [] if args.no_plots else files:
        png = file.with_suffix(".png")
        if png.exists():
            target = args.out.parent / "results" / f"{args.name}-{png.name.replace('__results', '')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, png.read_bytes())
            lines.append(f"![{file.stem}](results/{target.name})")
    print(write_section(args.out, args.name, lines))


def column(r: dict) -> str:
    """A result's column label: the policy, with its budget when it has a fixed one."""
    fixed = r["budget"] not in ("100%", "learned") and not r["budget"].startswith("matched to namm")
    return f"{r['policy']} @ {r['budget']}" if fixed else r["policy"]


def pivot(results: list[dict]) -> list[str]:
    """Tasks x policies: the full cache's absolute score, every other policy's score relative to it; then
    the mean over tasks (tasks where the full cache scores 0 have no ratio and are left out) and the mean
    cache fraction."""
    columns = list(dict.fromkeys(column(r) for data in results for r in data["results"]))
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    ratios: dict[str, list[float]] = {c: [] for c in columns}
    caches: dict[str, list[float]] = {c: [] for c in columns}
    for data in results:
        cells = {column(r): r for r in data["results"]}
        row = []
        for c in columns:
            r = cells.get(c)
            if r is None:
                row.append("")
                continue
            caches[c].append(r["cache_fraction"])
            if c == "full":
                row.append(f"{r['score']:.1f}")
            elif math.isnan(r["relative"]):
                row.append("n/a")
            else:
                ratios[c].append(r["relative"])
                row.append(f"{r['relative']:.2f}")
        lines.append(f"| {data['task']} | " + " | ".join(row) + " |")
    lines.append("| **mean vs full** | 1.00 | " + " | ".join(
        f"**{statistics.fmean(ratios[c]):.2f}**" if ratios[c] else "" for c in columns[1:]) + " |")
    lines.append("| mean cache | " + " | ".join(
        f"{statistics.fmean(caches[c]):.0%}" if caches[c] else "" for c in columns) + " |")
    return ["Full: score (x100); the others: score relative to the full cache on the same samples.", "", *lines]


if __name__ == "__main__":
    main()
