"""How well replay evaluation (namm.evolution.replay) agrees with exact evaluation, and what each costs.

Members: the recipe's start (the shipped reconstruction rule) and ``--members - 1`` random points around it in the
recipe's search subspace (``--sigma``, seeded), scored on the same training samples (the recipe's seed, ``--samples``
per task of its first stage) by the exact evaluator (every member's whole prompt, probe included) and by replay
(one keep-all recording per sample, ``--recompute`` tokens recomputed). Prints and writes (``--out``, JSON) the
per-(member, sample) scores, their Pearson and Spearman correlations, the mean absolute difference, the agreement
on which member of a pair is better (what CMA-ES's ranking needs) and both times.

Usage: ``python benchmarks/replay_fidelity.py --recipe src/namm/recipes/smollm2-replay.yaml --samples 2
--out runs/replay-fidelity/fidelity.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from namm.atomic import atomic_write_json
from namm.evolution.lm import LMEvaluator
from namm.evolution.recipe import load_recipe
from namm.evolution.replay import ReplayEvaluator
from namm.models import load_model


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (scores capped at 1 tie often)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2.0)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def pair_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of member pairs (per sample, ties in either excluded) that ``a`` and ``b`` order the same way."""
    same = total = 0
    for j in range(a.shape[1]):
        da = np.sign(a[:, j, None] - a[None, :, j])
        db = np.sign(b[:, j, None] - b[None, :, j])
        apart = (np.abs(a[:, j, None] - a[None, :, j]) > 0.02) & (np.abs(b[:, j, None] - b[None, :, j]) > 0.02)
        mask = np.triu(apart, 1)
        same += int((da == db)[mask].sum())
        total += int(mask.sum())
    return same / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--samples", type=int, default=2, help="training samples per task")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--recompute", type=int, default=None, help="default: the recipe's replay_recompute")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    if args.recompute is not None:
        recipe = dataclasses.replace(recipe, replay_recompute=args.recompute)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(recipe.model, dtype=recipe.dtype)
    for sub in ("exact", "replay"):
        (out.parent / sub).mkdir(exist_ok=True)
    exact = LMEvaluator(recipe, out.parent / "exact", model, tok)
    replayed = ReplayEvaluator(recipe, out.parent / "replay", model, tok)
    rng = np.random.default_rng(0)
    start = exact.initial_params()
    members = np.vstack([start, start + args.sigma * rng.standard_normal((args.members - 1, start.size))])
    rows = []
    seconds = {"exact": 0.0, "replay": 0.0, "recording": 0.0}
    scores = {"exact": [], "replay": []}
    for spec in recipe.stages[0].tasks:
        ids = exact.sample_pool(spec.key, "train")[: args.samples]
        for name, ev in (("exact", exact), ("replay", replayed)):
            t0 = time.perf_counter()
            result = ev.evaluate(members, spec.key, ids)
            seconds[name] += time.perf_counter() - t0
            scores[name].append(result.scores)
        rows.append({"task": spec.key, "samples": ids, "exact": scores["exact"][-1].tolist(),
                     "replay": scores["replay"][-1].tolist()})
        print(spec.key, "exact", np.round(scores["exact"][-1].mean(1), 3), "replay",
              np.round(scores["replay"][-1].mean(1), 3), flush=True)
    seconds["recording"] = replayed.record_seconds
    seconds["replay"] -= replayed.record_seconds
    a, b = np.hstack(scores["exact"]), np.hstack(scores["replay"])
    summary = {
        "recipe": args.recipe, "recompute": recipe.replay_recompute, "members": args.members, "sigma": args.sigma,
        "samples_per_task": args.samples,
        "pearson": pearson(a.ravel(), b.ravel()),
        "spearman": pearson(average_ranks(a.ravel()), average_ranks(b.ravel())),
        "pearson_member_means": pearson(a.mean(1), b.mean(1)),
        "mean_abs_diff": float(np.abs(a - b).mean()),
        "pair_agreement": pair_agreement(a, b),
        "exact_mean": a.mean(1).tolist(), "replay_mean": b.mean(1).tolist(),
        "seconds": seconds, "tasks": rows,
    }
    atomic_write_json(out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "tasks"}, indent=1))


if __name__ == "__main__":
    main()
