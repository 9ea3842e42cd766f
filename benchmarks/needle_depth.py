"""Where in the context a policy loses answers: scores by needle depth, from a bench run's records.

A synthetic sample's needle depth depends only on (task, seed, index) (``namm.tasks.synthetic.default_depth``),
so a run's records say, with no model run, whether a policy loses needles placed early (what StreamingLLM drops)
or late (what a recency window keeps). Prints, per task and depth bin, the mean task score of every cell.

    python benchmarks/needle_depth.py runs/namm-recon-2k
    python benchmarks/needle_depth.py runs/namm-gemma --cells full namm@0.5 kvzip@0.5 streaming@0.5 --bins 2
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from namm.tasks.synthetic import default_depth

RECORD = re.compile(r"(?P<task>[a-z_]+)-(?P<length>\d+)-s(?P<seed>\d+)__(?P<cell>.+)\.jsonl$")


def load(run: Path) -> dict[tuple[str, int, int], dict[str, dict[str, float]]]:
    """``{(task, length, seed): {cell: {sample id: score}}}`` for every record file of a bench run."""
    out: dict = defaultdict(dict)
    for path in sorted((run / "records").glob("*.jsonl")):
        m = RECORD.match(path.name)
        if not m:
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[(m["task"], int(m["length"]), int(m["seed"]))][m["cell"]] = {r["id"]: r["score"] for r in rows}
    return out


def index_of(sample_id: str) -> int:
    """The sample index at the end of a synthetic sample id (``niah_single-s7000-12`` -> 12)."""
    return int(sample_id.rsplit("-", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `namm bench` output directory")
    parser.add_argument("--cells", nargs="*", help="cells to show (default: every cell with records)")
    parser.add_argument("--bins", type=int, default=2, help="equal-width depth bins (2: first and second half)")
    args = parser.parse_args()
    for (task, length, seed), cells in sorted(load(args.run).items()):
        full = cells.get("full")
        if full is None or not all(re.fullmatch(r".+-s\d+-\d+", i) for i in full):
            continue  # not a synthetic task, or no Full cell
        names = [c for c in (args.cells or sorted(cells, key=lambda c: (c != "full", c))) if c in cells]
        bins: dict[int, list[str]] = defaultdict(list)
        for sample_id in full:
            depth = default_depth(task, seed, index_of(sample_id))
            bins[min(int(depth * args.bins), args.bins - 1)].append(sample_id)
        print(f"\n{task} at {length}, seed {seed}")
        print("depth      n  " + "  ".join(f"{c:>18s}" for c in names))
        for b in sorted(bins):
            ids = bins[b]
            means = []
            for c in names:
                have = [cells[c][i] for i in ids if i in cells[c]]
                means.append(f"{sum(have) / len(have):18.2f}" if have else f"{'-':>18s}")
            print(f"{b / args.bins:.2f}-{(b + 1) / args.bins:.2f} {len(ids):3d}  " + "  ".join(means))


if __name__ == "__main__":
    main()
