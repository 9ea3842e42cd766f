"""Render ``namm compare`` outputs (``<task>__results.json``) as a markdown section of docs/results.md.

    python benchmarks/results_table.py runs/results-2k --title "SmolLM2, 2k tokens" --name smollm2-2k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _report import write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--title", required=True)
    ap.add_argument("--name", required=True, help="Section marker in the output file.")
    ap.add_argument("--command", default="", help="The command that produced the results (quoted in the doc).")
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args()
    files = sorted(args.run_dir.glob("*__results.json"))
    if not files:
        raise SystemExit(f"no *__results.json in {args.run_dir}")
    lines = [f"## {args.title}", ""]
    if args.command:
        lines += [f"`{args.command}`", ""]
    lines += ["| task | policy | budget | score | vs full | mean KV tokens | mean cache | samples |",
              "|---|---|---|---|---|---|---|---|"]
    for file in files:
        data = json.loads(file.read_text())
        for r in data["results"]:
            lines.append(f"| {data['task']} | {r['policy']} | {r['budget']} | {r['score']:.1f} | {r['relative']:.2f} | "
                         f"{r['mean_kv_tokens']:.0f} | {r['cache_fraction']:.0%} | {r['samples']} |")
    lines.append("")
    for file in files:
        png = file.with_suffix(".png")
        if png.exists():
            target = args.out.parent / "results" / f"{args.name}-{png.name.replace('__results', '')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(png.read_bytes())
            lines.append(f"![{file.stem}](results/{target.name})")
    print(write_section(args.out, args.name, lines))


if __name__ == "__main__":
    main()
