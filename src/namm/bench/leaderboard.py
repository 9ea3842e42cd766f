"""The leaderboard of a suite run: tables with bootstrap intervals, a paired comparison, a Pareto plot.

Per cell (policy x budget), over the samples it shares with Full:

* **score vs Full**: mean over groups of the cell's mean task score over Full's, with a 95% bootstrap interval
  resampling samples within groups (:func:`namm.stats.relative_score`); groups where Full scores 0 are left out;
* **Δ answer NLL**: mean over groups of the cell's mean per-token NLL of the gold answer minus Full's (nats per
  token; > 0 is worse), same bootstrap: a graded view that separates a near miss from a lost needle;
* **same answer as Full**: mean over groups of the share of samples whose answer (the generation's first line)
  equals Full's word for word, same bootstrap: what the issue calls "answers what the full cache answers",
  informative where Full's own task score is low (real LongBench text on a small model);
* **cache**: mean over groups of the mean KV cache fraction; **time / peak KV x Full**: total seconds (prefill +
  decoding, probes included) and mean peak KV bytes relative to Full on the same samples, in the same run;
* **paired**: each cell against the best baseline at its budget: the difference of relative scores with its
  interval, and per-sample wins / ties / losses.

The page is written as a marked section (``<!-- bench-NAME:start -->`` ... ``end``) of a markdown file, so other
sections (e.g. the kvpress check written by ``benchmarks/kvpress_check.py``) survive a re-render.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from namm.atomic import atomic_save_figure, atomic_write_text
from namm.bench.run import group_keys, records_file
from namm.bench.suite import Cell, Suite
from namm.harness import read_records
from namm.stats import Interval, Paired, group_mean, mean_difference, paired_difference, relative_score
from namm.tasks.metrics import first_line


@dataclass
class Row:
    """One cell's summary. Ratios are against Full on the same samples."""

    cell: Cell
    samples: int
    relative: Interval
    nll: Interval
    same: Interval
    cache: float
    time: float
    peak: float
    probe_share: float
    per_group: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    cell: Cell
    baseline: Cell
    paired: Paired
    samples: int
    same: Interval  # difference of the shares of answers equal to Full's (a minus baseline)


