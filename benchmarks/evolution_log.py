"""Render an evolution run's log (``log.jsonl``) and fitness plot as a section of docs/evolution.md.

    python benchmarks/evolution_log.py runs/smollm2-cpu --name smollm2-cpu --title "SmolLM2 on 2 CPU cores"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _report import write_section

from namm.errors import NammError
from namm.evolution.plot import plot_run, read_log


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--name", required=True, help="Section marker (and plot file name).")
    ap.add_argument("--title", required=True)
    ap.add_argument("--note", default="", help="A paragraph printed under the title.")
    ap.add_argument("--out", type=Path, default=Path("docs/evolution.md"))
    args = ap.parse_args()
    try:
        rows = read_log(args.run_dir)
    except NammError as e:
        raise SystemExit(str(e)) from None
    png = args.out.parent / "evolution" / f"{args.name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_run(args.run_dir, png)
    lines = [f"## {args.title}", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [f"Run directory `{args.run_dir}` ({len(rows)} generations). Fitness = mean over tasks of the members' "
              "score relative to the full cache on the same samples, minus `cache_weight` x mean cache fraction. "
              "Validation: the CMA-ES mean on held-out samples.", "",
              f"![fitness]({png.relative_to(args.out.parent)})", "",
              "| gen | best | mean | median | members' cache | sigma | validation (mean) | its cache | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(r["generation"]), f"{r['best']:.3f}", f"{r['mean']:.3f}", f"{r['median']:.3f}",
                 f"{r['cache_fraction']:.0%}", f"{r['sigma']:.4f}", fmt(r.get("validation"), ".3f"),
                 fmt(r.get("validation_cache_fraction"), ".0%"), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print(write_section(args.out, args.name, lines))


if __name__ == "__main__":
    main()
