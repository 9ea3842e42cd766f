"""Fit a budgeted NAMM's linear head to an oracle's keep labels: the warm start that CMA-ES then refines.

With the BAM's qkv/out weights at zero the NAMM scores a token by a linear function of its features, and in
budgeted mode only the ranking within a head matters. This script runs the recipe's NAMM keeping everything
(budget 1.0) on training samples of the recipe's synthetic tasks (the training pool: the recipe's seed),
records every memory step's features, labels the needle tokens (the oracle: what the task's answer needs),
and fits the head by class-balanced logistic regression (torch's L-BFGS). It reports, on other training
samples, the needle recall at the recipe's budget (the share of needle tokens a head would keep, averaged
over memory steps, layers and heads) of the fit, of the L2 start (-1 on the key norm) and of single features,
and writes ``warm_start.json`` (``head_weight``, the feature names, the fit's figures) for the recipe's
``search.start``. ``--by-layer`` also fits one head per layer and one per (layer, KV head), to measure what a
richer scorer could add.

The features are those of a keep-all run, not of the member's own evicted cache (a replay approximation, see
docs/evolution.md): a start, not a selection.

Usage: ``python benchmarks/fit_warm_start.py --recipe src/namm/recipes/smollm2-budget-v2.yaml --samples 4
--out runs/warm-start``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import namm.memory.policy as namm_policy
from namm.atomic import atomic_write_json
from namm.engine import generate
from namm.evolution.lm import LMEvaluator
from namm.evolution.recipe import TaskSpec, load_recipe

NEGATIVE_SHARE = 0.05  # haystack tokens kept for the fit (all needle tokens are)


def feature_names(config) -> list[str]:
    names = [f"recency{i}" for i in range(config.recency_dim)] + [f"spec{i}" for i in range(config.n_spec)]
    names += ["key_norm"] * config.key_norm_feature + ["query_entropy"] * config.query_entropy_feature
    names += ["key_novelty"] * config.key_novelty_feature
    return names + ["reconstruction"] * config.reconstruction_feature


Step = tuple[int, int, np.ndarray, np.ndarray]  # layer, head, features (T, F), needle labels (T,)


def record_steps(ev: LMEvaluator, task: str, sample_id: str) -> list[Step]:
    """Keep-all run of one sample -> per (memory step, layer, head): features ``(T, F)`` and needle labels."""
    sample = ev.sample(task, sample_id)
    needle = [(n["token_index"], n["token_end"]) for n in sample.meta["needles"]]
    steps: list[Step] = []
    inner, score = namm_policy.bam_scores, ev.policy.score
    layer = [0]

    def scoring(step):
        layer[0] = step.layer_idx
        return score(step)

    def capture(features, valid, params, config=None, positions=None):
        for h in range(features.shape[1]):
            v = valid[0, h]
            pos = positions[0, h][v].numpy()
            label = np.zeros(pos.shape, bool)
            for lo, hi in needle:
                label |= (pos >= lo) & (pos < hi)
            steps.append((layer[0], h, features[0, h][v].numpy().copy(), label))
        return inner(features, valid, params, config, positions)

    namm_policy.bam_scores, ev.policy.score = capture, scoring
    try:
        generate(ev.model, ev.tokenizer, sample.prompt, ev.policy, max_new_tokens=0, delay=ev.recipe.delay,
                 chunk_size=ev.recipe.chunk_size)
    finally:
        namm_policy.bam_scores = inner
        del ev.policy.score
    return steps


def fit(steps, rng: np.random.Generator, l2: float) -> np.ndarray:
    xs, ys = [], []
    for _, _, x, y in steps:
        keep = y | (rng.random(len(y)) < NEGATIVE_SHARE)
        xs.append(x[keep])
        ys.append(y[keep])
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    w_pos, w_neg = 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    weight = torch.where(yt > 0, w_pos, w_neg).double()
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ theta[:-1] + theta[-1]
        loss = (weight * torch.nn.functional.softplus(-(2 * yt - 1) * z)).sum() + l2 * (theta[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()[:-1].numpy()


def recall(steps, w: np.ndarray, budget: float) -> float:
    """Mean over steps with a needle token of the share of needle tokens among the head's top ``budget``."""
    shares = []
    for _, _, x, y in steps:
        if not y.any():
            continue
        k = int(np.ceil(len(y) * budget))
        top = np.argsort(-(x @ w), kind="stable")[:k]
        shares.append(y[top].sum() / y.sum())
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--samples", type=int, default=4, help="fit samples per task (as many again to measure)")
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--by-layer", action="store_true", help="also fit one head per layer and per (layer, head)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = LMEvaluator(recipe, out)
    ev.policy.budget = 1.0  # keep every token: the features of a full cache
    budget = float(recipe.policy["budget"])
    tasks = list(dict.fromkeys(t.key for t in recipe.stages[0].tasks))
    names = feature_names(ev.policy.config)
    t0 = time.perf_counter()
    train, test = [], []
    for task in tasks:
        if TaskSpec.from_key(task).name == "passkey" or "niah" in task:
            for i in range(2 * args.samples):
                (train if i < args.samples else test).extend(record_steps(ev, task, f"t{i}"))
    w = fit(train, np.random.default_rng(0), args.l2)
    w = w / np.abs(w).max()
    l2_start = np.zeros(len(names))
    l2_start[names.index("key_norm")] = -1.0
    report = {"fit": recall(test, w, budget), "l2 start (-key_norm)": recall(test, l2_start, budget)}
    for name in ("key_norm", "key_novelty", "query_entropy", "spec0", "reconstruction"):
        if name in names:
            for sign in (1.0, -1.0):
                e = np.zeros(len(names))
                e[names.index(name)] = sign
                report[f"{'+' if sign > 0 else '-'}{name}"] = recall(test, e, budget)
    report["random (expected)"] = budget
    if args.by_layer:  # how much a head per layer, or per (layer, head), would add (on the same split)
        layers = sorted({s[0] for s in train})
        heads = sorted({s[1] for s in train})
        rng = np.random.default_rng(1)

        def part(steps, lay, head=None):
            return [s for s in steps if s[0] == lay and (head is None or s[1] == head)]

        per_layer = [recall(part(test, lay), fit(part(train, lay), rng, 10 * args.l2), budget) for lay in layers]
        per_head = [recall(part(test, lay, h), fit(part(train, lay, h), rng, 10 * args.l2), budget)
                    for lay in layers for h in heads]
        report["a head fitted per layer (mean over layers)"] = float(np.mean(per_layer))
        report["a head fitted per (layer, KV head) (mean)"] = float(np.mean(per_head))
    result = {"recipe": args.recipe, "budget": budget, "tasks": tasks, "samples_per_task": args.samples,
              "features": names, "head_weight": [round(float(v), 4) for v in w],
              "needle_recall_at_budget": report, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "warm_start.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