def load_records(suite: Suite, out_dir: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """``records[cell label][group][sample id]`` for every record file of the suite that exists."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for cell in suite.cells:
        for group in group_keys(suite):
            recs = read_records(records_file(out_dir, group, cell.label))
            if recs:
                out.setdefault(cell.label, {})[group] = {r["id"]: r for r in recs}
    return out


def _common(*tables: dict[str, dict] | None) -> list[str]:
    if any(t is None for t in tables):
        return []
    ids = [i for i in tables[0] if all(i in t for t in tables[1:])]
    return ids


def same_answer(record: dict, full: dict) -> float:
    """1.0 if the record's answer equals Full's on the same sample, else 0.0; ``nan`` when either record has no
    prediction. The answer is the generation's first line (LongBench's post-processing for its few-shot tasks,
    :func:`~namm.tasks.metrics.first_line`), surrounding whitespace ignored: what a model writes after its answer
    (a base model's rambling) is left out."""
    a, b = record.get("prediction"), full.get("prediction")
    if a is None or b is None:
        return float("nan")
    return float(first_line(a).strip() == first_line(b).strip())


def _same_columns(groups: list[tuple[list[list[dict]], list[dict]]]) -> list[np.ndarray]:
    """Per group an ``(n, K)`` array of :func:`same_answer` for each of ``K`` record lists against Full's,
    samples where some record has no prediction left out."""
    out = []
    for cells, ref in groups:
        rows = np.array([[same_answer(r, f) for r in recs] for *recs, f in zip(*cells, ref, strict=True)])
        rows = rows[~np.isnan(rows).any(axis=1)] if rows.size else rows
        if len(rows):
            out.append(rows)
    return out


def summarise(suite: Suite, records: dict) -> tuple[list[Row], list[Comparison]]:
    """Rows for every cell with records, and the paired comparisons against the best baseline per budget."""
    boot = suite.bootstrap
    full = records.get("full", {})
    rows = []
    for cell in suite.cells:
        mine = records.get(cell.label, {})
        pairs, nlls, sames, caches, secs, full_secs, peaks, probes, per_group = [], [], [], [], [], [], [], [], {}
        n = 0
        for group, ref in full.items():
            ids = _common(mine.get(group), ref)
            if not ids:
                continue
            a, f = [mine[group][i] for i in ids], [ref[i] for i in ids]
            n += len(ids)
            pairs.append(np.array([[x["score"], y["score"]] for x, y in zip(a, f, strict=True)]))
            nlls.append(np.array([[x["answer_nll"], y["answer_nll"]] for x, y in zip(a, f, strict=True)]))
            sames.append(([a], f))
            caches.append(statistics.fmean(x["cache_fraction"] for x in a))
            secs.append(sum(x["seconds"] for x in a))
            full_secs.append(sum(y["seconds"] for y in f))
            probes.append(sum(x.get("probe_seconds", 0.0) for x in a))
            peaks.extend(x["peak_kv_bytes"] / max(y["peak_kv_bytes"], 1) for x, y in zip(a, f, strict=True))
            full_mean = pairs[-1][:, 1].mean()
            per_group[group] = pairs[-1][:, 0].mean() / full_mean if full_mean > 0 else float("nan")
        if not n:
            continue
        rows.append(Row(
            cell=cell, samples=n, relative=relative_score(pairs, **boot), nll=mean_difference(nlls, **boot),
            same=group_mean(_same_columns(sames), **boot),
            cache=statistics.fmean(caches), time=sum(secs) / max(sum(full_secs), 1e-9),
            peak=statistics.fmean(peaks), probe_share=sum(probes) / max(sum(secs), 1e-9), per_group=per_group,
        ))
    return rows, _comparisons(suite, records, rows)


def _comparisons(suite: Suite, records: dict, rows: list[Row]) -> list[Comparison]:
    by_budget: dict[str, list[Row]] = {}
    for row in rows:
        if row.cell.policy == "full":
            continue
        key = "= namm, per step" if row.cell.policy == "namm" and row.cell.budget is None else row.cell.budget_text
        by_budget.setdefault(key, []).append(row)
    out = []
    for group_rows in by_budget.values():
        baselines = [r for r in group_rows if r.cell.policy in suite.baselines and not math.isnan(r.relative.estimate)]
        if not baselines:
            continue
        best = max(baselines, key=lambda r: r.relative.estimate)
        out += [_paired(suite, records, row.cell, best.cell) for row in group_rows if row is not best]
    return out


def _paired(suite: Suite, records: dict, cell: Cell, baseline: Cell) -> Comparison:
    """``cell`` against ``baseline`` on the samples both (and Full) have, relative to Full."""
    triples, sames, n = [], [], 0
    for group, ref in records.get("full", {}).items():
        a, b = records[cell.label].get(group), records[baseline.label].get(group)
        ids = _common(a, b, ref)
        n += len(ids)
        if ids:
            triples.append(np.array([[a[i]["score"], b[i]["score"], ref[i]["score"]] for i in ids]))
            sames.append(([[a[i] for i in ids], [b[i] for i in ids]], [ref[i] for i in ids]))
    return Comparison(cell, baseline, paired_difference(triples, **suite.bootstrap), n,
                      mean_difference(_same_columns(sames), **suite.bootstrap))


def learned_comparisons(suite: Suite, records: dict, rows: list[Row]) -> list[Comparison]:
    """Every NAMM cell against every other non-Full cell at the same budget, paired; two NAMM cells (e.g. an evolved
    memory and the one it started from) once, the one listed first in the suite first."""
    out = []
    namms = [r for r in rows if r.cell.policy == "namm"]
    for i, mine in enumerate(namms):
        for other in rows:
            if other.cell.policy == "full" or other.cell.budget_text != mine.cell.budget_text:
                continue
            if other.cell.policy == "namm" and namms.index(other) <= i:
                continue
            out.append(_paired(suite, records, mine.cell, other.cell))
    return out


def _paired_line(c: Comparison, name: str) -> str:
    """A row of a paired table: ``name``, budget, the other cell, the difference (bold when its interval excludes
    0), wins / ties / losses, the difference of the shares of answers equal to Full's (bold the same way) and
    samples."""
    return (f"| {name} | {c.cell.budget_text} | {c.baseline.label} | {_bold(c.paired.difference)} | "
            f"{c.paired.wins} | {c.paired.ties} | {c.paired.losses} | {_bold(c.same)} | "
            f"{c.samples} |")


def _bold(iv: Interval) -> str:
    """A signed interval, bold when it excludes 0."""
    bold = "**" if iv.excludes(0.0) else ""
    return f"{bold}{_interval(iv, signed=True)}{bold}"


def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _interval(iv: Interval, signed: bool = False) -> str:
    if math.isnan(iv.estimate):
        return "n/a"
    spec = "+.2f" if signed else ".2f"
    if math.isnan(iv.low):
        return format(iv.estimate, spec)
    return f"{iv.estimate:{spec}} [{iv.low:{spec}}, {iv.high:{spec}}]"


def plot_pareto(rows: Sequence[Row], path: Path, title: str) -> None:
    """Relative score (left) and Δ answer NLL (right) against mean cache fraction, one line per policy."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_policy: dict[str, list[Row]] = {}
    for row in rows:
        by_policy.setdefault(row.cell.name, []).append(row)
    for ax, what, label in ((axes[0], "relative", "score / Full (95% CI)"),
                            (axes[1], "nll", "Δ answer NLL vs Full, nats/token (95% CI)")):
        for policy, prs in by_policy.items():
            prs = sorted((r for r in prs if not math.isnan(getattr(r, what).estimate)), key=lambda r: r.cache)
            if not prs:
                continue
            ivs = [getattr(r, what) for r in prs]
            est = np.array([iv.estimate for iv in ivs])
            low = np.array([iv.low if not math.isnan(iv.low) else iv.estimate for iv in ivs])
            high = np.array([iv.high if not math.isnan(iv.high) else iv.estimate for iv in ivs])
            kind = prs[0].cell.policy
            fmt = "*" if kind == "full" else ("*-" if kind == "namm" else "o-")
            ax.errorbar([r.cache for r in prs], est, yerr=[est - low, high - est], fmt=fmt, capsize=3,
                        label=policy, markersize=9 if fmt == "*" else 5)
        ax.set_xlabel("mean KV cache / full cache")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "Full scores 0 everywhere: no ratio", ha="center", transform=axes[0].transAxes)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_section(path: Path, name: str, lines: list[str], title: str = "# Leaderboard") -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` of ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, *lines, end])
    text = path.read_text() if path.exists() else f"{title}\n\n"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _reuse_note(records: dict) -> list[str]:
    """A paragraph naming the runs whose records were copied in (``namm bench --reuse``), if any."""
    sources: dict[str, int] = {}
    total = 0
    for groups in records.values():
        for recs in groups.values():
            for r in recs.values():
                total += 1
                if "reused_from" in r:
                    sources[r["reused_from"]] = sources.get(r["reused_from"], 0) + 1
    if not sources:
        return []
    named = ", ".join(f"`{s}` ({n})" for s, n in sorted(sources.items()))
    return [f"{sum(sources.values())} of the {total} records were copied from other runs with exactly this "
            f"setting (`--reuse`): {named}. Their times were measured in those runs, so the time column mixes "
            "runs for those cells.", ""]


def render(suite: Suite, out_dir: Path, page: Path | None = None, command: str | None = None) -> Path:
    """Write the suite's leaderboard section into ``page`` (default ``OUT/leaderboard.md``) and its plot."""
    page = page or out_dir / "leaderboard.md"
    records = load_records(suite, out_dir)
    rows, comparisons = summarise(suite, records)
    image = page.parent / page.stem / f"{suite.name}-pareto.png"
    groups = group_keys(suite)
    expected = {g: 0 for g in groups}
    for group, recs in records.get("full", {}).items():
        expected[group] = len(recs)
    model = next((r.get("setting", {}).get("model") for g in records.get("full", {}).values() for r in g.values()),
                 suite.model)
    level = int(round(suite.bootstrap["level"] * 100))
    lines = [f"## Suite `{suite.name}`: {model}, {suite.mode} mode", ""]
    if suite.description:
        lines += [suite.description, ""]
    lines += [
        f"`{command or f'namm bench --suite {suite.name} --out {out_dir}'}`", "",
        f"Memory step every {suite.delay} tokens (prefill chunks of {suite.chunk_size}, Full included); "
        f"{len(groups)} groups (task x length x seed), {sum(expected.values())} samples with a Full record; "
        f"{level}% bootstrap intervals from {suite.bootstrap['resamples']} resamples of samples within groups "
        f"(seed {suite.bootstrap['seed']}). Score vs Full: mean over groups of the policy's mean score over Full's "
        "(groups where Full scores 0 left out). Δ NLL: the gold answer's teacher-forced negative log-likelihood "
        "per token minus Full's (nats; > 0 is worse). Same answer as Full: the share of samples whose answer (the "
        "generation's first line) is Full's, word for word (mean over groups). Time and peak KV are ratios to Full "
        "in the same run.", "",
        *_reuse_note(records),
        f"| policy | budget | score vs Full ({level}% CI) | Δ answer NLL ({level}% CI) | same answer as Full "
        f"({level}% CI) | mean cache | time x Full | probe share | peak KV x Full | samples |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.cell.name} | {r.cell.budget_text} | {_interval(r.relative)} | "
                     f"{_interval(r.nll, signed=True)} | {_interval(r.same)} | {r.cache:.0%} | {r.time:.2f} | "
                     f"{_fmt(r.probe_share, '.0%') if r.probe_share else '-'} | {r.peak:.2f} | {r.samples} |")
    if comparisons:
        lines += ["", f"Paired against the best baseline ({', '.join(suite.baselines)}) at the same budget: the "
                  "difference of scores relative to Full on the same samples (an interval that excludes 0 is a real "
                  "difference at this level), and per-sample wins / ties / losses.", "",
                  f"| policy | budget | best baseline | difference ({level}% CI) | wins | ties | losses "
                  f"| Δ same answer as Full ({level}% CI) | samples |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [_paired_line(c, c.cell.name) for c in comparisons]
    learned = learned_comparisons(suite, records, rows)
    if learned:
        lines += ["", "The learned memory against every other policy at the same budget, paired the same way.", "",
                  f"| policy | budget | against | difference ({level}% CI) | wins | ties | losses "
                  f"| Δ same answer as Full ({level}% CI) | samples |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [_paired_line(c, c.cell.label) for c in learned]
    lines += ["", "Per group: Full's mean score (x100), the others' relative to it.", "",
              "| policy | budget | " + " | ".join(groups) + " |", "|---" * (len(groups) + 2) + "|"]
    full_rows = records.get("full", {})
    for r in rows:
        if r.cell.policy == "full":
            cells = [_fmt(100 * statistics.fmean(x["score"] for x in full_rows[g].values()), ".1f")
                     if g in full_rows else "" for g in groups]
        else:
            cells = [_fmt(r.per_group[g]) if g in r.per_group else "" for g in groups]
        lines.append(f"| {r.cell.name} | {r.cell.budget_text} | " + " | ".join(cells) + " |")
    if rows:
        plot_pareto(rows, image, f"{suite.name}: {model}, {suite.mode} mode")
        lines += ["", f"![{suite.name} Pareto plot]({image.relative_to(page.parent).as_posix()})"]
    write_section(page, f"bench-{suite.name}", lines)
    return page
