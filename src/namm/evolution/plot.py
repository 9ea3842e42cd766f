"""Training curves of an evolution run (``namm evolve-plot RUN_DIR``).

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works headless and
does not disturb other matplotlib users in the process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from namm.atomic import atomic_save_figure
from namm.errors import NammError


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/log.jsonl`` (one per finished generation)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        raise NammError(f"No evolution log at {path}.")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise NammError(f"{path}:{n} is not valid JSON: {e}") from e
    return records


def plot_run(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path:
    """Plot fitness (best/mean/median, validation of the mean) and cache fraction / sigma per generation.

    Args:
        run_dir: an evolution run directory.
        out_png: output image (default ``run_dir/fitness.png``); written atomically.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(run_dir)
    out = Path(out_png) if out_png is not None else Path(run_dir) / "fitness.png"
    fig = Figure(figsize=(9, 6.5))
    fig.subplots_adjust(left=0.09, right=0.9, top=0.94, bottom=0.08, hspace=0.08)
    FigureCanvasAgg(fig)
    ax_fit, ax_cache = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    gens = [r["generation"] for r in records]
    for key, style in (("best", "-"), ("mean", "-"), ("median", "--")):
        ax_fit.plot(gens, [r[key] for r in records], style, label=f"{key} member", linewidth=1.2)
    val = [(r["generation"], r["validation"]) for r in records if r.get("validation") is not None]
    if val:
        ax_fit.plot(*zip(*val, strict=True), "o-", color="black", label="validation (mean)", markersize=4)
    ax_fit.set_ylabel("fitness (score / full-cache score)")
    ax_fit.grid(alpha=0.3)
    ax_fit.legend(loc="lower right", fontsize=8)
    ax_cache.plot(gens, [r["cache_fraction"] for r in records], color="tab:green", label="mean kept cache fraction")
    ax_cache.set_ylabel("kept cache fraction")
    ax_cache.set_xlabel("generation")
    ax_cache.grid(alpha=0.3)
    ax_sigma = ax_cache.twinx()
    ax_sigma.plot(gens, [r["sigma"] for r in records], color="tab:purple", linewidth=1, label="sigma")
    ax_sigma.set_ylabel("sigma")
    lines = ax_cache.get_lines() + ax_sigma.get_lines()
    ax_cache.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    for i, cur in enumerate(records):
        if i == 0 or cur["stage"] != records[i - 1]["stage"]:
            if i > 0:
                for ax in (ax_fit, ax_cache):
                    ax.axvline(cur["generation"] - 0.5, color="gray", linestyle=":", linewidth=1)
            ax_fit.annotate(
                f" {cur['stage']}", (cur["generation"] - 0.5, 0.98), xycoords=("data", "axes fraction"), va="top"
            )
    if records:
        ax_fit.set_title(f"{Path(run_dir).name}: {len(records)} generations")
    atomic_save_figure(fig, out, dpi=100)
    return out
